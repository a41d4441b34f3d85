"""The HTTP client against a real `juturna serve`: every answer maps to its reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from controlplane import free_port

from juturna_operator.api import PipelineSpec
from juturna_operator.engines.client import JuturnaClient
from juturna_operator.reasons import FailureReason, PipelineFailure
from support import JuturnaServe


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
