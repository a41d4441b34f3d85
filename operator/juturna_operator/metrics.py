"""Prometheus metrics: what the reconciler observed, exposed on ``/metrics``.

* Pipelines: ``juturna_pipeline*``. Per-pipeline series come from a collector that reads the
  live table at scrape time, so a deleted pipeline's series disappear with it; counters and
  the histogram aggregate by namespace (and phase or reason) and never name a single
  pipeline. ``juturna_pipelines`` gives every phase of a namespace that has Pipelines, 0
  included, so a query or an alert on a phase always finds its series.
* The reconcile loop, under controller-runtime's names (``controller_runtime_reconcile_*``,
  ``workqueue_*``, label ``controller``, and ``name`` for the queue), so dashboards made for
  Go operators read it as they read theirs.
* The operator: ``juturna_operator_build_info``, instances by engine, failed API writes, and
  prometheus_client's process and Python collectors (``process_*``, ``python_*``).

No ``*_created`` series: they would double every counter for a value nobody charts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from juturna_operator import __version__, api
from juturna_operator.domain import PipelineKey
from juturna_operator.workqueue import WorkQueue

# controller-runtime's name for a controller is its kind, lowercased; its queue has the same.
CONTROLLER = "pipeline"
# controller-runtime's reconcile results (pkg/internal/controller), in its order.
RESULTS = ("error", "requeue_after", "requeue", "success")
# API writes that can fail without failing a pass: the label of write_failures.
WRITES = ("status", "finalizer", "event")
# controller-runtime's buckets for controller_runtime_reconcile_time_seconds.
RECONCILE_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5),
    *(0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5),
    *(6, 7, 8, 9, 10, 15, 20, 25, 30, 40, 50, 60),
)
# client-go's workqueue buckets: ExponentialBuckets(10e-9, 10, 12), 10 ns to 1000 s.
QUEUE_BUCKETS = tuple(1e-8 * 10**i for i in range(12))
# kopf logs this warning once for each Event it gives up posting (kopf/_cogs/clients/events.py).
EVENT_POST_FAILED = "Failed to post an event"

disable_created_metrics()  # type: ignore[no-untyped-call]


def reconcile_result(delay_s: float | None, error: bool) -> str:
    """controller-runtime's ``result`` label for a pass: ``error`` when it raised, else by
    when it asked to be looked at again (``requeue_after``: a backoff or a resync)."""
    if error:
        return "error"
    if delay_s is None:
        return "success"
    return "requeue_after" if delay_s > 0 else "requeue"


@dataclass
class _Tracked:
    phase: str
    restarts: int
    changed_at: float  # monotonic time of the last spec change not yet Ready


class QueueMetrics:
    """client-go's workqueue counters and histograms for one queue (a ``QueueObserver``)."""

    def __init__(self, registry: CollectorRegistry, name: str) -> None:
        labels = {"name": name, "controller": name}

        def counter(metric: str, text: str) -> Counter:
            return Counter(metric, text, list(labels), registry=registry).labels(**labels)

        def histogram(metric: str, text: str) -> Histogram:
            return Histogram(
                metric, text, list(labels), registry=registry, buckets=QUEUE_BUCKETS
            ).labels(**labels)

        self.adds = counter("workqueue_adds", "Total number of adds handled by workqueue")
        self.retries = counter("workqueue_retries", "Total number of retries handled by workqueue")
        self.queue_duration = histogram(
            "workqueue_queue_duration_seconds",
            "How long in seconds an item stays in workqueue before being requested",
        )
        self.work_duration = histogram(
            "workqueue_work_duration_seconds",
            "How long in seconds processing an item from workqueue takes.",
        )

    def added(self) -> None:
        self.adds.inc()

    def waited(self, seconds: float) -> None:
        self.queue_duration.observe(seconds)

    def worked(self, seconds: float) -> None:
        self.work_duration.observe(seconds)

    def retried(self) -> None:
        self.retries.inc()


