"""The service engine against real runtimes, driven directly: a `juturna serve` of the test's
own, and our worker module run as the service.

Faults are real: the serve frozen with SIGSTOP, or a loopback proxy between the engine and the
serve that refuses connections (a network partition: the serve keeps its pipelines) or loses
the answer to one request after the serve has done it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import tracemalloc
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import exit_with_parent, free_port, stop_popen

from juturna_operator.api import PipelineSpec
from juturna_operator.domain import InstanceState, PipelineKey
from juturna_operator.engines.base import Plan
from juturna_operator.engines.client import JuturnaClient
from juturna_operator.engines.service import MISSES_ALLOWED, ServiceEngine
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import Runtime, Settings
from support import PLUGIN_ROOTS, JuturnaServe, answered_size, wait_until

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JuturnaServe]:
    base = tmp_path_factory.mktemp("service-runtime")
    server = JuturnaServe(base / "pipelines", base / "serve.log").start()
    yield server
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGCONT)  # never leave it frozen, whatever a test did
    server.stop()


@contextlib.contextmanager
def worker_service(base: Path) -> Iterator[tuple[str, Path, Path]]:
    """Our worker module run as a remote service in ``base``: (url, token file, pipeline
    folder)."""
    token, port_file, folder = base / "token", base / "port", base / "pipelines"
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    env = {**os.environ, "JUTURNA_OPERATOR_PLUGIN_PATH": os.pathsep.join(map(str, PLUGIN_ROOTS))}
    command = [sys.executable, "-m", "juturna_operator.worker", "--folder", str(folder)]
    command += ["--port-file", str(port_file), "--owner", "service", "--token-file", str(token)]
    with open(base / "worker.log", "ab") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=exit_with_parent
        )
    try:
        url = ""

        def ready() -> bool:
            nonlocal url
            assert proc.poll() is None, (base / "worker.log").read_text()[-2000:]
            if not port_file.exists():
                return False
            url = f"http://127.0.0.1:{port_file.read_text()}"
            try:
                urllib.request.urlopen(f"{url}/operator/ready", timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(ready, 60, "the worker service answers")
        yield url, token, folder
    finally:
        stop_popen(proc, grace_s=10)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """Our worker module run as a remote service, shared by the module's tests."""
    with worker_service(tmp_path_factory.mktemp("worker-service")) as service:
        yield service


# -- a loopback proxy the test starts and stops ------------------------------------------------


