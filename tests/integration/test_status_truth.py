"""Status that tells the truth after a fault: a failed status write, a fixed configuration.

Both run an operator of their own (the reconciler in this process, or a second operator
process), before the session's operator starts."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from juturna.components._pipeline_manager import PipelineManager
from kubernetes import client

from juturna_operator import api, handlers
from juturna_operator.domain import PipelineKey
from juturna_operator.engines import Router
from juturna_operator.engines.inprocess import InProcessEngine
from juturna_operator.patching import StatusPatcher, StatusWriteRefused
from juturna_operator.reconciler import Reconciler, Resource
from juturna_operator.settings import Settings
from support import (
    PLUGIN_ROOTS,
    Operator,
    Pipelines,
    assert_sole_operator,
    condition,
    is_ready,
    manifest,
)

pytestmark = [pytest.mark.cluster, pytest.mark.own_operator]


def refused(status: int) -> StatusWriteRefused:
    return StatusWriteRefused(status, "Injected")


def test_a_status_write_that_failed_is_written_on_the_next_pass(
    objects: client.CustomObjectsApi,
    namespace: str,
    crd: None,
    kubeconfig: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The final write (Running) gets a 500; the next pass must write it, not take the
    memory of what it meant to write for what the object says (kubectl wait would hang)."""
    assert_sole_operator(kubeconfig)
    body = manifest("once")
    objects.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body)
    workdir = Path(PipelineManager._base_folder or tmp_path_factory.mktemp("engine"))
    # A tiny progress threshold: every step writes its phase first, so the failed write is
    # not the first one (the memory of the last written status is not empty).
    settings = Settings(
        plugin_roots=PLUGIN_ROOTS, workdir=workdir, progress_threshold_s=1e-6, metrics_port=0
    )
    attempts: list[str] = []
    seen: list[Resource] = []
    operators: list[handlers.Operator] = []  # the operator's own status writer, on the plane

    async def write_status(key: PipelineKey, status: dict[str, Any]) -> None:
        attempts.append(status["phase"])
        if status["phase"] == "Running" and attempts.count("Running") == 1:
            raise refused(500)
        await operators[0].write_status(key, status)

    def current() -> Resource:
        return Resource.from_body(
            objects.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, "once"
            )
        )

    async def passes() -> None:
        engine = InProcessEngine(settings)
        operators.append(handlers.Operator(settings, objects, Router(engine, None), None))
        reconciler = Reconciler(engine, settings, write_status, lambda *_: None)
        log = logging.getLogger("test")
        try:
            with pytest.raises(StatusWriteRefused):
                await reconciler.reconcile(current(), log)
            for _ in range(2):  # as kopf runs the daemon again after its backoff
                await reconciler.reconcile(current(), log)
            seen.append(current())
        finally:
            await reconciler.finalize(current(), log)
            await engine.close()
            await operators[0].patcher.close()

    asyncio.run(passes())
    assert attempts[:5] == ["Pending", "Creating", "WarmingUp", "Starting", "Running"], attempts
    assert attempts.count("Running") == 2, f"the refused write was not made again: {attempts}"
    live = seen[0]
    assert live.status["phase"] == "Running"
    assert condition({"status": live.status}, "Ready")["status"] == "True"


def test_a_refused_status_write_names_the_api_servers_reason(
    objects: client.CustomObjectsApi, namespace: str, crd: None
) -> None:
    """The writer on the event loop: a write lands; a write the schema refuses raises with
    the API server's own message (not its JSON); a Pipeline deleted meanwhile is no error."""
    body = manifest("patched")
    made = objects.create_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, body
    )
    key = PipelineKey(namespace, "patched", made["metadata"]["uid"])
    patcher = StatusPatcher(objects.api_client.configuration, connections=2)

    async def writes() -> StatusWriteRefused:
        try:
            await patcher.patch(key, {"phase": "Pending", "restarts": 3})
            with pytest.raises(StatusWriteRefused) as refusal:
                await patcher.patch(key, {"phase": "Sleeping"})
            await patcher.patch(PipelineKey(namespace, "absent", "x"), {"phase": "Pending"})
            return refusal.value
        finally:
            await patcher.close()

    try:
        refusal = asyncio.run(writes())
        live = objects.get_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, "patched"
        )
    finally:
        objects.delete_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, "patched"
        )
    assert live["status"]["phase"] == "Pending"
    assert live["status"]["restarts"] == 3
    assert refusal.status == 422
    text = str(refusal)
    assert text.startswith("status write refused (422 Unprocessable Entity): "), text
    assert 'status.phase: Unsupported value: "Sleeping"' in text, text
    assert '\\"' not in text, text  # not JSON-escaped
    assert "{" not in text.split(": ", 1)[1], text  # nor inside the body


def test_a_failure_the_configuration_caused_is_checked_again_after_a_restart(
    crd: None,
    kubeconfig: Path,
    objects: client.CustomObjectsApi,
    namespace: str,
    kubectl: Any,
    tmp_path: Path,
) -> None:
    """The administrator forgot the plugins: PluginNotFound (4xx, never retried). Fixed and
    restarted, the operator must not restore that failure from status as final."""
    assert_sole_operator(kubeconfig)
    (tmp_path / "empty").mkdir()
    op = Operator(
        kubeconfig, tmp_path / "work", tmp_path / "op.log", tmp_path / "empty", "inprocess"
    )
    op.where = ["-n", namespace]
    op.env["JUTURNA_OPERATOR_PLUGIN_PATH"] = str(tmp_path / "empty")
    pipelines = Pipelines(objects, namespace, kubectl)
    try:
        op.start()
        pipelines.apply(manifest("fixme"))
        failed = pipelines.wait_failure("fixme", "PluginNotFound", 30)
        assert failed["status"]["failure"]["code"] == 422
        op.stop()
        op.env["JUTURNA_OPERATOR_PLUGIN_PATH"] = os.pathsep.join(map(str, PLUGIN_ROOTS))
        op.start()
        body = pipelines.wait_ready("fixme", timeout=30)
        assert is_ready(body)
        assert body["status"].get("failure") is None
        assert body["status"]["phase"] == "Running"
        pipelines.delete("fixme")
        pipelines.wait_gone("fixme")
    finally:
        op.stop()
