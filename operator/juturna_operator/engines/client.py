"""An async client for Juturna's HTTP service, with every answer mapped to a failure reason.

The endpoints are the contract upstream Juturna ships (``juturna serve``): ``/pipelines/new``,
``/{id}/warmup``, ``/{id}/start``, ``/{id}/stop``, ``/{id}/delete``, ``/{id}/status`` and
``GET /pipelines``. Connections are reused, and a failed connection is retried, but a
request is sent again only where that is safe:

* the connection was never made (refused, connect timeout): nothing reached the service;
* a GET, which changes nothing;
* a POST whose repetition is recognisable: when the connection dropped after the request
  went out, the service may have done it and only the answer was lost. The retry then gets
  Juturna's conflict (a warmup's ``AlreadyWarmedUp``, a start's ``AlreadyRunning``, a stop's
  ``NotRunning``, a delete's 404), and that conflict means done;
* a create (a second pipeline at worst; the orphan sweep removes it).

Any other POST (Juturna's deploy, our worker's shutdown) is not sent twice: the drop is
``RuntimeUnavailable``, and the caller looks at the service before it acts again.

No answer is read past ``MAX_ANSWER_BYTES``: a longer one is ``AnswerTooLarge``, and fails
what the runtime behind it runs, never the operator.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
from pathlib import PurePosixPath
from typing import Any

import httpx

from juturna_operator.domain import InstanceState
from juturna_operator.reasons import FailureReason, PipelineFailure, Step, classify

# Juturna's pipeline states (status "self") as ours.
JUTURNA_STATE = {
    "pipeline_created": InstanceState.Created,
    "pipeline_ready": InstanceState.Ready,
    "pipeline_running": InstanceState.Running,
}

# The request never reached the service.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
# The request may have reached it, and been done: only the answer is surely lost.
MAYBE_SENT = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

# The most of one answer the operator reads, from any runtime (a worker, a shard, a pod, a remote
# service); beyond it the answer is not read further, and fails what it is about
# (``AnswerTooLarge``). Answers are read in chunks as they arrive, never whole: a 60 MB health
# answer took the operator from 82 to 430 MiB (the chart's limit is 512Mi), and after the OOM
# restart its adoption asked the same runtime again. Sized from the largest answer a runtime gives,
# a full shard's health (``bench/health_size.py``, measured with a real shard; it lists the crashes
# of the pipelines the shard runs, a deleted one's leave with it, so a long-lived shard's answer
# does not grow past that): 32 pipelines (the default shard size) of 8 nodes, every node but the
# source crashed with a 400-byte message, 156 KiB; the same shard with every pipeline at the CRD's
# 128 nodes, all crashed, 2.7 MB (4 pipelines measured, 331 KiB). 4 MiB is 26 times the first and
# 1.5 times the second; parsing an answer that large costs the operator 11 MiB in the shard's shape,
# 75 MiB in the costliest JSON shape (a list of one-item lists).
MAX_ANSWER_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 64 * 1024  # read at a time, where the reader chooses (the sync one)

CONFLICTS = {
    "already warmed up": FailureReason.AlreadyWarmedUp,
    "already running": FailureReason.AlreadyRunning,
    "is not ready": FailureReason.NotReady,
    "is not running": FailureReason.NotRunning,
}


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default TLS context, built once: every client builds its own by default, which
    loads the CA bundle (about 18 ms of CPU on the event loop, per client: per worker of the
    process engine, even on plain http)."""
    return httpx.create_ssl_context()


# What Juturna answers to a step sent twice, when the first did it.
DONE_IF_REPEATED = {
    Step.warmup: FailureReason.AlreadyWarmedUp,
    Step.start: FailureReason.AlreadyRunning,
    Step.stop: FailureReason.NotRunning,
}


class HalfBuilt(PipelineFailure):
    """A deploy that failed part of the way. Juturna rolls nothing back (pitfall 4): the
    pipeline it built so far stays registered, with ``pipeline_id`` in ``state``; the caller
    takes it down."""

    def __init__(self, failure: PipelineFailure, pipeline_id: str, state: InstanceState) -> None:
        super().__init__(failure.reason, failure.step, failure.message)
        self.pipeline_id, self.state = pipeline_id, state


