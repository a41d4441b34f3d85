"""What ``/metrics`` shows after real reconciles on the real control plane, where Events say
they come from, what a refused status or Event write counts, and the Grafana dashboard in
docs/ read against a real scrape (every metric its queries name is one the operator
exports)."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from processes import processes_mentioning

from juturna_operator import __version__, api
from juturna_operator.settings import Settings
from support import (
    REPO,
    Kubectl,
    Operator,
    Pipelines,
    assert_sole_operator,
    manifest,
    promql_metric_names,
    sample,
    samples_of,
    scrape,
    wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.own_operator, pytest.mark.usefixtures("crd")]

DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
CONTROLLER = {"controller": "pipeline"}
QUEUE = {"name": "pipeline", "controller": "pipeline"}


@pytest.fixture
def own_operator(
    request: pytest.FixtureRequest,
    kubeconfig: Path,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
) -> Iterator[Operator]:
    """An operator of this test's own, not started: the test starts it. Engine inprocess,
    or the one a test's ``@pytest.mark.parametrize("own_operator", [...], indirect=True)``
    names. Teardown deletes the test's Pipelines while it runs (their finalizer needs it),
    then stops it: nothing is left for the next test's operator to take up."""
    assert_sole_operator(kubeconfig)
    engine = getattr(request, "param", "inprocess")
    op = Operator(kubeconfig, tmp_path / "work", tmp_path / "operator.log", tmp_path, engine)
    try:
        yield op
        pipelines = Pipelines(objects, namespace, kubectl)
        left = pipelines.names()
        for name in left:
            pipelines.delete(name)
        for name in left:
            pipelines.wait_gone(name, timeout=30)
    finally:
        op.stop()
        # The process engine's workers outlive their operator by design (adoption); a test
        # that failed before its Pipelines were deleted leaves them: they end here, by PID.
        left_running = processes_mentioning(f"--folder {op.workdir} ")
        for pid in left_running:
            os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: not processes_mentioning(f"--folder {op.workdir} "), 10, "no worker left running"
    )


def with_cycle(name: str) -> dict[str, Any]:
    """The example Pipeline with a cycle: InvalidGraph, a Warning Event and a Failed status."""
    body = manifest(name)
    body["spec"]["links"].append({"from": "out", "to": "amp"})
    return body


