"""The operator's own finalizer: the guarded JSON patches that add and remove it, the writer
that reads the object again when a guard fails (a local HTTP server stands in for the API
server; the control plane's own answers are tested in tests/integration), and kopf left
with no reason to write a finalizer of its own."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from aiohttp import web
from kubernetes import client as k8s

from juturna_operator import handlers
from juturna_operator.domain import PipelineKey
from juturna_operator.patching import (
    FINALIZER,
    ApiConnection,
    FinalizerPatcher,
    FinalizerWriteRefused,
    finalizer_patch,
    holds_finalizer,
)

KEY = PipelineKey("team", "tones", "uid-1")
UID_TEST = {"op": "test", "path": "/metadata/uid", "value": "uid-1"}
ARGO = "argocd.argoproj.io/hook-finalizer"


def meta(*finalizers: str, deleting: bool = False, uid: str = "uid-1") -> dict[str, Any]:
    found: dict[str, Any] = {"uid": uid, "resourceVersion": "41", "name": "tones"}
    if finalizers:
        found["finalizers"] = list(finalizers)
    if deleting:
        found["deletionTimestamp"] = "2026-12-08T00:00:00Z"
    return found


def test_an_add_to_no_list_is_guarded_by_the_resource_version() -> None:
    """JSON patch cannot test that a member is absent: a list someone made meanwhile changes
    the resourceVersion, and the add is refused rather than replacing that list."""
    assert finalizer_patch(meta(), add=True) == [
        UID_TEST,
        {"op": "test", "path": "/metadata/resourceVersion", "value": "41"},
        {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
    ]


def test_an_add_to_another_writers_list_appends_to_exactly_that_list() -> None:
    assert finalizer_patch(meta(ARGO), add=True) == [
        UID_TEST,
        {"op": "test", "path": "/metadata/finalizers", "value": [ARGO]},
        {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
    ]


def test_nothing_is_added_where_it_is_or_while_the_pipeline_is_being_deleted() -> None:
    assert finalizer_patch(meta(ARGO, FINALIZER), add=True) is None
    # The API server refuses new finalizers on an object being deleted.
    assert finalizer_patch(meta(ARGO, deleting=True), add=True) is None


def test_a_removal_tests_each_index_it_removes_from_the_last() -> None:
    assert finalizer_patch(meta(FINALIZER, deleting=True), add=False) == [
        UID_TEST,
        {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]
    # Two copies (two writers added it at once): both go, the later index first, so that the
    # earlier one's index still holds when its turn comes; the other finalizer stays.
    assert finalizer_patch(meta(FINALIZER, ARGO, FINALIZER), add=False) == [
        UID_TEST,
        {"op": "test", "path": "/metadata/finalizers/2", "value": FINALIZER},
        {"op": "remove", "path": "/metadata/finalizers/2"},
        {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]


def test_nothing_is_removed_where_it_is_not() -> None:
    assert finalizer_patch(meta(ARGO, deleting=True), add=False) is None
    assert finalizer_patch(meta(), add=False) is None
    assert holds_finalizer(meta(ARGO, FINALIZER))
    assert not holds_finalizer(meta(ARGO))


Answer = tuple[int, dict[str, Any]]


async def _serve(answers: list[Answer], seen: list[tuple[str, Any]]) -> web.AppRunner:
    """A stand-in API server: records each request (method, JSON body) and gives the next
    answer."""

    async def answer(request: web.Request) -> web.Response:
        body = await request.json() if request.method == "PATCH" else None
        seen.append((request.method, body))
        if request.method == "PATCH":
            assert request.headers["Content-Type"] == "application/json-patch+json"
        status, reply = answers.pop(0)
        return web.json_response(reply, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def _write(answers: list[Answer], add: bool, start: dict[str, Any]) -> tuple[Any, list[Any]]:
    """One add (``add``) or removal through a FinalizerPatcher against the stand-in; what it
    returned (or raised), and the requests it made."""
    seen: list[tuple[str, Any]] = []

    async def run() -> Any:
        runner = await _serve(answers, seen)
        configuration = k8s.Configuration()
        configuration.host = f"http://127.0.0.1:{runner.addresses[0][1]}"
        connection = ApiConnection(configuration, 2)
        patcher = FinalizerPatcher(connection)
        try:
            if add:
                return await patcher.add(KEY, start)
            return await patcher.remove(KEY, start)
        except FinalizerWriteRefused as refused:
            return refused
        finally:
            await connection.close()
            await runner.cleanup()

    return asyncio.run(run()), seen


GUARD_FAILED = {
    "kind": "Status",
    "message": "the server rejected our request due to an error in our request",
    "code": 422,
}


def test_an_add_whose_guard_failed_reads_again_and_appends_to_the_new_list() -> None:
    """Argo CD added its finalizer between the operator's read and its write: the guarded
    add is refused, the object read again, and ours appended after Argo CD's."""
    fresh = {"metadata": meta(ARGO) | {"resourceVersion": "42"}}
    result, seen = _write([(422, GUARD_FAILED), (200, fresh), (200, {})], True, meta())
    assert result is True
    assert [method for method, _ in seen] == ["PATCH", "GET", "PATCH"]
    assert seen[2][1] == finalizer_patch(fresh["metadata"], add=True)


