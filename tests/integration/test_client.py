"""The HTTP client against a real `juturna serve`: every answer maps to its reason."""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from processes import free_port

from juturna_operator.api import PipelineSpec
from juturna_operator.engines.client import MAX_ANSWER_BYTES, JuturnaClient
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from support import CannedAnswer, JuturnaServe, answered_size, wait_until


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JuturnaServe]:
    base = tmp_path_factory.mktemp("serve")
    server = JuturnaServe(base / "pipelines", base / "serve.log").start()
    yield server
    server.stop()


def config(name: str, middle: str = "scale", **cfg: Any) -> dict[str, Any]:
    return PipelineSpec.model_validate(
        {
            "plugins": ["tones", "faulty"],
            "nodes": [
                {"name": "src", "type": "source", "mark": "ticker", "configuration": {"rate": 20}},
                {"name": "mid", "type": "proc", "mark": middle, "configuration": cfg},
            ],
            "links": [{"from": "src", "to": "mid"}],
        }
    ).to_juturna_config(name)


def failure(coro: Any) -> PipelineFailure:
    with pytest.raises(PipelineFailure) as err:
        asyncio.run(coro)
    return err.value


def with_client(url: str, fn: Any, **kw: Any) -> Any:
    async def run() -> Any:
        client = JuturnaClient(url, **kw)
        try:
            return await fn(client)
        finally:
            await client.close()

    return run()


def test_the_whole_lifecycle_and_each_conflict(serve: JuturnaServe) -> None:
    async def scenario(c: JuturnaClient) -> dict[str, Any]:
        pid = await c.create(config("ns__a__00000000"))
        reasons = {}
        for label, call in (("start-before-warmup", c.start(pid)),):
            try:
                await call
            except PipelineFailure as f:
                reasons[label] = f
        await c.warmup(pid, 30)
        for label, call in (("warmup-twice", c.warmup(pid, 30)),):
            try:
                await call
            except PipelineFailure as f:
                reasons[label] = f
        await c.start(pid)
        for label, call in (("start-twice", c.start(pid)),):
            try:
                await call
            except PipelineFailure as f:
                reasons[label] = f
        status = await c.status(pid)
        listed = await c.list()
        await c.stop(pid, 10)
        try:
            await c.stop(pid, 10)
        except PipelineFailure as f:
            reasons["stop-twice"] = f
        await c.delete(pid)
        return {"reasons": reasons, "status": status, "listed": listed, "pid": pid}

    out = asyncio.run(with_client(serve.url, scenario))
    assert out["status"]["self"] == "pipeline_running"
    assert out["pid"] in out["listed"]
    got = {k: (f.reason, f.reason.code, f.message) for k, f in out["reasons"].items()}
    pid = out["pid"]
    assert got == {
        "start-before-warmup": (FailureReason.NotReady, 409, f"pipeline {pid} is not ready"),
        "warmup-twice": (FailureReason.AlreadyWarmedUp, 409, f"pipeline {pid} already warmed up"),
        "start-twice": (FailureReason.AlreadyRunning, 409, f"pipeline {pid} already running"),
        "stop-twice": (FailureReason.NotRunning, 409, f"pipeline {pid} is not running"),
    }


def test_unknown_id_is_invalid_pipeline_id(serve: JuturnaServe) -> None:
    f = failure(with_client(serve.url, lambda c: c.status("nope")))
    assert (f.reason, f.reason.code, f.message) == (
        FailureReason.InvalidPipelineId,
        404,
        "no pipeline with id: nope",
    )


def test_a_bad_body_is_invalid_spec_with_the_detail(serve: JuturnaServe) -> None:
    f = failure(with_client(serve.url, lambda c: c.create({"version": "1"})))
    assert f.reason is FailureReason.InvalidSpec
    assert f.reason.code == 422
    assert f.message.startswith("rejected by Juturna: body.plugins: Field required")


