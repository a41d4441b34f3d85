"""A deletion racing a reconcile pass: the finalizer's word is final.

The reconciler drives the real in-process engine (real Juturna, real plugins) as kopf would:
a pass for a spec change still running when the deletion's finalizer starts, then a late
pass from the daemon. Status and Events are only recorded: the race is between the passes
and the engine, not with the API server."""

from __future__ import annotations

import asyncio
import copy
import logging
from pathlib import Path
from typing import Any

import pytest
from juturna.components._pipeline_manager import PipelineManager

from juturna_operator.domain import PipelineKey
from juturna_operator.engines.inprocess import InProcessEngine
from juturna_operator.reconciler import Reconciler, Resource
from juturna_operator.settings import Settings
from support import EXAMPLE, PLUGIN_ROOTS

ROUNDS = 12


def body(uid: str, generation: int, rate: float) -> dict[str, Any]:
    spec = copy.deepcopy(EXAMPLE["spec"])
    spec["nodes"][0]["configuration"]["rate"] = rate
    meta = {"namespace": "race", "name": f"p{uid[:4]}", "uid": uid, "generation": generation}
    return {"metadata": meta, "spec": spec, "status": {}}


def test_a_delete_during_a_spec_change_leaves_nothing_running(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    workdir = Path(PipelineManager._base_folder or tmp_path_factory.mktemp("engine"))
    settings = Settings(
        plugin_roots=PLUGIN_ROOTS, workdir=workdir, stop_timeout_s=3, metrics_port=0
    )
    log = logging.getLogger("test")
    leaks: list[str] = []

    async def write_status(key: PipelineKey, status: dict[str, Any]) -> None:
        return None

    async def rounds() -> None:
        engine = InProcessEngine(settings)
        reconciler = Reconciler(engine, settings, write_status, lambda *_: None)
        try:
            for i in range(ROUNDS):
                uid = f"{i:04d}0000-race"
                first = Resource.from_body(body(uid, 1, 4))
                await reconciler.reconcile(first, log)
                assert (await engine.status(first.key)) is not None, "not deployed"
                # The spec changes (redeploy: delete, create, warm up, start) and, a moment
                # later (0 to 55 ms: each round hits another step), the Pipeline is deleted.
                changed = body(uid, 2, 5)
                redeploy = asyncio.create_task(
                    reconciler.reconcile(Resource.from_body(changed), log)
                )
                await asyncio.sleep(0.005 * i)
                await reconciler.finalize(Resource.from_body(changed, deleting=True), log)
                await redeploy
                await asyncio.sleep(0.1)
                if await engine.status(first.key) is not None:
                    leaks.append(f"round {i}: an instance runs after the finalizer returned")
                # The daemon's next pass, with the body it had before the deletion.
                await reconciler.reconcile(Resource.from_body(changed), log)
                if await engine.status(first.key) is not None:
                    leaks.append(f"round {i}: a later pass deployed the deleted Pipeline")
                    await engine.delete(first.key)
        finally:
            await engine.close()

    asyncio.run(rounds())
    assert not leaks, leaks