def test_an_add_to_a_pipeline_deleted_meanwhile_deploys_nothing() -> None:
    # Being deleted (the API server refuses new finalizers then): read again, nothing to add.
    result, seen = _write(
        [(422, GUARD_FAILED), (200, {"metadata": meta(ARGO, deleting=True)})], True, meta(ARGO)
    )
    assert result is False
    assert [method for method, _ in seen] == ["PATCH", "GET"]
    # Gone.
    result, seen = _write([(404, {})], True, meta())
    assert result is False
    # Made again under the same name: another object, not this one's to hold.
    result, seen = _write(
        [(422, GUARD_FAILED), (200, {"metadata": meta(uid="uid-2")})], True, meta()
    )
    assert result is False


def test_a_refused_finalizer_write_names_the_api_servers_message() -> None:
    forbidden = {
        "kind": "Status",
        "message": 'pipelines.juturna.io "tones" is forbidden: User "jo" cannot patch resource '
        '"pipelines" in API group "juturna.io" in the namespace "team"',
        "code": 403,
    }
    result, _ = _write([(403, forbidden)], False, meta(FINALIZER, deleting=True))
    assert isinstance(result, FinalizerWriteRefused)
    assert result.status == 403
    assert str(result) == (
        'finalizer write refused (403 Forbidden): pipelines.juturna.io "tones" is forbidden: '
        'User "jo" cannot patch resource "pipelines" in API group "juturna.io" in the '
        'namespace "team"'
    )


def test_a_guard_that_keeps_failing_gives_up_with_the_api_servers_message() -> None:
    answers: list[Answer] = []
    for _ in range(5):
        answers += [(422, GUARD_FAILED), (200, {"metadata": meta(FINALIZER, deleting=True)})]
    result, seen = _write(answers, False, meta(FINALIZER, deleting=True))
    assert isinstance(result, FinalizerWriteRefused)
    assert str(result) == (
        "finalizer write refused (422 Unprocessable Entity): "
        "the server rejected our request due to an error in our request"
    )
    assert len(seen) == 10


def test_kopf_has_no_handler_that_asks_for_a_finalizer() -> None:
    """kopf adds its finalizer for on.create/update/delete/resume handlers and daemons
    (kopf/_core/reactor/processing.py), and removes its finalizer's name from any object
    where no handler needs it: the operator registers watch-event handlers only (so kopf
    keeps no progress either), and kopf's finalizer name is not the operator's."""
    registry = kopf.get_default_registry()
    watched = [h.fn for h in registry._watching.get_all_handlers()]
    assert handlers.enqueue in watched  # the module's handlers are registered
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()
    assert handlers.KOPF_FINALIZER != FINALIZER