class EventFailures(logging.Filter):
    """Counts the Events kopf gave up posting (after its retries): kopf posts them in the
    background and says so only in one warning each. Keeps every record."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self._counter = counter

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and record.getMessage().startswith(EVENT_POST_FAILED):
            self._counter.inc()
        return True


class Metrics(Collector):
    """The operator's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self._pipelines: dict[PipelineKey, _Tracked] = {}
        self._queue: WorkQueue[str] | None = None
        self._instances: Callable[[], dict[str, int]] = dict
        self._health_asks: Callable[[], int] = lambda: 0
        self.transitions = Counter(
            "juturna_pipeline_phase_transitions",
            "Phase changes of Pipelines.",
            ["namespace", "from_phase", "to_phase"],
            registry=self.registry,
        )
        self.failures = Counter(
            "juturna_pipeline_failures",
            "Failures of Pipelines, by reason.",
            ["namespace", "reason"],
            registry=self.registry,
        )
        self.time_to_ready = Histogram(
            "juturna_pipeline_time_to_ready_seconds",
            "From a spec change (or creation) seen by the operator to Ready.",
            ["namespace"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.updates = Counter(
            "juturna_pipeline_updates",
            "Warm swaps of Pipelines, by how they ended: Succeeded, Aborted (the old "
            "revision serves on), FellBack (no room for two: replaced in place), Cancelled "
            "(a newer spec, a revert, a stop or a deletion came first).",
            ["namespace", "outcome"],
            registry=self.registry,
        )
        self.update_duration = Histogram(
            "juturna_pipeline_update_duration_seconds",
            "From a warm swap's start to its end (the switch and drain included), by outcome.",
            ["namespace", "outcome"],
            registry=self.registry,
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
        )
        Gauge(
            "juturna_operator_build_info",
            "The operator's version; always 1.",
            ["version"],
            registry=self.registry,
        ).labels(__version__).set(1)
        self.write_failures = Counter(
            "juturna_operator_write_failures",
            "API writes that failed: status and finalizer patches, Events kopf gave up posting.",
            ["kind"],
            registry=self.registry,
        )
        for kind in WRITES:
            self.write_failures.labels(kind)
        self.event_failures = EventFailures(self.write_failures.labels("event"))
        self.reconciles = Counter(
            "controller_runtime_reconcile",
            "Total number of reconciliations per controller",
            ["controller", "result"],
            registry=self.registry,
        )
        for result in RESULTS:
            self.reconciles.labels(CONTROLLER, result)
        self.reconcile_errors = Counter(
            "controller_runtime_reconcile_errors",
            "Total number of reconciliation errors per controller",
            ["controller"],
            registry=self.registry,
        ).labels(CONTROLLER)
        self.reconcile_time = Histogram(
            "controller_runtime_reconcile_time_seconds",
            "Length of time per reconciliation per controller",
            ["controller"],
            registry=self.registry,
            buckets=RECONCILE_BUCKETS,
        ).labels(CONTROLLER)
        self.queue = QueueMetrics(self.registry, CONTROLLER)
        self.registry.register(self)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def watch(
        self,
        queue: WorkQueue[str],
        instances: Callable[[], dict[str, int]],
        health_asks: Callable[[], int] = lambda: 0,
    ) -> None:
        """What scrapes read live: the reconcile queue, the instances each engine holds, and
        the health requests sent to pipeline pods."""
        self._queue, self._instances, self._health_asks = queue, instances, health_asks

    # -- fed by the handlers --

    def reconciled(self, seconds: float, delay_s: float | None, error: bool) -> None:
        """One pass: how long it took, and how it ended."""
        self.reconcile_time.observe(seconds)
        self.reconciles.labels(CONTROLLER, reconcile_result(delay_s, error)).inc()
        if error:
            self.reconcile_errors.inc()

    def write_failed(self, kind: str) -> None:
        """A status patch (``status``) or a finalizer patch (``finalizer``) failed."""
        self.write_failures.labels(kind).inc()

    # -- fed by the reconciler --

    def spec_changed(self, key: PipelineKey) -> None:
        tracked = self._pipelines.setdefault(key, _Tracked("", 0, time.monotonic()))
        tracked.changed_at = time.monotonic()

    def observed(
        self, key: PipelineKey, phase: str, restarts: int, ready: bool, before: str | None = None
    ) -> None:
        """The phase just published. ``before``: the object's phase when this process first
        sees it (none yet: ``Pending``, what a new Pipeline shows), so that a Pipeline adopted
        after a restart counts no transition into the phase it already had."""
        tracked = self._pipelines.setdefault(key, _Tracked("", 0, time.monotonic()))
        previous = tracked.phase or before or api.Phase.Pending
        if previous != phase:
            self.transitions.labels(key.namespace, previous, phase).inc()
        tracked.phase = phase
        tracked.restarts = restarts
        if ready and tracked.changed_at:
            self.time_to_ready.labels(key.namespace).observe(time.monotonic() - tracked.changed_at)
            tracked.changed_at = 0.0

    def update_ended(self, key: PipelineKey, outcome: str, seconds: float) -> None:
        self.updates.labels(key.namespace, outcome).inc()
        self.update_duration.labels(key.namespace, outcome).observe(seconds)

    def failed(self, key: PipelineKey, reason: str) -> None:
        self.failures.labels(key.namespace, reason).inc()

    def forget(self, key: PipelineKey) -> None:
        self._pipelines.pop(key, None)

    # -- the collector (the HTTP server's thread: it reads snapshots, never iterates live) --

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        pipelines = sorted(self._pipelines.copy().items(), key=lambda kv: str(kv[0]))
        by_phase = GaugeMetricFamily(
            "juturna_pipelines", "Pipelines by namespace and phase.", labels=["namespace", "phase"]
        )
        counts: dict[tuple[str, str], int] = {}
        for key, tracked in pipelines:
            if tracked.phase:
                where = (key.namespace, tracked.phase)
                counts[where] = counts.get(where, 0) + 1
        for namespace in sorted({namespace for namespace, _ in counts}):
            for phase in api.Phase:
                by_phase.add_metric([namespace, phase], counts.get((namespace, phase), 0))
        yield by_phase
        restarts = GaugeMetricFamily(
            "juturna_pipeline_restarts",
            "Restarts since the last spec change.",
            labels=["namespace", "pipeline"],
        )
        for key, tracked in pipelines:
            restarts.add_metric([key.namespace, key.name], tracked.restarts)
        yield restarts
        instances = GaugeMetricFamily(
            "juturna_operator_instances",
            "Pipeline instances each engine holds.",
            labels=["engine"],
        )
        for engine, count in sorted(self._instances().items()):
            instances.add_metric([engine], count)
        yield instances
        asks = CounterMetricFamily(
            "juturna_operator_health_requests",
            "Health requests the operator sent to pipeline pods (engine pod).",
        )
        asks.add_metric([], self._health_asks())
        yield asks
        yield from self._queue_gauges()

    def _queue_gauges(self) -> Iterator[GaugeMetricFamily]:
        queue = self._queue
        if queue is None:
            return
        labels = {"name": CONTROLLER, "controller": CONTROLLER}
        passes = queue.in_flight_s()
        for name, text, value in (
            ("workqueue_depth", "Current depth of workqueue", queue.depth()),
            (
                "workqueue_unfinished_work_seconds",
                "How many seconds of work has been done that is in progress and hasn't been "
                "observed by work_duration.",
                sum(passes),
            ),
            (
                "workqueue_longest_running_processor_seconds",
                "How many seconds has the longest running processor for workqueue been running.",
                max(passes, default=0.0),
            ),
        ):
            family = GaugeMetricFamily(name, text, labels=list(labels))
            family.add_metric(list(labels.values()), value)
            yield family
        for name, text, value in (
            (
                "controller_runtime_max_concurrent_reconciles",
                "Maximum number of concurrent reconciles per controller",
                queue.workers,
            ),
            (
                "controller_runtime_active_workers",
                "Number of currently used workers per controller",
                len(passes),
            ),
        ):
            family = GaugeMetricFamily(name, text, labels=["controller"])
            family.add_metric([CONTROLLER], value)
            yield family