def test_a_warmup_failure_is_warmup_failed_with_juturnas_message(serve: JuturnaServe) -> None:
    async def scenario(c: JuturnaClient) -> None:
        pid = await c.create(config("ns__b__00000000", "boom", model="x.bin"))
        try:
            await c.warmup(pid, 30)
        finally:
            await c.delete(pid)

    f = failure(with_client(serve.url, scenario))
    assert (f.reason, f.reason.code) == (FailureReason.WarmupFailed, 500)
    assert f.message == "Unexpected FileNotFoundError exception, see logs"


def test_nobody_listening_is_runtime_unavailable_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    f = failure(with_client(url, lambda c: c.list(), connect_retries=2))
    assert (f.reason, f.reason.code) == (FailureReason.RuntimeUnavailable, 503)
    assert f.reason.retryable
    assert f.message == f"cannot connect to {url}: ConnectError"
    assert time.monotonic() - started >= 0.3  # two retries: 0.1 s, then 0.2 s


def test_no_answer_in_time_is_runtime_unavailable(serve: JuturnaServe) -> None:
    async def scenario(c: JuturnaClient) -> None:
        pid = await c.create(config("ns__c__00000000", "slow", seconds=3))
        try:
            await c.warmup(pid, 0.5)
        finally:
            await asyncio.sleep(3)
            await c.delete(pid)

    f = failure(with_client(serve.url, scenario))
    assert f.reason is FailureReason.RuntimeUnavailable
    assert f.message.endswith("/warmup gave no answer within 0.5 s")


# -- answers over the size cap -----------------------------------------------------------------


def peak_allocated(coro: Any) -> tuple[Any, int]:
    """What ``coro`` returned (or the PipelineFailure it raised), and the most memory Python
    held for it at once beyond what it held before, in bytes."""
    tracemalloc.start()
    try:
        try:
            result = asyncio.run(coro)
        except PipelineFailure as failure:
            result = failure
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_answer_over_the_cap_is_answer_too_large_and_its_body_is_never_read(
    serve: JuturnaServe,
) -> None:
    """A real `juturna serve` whose pipeline's status is 60 MB: its name is that long, and
    the status repeats it in the pipeline's folder. The status call fails with
    AnswerTooLarge, naming the size announced and the cap, having read nothing of it."""
    created = asyncio.run(
        with_client(serve.url, lambda c: c.create(config("n" * 60_000_000)), timeout_s=60)
    )
    pid = str(created)
    try:
        f, peak = peak_allocated(with_client(serve.url, lambda c: c.status(pid)))
        assert isinstance(f, PipelineFailure), f"the status was read whole: {str(f)[:200]}"
        assert (f.reason, f.reason.code, f.step) == (FailureReason.AnswerTooLarge, 502, Step.run)
        assert answered_size(f.message, re.escape(f"{serve.url}/pipelines/{pid}/status")) > 60e6
        assert peak < 1_000_000, f"{peak} bytes held while refusing the answer"
    finally:  # no folder to wipe: its name is too long for one
        asyncio.run(with_client(serve.url, lambda c: c.delete(pid, wipe=False)))


class Flood(BaseHTTPRequestHandler):
    """Stands in for a runtime that answers without a Content-Length (chunked), which the
    real worker and `juturna serve` cannot be made to do: their answers are rendered whole,
    and say their length (the test above). ``GET /json/<n>``: a JSON answer of exactly n
    bytes, sent in 64 KiB chunks; ``sent`` counts what went out before the client hung up."""

    protocol_version = "HTTP/1.1"
    sent: ClassVar[list[int]] = []

    def do_GET(self) -> None:
        size = int(self.path.rsplit("/", 1)[1])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        # Made as it goes (the test measures what this process holds): {"pad": "x…x"}.
        pads = [65536] * ((size - 11) // 65536) + [(size - 11) % 65536]
        chunks = itertools.chain([b'{"pad": "'], (b"x" * n for n in pads if n), [b'"}'])
        sent = 0
        try:
            for chunk in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        Flood.sent.append(sent)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def flood() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flood)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Flood.sent.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_chunked_answer_is_read_up_to_the_cap_and_no_further(flood: str) -> None:
    """60 MB in chunks, no length announced: the client stops at the cap, holding no more
    than the cap, and hangs up; the runtime could send little more than that."""
    f, peak = peak_allocated(
        with_client(flood, lambda c: c.request("GET", "/json/60000000", Step.run))
    )
    assert isinstance(f, PipelineFailure), "the answer was read whole"
    assert (f.reason, f.step) == (FailureReason.AnswerTooLarge, Step.run)
    assert f.message == (
        f"{flood}/json/60000000 answered more than {MAX_ANSWER_BYTES} bytes, over the size "
        f"cap of the operator's answers ({MAX_ANSWER_BYTES} bytes, 4 MiB): the rest was not read"
    )
    assert peak < MAX_ANSWER_BYTES + 1_000_000, f"{peak} bytes held while reading the answer"
    wait_until(lambda: bool(Flood.sent), 10, "the runtime's write to end")
    assert Flood.sent[0] < 30_000_000, f"{Flood.sent[0]} bytes sent: the client read on"


