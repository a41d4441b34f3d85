"""An error no engine foresaw still reaches the user: classified, in status, never left to
kopf's retry-forever with an empty status (found with the pod engine: the Kubernetes
client's own check of a Pod raised before any request, and status stayed null)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import yaml

from juturna_operator.domain import PipelineKey
from juturna_operator.engines.base import InstanceInfo
from juturna_operator.reconciler import Reconciler, Resource
from juturna_operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]


class ExplodingEngine:
    """An engine whose create fails with an error of no known kind."""

    name = "exploding"

    async def status(self, key: PipelineKey) -> InstanceInfo | None:
        return None

    async def create(self, *args: Any, **kwargs: Any) -> str:
        raise RuntimeError("disk on fire")

    two_slots = False

    def warm_swap(self, plan: Any) -> str | None:
        return "one instance per Pipeline"

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        return None


def test_an_unforeseen_engine_error_is_a_classified_failure_in_status() -> None:
    written: list[dict[str, Any]] = []
    events: list[tuple[str, str, str]] = []

    async def write_status(key: PipelineKey, status: dict[str, Any]) -> None:
        written.append(status)

    def post_event(key: PipelineKey, kind: str, reason: str, message: str) -> None:
        events.append((kind, reason, message))

    settings = Settings(plugin_roots=[REPO / "examples" / "plugins"], metrics_port=0)
    reconciler = Reconciler(ExplodingEngine(), settings, write_status, post_event)  # type: ignore[arg-type]
    example = yaml.safe_load((REPO / "examples" / "pipeline.yaml").read_text())
    body = {
        "metadata": {"namespace": "ns", "name": "tones", "uid": "0" * 8 + "-x", "generation": 1},
        "spec": example["spec"],
    }
    asyncio.run(reconciler.reconcile(Resource.from_body(body), logging.getLogger("test")))
    failure = written[-1]["failure"]
    assert failure == {
        "reason": "CreateFailed",
        "code": 500,
        "step": "create",
        "message": "RuntimeError: disk on fire",
    }
    assert ("Warning", "CreateFailed", "RuntimeError: disk on fire") in events
