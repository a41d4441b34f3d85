"""The metrics' pure parts: what a registry exposes before and after a few observations,
the reconcile result labels, the count of Events kopf gave up posting, and the dashboard
test's reader of PromQL. What a running operator exports is in
tests/integration/test_metrics.py."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from juturna_operator import __version__, api
from juturna_operator.domain import PipelineKey
from juturna_operator.metrics import EVENT_POST_FAILED, Metrics, reconcile_result
from support import Samples, promql_metric_names, sample, samples_of

KEY = PipelineKey("ns", "tones", "0123456789")


def samples(metrics: Metrics) -> Samples:
    """Every sample of the registry: (name, labels) -> value."""
    return samples_of(generate_latest(metrics.registry).decode())


def value(metrics: Metrics, metric: str, /, **labels: str) -> float | None:
    return sample(generate_latest(metrics.registry).decode(), metric, **labels)


def test_no_created_series_and_the_process_build_and_python_series_are_there() -> None:
    metrics = Metrics()
    metrics.failed(KEY, "InvalidGraph")
    metrics.reconciled(0.01, 30.0, error=False)
    names = {name for name, _ in samples(metrics)}
    assert not [n for n in names if n.endswith("_created")]
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    assert "python_gc_collections_total" in names
    assert value(metrics, "juturna_operator_build_info", version=__version__) == 1.0


def test_reconcile_results_are_controller_runtimes() -> None:
    assert reconcile_result(None, error=True) == "error"
    assert reconcile_result(2.0, error=True) == "error"
    assert reconcile_result(30.0, error=False) == "requeue_after"
    assert reconcile_result(0.0, error=False) == "requeue"
    assert reconcile_result(None, error=False) == "success"


def test_every_result_and_write_is_there_from_the_start_at_zero() -> None:
    metrics = Metrics()
    for result in ("error", "requeue_after", "requeue", "success"):
        total = value(
            metrics, "controller_runtime_reconcile_total", controller="pipeline", result=result
        )
        assert total == 0.0, result
    assert value(metrics, "controller_runtime_reconcile_errors_total", controller="pipeline") == 0
    for kind in ("status", "finalizer", "event"):
        assert value(metrics, "juturna_operator_write_failures_total", kind=kind) == 0.0
    metrics.reconciled(0.2, 2.0, error=True)
    metrics.write_failed("status")
    assert value(metrics, "controller_runtime_reconcile_errors_total", controller="pipeline") == 1
    errors = value(
        metrics, "controller_runtime_reconcile_total", controller="pipeline", result="error"
    )
    assert errors == 1.0
    assert value(metrics, "juturna_operator_write_failures_total", kind="status") == 1.0
    assert (
        value(metrics, "controller_runtime_reconcile_time_seconds_count", controller="pipeline")
        == 1
    )


def test_every_phase_is_there_with_zero_and_no_transition_comes_from_none() -> None:
    metrics = Metrics()
    metrics.observed(KEY, "Creating", 0, ready=False)
    metrics.observed(KEY, "Running", 0, ready=True)
    phases = {p: value(metrics, "juturna_pipelines", namespace="ns", phase=p) for p in api.Phase}
    assert phases == {p: 1.0 if p == "Running" else 0.0 for p in api.Phase}
    transitions = {
        dict(labels)["from_phase"]: v
        for (name, labels), v in samples(metrics).items()
        if name == "juturna_pipeline_phase_transitions_total"
    }
    assert transitions == {"Pending": 1.0, "Creating": 1.0}  # Pending -> Creating -> Running
    metrics.forget(KEY)
    assert not [k for k in samples(metrics) if k[0] == "juturna_pipelines"]  # none left in ns


def test_a_pipeline_adopted_in_its_phase_counts_no_transition() -> None:
    """After a restart the operator first sees a Running Pipeline as Running: no change."""
    metrics = Metrics()
    metrics.observed(KEY, "Running", 0, ready=True, before="Running")
    metrics.observed(PipelineKey("ns", "other", "abcdef0123"), "Failed", 0, False, before="Running")
    transitions = {
        (dict(labels)["from_phase"], dict(labels)["to_phase"]): v
        for (name, labels), v in samples(metrics).items()
        if name == "juturna_pipeline_phase_transitions_total"
    }
    assert transitions == {("Running", "Failed"): 1.0}


@pytest.fixture
def kopf_posting() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """kopf's posting logger, printing to a buffer, at WARNING as an operator runs it."""
    logger = logging.getLogger("kopf._core.engines.posting")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    yield logger, out
    logger.removeHandler(handler)


def test_each_event_kopf_gives_up_on_is_counted_and_still_logged(
    kopf_posting: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = kopf_posting
    metrics = Metrics()
    logger.addFilter(metrics.event_failures)
    try:
        # kopf's own words (kopf/_cogs/clients/events.py)
        logger.warning(
            f"{EVENT_POST_FAILED}. Ignoring and continuing. Code: 422. Message: denied. "
            "Details: None Event: type='Normal', reason='Created', message='x'."
        )
        logger.warning("Request attempt #1/9 failed; will retry: POST /api/v1/events")
    finally:
        logger.removeFilter(metrics.event_failures)
    assert value(metrics, "juturna_operator_write_failures_total", kind="event") == 1.0
    assert out.getvalue().count("\n") == 2  # both lines still printed


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.99, sum by (le) (rate(workqueue_work_duration_seconds_bucket"
            '{job=~"$job", name="pipeline"}[$__rate_interval])))',
            {"workqueue_work_duration_seconds_bucket"},
        ),
        (
            'sum by (reason) (rate(juturna_pipeline_failures_total{reason=~"a|b"}[5m])) / on(ns) '
            "group_left(x) count(juturna_pipelines) > bool 1e3",
            {"juturna_pipeline_failures_total", "juturna_pipelines"},
        ),
        (
            "topk(10, process_open_fds) or process_max_fds offset 5m and sum(up) without (pod)",
            {"process_open_fds", "process_max_fds", "up"},
        ),
        ('count_values("version", juturna_operator_build_info)', {"juturna_operator_build_info"}),
        ('label_values(juturna_pipelines{job=~"$job"}, namespace)', {"juturna_pipelines"}),
        ("label_values(job)", set()),
    ],
)
def test_promql_metric_names_finds_the_metrics_and_nothing_else(expr: str, names: set[str]) -> None:
    """The dashboard test's reader of queries (tests/integration/test_metrics.py)."""
    assert promql_metric_names(expr) == names