def dashboard_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of a dashboard."""
    panels = list(board["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield (
                f"variable {variable['name']!r}",
                query["query"] if isinstance(query, dict) else query,
            )


def test_metrics_events_and_the_dashboard_after_real_reconciles(
    own_operator: Operator,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    pipelines = Pipelines(objects, namespace, kubectl)
    own_operator.start()
    pipelines.apply(manifest("m1"))
    pipelines.wait_ready("m1")
    pipelines.apply(with_cycle("m2"))
    pipelines.wait_phase("m2", "Failed")
    wait_until(
        lambda: (
            sample(
                scrape(own_operator),
                "juturna_pipeline_failures_total",
                namespace=namespace,
                reason="InvalidGraph",
            )
            == 1.0
        ),
        timeout=10,
        what="the failure counted",
    )
    text = scrape(own_operator)
    found = samples_of(text)
    names = {name for name, _ in found}

    def value(metric: str, /, **labels: str) -> float | None:
        return found.get((metric, frozenset(labels.items())))

    # prometheus_client's process and Python collectors, the version, and no _created.
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert name in names, name
    assert "python_gc_collections_total" in names
    assert value("juturna_operator_build_info", version=__version__) == 1.0
    assert not [n for n in names if n.endswith("_created")], "_created series are exported"
    # controller-runtime's reconcile metrics, after real passes.
    assert (
        value("controller_runtime_reconcile_total", **CONTROLLER, result="requeue_after") or 0
    ) >= 2
    assert value("controller_runtime_reconcile_total", **CONTROLLER, result="error") == 0.0
    assert value("controller_runtime_reconcile_errors_total", **CONTROLLER) == 0.0
    assert (value("controller_runtime_reconcile_time_seconds_count", **CONTROLLER) or 0) >= 2
    workers = Settings().reconcile_workers  # the default: the test sets none
    assert value("controller_runtime_max_concurrent_reconciles", **CONTROLLER) == workers
    assert value("controller_runtime_active_workers", **CONTROLLER) is not None
    # client-go's workqueue metrics, with the name and controller labels.
    adds = value("workqueue_adds_total", **QUEUE) or 0
    assert adds >= 2
    assert (value("workqueue_queue_duration_seconds_count", **QUEUE) or 0) >= 2
    assert (value("workqueue_work_duration_seconds_count", **QUEUE) or 0) >= 2
    assert (value("workqueue_retries_total", **QUEUE) or 0) >= 1  # the passes' next looks
    for gauge in ("depth", "unfinished_work_seconds", "longest_running_processor_seconds"):
        assert value(f"workqueue_{gauge}", **QUEUE) is not None, gauge
    # Every phase of the namespace, 0 included; transitions from Pending, never from "None".
    phases = {p: value("juturna_pipelines", namespace=namespace, phase=p) for p in api.Phase}
    assert phases == {
        p: 1.0 if p in (api.Phase.Running, api.Phase.Failed) else 0.0 for p in api.Phase
    }
    froms = {
        dict(labels)["from_phase"]
        for (name, labels) in found
        if name == "juturna_pipeline_phase_transitions_total"
    }
    assert "None" not in froms
    assert "Pending" in froms
    # Instances by engine, and no failed write.
    assert value("juturna_operator_instances", engine="inprocess") == 1.0
    for kind in ("status", "finalizer", "event"):
        assert value("juturna_operator_write_failures_total", kind=kind) == 0.0, kind

    # Events come from juturna-operator, not kopf.
    events = json.loads(kubectl("-n", namespace, "get", "events", "-o", "json").stdout)["items"]
    ours = [e for e in events if e["involvedObject"].get("name") in ("m1", "m2")]
    assert {e["reason"] for e in ours} >= {"Started", "InvalidGraph"}, ours
    for event in ours:
        assert event["reportingComponent"] == "juturna-operator", event
        assert event["source"]["component"] == "juturna-operator", event
        assert event["reportingInstance"] == socket.gethostname(), event
        assert event["metadata"]["name"].startswith("juturna-operator-"), event

    # The dashboard: every query names metrics, and each one is in this scrape.
    board = json.loads(DASHBOARD.read_text())
    queries = list(dashboard_queries(board))
    assert len(queries) >= 20
    unknown = {}
    for where, expr in queries:
        used = promql_metric_names(expr)
        assert used, f"{where} names no metric: {expr}"
        if used - names:
            unknown[where] = sorted(used - names)
    assert not unknown, f"the dashboard queries metrics the operator does not export: {unknown}"


@pytest.mark.parametrize("own_operator", ["process"], indirect=True)
def test_a_restarted_operator_counts_the_instances_it_adopts_and_no_transition(
    own_operator: Operator,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    """The process engine's workers outlive the operator: the next one adopts the instance.
    It counts it among the engine's instances, and the Pipeline, Running before and after,
    made no phase change in the new process."""
    pipelines = Pipelines(objects, namespace, kubectl)
    own_operator.start()
    pipelines.apply(manifest("kept"))
    before = pipelines.wait_ready("kept")["status"]["pipelineId"]
    own_operator.kill()
    own_operator.start()
    wait_until(
        lambda: (
            sample(scrape(own_operator), "juturna_pipelines", namespace=namespace, phase="Running")
            == 1.0
        ),
        timeout=30,
        what="the adopted Pipeline counted Running",
        last=lambda: scrape(own_operator),
    )
    text = scrape(own_operator)
    assert pipelines.get("kept")["status"]["pipelineId"] == before  # adopted, not redeployed
    assert sample(text, "juturna_operator_instances", engine="process") == 1.0
    transitions = [
        (dict(labels), v)
        for (name, labels), v in samples_of(text).items()
        if name == "juturna_pipeline_phase_transitions_total"
    ]
    assert transitions == [], transitions
    pipelines.delete("kept")
    pipelines.wait_gone("kept")
    wait_until(
        lambda: sample(scrape(own_operator), "juturna_operator_instances", engine="process") == 0,
        timeout=10,
        what="the deleted instance uncounted",
    )


def admission_policy(name: str, namespace: str, rules: list[dict[str, Any]], why: str) -> str:
    """A ValidatingAdmissionPolicy that refuses every request matching ``rules`` in
    ``namespace``, and its binding: the API server's own admission, refusing as it would
    for a policy a cluster administrator set."""
    return yaml.safe_dump_all(
        [
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": {"name": name},
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {"resourceRules": rules},
                    "validations": [{"expression": "false", "message": why}],
                },
            },
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": name},
                "spec": {
                    "policyName": name,
                    "validationActions": ["Deny"],
                    "matchResources": {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": namespace}
                        }
                    },
                },
            },
        ]
    )


def test_refused_status_and_event_writes_are_counted_and_said(
    own_operator: Operator,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    """A cluster's admission policy refuses the operator's status patches and Events in one
    namespace: each refusal is counted (status, event), the passes are reconcile errors,
    the log says what was refused and why; once the policy goes, the status is written."""
    pipelines = Pipelines(objects, namespace, kubectl)
    closed = f"status-closed-{namespace}"
    silent = f"events-closed-{namespace}"
    policies = (
        admission_policy(
            closed,
            namespace,
            [
                {
                    "apiGroups": [api.GROUP],
                    "apiVersions": ["*"],
                    "operations": ["UPDATE"],
                    "resources": [f"{api.PLURAL}/status"],
                }
            ],
            "no status writes here (test)",
        )
        + "---\n"
        + admission_policy(
            silent,
            namespace,
            [
                {
                    "apiGroups": ["", "events.k8s.io"],
                    "apiVersions": ["*"],
                    "operations": ["CREATE"],
                    "resources": ["events"],
                }
            ],
            "no Events here (test)",
        )
    )
    kubectl("apply", "-f", "-", input=policies)
    try:
        pipelines.apply(with_cycle("refused"))
        # The API server enforces a policy once it has loaded it: wait until it refuses both.
        wait_until(
            lambda: (
                "no status writes here"
                in kubectl(
                    "-n",
                    namespace,
                    "patch",
                    f"{api.PLURAL}.{api.GROUP}",
                    "refused",
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    '{"status": {"phase": "Pending"}}',
                    check=False,
                ).stderr
            ),
            timeout=30,
            what="the status policy enforced",
        )
        wait_until(
            lambda: (
                "no Events here"
                in kubectl(
                    "-n",
                    namespace,
                    "create",
                    "-f",
                    "-",
                    input=json.dumps(
                        {
                            "apiVersion": "v1",
                            "kind": "Event",
                            "metadata": {"generateName": "probe-"},
                            "involvedObject": {
                                "kind": "Namespace",
                                "name": namespace,
                                "namespace": namespace,  # an Event's own, or it is invalid
                            },
                            "reason": "Probe",
                            "message": "probe",
                        }
                    ),
                    check=False,
                ).stderr
            ),
            timeout=30,
            what="the Events policy enforced",
        )
        own_operator.start()

        def counted() -> dict[str, float | None]:
            text = scrape(own_operator)
            return {
                "status": sample(text, "juturna_operator_write_failures_total", kind="status"),
                "event": sample(text, "juturna_operator_write_failures_total", kind="event"),
                "errors": sample(text, "controller_runtime_reconcile_errors_total", **CONTROLLER),
                "error passes": sample(
                    text, "controller_runtime_reconcile_total", **CONTROLLER, result="error"
                ),
            }

        wait_until(
            lambda: all((v or 0) >= 1 for v in counted().values()),
            timeout=30,
            what="the refused writes and failed passes counted",
            last=counted,
        )
        log = own_operator.log_text()
        assert "reconcile failed; trying again in 2 s" in log
        assert (
            'status write refused (422 Unprocessable Entity): pipelines.juturna.io "refused" is '
            f"forbidden: ValidatingAdmissionPolicy '{closed}' with binding '{closed}' denied "
            "request: no status writes here (test)"
        ) in log
        assert (
            "Failed to post an event. Ignoring and continuing. Code: 422. Message: events "
            '"juturna-operator-'
        ) in log
        assert (
            f"ValidatingAdmissionPolicy '{silent}' with binding '{silent}' denied request: " in log
        )
        assert "failure" not in (pipelines.get("refused").get("status") or {})  # never written
    finally:
        kinds = "validatingadmissionpolicybinding,validatingadmissionpolicy"
        kubectl("delete", kinds, closed, silent, "--ignore-not-found")
    # The operator keeps trying: once the policy is gone, the user sees the failure in status.
    body = pipelines.wait_phase("refused", "Failed", timeout=30)
    assert body["status"]["failure"]["reason"] == "InvalidGraph"
