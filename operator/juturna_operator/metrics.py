"""Prometheus metrics: what the reconciler observed, exposed on ``/metrics``.

Per-pipeline series come from a collector that reads the live table at scrape time, so a
deleted pipeline's series disappear with it; counters and the histogram aggregate by
namespace (and phase or reason) and never name a single pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from juturna_operator.domain import PipelineKey


@dataclass
class _Tracked:
    phase: str
    restarts: int
    changed_at: float  # monotonic time of the last spec change not yet Ready


class Metrics(Collector):
    """The operator's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._pipelines: dict[PipelineKey, _Tracked] = {}
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
        self.registry.register(self)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)

    # -- fed by the reconciler --

    def spec_changed(self, key: PipelineKey) -> None:
        tracked = self._pipelines.setdefault(key, _Tracked("", 0, time.monotonic()))
        tracked.changed_at = time.monotonic()

    def observed(self, key: PipelineKey, phase: str, restarts: int, ready: bool) -> None:
        tracked = self._pipelines.setdefault(key, _Tracked("", 0, time.monotonic()))
        if tracked.phase != phase:
            self.transitions.labels(key.namespace, tracked.phase or "None", phase).inc()
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

    # -- the collector --

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_phase = GaugeMetricFamily(
            "juturna_pipelines", "Pipelines by namespace and phase.", labels=["namespace", "phase"]
        )
        counts: dict[tuple[str, str], int] = {}
        for key, tracked in self._pipelines.items():
            if tracked.phase:
                counts[(key.namespace, tracked.phase)] = (
                    counts.get((key.namespace, tracked.phase), 0) + 1
                )
        for (namespace, phase), count in sorted(counts.items()):
            by_phase.add_metric([namespace, phase], count)
        yield by_phase
        restarts = GaugeMetricFamily(
            "juturna_pipeline_restarts",
            "Restarts since the last spec change.",
            labels=["namespace", "pipeline"],
        )
        for key, tracked in sorted(self._pipelines.items(), key=lambda kv: str(kv[0])):
            restarts.add_metric([key.namespace, key.name], tracked.restarts)
        yield restarts
