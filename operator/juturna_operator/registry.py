"""Every engine, by the name an administrator gives it (``JUTURNA_OPERATOR_ENGINE``).

The one list of engines: settings validation, the CLI help, ``make_engine`` and the test
that checks the chart's schema all read it. Adding an engine is its module plus one line
here. An engine's module is imported only when it is chosen (each pulls in what it needs:
Juturna itself, an HTTP client, the Kubernetes client).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineEntry:
    """Where an engine's class lives, and what it is for (the CLI help says it)."""

    module: str
    cls: str
    summary: str
    needs_api_client: bool = False  # constructed with the Kubernetes API client


ENGINES: dict[str, EngineEntry] = {
    "inprocess": EngineEntry(
        "juturna_operator.engines.inprocess", "InProcessEngine", "threads in the operator"
    ),
    "process": EngineEntry(
        "juturna_operator.engines.process",
        "ProcessEngine",
        "worker processes, PIPELINES_PER_PROCESS pipelines at most each (1: one per pipeline)",
    ),
    "service": EngineEntry(
        "juturna_operator.engines.service", "ServiceEngine", "a runtime the administrator runs"
    ),
    "pod": EngineEntry(
        "juturna_operator.engines.pod", "PodEngine", "a Pod per Pipeline", needs_api_client=True
    ),
}