def listed_name(pipeline_id: str, status: dict[str, Any]) -> str:
    """The name a listed pipeline was created with: Juturna reports no name, but names the
    pipeline's folder ``<name>_<id>``."""
    return PurePosixPath(str(status.get("folder", ""))).name.removesuffix(f"_{pipeline_id}")


# Where a deploy stopped, read from the state of what it left: the step after that state.
_FAILED_AFTER = {
    InstanceState.Created: (FailureReason.WarmupFailed, Step.warmup),
    InstanceState.Ready: (FailureReason.StartFailed, Step.start),
}


class AnswerTooLarge(PipelineFailure):
    """An answer longer than ``MAX_ANSWER_BYTES``, of which no more than that was read: the
    runtime behind it failed what it was asked about (a worker's pipeline, a shard's or a
    service's pipelines, a pod's)."""

    def __init__(self, step: Step, url: str, size: str) -> None:
        super().__init__(
            FailureReason.AnswerTooLarge,
            step,
            f"{url} answered {size} bytes, over the size cap of the operator's answers "
            f"({MAX_ANSWER_BYTES} bytes, {MAX_ANSWER_BYTES // 2**20} MiB): the rest was not read",
        )


class CappedBody:
    """An answer's body, taken chunk by chunk as it arrives, up to ``MAX_ANSWER_BYTES``:
    ``AnswerTooLarge`` as soon as it announces (``Content-Length``) or reaches more."""

    def __init__(self, step: Step, url: str, announced: str | None) -> None:
        self.step, self.url = step, url
        if announced is not None and announced.isdigit() and int(announced) > MAX_ANSWER_BYTES:
            raise AnswerTooLarge(step, url, announced)
        self._chunks: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > MAX_ANSWER_BYTES:
            raise AnswerTooLarge(self.step, self.url, f"more than {MAX_ANSWER_BYTES}")
        self._chunks.append(chunk)

    def content(self) -> bytes:
        return b"".join(self._chunks)


class NoAnswer(PipelineFailure):
    """The service took the request and gave no answer in time (``RuntimeUnavailable``): a
    stop stuck there is told apart from a runtime that cannot be reached by this type."""

    def __init__(self, step: Step, message: str) -> None:
        super().__init__(FailureReason.RuntimeUnavailable, step, message)


def _message(response: httpx.Response, content: bytes, body: Any) -> str:
    if body is None:
        return content.decode(errors="replace").strip()[:500] or response.reason_phrase
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    if isinstance(body, dict) and isinstance(body.get("detail"), list):
        return "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}"
            for d in body["detail"]
        )
    return str(body)[:500]


