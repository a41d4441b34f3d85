"""Remote Juturna services: unreachable runtimes, recovery, and orphans."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import pytest

from juturna_operator.api import PipelineSpec
from juturna_operator.engines.client import JuturnaClient
from support import JuturnaServe, Operator, Pipelines, manifest, only_on

pytestmark = pytest.mark.cluster


@pytest.fixture
def service_operator(operator: Operator) -> Operator:
    return only_on(operator, "service", "runtimes are configured only for the service engine run")


@pytest.mark.reliability(repeat=True)
def test_an_unreachable_runtime_is_retried_and_recovers_by_itself(
    pipelines: Pipelines, service_operator: Operator, fault_log: Any
) -> None:
    policy = {"maxRestarts": 1, "backoffSeconds": 0.2}
    pipelines.apply(manifest("far", runtime="later", restartPolicy=policy))
    body = pipelines.wait_failure("far", "RuntimeUnavailable")
    failure = body["status"]["failure"]
    assert failure["code"] == 503
    assert failure["message"] == (
        f"cannot connect to http://127.0.0.1:{service_operator.later_port}: ConnectError"
    )
    time.sleep(2)  # several backoffs: an unreachable runtime spends no restart budget
    body = pipelines.get("far")
    assert body["status"]["phase"] == "Pending"
    assert body["status"]["restarts"] == 0
    later = JuturnaServe(
        service_operator.workdir,
        service_operator.log.with_name("later.log"),
        port=service_operator.later_port,
    ).start()
    try:
        up = time.monotonic()
        body = pipelines.wait_ready("far", timeout=30)
        assert body["status"]["phase"] == "Running"
        assert body["status"].get("failure") is None
        fault_log.record(
            "a runtime unreachable, then started",
            "service",
            "RuntimeUnavailable (503), no restart spent; Running once it answers",
            time.monotonic() - up,
        )
        pipelines.delete("far")
        pipelines.wait_gone("far")
    finally:
        later.stop()


def remote_ids(url: str) -> set[str]:
    with urllib.request.urlopen(f"{url}/pipelines", timeout=5) as resp:
        return {pid for entry in json.load(resp)["pipelines"] for pid in entry}


def test_orphans_on_the_service_are_swept_and_others_left_alone(
    pipelines: Pipelines, service_operator: Operator
) -> None:
    assert service_operator.serve is not None
    url = service_operator.serve.url

    def config(name: str) -> dict:
        spec = PipelineSpec.model_validate(
            {
                "plugins": ["tones"],
                "nodes": [{"name": "src", "type": "source", "mark": "ticker"}],
            }
        )
        return spec.to_juturna_config(name)

    async def create_both() -> tuple[str, str]:
        client = JuturnaClient(url)
        try:
            # Named like ours, for a resource that does not exist: an orphan.
            ours = await client.create(config("gone__pipe__deadbeef"))
            theirs = await client.create(config("someone-elses"))
            return ours, theirs
        finally:
            await client.close()

    orphan, foreign = asyncio.run(create_both())
    deadline = time.monotonic() + 20
    while orphan in remote_ids(url):
        assert time.monotonic() < deadline, "the orphan was not swept"
        time.sleep(0.2)
    assert foreign in remote_ids(url)
    assert "removing orphan" in service_operator.log_text()
