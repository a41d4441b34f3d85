"""The service engine against real runtimes, driven directly: a `juturna serve` of the test's
own, and our worker module run as the service.

Faults are real: the serve frozen with SIGSTOP, or a loopback proxy between the engine and the
serve that refuses connections (a network partition: the serve keeps its pipelines) or loses
the answer to one request after the serve has done it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from juturna_operator.api import PipelineSpec
from juturna_operator.engines.base import PipelineKey
from juturna_operator.engines.client import JuturnaClient
from juturna_operator.engines.service import ServiceEngine
from juturna_operator.reasons import PipelineFailure
from juturna_operator.settings import Runtime, Settings
from support import PLUGIN_ROOTS, JuturnaServe

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JuturnaServe]:
    base = tmp_path_factory.mktemp("service-runtime")
    server = JuturnaServe(base / "pipelines", base / "serve.log").start()
    yield server
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGCONT)  # never leave it frozen, whatever a test did
    server.stop()


# -- helpers -----------------------------------------------------------------------------------


def settings(url: str, tmp_path: Path, token: Path | None = None, **kw: Any) -> Settings:
    return Settings(
        plugin_roots=PLUGIN_ROOTS,
        workdir=tmp_path,
        stop_timeout_s=3,
        runtimes={"local": Runtime("local", url, token)},
        default_runtime="local",
        **kw,
    )


def config(name: str, dud: bool = False, rate: float = 20) -> dict[str, Any]:
    """The ticker and the jsonl sink; with ``dud``, a second source whose start fails
    (Juturna starts it last: the other two run by then)."""
    nodes = [
        {"name": "src", "type": "source", "mark": "ticker", "configuration": {"rate": rate}},
        {"name": "out", "type": "sink", "mark": "jsonl"},
    ]
    links = [{"from": "src", "to": "out"}]
    if dud:
        nodes.insert(1, {"name": "cam", "type": "source", "mark": "dud"})
        links.append({"from": "cam", "to": "out"})
    spec = {"plugins": ["tones", "faulty"], "nodes": nodes, "links": links}
    return PipelineSpec.model_validate(spec).to_juturna_config(name)


def new_key(namespace: str) -> PipelineKey:
    return PipelineKey(namespace, "video", str(uuid.uuid4()))


async def deploy(engine: ServiceEngine, key: PipelineKey, **kw: Any) -> str:
    pipeline_id = await engine.create(key, config(key.juturna_name, **kw), "r1")
    await engine.warmup(key)
    await engine.start(key)
    return pipeline_id


async def listed(url: str) -> dict[str, Any]:
    """``{id: status}`` on the service, asked directly (not through the proxy)."""
    client = JuturnaClient(url)
    try:
        return await client.list()
    finally:
        await client.close()


async def remove(url: str, *pipeline_ids: str) -> None:
    """Stop and delete what a test left on the service."""
    client = JuturnaClient(url)
    try:
        present = await client.list()
        for pipeline_id in pipeline_ids:
            if present.get(pipeline_id, {}).get("self") == "pipeline_running":
                await client.stop(pipeline_id, 10)
            if pipeline_id in present:
                await client.delete(pipeline_id)
    finally:
        await client.close()


def failure_of(coro: Any) -> Any:
    async def run() -> PipelineFailure:
        with pytest.raises(PipelineFailure) as err:
            await coro
        return err.value

    return run()


# -- 1. the sweep removes only what this operator owns ------------------------------------------


def test_the_sweep_leaves_the_pipelines_of_namespaces_it_does_not_watch(
    serve: JuturnaServe, tmp_path: Path
) -> None:
    async def scenario() -> None:
        client = JuturnaClient(serve.url)
        ours = await client.create(config("a__video__abcdef12"))  # watched, no resource
        theirs = await client.create(config("team-b__video__abcdef12"))  # another operator's
        await client.close()
        watching_a = ServiceEngine(settings(serve.url, tmp_path, namespaces=["a"]))
        watching_all = ServiceEngine(settings(serve.url, tmp_path, all_namespaces=True))
        try:
            assert await watching_a.sweep({}) == [ours]
            assert theirs in await listed(serve.url)
            # Watching every namespace, every pipeline named like ours is ours.
            assert theirs in await watching_all.sweep({})
            assert theirs not in await listed(serve.url)
        finally:
            await watching_a.close()
            await watching_all.close()
            await remove(serve.url, ours, theirs)

    asyncio.run(scenario())
