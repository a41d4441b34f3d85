"""The service engine: pipelines on remote Juturna services (``juturna serve``), by name.

The administrator configures runtimes (``JUTURNA_OPERATOR_RUNTIMES``); a Pipeline picks one
with ``spec.runtime``. URLs never come from a Pipeline, only from the operator's own
configuration, so a Pipeline author cannot make the operator call an address of their
choosing.

Each remote pipeline is named ``<namespace>__<name>__<uid8>``, so the operator can tell its
own pipelines from anybody else's on a shared service. ``sweep`` removes the ones no
resource references any more: pipelines of deleted resources, half-built pipelines a
failed deploy left (Juturna's deploy has no rollback), and pipelines a delete could not
reach (the runtime was unreachable; the resource went, the sweep retries). It sweeps only
the namespaces this operator watches: an operator started with ``-n a`` shares the runtime
with the one that watches ``b``. Juturna reports back nothing else the operator could mark
its pipelines with (status and list give the id, the folder, the state and the nodes' known
configuration keys), so the namespace in the name is the owner.

A new pipeline reaches Running with one request, Juturna's deploy (``POST
/pipelines/deploy``), and Juturna's ready (a Standby Pipeline's) with two (create, warm up); a
failed deploy names the step that failed, and the half-built pipeline it leaves is held and
deleted like any other. The per-step requests remain for ready → Running and for recovery.

One status request that fails is not a dead runtime (a loaded service answers late):
``MISSES_ALLOWED`` failures in a row are ``RuntimeUnavailable``; until then the last known
state stands.

What a plain remote service cannot tell: Juturna does not report a node thread that died
(its status still says running). Only our worker module (``juturna_operator.worker``), run
as the remote service, adds the health route that reports it. Nor can a plain service stop
the nodes of a pipeline whose start failed (see ``_start``); our worker stops them itself.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from juturna_operator.domain import InstanceState, PipelineKey, log_extra_of_juturna_name
from juturna_operator.engines.base import (
    DEFAULT_PLAN,
    WARMUP_TIMEOUT_S,
    InstanceInfo,
    LockedEngine,
    Plan,
    apply_health,
    held,
    node_statuses,
    vacant,
)
from juturna_operator.engines.client import (
    JUTURNA_STATE,
    AnswerTooLarge,
    HalfBuilt,
    JuturnaClient,
    NoAnswer,
    listed_name,
)
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import Runtime, Settings

log = logging.getLogger(__name__)

OURS = re.compile(r"^[a-z0-9.-]+__[a-z0-9.-]+__[0-9a-f-]{8}$")
HEALTH_TIMEOUT_S = 2.0
MISSES_ALLOWED = 3  # failed status requests in a row before the runtime counts as unavailable
PROBE_TIMEOUT_S = 2.0  # a runtime that does not list its pipelines within this is unreachable


@dataclass
class _Remote:
    runtime: str
    pipeline_id: str
    revision: str
    state: InstanceState = InstanceState.Created
    # The last status the runtime gave, kept through a few failed status requests.
    nodes: dict[str, str] = field(default_factory=dict)
    misses: int = 0
    # A delete could not reach the runtime: the pipeline must go, and the sweep may take it.
    doomed: bool = False


class ServiceEngine(LockedEngine):
    """Drives pipelines on the administrator's named Juturna services."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings
        self._runtimes: dict[str, Runtime] = dict(settings.runtimes)
        self._remotes: dict[PipelineKey, _Remote] = {}
        self._abandoned: set[str] = set()  # stuck in a stop on the service: never touched again
        self._clients: dict[str, JuturnaClient] = {}
        self._plain: dict[str, bool] = {}  # runtime -> a plain `juturna serve` (no health route)

    def _client(self, runtime: str) -> JuturnaClient:
        config = self._runtimes[runtime]
        token = config.token()
        client = self._clients.get(runtime)
        if client is None or client.token != token:
            client = self._clients[runtime] = JuturnaClient(config.url, token=token)
        return client

    # -- the Engine interface --

    async def create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan = DEFAULT_PLAN
    ) -> str:
        runtime = plan.runtime or self._settings.default_runtime
        if runtime not in self._runtimes:
            raise PipelineFailure(
                FailureReason.UnknownRuntime, Step.create, f"no runtime named {runtime!r}"
            )
        return await super().create(key, config, revision, plan)

    async def _create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan
    ) -> str:
        runtime = plan.runtime or self._settings.default_runtime
        assert runtime is not None  # create() checked it
        vacant(self._remotes, key)
        client = self._client(runtime)
        try:
            pipeline_id, state = await self._deploy(key, client, config, plan.until)
        except HalfBuilt as failure:
            # Held like any instance, so the delete that follows a failed step takes it down.
            remote = self._remotes[key] = _Remote(
                runtime, failure.pipeline_id, revision, failure.state
            )
            if failure.reason is FailureReason.StartFailed:
                raise await self._still_running(client, remote, failure) from None
            raise
        except PipelineFailure as failure:
            if failure.reason is not FailureReason.InvalidPipelineId:
                raise
            # Juturna lost the pipeline its own deploy had just made (a restarted service, a
            # delete by another client): the runtime's doing, not the spec's; deployed again.
            raise PipelineFailure(
                FailureReason.RuntimeUnavailable,
                Step.create,
                f"runtime {runtime!r} lost the pipeline while deploying it ({failure.message}); "
                "it is deployed again",
            ) from None
        self._remotes[key] = _Remote(runtime, pipeline_id, revision, state)
        return pipeline_id

    async def _warmup(self, key: PipelineKey) -> None:
        remote = held(self._remotes, key, Step.warmup)
        await self._client(remote.runtime).warmup(remote.pipeline_id, WARMUP_TIMEOUT_S)
        remote.state = InstanceState.Ready

    async def _start(self, key: PipelineKey) -> None:
        remote = held(self._remotes, key, Step.start)
        client = self._client(remote.runtime)
        try:
            await client.start(remote.pipeline_id)
        except PipelineFailure as failure:
            if failure.reason is FailureReason.StartFailed:
                failure = await self._still_running(client, remote, failure)
            raise failure
        remote.state = InstanceState.Running

    async def _still_running(
        self, client: JuturnaClient, remote: _Remote, failure: PipelineFailure
    ) -> PipelineFailure:
        """``failure``, saying which nodes still run if the start left some running.

        Juturna starts the nodes one by one and, when one fails, leaves the others running
        and the pipeline ready (not running). A plain ``juturna serve`` then has no way to
        stop them: its stop answers "not running", and its delete does not stop a pipeline
        that is not running. Our worker, run as the service, stops them itself."""
        try:
            nodes = node_statuses(await client.status(remote.pipeline_id))
        except PipelineFailure:
            return failure
        running = sorted(name for name, status in nodes.items() if status == "Running")
        if not running:
            return failure
        return PipelineFailure(
            failure.reason,
            failure.step,
            f"{failure.message}; node(s) {', '.join(running)} started and keep running on "
            f"runtime {remote.runtime!r} until it restarts: Juturna's service cannot stop the "
            "nodes of a pipeline whose start failed (run juturna_operator.worker as the "
            "service: it stops them)",
        )

    async def _stop(self, key: PipelineKey) -> None:
        remote = held(self._remotes, key, Step.stop)
        if remote.state is InstanceState.Running:
            timeout = self._settings.stop_timeout_s
            try:
                await self._client(remote.runtime).stop(remote.pipeline_id, timeout)
            except PipelineFailure as failure:
                if failure.reason is FailureReason.InvalidPipelineId:
                    # The service lost it (it restarted): nothing runs, nothing is left to
                    # stop or delete. Absent, so the next pass deploys it again.
                    self._remotes.pop(key, None)
                    return
                if failure.reason is not FailureReason.RuntimeUnavailable:
                    raise
                stuck = await self._abandon_if_stuck(key, remote, failure, Step.stop)
                if stuck is None:
                    raise  # unreachable: still ours, the next pass stops it again
                raise stuck from failure
        remote.state = InstanceState.Spent

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        # keep_output: a runtime's or a pod's folder is not the operator's to carry over.
        await self.exclusive(key, self._delete, key)
        self.drop_lock(key)

    async def _delete(self, key: PipelineKey) -> None:
        remote = self._remotes.get(key)
        if remote is None:
            return
        client = self._client(remote.runtime)
        try:
            if remote.state is InstanceState.Running:
                await self._stop_before_delete(key, client, remote)
            await client.delete(remote.pipeline_id)
        except PipelineFailure as failure:
            if failure.reason is FailureReason.InvalidPipelineId:
                self._remotes.pop(key, None)  # gone already (the service restarted)
                return
            if failure.reason is not FailureReason.RuntimeUnavailable:
                raise
            # A deletion must not wait for a runtime that may never come back: the resource
            # may go. The pipeline stays held (a redeploy's next pass deletes it again before
            # it creates another), doomed: the sweep, which lists every runtime at each round,
            # removes it once the runtime answers, if nothing else has by then.
            remote.doomed = True
            raise PipelineFailure(
                failure.reason,
                Step.delete,
                f"{failure.message}; pipeline {remote.pipeline_id} is left on runtime "
                f"{remote.runtime!r}, and the orphan sweep removes it once the runtime answers",
            ) from failure
        self._remotes.pop(key, None)

    async def _stop_before_delete(
        self, key: PipelineKey, client: JuturnaClient, remote: _Remote
    ) -> None:
        """Stop a running pipeline before its delete (Juturna's delete would stop it too,
        with no bound). An unreachable runtime raises ``RuntimeUnavailable``; a stop that
        hangs on a runtime that answers, ``StopTimeout``."""
        try:
            await client.stop(remote.pipeline_id, self._settings.stop_timeout_s)
        except PipelineFailure as failure:
            if failure.reason is not FailureReason.RuntimeUnavailable:
                log.warning("stopping before delete: %s", failure, extra=key.log_extra)
                return
            stuck = await self._abandon_if_stuck(key, remote, failure, Step.delete)
            if stuck is None:
                raise  # unreachable: the caller lets the sweep retry
            raise stuck from failure

    async def _abandon_if_stuck(
        self, key: PipelineKey, remote: _Remote, failure: PipelineFailure, step: Step
    ) -> PipelineFailure | None:
        """After a stop that failed with ``RuntimeUnavailable``: None if the runtime is
        unreachable; ``StopTimeout`` if it lists its pipelines while the stop gave no answer.
        A node then blocks the stop, and nothing from here can end it (a delete or a sweep
        would stop it again, and hang too): the pipeline is abandoned there."""
        if not isinstance(failure, NoAnswer):
            return None
        try:
            await self._client(remote.runtime).request("GET", "/pipelines", step, PROBE_TIMEOUT_S)
        except PipelineFailure:
            return None
        self._abandoned.add(remote.pipeline_id)
        self._remotes.pop(key, None)
        timeout = self._settings.stop_timeout_s
        return PipelineFailure(
            FailureReason.StopTimeout,
            step,
            f"stop did not finish within {timeout:g} s on runtime {remote.runtime!r}; "
            f"pipeline {remote.pipeline_id} was left there, stuck",
        )

    async def status(self, key: PipelineKey) -> InstanceInfo | None:
        remote = self._remotes.get(key)
        if remote is None:
            return None
        info = InstanceInfo(key, remote.pipeline_id, remote.revision, remote.state)
        if self.busy(key):
            return info
        try:
            status = await self._client(remote.runtime).status(remote.pipeline_id)
        except PipelineFailure as failure:
            if failure.reason is FailureReason.InvalidPipelineId:
                # The service lost it (it restarted): nothing is there to stop or delete.
                self._remotes.pop(key, None)
                return None
            if failure.reason is FailureReason.RuntimeUnavailable:
                remote.misses += 1
                if remote.misses < MISSES_ALLOWED:
                    # A late answer is not a dead runtime: the last known state stands.
                    log.info(
                        "status %d of %d in a row failed: %s",
                        remote.misses,
                        MISSES_ALLOWED,
                        failure,
                        extra=key.log_extra,
                    )
                    info.nodes = dict(remote.nodes)
                    return info
                failure = PipelineFailure(
                    failure.reason,
                    failure.step,
                    f"{failure.message} ({remote.misses} status requests in a row failed)",
                )
            info.failure = failure
            return info
        remote.misses = 0
        seen = JUTURNA_STATE.get(status.get("self", ""), remote.state)
        if not (remote.state is InstanceState.Spent and seen is InstanceState.Ready):
            remote.state = seen
            info.state = seen
        info.nodes = node_statuses(status)
        remote.nodes = dict(info.nodes)
        if info.state is InstanceState.Running:
            await self._crashes(remote.runtime, info)
        return info

    async def _crashes(self, runtime: str, info: InstanceInfo) -> None:
        """Dead node threads, where the runtime is our worker module: a plain ``juturna
        serve`` cannot tell (its status says running), our worker's health route can."""
        if self._plain.get(runtime):
            return
        try:
            health = await self._client(runtime).request(
                "GET", "/operator/health", Step.run, HEALTH_TIMEOUT_S
            )
        except AnswerTooLarge as failure:
            # It answers for every pipeline on the runtime: each running one fails with it.
            info.failure = failure
            return
        except PipelineFailure as failure:
            if failure.reason is FailureReason.InvalidPipelineId:  # 404: no such route
                self._plain[runtime] = True
            return  # else a late answer: the status request decides about the runtime
        self._plain[runtime] = False
        apply_health(info, health)

    def _owns(self, juturna_name: str) -> bool:
        """Whether a pipeline named like ours belongs to this operator: its namespace is one
        this operator watches (all of them without ``-n``). Another operator, watching other
        namespaces, may share the runtime; its pipelines are not in ``keep``."""
        if not self._settings.namespaces:
            return True
        return juturna_name.partition("__")[0] in self._settings.namespaces

    def _claimed(self, pipeline_id: str, name: str) -> bool:
        """Held (and not doomed), abandoned, or being created right now by this process.

        Asked at each decision, with no await since the listing: a create in flight has its
        pipeline on the service before ``_remotes`` knows the id, so the name of a resource
        with an operation under way is never swept."""
        if pipeline_id in self._abandoned or any(
            r.pipeline_id == pipeline_id and not r.doomed for r in self._remotes.values()
        ):
            return True
        return any(key.juturna_name == name and self.busy(key) for key in list(self._locks))

    def _forget_doomed(self, pipeline_id: str) -> None:
        """The sweep deleted a pipeline a delete could not reach: nothing holds it now."""
        for key, remote in list(self._remotes.items()):
            if remote.pipeline_id == pipeline_id and remote.doomed:
                self._remotes.pop(key, None)

    async def sweep(self, keep: dict[str, str | None]) -> list[str]:
        """Delete this operator's pipelines that no resource references any more.

        ``keep`` maps each existing resource's Juturna name to the pipeline id its status
        references, for the namespaces this operator watches. A pipeline named like ours in
        one of those namespaces is removed when its resource is gone, or when the resource
        references another id and this process does not hold it.
        """
        removed = []
        for runtime in self._runtimes:
            client = self._client(runtime)
            try:
                listed = await client.list()
            except PipelineFailure as failure:
                log.info("sweep: runtime %s: %s", runtime, failure)
                continue
            for pipeline_id, status in listed.items():
                name = listed_name(pipeline_id, status)
                if not OURS.match(name) or not self._owns(name):
                    continue
                if self._claimed(pipeline_id, name):
                    continue
                if name in keep and keep[name] == pipeline_id:
                    continue
                about = log_extra_of_juturna_name(name)
                log.warning(
                    "sweep: removing orphan %s on runtime %s", pipeline_id, runtime, extra=about
                )
                if status.get("self") == "pipeline_running":
                    try:
                        await client.stop(pipeline_id, self._settings.stop_timeout_s)
                    except PipelineFailure as failure:
                        log.warning("sweep: stopping %s: %s", pipeline_id, failure, extra=about)
                try:
                    await client.delete(pipeline_id)
                    removed.append(pipeline_id)
                    self._forget_doomed(pipeline_id)
                except PipelineFailure as failure:
                    log.warning("sweep: deleting %s: %s", pipeline_id, failure, extra=about)
        return removed

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
