"""The status writer on the event loop: what it sends, what it makes of a refusal, and the
rotated in-cluster token (a local HTTP server stands in for the API server's PATCH
endpoint; the control plane's own answers are tested in tests/integration)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client as k8s
from kubernetes.config.incluster_config import InClusterConfigLoader

from juturna_operator import patching
from juturna_operator.domain import PipelineKey
from juturna_operator.patching import StatusPatcher, StatusWriteRefused

KEY = PipelineKey("team", "tones", "uid-1")
STATUS_BODY = json.dumps(
    {
        "kind": "Status",
        "status": "Failure",
        "message": 'Pipeline.juturna.io "tones" is invalid: status.phase: Unsupported value: '
        '"Sleeping"',
        "code": 422,
    }
)


def test_a_refusal_names_the_api_servers_message_in_plain_words() -> None:
    refusal = StatusWriteRefused(422, "Unprocessable Entity", STATUS_BODY)
    assert refusal.status == 422
    assert str(refusal) == (
        "status write refused (422 Unprocessable Entity): Pipeline.juturna.io "
        '"tones" is invalid: status.phase: Unsupported value: "Sleeping"'
    )


def test_a_refusal_without_a_status_body_shows_the_body_as_it_came() -> None:
    assert str(StatusWriteRefused(502, "Bad Gateway", "upstream down")) == (
        "status write refused (502 Bad Gateway): upstream down"
    )


async def _serve(answers: list[tuple[int, str]], seen: list[dict[str, Any]]) -> web.AppRunner:
    async def patch(request: web.Request) -> web.Response:
        seen.append(
            {
                "path": request.path,
                "type": request.headers.get("Content-Type"),
                "authorization": request.headers.get("Authorization"),
                "body": await request.json(),
            }
        )
        status, text = answers.pop(0)
        return web.Response(status=status, text=text, content_type="application/json")

    app = web.Application()
    app.router.add_patch("/{tail:.*}", patch)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def _port(runner: web.AppRunner) -> int:
    server = runner.addresses[0]
    return int(server[1])


def test_a_merge_patch_of_the_status_subresource_with_the_rotated_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pod, the kubelet rotates the projected token: the next write after the refresh
    period carries the new one, read by the client's own in-cluster hook."""
    monkeypatch.setattr(patching, "TOKEN_REFRESH_S", 0.0)
    token = tmp_path / "token"
    token.write_text("first")
    seen: list[dict[str, Any]] = []
    answers = [(200, "{}"), (404, "{}"), (200, "{}"), (422, STATUS_BODY)]

    async def writes() -> StatusWriteRefused:
        runner = await _serve(answers, seen)
        configuration = k8s.Configuration()
        loader = InClusterConfigLoader(
            str(token),
            str(tmp_path / "ca.crt"),
            environ={
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(_port(runner)),
            },
        )
        (tmp_path / "ca.crt").write_text("unused: the local server speaks plain HTTP")
        # The client's hook reads the file again once its own minute has passed.
        loader._token_refresh_period = dt.timedelta(0)
        loader.load_and_set(configuration)
        configuration.host = configuration.host.replace("https:", "http:")
        patcher = StatusPatcher(configuration, connections=2)
        try:
            await patcher.patch(KEY, {"phase": "Pending"})
            await patcher.patch(KEY, {"phase": "Creating"})  # 404: deleted meanwhile
            token.write_text("second")
            await patcher.patch(KEY, {"phase": "Running"})
            with pytest.raises(StatusWriteRefused) as refusal:
                await patcher.patch(KEY, {"phase": "Sleeping"})
            return refusal.value
        finally:
            await patcher.close()
            await runner.cleanup()

    refusal = asyncio.run(writes())
    assert [s["path"] for s in seen] == [
        "/apis/juturna.io/v1alpha1/namespaces/team/pipelines/tones/status"
    ] * 4
    assert {s["type"] for s in seen} == {"application/merge-patch+json"}
    assert [s["body"] for s in seen] == [
        {"status": {"phase": phase}} for phase in ("Pending", "Creating", "Running", "Sleeping")
    ]
    assert [s["authorization"] for s in seen] == [
        "bearer first",
        "bearer first",
        "bearer second",
        "bearer second",
    ]
    assert refusal.status == 422
    assert "Unsupported value" in str(refusal)
