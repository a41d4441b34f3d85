"""A fake engine and a harness for the reconcile loop in milliseconds: the engine is pure
bookkeeping (its two slots included, for warm swaps), the status writer and the Event poster
record, and the test moves the clock (as kopf tests its own core in ``tests/handling/``)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from juturna_operator.domain import InstanceState, NodeCrash, PipelineKey
from juturna_operator.engines.base import DEFAULT_PLAN, InstanceInfo, Plan
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.reconciler import Reconciler, Resource
from juturna_operator.settings import Settings

LOG = logging.getLogger("test")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "plugins"
UID = "0123abcd-uid"
NODES = [
    {"name": "src", "type": "source", "mark": "ticker"},
    {"name": "out", "type": "sink", "mark": "jsonl"},
]


class FakeEngine:
    """Instances as records; ``fail_start`` makes each start fail with that reason;
    ``swaps``: it runs a candidate beside the active instance (a warm swap), as engine pod."""

    name = "fake"

    def __init__(self, swaps: bool = False) -> None:
        self.instances: dict[PipelineKey, InstanceInfo] = {}
        self.fail_start: FailureReason | None = None
        self.created = 0
        self.swaps = swaps
        self.swap_asked = 0  # how often the reconciler asked warm_swap
        self.pods: dict[PipelineKey, str] = {}  # pod_under_way's answers

    @property
    def two_slots(self) -> bool:
        return self.swaps

    def warm_swap(self, plan: Plan) -> str | None:
        self.swap_asked += 1
        return None if self.swaps else "the fake engine runs one instance per Pipeline"

    def step_under_way(self, key: PipelineKey) -> Step | None:
        return None

    def pod_under_way(self, key: PipelineKey) -> str | None:
        return self.pods.get(key)

    async def promote(self, key: PipelineKey) -> None:
        new, old = self.instances.pop(key.candidate), self.instances.pop(key, None)
        assert new.state is InstanceState.Running
        new.key, self.instances[key] = key, new
        if old is not None:
            old.key, self.instances[key.candidate] = key.candidate, old

    async def create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan = DEFAULT_PLAN
    ) -> str:
        self.created += 1
        pid = f"id-{self.created}"
        nodes = {n["name"]: "Created" for n in config["pipeline"]["nodes"]}
        self.instances[key] = InstanceInfo(key, pid, revision, InstanceState.Created, nodes=nodes)
        return pid

    async def warmup(self, key: PipelineKey) -> None:
        info = self.instances[key]
        info.state, info.nodes = InstanceState.Ready, dict.fromkeys(info.nodes, "Configured")

    async def start(self, key: PipelineKey) -> None:
        if self.fail_start is not None:
            raise PipelineFailure(self.fail_start, Step.start, "camera unplugged")
        info = self.instances[key]
        info.state, info.nodes = InstanceState.Running, dict.fromkeys(info.nodes, "Running")

    async def stop(self, key: PipelineKey) -> None:
        self.instances[key].state = InstanceState.Spent

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        self.instances.pop(key, None)

    async def status(self, key: PipelineKey) -> InstanceInfo | None:
        info = self.instances.get(key)
        if info is None:
            return None
        return InstanceInfo(
            key,
            info.pipeline_id,
            info.revision,
            info.state,
            nodes=dict(info.nodes),
            crashes=list(info.crashes),
        )

    def crash(self, key: PipelineKey) -> None:
        self.instances[key].crashes.append(NodeCrash("src", "_source_src", "OSError: gone"))


class Harness:
    """One resource, the reconciler, and what it wrote and posted."""

    def __init__(self, engine: FakeEngine | None = None, status: dict[str, Any] | None = None):
        self.now = 1000.0
        self.engine = engine or FakeEngine()
        self.writes: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.refuse_writes = 0
        self.generation = 1
        self.spec: dict[str, Any] = {
            "plugins": ["tones"],
            "nodes": NODES,
            "links": [{"from": "src", "to": "out"}],
        }
        self.status: dict[str, Any] = dict(status or {})
        settings = Settings(plugin_roots=[EXAMPLES], metrics_port=0, progress_threshold_s=60)
        self.reconciler = Reconciler(
            self.engine,  # type: ignore[arg-type]
            settings,
            self.write,
            self.post,
            clock=lambda: self.now,
        )

    async def write(self, key: PipelineKey, status: dict[str, Any]) -> None:
        if self.refuse_writes:
            self.refuse_writes -= 1
            raise RuntimeError("500 Internal Server Error")
        self.writes.append(status)
        self.status.update(status)  # as a merge patch does, top level

    def post(self, key: PipelineKey, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    def body(self) -> dict[str, Any]:
        meta = {
            "namespace": "ns",
            "name": "p",
            "uid": "0123abcd-uid",
            "generation": self.generation,
        }
        return {"metadata": meta, "spec": self.spec, "status": self.status}

    def reconcile(self) -> float:
        return asyncio.run(self.reconciler.reconcile(Resource.from_body(self.body()), LOG))