def failure_of(response: httpx.Response, content: bytes, step: Step) -> PipelineFailure:
    """The reason for a non-2xx answer (``content``: its body), with the service's own words.
    Our worker's deploy names the step that failed and the pipeline it left: that step
    classifies the failure, and the pipeline comes back as ``HalfBuilt``."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    message = _message(response, content, body)
    said = body if isinstance(body, dict) else {}
    if said.get("step") in {s.value for s in Step}:
        step = Step(said["step"])
    code = response.status_code
    failure = PipelineFailure(classify(RuntimeError(), step).reason, step, message)
    if code == 404:
        failure = PipelineFailure(FailureReason.InvalidPipelineId, step, message)
    elif code == 409:
        for words, reason in CONFLICTS.items():
            if words in message:
                failure = PipelineFailure(reason, step, message)
    elif code == 422:
        failure = PipelineFailure(
            FailureReason.InvalidSpec, step, f"rejected by Juturna: {message}"
        )
    if said.get("pipeline_id"):
        state = InstanceState(said.get("state") or InstanceState.Created.value)
        return HalfBuilt(failure, str(said["pipeline_id"]), state)
    return failure


class JuturnaClient:
    """One Juturna service (a worker process or a remote ``juturna serve``)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 10.0,
        connect_retries: int = 2,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        # What messages show: the URL without any user:password part.
        self.shown_url = str(httpx.URL(self.base_url).copy_with(userinfo=b""))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout_s, verify=_tls_context()
        )
        self._retries = connect_retries
        self._timeout_s = timeout_s

    async def request(
        self, method: str, path: str, step: Step, timeout_s: float | None = None, **kw: Any
    ) -> Any:
        """One call; a 2xx answer's JSON, or a classified ``PipelineFailure``.

        ``done_if``: the failure that, on a POST sent again after its connection dropped,
        means the lost attempt did it (the call then returns None); ``resend=True``: a POST
        that may be repeated anyway. Other POSTs are never sent twice (see the module).

        A failure's message goes to status, Events and logs, so the token never does: a
        service that echoes the request's headers in its error would otherwise publish it."""
        try:
            return await self._request(method, path, step, timeout_s, **kw)
        except PipelineFailure as failure:
            if self.token and self.token in failure.message:
                failure.message = failure.message.replace(self.token, "<token>")
                failure.args = (failure.message,)
            raise

    async def _request(
        self,
        method: str,
        path: str,
        step: Step,
        timeout_s: float | None,
        done_if: FailureReason | None = None,
        resend: bool = False,
        **kw: Any,
    ) -> Any:
        timeout = timeout_s if timeout_s is not None else self._timeout_s
        resend = resend or method == "GET" or done_if is not None
        dropped = False  # a request went out and its connection dropped before the answer
        for attempt in range(self._retries + 1):
            if self._http.is_closed:
                # Its runtime was ended meanwhile (the deletes of a shard's pipelines all end
                # it; a retry waited here while one did): httpx would raise RuntimeError.
                raise PipelineFailure(
                    FailureReason.RuntimeUnavailable,
                    step,
                    f"{self.shown_url}{path}: not sent, as the runtime is being ended (the "
                    "operator closed its connection to it)",
                )
            try:
                response, content = await self._send(method, path, step, timeout, **kw)
                break
            except (*NOT_SENT, *MAYBE_SENT) as err:
                # A pooled connection the service closed (uvicorn does after a 500) fails
                # like a dropped one, whether or not the service read the request: only a
                # request that is safe to repeat is sent again.
                if isinstance(err, MAYBE_SENT):
                    if not resend:
                        raise PipelineFailure(
                            FailureReason.RuntimeUnavailable,
                            step,
                            f"{self.shown_url}{path}: the connection dropped before the answer "
                            f"({type(err).__name__}); not sent again, as the service may have "
                            "done it",
                        ) from err
                    dropped = True
                if attempt == self._retries:
                    raise PipelineFailure(
                        FailureReason.RuntimeUnavailable,
                        step,
                        f"cannot connect to {self.shown_url}: {type(err).__name__}",
                    ) from err
                await asyncio.sleep(0.1 * 2**attempt)
            except httpx.TimeoutException as err:
                raise NoAnswer(
                    step, f"{self.shown_url}{path} gave no answer within {timeout:g} s"
                ) from err
            except httpx.TransportError as err:
                raise PipelineFailure(
                    FailureReason.RuntimeUnavailable,
                    step,
                    f"{self.shown_url}{path}: {type(err).__name__}: {err}",
                ) from err
        if response.is_success:
            return json.loads(content)
        failure = failure_of(response, content, step)
        if dropped and failure.reason is done_if:
            return None  # the attempt whose answer was lost did it
        raise failure

    async def _send(
        self, method: str, path: str, step: Step, timeout_s: float, **kw: Any
    ) -> tuple[httpx.Response, bytes]:
        """One request and its answer's body, read as it arrives and no further than
        ``MAX_ANSWER_BYTES`` (else ``AnswerTooLarge``; closing the answer unread drops its
        connection, so nothing of it is read later either)."""
        request = self._http.build_request(method, path, timeout=timeout_s, **kw)
        response = await self._http.send(request, stream=True)
        url = f"{self.shown_url}{path}"
        try:
            body = CappedBody(step, url, response.headers.get("content-length"))
            async for chunk in response.aiter_bytes():
                body.add(chunk)
        finally:
            await response.aclose()
        return response, body.content()

    async def deploy(
        self, config: dict[str, Any], until: InstanceState, timeout_s: float
    ) -> tuple[str, InstanceState]:
        """Take a new pipeline as far as ``until`` in as few calls as Juturna allows: to
        Running with its one call (``POST /pipelines/deploy``: create, warm up, start), to
        Ready with create and warm up. Returns the pipeline's id and state.

        A failure names the step that failed. Juturna's deploy says only that it failed, so
        the half-built pipeline it left is found by its name and its state says where it
        stopped: ``HalfBuilt`` carries it, for the caller to delete."""
        if until is InstanceState.Running:
            try:
                status = await self.request(
                    "POST", "/pipelines/deploy", Step.create, timeout_s, json=config
                )
            except PipelineFailure as failure:
                raise await self._half_built(failure, config["pipeline"]["name"]) from None
            return str(status["pipe_id"]), InstanceState.Running
        pipeline_id = await self.create(config)
        if until is InstanceState.Ready:
            try:
                await self.warmup(pipeline_id, timeout_s)
            except PipelineFailure as failure:
                raise HalfBuilt(failure, pipeline_id, InstanceState.Created) from None
            return pipeline_id, InstanceState.Ready
        return pipeline_id, InstanceState.Created

    async def deploy_on_worker(
        self, config: dict[str, Any], until: InstanceState, timeout_s: float
    ) -> tuple[str, InstanceState]:
        """``deploy`` on our worker (``juturna_operator.worker``): one request to any of
        Created, Ready or Running, with the resource's output folder carried over between
        create and warmup. A failure names its step; ``HalfBuilt`` carries what it left."""
        answer = await self.request(
            "POST",
            "/operator/deploy",
            Step.create,
            timeout_s,
            json={"config": config, "until": until.value},
        )
        return str(answer["pipeline_id"]), InstanceState(answer["state"])

    async def _half_built(self, failure: PipelineFailure, name: str) -> PipelineFailure:
        """``failure`` of a deploy, as ``HalfBuilt`` if it left a pipeline called ``name``
        (the newest, should an older one still wait for the orphan sweep)."""
        if failure.reason is not FailureReason.CreateFailed:
            return failure  # refused before anything was built (422, 409, unreachable)
        try:
            listed = await self.list()
        except PipelineFailure:
            return failure
        found = [
            (pipeline_id, JUTURNA_STATE.get(str(status.get("self"))))
            for pipeline_id, status in listed.items()
            if listed_name(pipeline_id, status) == name
        ]
        if not found:
            return failure  # the create itself failed
        pipeline_id, state = found[-1]
        if state in _FAILED_AFTER:
            reason, step = _FAILED_AFTER[state]
            failure = PipelineFailure(reason, step, failure.message)
        return HalfBuilt(failure, pipeline_id, state or InstanceState.Created)

    async def create(self, config: dict[str, Any]) -> str:
        answer = await self.request("POST", "/pipelines/new", Step.create, json=config, resend=True)
        return str(answer["data"]["pipeline_id"])

    async def warmup(self, pipeline_id: str, timeout_s: float) -> Any:
        return await self._step(pipeline_id, Step.warmup, timeout_s)

    async def start(self, pipeline_id: str) -> Any:
        return await self._step(pipeline_id, Step.start, None)

    async def stop(self, pipeline_id: str, timeout_s: float) -> Any:
        return await self._step(pipeline_id, Step.stop, timeout_s)

    async def _step(self, pipeline_id: str, step: Step, timeout_s: float | None) -> Any:
        """Juturna's status dict, or None when a retry found it done (its answer was lost:
        the conflict Juturna then answers means the first request did it)."""
        return await self.request(
            "POST",
            f"/pipelines/{pipeline_id}/{step}",
            step,
            timeout_s,
            done_if=DONE_IF_REPEATED[step],
        )

    async def delete(
        self, pipeline_id: str, timeout_s: float | None = None, wipe: bool = True
    ) -> Any:
        """Juturna's delete; ``wipe``: its folder too (else it stays, for the resource's
        next instance)."""
        return await self.request(
            "POST",
            f"/pipelines/{pipeline_id}/delete",
            Step.delete,
            timeout_s,
            params={"wipe": "true" if wipe else "false"},
            done_if=FailureReason.InvalidPipelineId,
        )

    async def status(self, pipeline_id: str) -> Any:
        return await self.request("GET", f"/pipelines/{pipeline_id}/status", Step.run)

    async def list(self) -> dict[str, Any]:
        """``{pipeline_id: status}`` for every pipeline on the service."""
        answer = await self.request("GET", "/pipelines", Step.run)
        merged: dict[str, Any] = {}
        for entry in answer.get("pipelines", []):
            merged.update(entry)
        return merged

    async def close(self) -> None:
        await self._http.aclose()