def test_an_answer_of_exactly_the_cap_is_read(flood: str) -> None:
    answer = asyncio.run(
        with_client(flood, lambda c: c.request("GET", f"/json/{MAX_ANSWER_BYTES}", Step.run))
    )
    assert len(answer["pad"]) == MAX_ANSWER_BYTES - 11
    f = failure(
        with_client(flood, lambda c: c.request("GET", f"/json/{MAX_ANSWER_BYTES + 1}", Step.run))
    )
    assert f.reason is FailureReason.AnswerTooLarge


def test_a_request_after_the_client_closed_is_runtime_unavailable(serve: JuturnaServe) -> None:
    """A runtime being ended closes its client while another task may still ask it (its
    retry waiting): that request fails as the runtime's absence, not as a RuntimeError."""

    async def scenario(c: JuturnaClient) -> Any:
        await c.close()
        return await c.list()

    f = failure(with_client(serve.url, scenario))
    assert (f.reason, f.step) == (FailureReason.RuntimeUnavailable, Step.run)
    assert f.message == (
        f"{serve.url}/pipelines: not sent, as the runtime is being ended (the operator closed "
        "its connection to it)"
    )


class LosesIt(CannedAnswer):
    """Stands in for a `juturna serve` whose deploy answers 404 "no pipeline with id" (its
    deploy creates the pipeline, then reads its status: a pipeline lost in between, as the
    service fault test once saw, is not something a real service can be made to do on cue)."""

    status = 404
    body = b'{"message":"no pipeline with id: 8b56a568"}'


def test_a_pipeline_the_runtime_lost_during_its_deploy_is_deployed_again() -> None:
    """A 404 from a deploy is the runtime's doing, never the spec's: RuntimeUnavailable
    (retried without spending a restart), not InvalidPipelineId (which left the Pipeline
    Failed for good in the remote-runtime fault test)."""
    from juturna_operator.domain import InstanceState, PipelineKey
    from juturna_operator.engines.base import Plan
    from juturna_operator.engines.service import ServiceEngine
    from juturna_operator.settings import Runtime, Settings

    server = ThreadingHTTPServer(("127.0.0.1", 0), LosesIt)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    settings = Settings(engine="service", runtimes={"r": Runtime("r", url)}, default_runtime="r")
    engine = ServiceEngine(settings)
    key = PipelineKey("team-a", "lost", "8b56a568-0000-4000-8000-000000000000")
    config = {"version": "1.0", "plugins": [], "pipeline": {"name": key.juturna_name}}

    async def create() -> None:
        try:
            await engine.create(key, config, "r1", Plan(until=InstanceState.Running))
        finally:
            await engine.close()

    try:
        with pytest.raises(PipelineFailure) as lost:
            asyncio.run(create())
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert lost.value.reason is FailureReason.RuntimeUnavailable
    assert not lost.value.reason.counts_as_restart
    assert (lost.value.step, lost.value.message) == (
        Step.create,
        "runtime 'r' lost the pipeline while deploying it (no pipeline with id: 8b56a568); "
        "it is deployed again",
    )