async def read_message(reader: asyncio.StreamReader) -> bytes | None:
    """One HTTP/1.1 message (its head and Content-Length body), or None at the stream's end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


class Proxy:
    """Forwards HTTP requests on a loopback port to the serve, one upstream connection each.

    ``down()`` refuses connections and cuts those open (the serve keeps running, with its
    pipelines); ``up()`` listens again on the same port. A path ending in one of ``drops``
    is forwarded once and its connection cut after the serve answered: the answer is lost.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.drops: list[str] = []
        self.dropped: list[str] = []  # request lines whose answer was lost
        self.requests: list[str] = []  # every request line forwarded, in order
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def up(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()  # closes the listening socket at once: connections refused
            self._server = None
        for writer in list(self._clients):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            while (request := await read_message(reader)) is not None:
                line = request.split(b"\r\n", 1)[0].decode()
                self.requests.append(line)
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
                try:
                    up_writer.write(request)
                    await up_writer.drain()
                    answer = await read_message(up_reader)
                finally:
                    up_writer.close()
                path = line.split()[1].split("?")[0]
                drop = next((d for d in self.drops if path.endswith(d)), None)
                if answer is None or drop is not None:
                    if drop is not None:
                        self.drops.remove(drop)
                        self.dropped.append(line)
                    return
                writer.write(answer)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self._clients.discard(writer)
            writer.close()


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


def config(name: str, dud: bool = False, rate: float = 20, sink: str = "jsonl") -> dict[str, Any]:
    """The ticker and a sink (jsonl); with ``dud``, a second source whose start fails
    (Juturna starts it last: the other two run by then)."""
    nodes = [
        {"name": "src", "type": "source", "mark": "ticker", "configuration": {"rate": rate}},
        {"name": "out", "type": "sink", "mark": sink},
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


@contextlib.asynccontextmanager
async def through_proxy(
    serve: JuturnaServe, tmp_path: Path, name: str
) -> AsyncIterator[tuple[Proxy, ServiceEngine, PipelineKey, Callable[[str], str]]]:
    """An engine that reaches the serve through a proxy the test can cut, a key, and
    ``made(pipeline_id)``: what it records is removed from the serve afterwards."""
    proxy = await Proxy(serve.port).up()
    engine = ServiceEngine(settings(proxy.url, tmp_path))
    pipeline_ids: list[str] = []

    def made(pipeline_id: str) -> str:
        pipeline_ids.append(pipeline_id)
        return pipeline_id

    try:
        yield proxy, engine, new_key(name), made
    finally:
        await engine.close()
        await proxy.down()
        await remove(serve.url, *pipeline_ids)


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


# -- 2. a delete while the runtime is unreachable ----------------------------------------------


def test_a_pipeline_deleted_while_its_runtime_is_unreachable_is_swept_once_it_answers(
    serve: JuturnaServe, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with through_proxy(serve, tmp_path, "lost") as (proxy, engine, key, made):
            pipeline_id = made(await deploy(engine, key))
            await proxy.down()  # a partition: the serve runs on, unreachable
            failure = await failure_of(engine.delete(key))
            assert (failure.reason, failure.step, failure.message) == (
                FailureReason.RuntimeUnavailable,
                Step.delete,
                f"cannot connect to {proxy.url}: ConnectError; pipeline {pipeline_id} is left on "
                "runtime 'local', and the orphan sweep removes it once the runtime answers",
            )
            assert (await listed(serve.url))[pipeline_id]["self"] == "pipeline_running"
            assert await engine.sweep({}) == []  # still unreachable: nothing to do yet
            await proxy.up()
            assert await engine.sweep({}) == [pipeline_id]  # the resource is gone
            assert pipeline_id not in await listed(serve.url)
            assert await engine.status(key) is None

    asyncio.run(scenario())


def test_a_delete_that_could_not_reach_the_runtime_is_done_by_the_next_one(
    serve: JuturnaServe, tmp_path: Path
) -> None:
    """A redeploy (the resource stays): its next pass deletes the old instance again before
    it creates another, and meanwhile the sweep keeps what the resource references."""

    async def scenario() -> None:
        async with through_proxy(serve, tmp_path, "redeploy") as (proxy, engine, key, made):
            pipeline_id = made(await deploy(engine, key))
            await proxy.down()
            failure = await failure_of(engine.delete(key, release=False))
            assert failure.reason is FailureReason.RuntimeUnavailable
            await proxy.up()
            assert await engine.sweep({key.juturna_name: pipeline_id}) == []
            info = await engine.status(key)
            assert info is not None
            assert (info.state, info.pipeline_id) == (InstanceState.Running, pipeline_id)
            await engine.delete(key, release=False)
            assert pipeline_id not in await listed(serve.url)
            assert await engine.status(key) is None

    asyncio.run(scenario())


def test_deleting_a_pipeline_the_service_no_longer_has_is_done(
    serve: JuturnaServe, tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = ServiceEngine(settings(serve.url, tmp_path))
        key = new_key("vanished")
        try:
            pipeline_id = await deploy(engine, key)
            await remove(serve.url, pipeline_id)  # as a service that restarted lost it
            await engine.delete(key)
            assert await engine.status(key) is None
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_a_delete_whose_stop_hangs_on_a_runtime_that_answers_abandons_the_pipeline(
    tmp_path: Path,
) -> None:
    # A serve of its own: the hung stop keeps one of its request threads for good.
    serve = JuturnaServe(tmp_path / "pipelines", tmp_path / "serve.log").start()

    async def scenario() -> None:
        engine = ServiceEngine(settings(serve.url, tmp_path))
        key = new_key("stuck")
        try:
            pipeline_id = await deploy(engine, key, rate=2000, sink="hang")
            await asyncio.sleep(3)  # 2000 messages a second fill the 999-message queues
            failure = await failure_of(engine.delete(key))
            assert (failure.reason, failure.step, failure.message) == (
                FailureReason.StopTimeout,
                Step.delete,
                f"stop did not finish within 3 s on runtime 'local'; pipeline {pipeline_id} "
                "was left there, stuck",
            )
            assert await engine.status(key) is None
            # Never touched again: a stop, or a delete (which stops), would hang once more.
            assert pipeline_id not in await engine.sweep({})
            assert pipeline_id in await listed(serve.url)
        finally:
            await engine.close()

    try:
        asyncio.run(scenario())
    finally:
        assert serve.proc is not None
        serve.proc.kill()  # a graceful exit would wait for the hung request
        serve.proc.wait(timeout=10)


# -- 3. a POST whose answer was lost -----------------------------------------------------------


def test_a_warmup_and_a_start_whose_answers_were_lost_are_done_not_conflicts(
    serve: JuturnaServe, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with through_proxy(serve, tmp_path, "lossy") as (proxy, engine, key, made):
            pipeline_id = made(await engine.create(key, config(key.juturna_name), "r1"))
            proxy.drops = ["/warmup", "/start"]
            await engine.warmup(key)  # sent again, AlreadyWarmedUp: the lost attempt did it
            await engine.start(key)  # sent again, AlreadyRunning: likewise
            assert proxy.dropped == [
                f"POST /pipelines/{pipeline_id}/warmup HTTP/1.1",
                f"POST /pipelines/{pipeline_id}/start HTTP/1.1",
            ]
            info = await engine.status(key)
            assert info is not None
            assert (info.state, info.failure, info.pipeline_id) == (
                InstanceState.Running,
                None,
                pipeline_id,
            )
            await engine.delete(key)
            assert pipeline_id not in await listed(serve.url)

    asyncio.run(scenario())


def test_a_deploy_whose_answer_was_lost_is_not_sent_again(serve: JuturnaServe) -> None:
    async def scenario() -> None:
        proxy = await Proxy(serve.port).up()
        client = JuturnaClient(proxy.url)
        before = set(await listed(serve.url))
        made: set[str] = set()
        try:
            proxy.drops = ["/pipelines/deploy"]
            failure = await failure_of(
                client.request(
                    "POST",
                    "/pipelines/deploy",
                    Step.create,
                    30,
                    json=config("once__video__abcdef12"),
                )
            )
            assert (failure.reason, failure.message) == (
                FailureReason.RuntimeUnavailable,
                f"{proxy.url}/pipelines/deploy: the connection dropped before the answer "
                "(RemoteProtocolError); not sent again, as the service may have done it",
            )
            made = set(await listed(serve.url)) - before
            assert len(made) == 1, "a deploy that may have been done was sent again"
        finally:
            await client.close()
            await proxy.down()
            await remove(serve.url, *made)

    asyncio.run(scenario())


def boom_config(name: str) -> dict[str, Any]:
    """The ticker into a node whose constructor raises: Juturna builds nodes at warmup."""
    nodes = [
        {"name": "src", "type": "source", "mark": "ticker", "configuration": {"rate": 1}},
        {"name": "amp", "type": "proc", "mark": "boom", "configuration": {"model": "/nope"}},
        {"name": "out", "type": "sink", "mark": "jsonl"},
    ]
    links = [{"from": "src", "to": "amp"}, {"from": "amp", "to": "out"}]
    spec = {"plugins": ["tones", "faulty"], "nodes": nodes, "links": links}
    return PipelineSpec.model_validate(spec).to_juturna_config(name)


RUNNING, READY = Plan(until=InstanceState.Running), Plan(until=InstanceState.Ready)


def test_a_new_pipeline_reaches_running_with_one_request_and_ready_with_two(
    serve: JuturnaServe, tmp_path: Path
) -> None:
    """Juturna's deploy does create, warm up and start in one request; Ready takes create and
    warm up. Counted on the wire, through the proxy."""

    async def scenario() -> None:
        async with through_proxy(serve, tmp_path, "wire") as (proxy, engine, key, made):
            pipeline_id = made(await engine.create(key, config(key.juturna_name), "r1", RUNNING))
            assert proxy.requests == ["POST /pipelines/deploy HTTP/1.1"]
            info = await engine.status(key)
            assert info is not None
            assert (info.state, info.pipeline_id) == (InstanceState.Running, pipeline_id)
            await engine.delete(key)
            proxy.requests.clear()
            other = new_key("wire")
            pipeline_id = made(await engine.create(other, config(other.juturna_name), "r1", READY))
            assert proxy.requests == [
                "POST /pipelines/new HTTP/1.1",
                f"POST /pipelines/{pipeline_id}/warmup HTTP/1.1",
            ]
            info = await engine.status(other)
            assert info is not None
            assert info.state is InstanceState.Ready
            await engine.delete(other)

    asyncio.run(scenario())


def test_a_failed_deploy_names_the_step_and_its_half_built_pipeline_is_deleted(
    serve: JuturnaServe, tmp_path: Path
) -> None:
    """Juturna's deploy rolls nothing back and its error names neither the step nor the
    pipeline: the engine finds what it left by name, names the step from its state, and the
    delete that follows (the reconciler's, after a failed step) removes it."""

    async def scenario() -> None:
        engine = ServiceEngine(settings(serve.url, tmp_path))
        try:
            for make, reason, step, words in (
                (
                    boom_config,
                    FailureReason.WarmupFailed,
                    Step.warmup,
                    # What a plain serve says of any error (the per-step warmup says the same).
                    "Unexpected FileNotFoundError exception, see logs",
                ),
                (
                    functools.partial(config, dud=True, rate=1),
                    FailureReason.StartFailed,
                    Step.start,
                    "Unexpected OSError exception, see logs; node(s) out, src started and keep "
                    "running on runtime 'local' until it restarts: Juturna's service cannot stop "
                    "the nodes of a pipeline whose start failed (run juturna_operator.worker as "
                    "the service: it stops them)",
                ),
            ):
                key = new_key("halves")
                failure = await failure_of(
                    engine.create(key, make(key.juturna_name), "r1", RUNNING)
                )
                assert (failure.reason, failure.step, failure.message) == (reason, step, words)
                info = await engine.status(key)
                assert info is not None, "the half-built pipeline is not held"
                await engine.delete(key)
                left = [
                    pid
                    for pid, status in (await listed(serve.url)).items()
                    if key.juturna_name in str(status.get("folder", ""))
                ]
                assert not left, f"the half-built pipeline is still on the service: {left}"
        finally:
            await engine.close()

    asyncio.run(scenario())


# -- 4. a start that fails after some nodes started --------------------------------------------


def output_lines(folder: str) -> int:
    out = Path(folder, "out", "output.jsonl")
    return len(out.read_text().splitlines()) if out.exists() else 0


def test_a_failed_start_leaves_no_node_running_on_our_worker(
    worker: tuple[str, Path, Path], tmp_path: Path
) -> None:
    url, token, _ = worker

    async def scenario() -> None:
        engine = ServiceEngine(settings(url, tmp_path, token))
        key = new_key("cams")
        try:
            await engine.create(key, config(key.juturna_name, dud=True), "r1")
            await engine.warmup(key)
            failure = await failure_of(engine.start(key))
            assert (failure.reason, failure.step, failure.message) == (
                FailureReason.StartFailed,
                Step.start,
                'node "cam": OSError: cannot open /dev/video9',
            )
            info = await engine.status(key)
            assert info is not None
            assert info.nodes == {"src": "Stopped", "cam": "Stopped", "out": "Stopped"}
            client = JuturnaClient(url, token=token.read_text().strip())
            folder = (await client.status(info.pipeline_id))["folder"]
            await client.close()
            written = output_lines(folder)
            await asyncio.sleep(1)  # the ticker sends 20 a second while it runs
            assert output_lines(folder) == written, "the nodes that started still run"
        finally:
            await engine.delete(key)
            await engine.close()

    asyncio.run(scenario())


def test_a_failed_start_on_a_plain_service_names_the_nodes_it_cannot_stop(
    serve: JuturnaServe, tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = ServiceEngine(settings(serve.url, tmp_path))
        key = new_key("cams")
        try:
            await engine.create(key, config(key.juturna_name, dud=True, rate=1), "r1")
            await engine.warmup(key)
            failure = await failure_of(engine.start(key))
            assert (failure.reason, failure.step, failure.message) == (
                FailureReason.StartFailed,
                Step.start,
                "Unexpected OSError exception, see logs; node(s) out, src started and keep "
                "running on runtime 'local' until it restarts: Juturna's service cannot stop the "
                "nodes of a pipeline whose start failed (run juturna_operator.worker as the "
                "service: it stops them)",
            )
        finally:
            await engine.delete(key)
            await engine.close()

    asyncio.run(scenario())


# -- 5. a slow answer is not a dead runtime ----------------------------------------------------


def test_a_runtime_frozen_for_one_status_request_keeps_the_pipeline_running(
    serve: JuturnaServe, tmp_path: Path
) -> None:
    assert serve.proc is not None
    pid = serve.proc.pid

    async def scenario() -> None:
        engine = ServiceEngine(settings(serve.url, tmp_path))
        key = new_key("frozen")
        try:
            pipeline_id = await deploy(engine, key)
            await engine.status(key)  # the reconciler looks after each step
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                info = await engine.status(key)  # no answer within the client's timeout
                assert time.monotonic() - started >= 5, "the status request did not time out"
            finally:
                os.kill(pid, signal.SIGCONT)
            assert info is not None
            assert (info.state, info.failure, info.pipeline_id) == (
                InstanceState.Running,
                None,
                pipeline_id,
            )
            assert info.nodes == {"src": "Running", "out": "Running"}  # the last known
            info = await engine.status(key)
            assert info is not None
            assert (info.state, info.failure, info.pipeline_id) == (
                InstanceState.Running,
                None,
                pipeline_id,
            )
        finally:
            os.kill(pid, signal.SIGCONT)
            await engine.delete(key)
            await engine.close()

    asyncio.run(scenario())


def test_status_misses_in_a_row_are_runtime_unavailable(
    serve: JuturnaServe, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with through_proxy(serve, tmp_path, "gone") as (proxy, engine, key, made):
            pipeline_id = made(await deploy(engine, key))
            await proxy.down()
            for _ in range(MISSES_ALLOWED - 1):
                info = await engine.status(key)
                assert info is not None
                assert (info.state, info.failure) == (InstanceState.Running, None)
            info = await engine.status(key)
            assert info is not None
            assert info.failure is not None
            assert (info.failure.reason, info.failure.step, info.failure.message) == (
                FailureReason.RuntimeUnavailable,
                Step.run,
                f"cannot connect to {proxy.url}: ConnectError ({MISSES_ALLOWED} status "
                "requests in a row failed)",
            )
            await proxy.up()
            info = await engine.status(key)
            assert info is not None
            assert (info.state, info.failure, info.pipeline_id) == (
                InstanceState.Running,
                None,
                pipeline_id,
            )
            # An answer starts the count again: one miss is again only a miss.
            await proxy.down()
            info = await engine.status(key)
            assert info is not None
            assert info.failure is None
            await proxy.up()
            await engine.delete(key)

    asyncio.run(scenario())


# -- a node that dies, on our worker run as the service ----------------------------------------


def crashing(name: str, words: int = 0) -> dict[str, Any]:
    """The ticker, a node that dies at its first message (its exception's message carrying
    ``words`` bytes of filler), and a sink."""
    configuration = {"after": 0, "words": words}
    spec = {
        "plugins": ["tones", "faulty"],
        "nodes": [
            {"name": "src", "type": "source", "mark": "ticker", "configuration": {"rate": 20}},
            {"name": "amp", "type": "proc", "mark": "crasher", "configuration": configuration},
            {"name": "out", "type": "sink", "mark": "jsonl"},
        ],
        "links": [{"from": "src", "to": "amp"}, {"from": "amp", "to": "out"}],
    }
    return PipelineSpec.model_validate(spec).to_juturna_config(name)


def test_a_node_that_dies_at_once_on_our_worker_is_a_crash_of_its_pipeline_only(
    worker: tuple[str, Path, Path], tmp_path: Path
) -> None:
    """Juturna's status still says running; our worker's health route names the node, and
    on a shared worker only the pipeline whose thread died (thread names repeat)."""
    url, token, _ = worker

    async def scenario() -> None:
        engine = ServiceEngine(settings(url, tmp_path, token))
        bad, good = new_key("cams"), new_key("cams")
        try:
            await deploy(engine, good)
            await engine.create(bad, crashing(bad.juturna_name), "r1")
            await engine.warmup(bad)
            await engine.start(bad)
            deadline = time.monotonic() + 10
            info = await engine.status(bad)
            while info is not None and not info.crashes and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                info = await engine.status(bad)
            assert info is not None
            assert [c.describe() for c in info.crashes] == [
                'node "amp" crashed: RuntimeError: kaboom in amp (thread _update_amp)'
            ]
            assert info.nodes["amp"] == "Failed"
            healthy = await engine.status(good)
            assert healthy is not None
            assert healthy.crashes == []
            assert healthy.state is InstanceState.Running
        finally:
            for key in (bad, good):
                await engine.delete(key)
            await engine.close()

    asyncio.run(scenario())


def test_a_health_answer_over_the_cap_fails_every_running_pipeline_of_the_runtime(
    tmp_path: Path,
) -> None:
    """A node on our worker run as the service dies with a 60 MB message, which the
    worker's health route (one answer for the whole runtime) repeats: each running pipeline
    there fails with AnswerTooLarge, naming the size and the cap, and the engine holds none
    of the answer. A worker of the test's own: the answer stays that large while it runs."""
    (tmp_path / "service").mkdir()
    with worker_service(tmp_path / "service") as (url, token, _):

        async def scenario() -> None:
            engine = ServiceEngine(settings(url, tmp_path, token))
            loud, calm = new_key("cams"), new_key("cams")
            try:
                await deploy(engine, calm)
                await engine.create(loud, crashing(loud.juturna_name, 60_000_000), "r1")
                await engine.warmup(loud)
                await engine.start(loud)
                tracemalloc.start()
                try:
                    deadline = time.monotonic() + 30
                    info = await engine.status(loud)
                    while info is not None and info.failure is None:
                        assert time.monotonic() < deadline, "the refusal not seen in 30 s"
                        await asyncio.sleep(0.2)
                        info = await engine.status(loud)
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                assert peak < 1_000_000, f"{peak} bytes held while the runtime answered 60 MB"
                assert info is not None
                assert info.failure is not None
                failure = info.failure
                assert (failure.reason, failure.step) == (FailureReason.AnswerTooLarge, Step.run)
                health = re.escape(f"{url}/operator/health")
                assert answered_size(failure.message, health) > 60_000_000
                other = await engine.status(calm)
                assert other is not None
                assert other.failure is not None
                assert other.failure.message == failure.message
            finally:
                for key in (loud, calm):
                    await engine.delete(key)
                await engine.close()

        asyncio.run(scenario())
