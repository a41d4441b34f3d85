"""The reconcile loop: lifecycle decides, the engine acts, the status and Events tell.

One ``Reconciler`` serves every Pipeline. For each resource it keeps a little memory
(the last failure, restarts, the backoff deadline, the last status written), restored
from ``status`` when the operator starts, so a restart loses nothing.

Status writes cost API calls, so a step that finishes within the progress threshold
gets no patch of its own; the final state, any failure and every condition change are
always written, and nothing is written when nothing changed.

Health is watched in one loop, not by a pass per Pipeline: ``changed_instances`` asks the
engine about every instance at once (the process engine, running many pipelines per
process, answers each of its processes' with one call) and returns only the Pipelines
whose instance changed since their last pass. A Pipeline at its desired state gets a pass
for a change, a watch event, or its resync (``SETTLED_RESYNC_S``); one that waits for a
backoff, at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from juturna_operator import graph, lifecycle, listening
from juturna_operator.api import (
    ConditionType,
    DesiredState,
    PipelineSpec,
    RestartPolicy,
    UpdateFallback,
    UpdateStrategy,
    deprecation_warnings,
    desired_state,
    first_error,
)
from juturna_operator.domain import Address, InstanceState, PipelineKey
from juturna_operator.engines.base import Engine, InstanceInfo, Plan, PluginCheck
from juturna_operator.lifecycle import (
    CANDIDATE_STEPS,
    Action,
    Desired,
    FailureRecord,
    Observed,
    SwapPolicy,
    UpdateAttempt,
    UpdateOutcome,
)
from juturna_operator.metrics import Metrics
from juturna_operator.reasons import FailureReason, PipelineFailure, Step, classify
from juturna_operator.settings import Settings
from juturna_operator.status import Facts, StatusWriter, WrittenStatus

log = logging.getLogger(__name__)

# What a create did beyond creating, by the state it left (the pod engine's deploy), told
# as the step-by-step engines tell it.
BEYOND_CREATED = {
    InstanceState.Ready: [("WarmedUp", "all nodes warmed up")],
    InstanceState.Running: [("WarmedUp", "all nodes warmed up"), ("Started", "pipeline started")],
}
# The phase shown while one call does several steps: the step it is in.
STEP_ACTION = {Step.create: Action.Create, Step.warmup: Action.Warmup, Step.start: Action.Start}
# How far a create may go in one call, for each desired state (engines that cannot go
# further create, and the lifecycle does the rest step by step).
UNTIL = {
    DesiredState.Running: InstanceState.Running,
    DesiredState.Standby: InstanceState.Ready,
    DesiredState.Stopped: InstanceState.Created,
}

MAX_STEPS = 16
# A Pipeline at its desired state is looked at again after this even when nothing changed
# (the health loop and the watch queue it for any change): a safety net, as
# controller-runtime's resync is.
SETTLED_RESYNC_S = 30.0
# Instances asked about at once by the health loop (each may be an HTTP call).
HEALTH_CONCURRENCY = 64
# Deleted resources remembered, so that a pass that began before the deletion never deploys
# again (uids are never reused; the oldest are forgotten long after their passes ended).
FINALIZED_REMEMBERED = 10_000

EventPoster = Callable[[PipelineKey, str, str, str], None]  # key, type, reason, message


@dataclass
class Resource:
    """The parts of a Pipeline object the reconciler reads."""

    key: PipelineKey
    generation: int
    spec: dict[str, Any]
    status: dict[str, Any]
    deleting: bool = False

    @classmethod
    def from_body(cls, body: Any, deleting: bool = False) -> Resource:
        meta = body["metadata"]
        return cls(
            key=PipelineKey(meta["namespace"], meta["name"], meta["uid"]),
            generation=int(meta.get("generation") or 1),
            spec=dict(body.get("spec") or {}),
            status=dict(body.get("status") or {}),
            deleting=deleting or bool(meta.get("deletionTimestamp")),
        )


@dataclass
class Retries:
    """Failures, restarts and the backoff of one resource, for the generation they concern."""

    generation: int | None = None
    failure: FailureRecord | None = None
    restarts: int = 0
    retry_at: float | None = None
    attempts: int = 0  # failed attempts in a row: the backoff's exponent


@dataclass
class SpecWork:
    """Work done once per generation, not on every pass (health checks come every few
    seconds for every Pipeline): the parsed spec, its revision, its validation."""

    parsed_generation: int | None = None
    parsed: PipelineSpec | PipelineFailure | None = None
    revision: str = ""
    validated_generation: int | None = None
    warnings: list[str] = field(default_factory=list)
    listeners: tuple[listening.Listener, ...] = ()  # set by validation
    # How a change lands (``Reconciler._swap_policy``), for the generation and listeners it
    # was asked with: the engine's answer does not change between passes.
    swap_asked: tuple[int | None, tuple[listening.Listener, ...]] | None = None
    swap: tuple[SwapPolicy | None, str] = (None, "")

    def parse(self, resource: Resource) -> PipelineSpec | PipelineFailure:
        """The resource's spec, parsed once per generation (or why it cannot be)."""
        if self.parsed is None or self.parsed_generation != resource.generation:
            self.parsed = _spec_or_failure(resource)
            self.revision = self.parsed.revision() if isinstance(self.parsed, PipelineSpec) else ""
            self.parsed_generation = resource.generation
        return self.parsed


Fingerprint = tuple[Any, ...] | None


def fingerprint(info: InstanceInfo | None) -> Fingerprint:
    """What a pass would act on or show of an engine's answer: equal fingerprints, no pass."""
    if info is None:
        return None
    failure = (info.failure.reason, info.failure.message) if info.failure else None
    crashes = tuple((c.node, c.thread, c.error) for c in info.crashes)
    nodes = tuple(sorted(info.nodes.items()))
    return (
        info.state,
        info.revision,
        info.pipeline_id,
        nodes,
        crashes,
        failure,
        info.pod,
        info.addresses,
    )


@dataclass(frozen=True)
class StableSpec:
    """The spec of the last revision that ran as asked: after an aborted update, what the
    operator deploys again if the instance serving it goes."""

    spec: PipelineSpec
    revision: str
    listeners: tuple[listening.Listener, ...]


@dataclass
class Memory:
    """What the operator remembers about one resource between reconciles."""

    retry: Retries = field(default_factory=Retries)
    spec: SpecWork = field(default_factory=SpecWork)
    written: WrittenStatus = field(default_factory=WrittenStatus)
    recovering_from: str | None = None  # a pipelineId from before an operator restart
    key: PipelineKey | None = None  # set by its first pass
    # The engine's answers at the end of its last pass: the active slot's, the candidate's.
    seen: tuple[Fingerprint, Fingerprint] = (None, None)
    update: UpdateAttempt | None = None  # a warm swap: under way, or how it ended
    # From the status a previous process wrote, made into ``update`` once the spec is parsed:
    # a swap under way (its revision), or the failure that ended this generation's update.
    restored_update: str | None = None
    update_failed_before: FailureRecord | None = None
    recreate_told: int | None = None  # the generation whose Recreate reason was posted
    stable: StableSpec | None = None  # this process's memory only (a restart forgets it)

    @classmethod
    def from_status(cls, status: dict[str, Any]) -> Memory:
        """Restore what a previous operator process wrote."""
        generation = status.get("observedGeneration")
        retry = Retries(generation=generation, restarts=int(status.get("restarts") or 0))
        raw = status.get("failure")
        failure = None
        if (
            raw
            and raw.get("reason") in FailureReason.__members__
            and not FailureReason[raw["reason"]].set_by_configuration  # checked again instead
            and generation is not None
        ):
            failure = FailureRecord(
                FailureReason[raw["reason"]],
                Step(raw.get("step", "run")),
                raw.get("message", ""),
                int(generation),
            )
        mem = cls(retry=retry, recovering_from=status.get("pipelineId"))
        if _condition_reason(status, ConditionType.Updating) == "UpdateFailed":
            mem.update_failed_before = failure  # the new revision's: the old one serves on
        elif failure is not None:
            retry.failure, retry.retry_at = failure, 0.0  # a retry that was due is due now
        mem.restored_update = (status.get("update") or {}).get("revision")
        return mem


def _condition_reason(status: dict[str, Any], ctype: ConditionType) -> str | None:
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == ctype:
            return str(cond.get("reason"))
    return None


def _spec_or_failure(resource: Resource) -> PipelineSpec | PipelineFailure:
    try:
        return PipelineSpec.model_validate(resource.spec)
    except ValidationError as err:
        return PipelineFailure(FailureReason.InvalidSpec, Step.validate, first_error(err))


Log = logging.Logger | logging.LoggerAdapter[Any]


@dataclass
class _Pass:
    """One reconcile pass over one resource: what every step of it needs."""

    resource: Resource
    mem: Memory
    desired: Desired
    log: Log
    # Steps done and not told yet: one Normal Event tells them all (fewer API writes).
    done: list[tuple[str, str]] = field(default_factory=list)

    @property
    def key(self) -> PipelineKey:
        return self.resource.key


class Reconciler:
    """Moves each Pipeline toward its desired state through an ``Engine``."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        write_status: StatusWriter,
        post_event: EventPoster,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.settings = settings
        self._write_status = write_status
        self._post_event = post_event
        self._clock = clock
        self._memory: dict[str, Memory] = {}
        # One pass at a time per resource (reconcile or finalize), and a resource whose
        # finalizer ran is never deployed again by a pass that started before it.
        self._passes: dict[str, asyncio.Lock] = {}
        self._finalizing: set[str] = set()
        self._finalized: OrderedDict[str, None] = OrderedDict()
        # Where a long step waits without holding a shared pass (the work queue's
        # ``released``, set by the handlers); by default it holds nothing to give back.
        self.released: Callable[[], contextlib.AbstractAsyncContextManager[None]] = (
            contextlib.nullcontext
        )

    def forget(self, uid: str) -> None:
        self._memory.pop(uid, None)

    async def changed_instances(self) -> list[str]:
        """The uids of the Pipelines whose instance changed since their last pass: the
        engine is asked about every one at once. Pipelines in a pass are left to it."""
        asked = [
            (uid, mem)
            for uid, mem in list(self._memory.items())
            if mem.key is not None and not self.finished(uid) and not self._in_pass(uid)
        ]
        room = asyncio.Semaphore(HEALTH_CONCURRENCY)

        async def changed(mem: Memory) -> bool:
            assert mem.key is not None
            async with room:
                try:
                    info = await self.engine.status(mem.key)
                    # The candidate slot only while a swap goes on (each look may be a call).
                    swapping = mem.update is not None or mem.seen[1] is not None
                    candidate = await self.engine.status(mem.key.candidate) if swapping else None
                except Exception:  # a pass asks again, and reports what it finds
                    return True
            return (fingerprint(info), fingerprint(candidate)) != mem.seen

        found = await asyncio.gather(*(changed(mem) for _, mem in asked))
        return [uid for (uid, _), yes in zip(asked, found, strict=True) if yes]

    def _in_pass(self, uid: str) -> bool:
        lock = self._passes.get(uid)
        return lock is not None and lock.locked()

    def finished(self, uid: str) -> bool:
        """Whether a finalize of this resource ran or runs (it is never deployed again)."""
        return uid in self._finalizing or uid in self._finalized

    def _remember(self, resource: Resource) -> Memory:
        mem = self._memory.get(resource.key.uid)
        if mem is None:
            mem = self._memory[resource.key.uid] = Memory.from_status(resource.status)
        if mem.retry.generation != resource.generation:
            if self.metrics is not None:
                self.metrics.spec_changed(resource.key)
            # A spec change: restarts count from zero and the new spec is validated again.
            mem.retry.generation = resource.generation
            mem.retry.restarts = 0
            mem.retry.attempts = 0
            mem.retry.retry_at = None
            mem.spec.validated_generation = None
        return mem

    # -- the loop --

    async def reconcile(self, resource: Resource, log: Log) -> float:
        """Act until the next step is to wait; write status. Returns seconds until next look."""
        uid = resource.key.uid
        async with self._passes.setdefault(uid, asyncio.Lock()):
            if self.finished(uid):
                return self.settings.health_interval_s  # its finalizer owns it now
            return await self._reconcile(resource, log)

    async def _reconcile(self, resource: Resource, log: Log) -> float:
        mem = self._remember(resource)
        new_generation = mem.spec.parsed_generation != resource.generation
        parsed = mem.spec.parse(resource)
        spec = parsed if isinstance(parsed, PipelineSpec) else None
        p = _Pass(resource, mem, self._desired(resource, spec, mem), log)
        self._restore_update(p)
        if new_generation:  # once per generation, as the other spec warnings
            for warning in deprecation_warnings(resource.spec):
                self._event(p, "Warning", "DeprecatedField", warning)
        if (
            isinstance(parsed, PipelineFailure)
            and lifecycle.current_failure(p.desired, self._observed(mem, None)) is None
        ):
            self._record_failure(p, parsed)

        # One engine query per slot per pass, and again after each action (for the process
        # and service engines a query is an HTTP call); a Retry changes only memory.
        info, candidate = await self._look(p)
        if info is not None:
            mem.recovering_from = None  # the engine still holds it: nothing to recover
        for _ in range(MAX_STEPS):
            if self.finished(p.key.uid):
                break  # a deletion came while this pass ran: it must not deploy any more
            self._check_health(p, info)
            self._check_candidate(p, candidate)
            observed = self._observed(mem, info, candidate)
            action = lifecycle.next_step(p.desired, observed, self._clock())
            if action in (Action.Nothing, Action.Wait):
                break
            if action is Action.Retry:
                assert mem.retry.failure is not None
                if mem.retry.failure.reason.counts_as_restart:
                    mem.retry.restarts += 1
                    self._event(
                        p,
                        "Normal",
                        "Restarting",
                        f"restart {mem.retry.restarts} of "
                        f"{p.desired.max_restarts} after {mem.retry.failure.reason.name}",
                    )
                mem.retry.failure, mem.retry.retry_at = None, None
                continue
            if action is Action.RetryCandidate:
                assert mem.update is not None
                mem.update = replace(mem.update, failure=None, retry_at=None)
                continue
            if action in (Action.AbortUpdate, Action.FallBack):
                await self._end_update(p, action, observed)
                info, candidate = await self._look(p)
                continue
            self._tell_recreate(p, action, observed)
            try:
                await self._with_progress(p, info, action, spec)
            except PipelineFailure as failure:
                if action in CANDIDATE_STEPS:
                    await self._candidate_failed(p, failure)
                    info, candidate = await self._look(p)
                    continue  # the old instance serves on; the backoff or the deadline decide
                self._record_failure(p, failure)
                if failure.step in (Step.create, Step.warmup, Step.start):
                    await self._discard(p)  # no half-built instance is kept
                info, candidate = await self._look(p)
                break  # look again at the next health check or when the backoff ends
            info, candidate = await self._look(p)
            if action is Action.DeleteCandidate:
                self._candidate_removed(p, observed)
            if action in (Action.Create, Action.CreateCandidate):
                made = info if action is Action.Create else candidate
                if made is not None and made.pod is not None and made.pod[1]:
                    # engine pod: where it was placed
                    p.done.append(("Scheduled", f"in pod {made.pod[0]} on node {made.pod[1]}"))
                if action is Action.Create and info is not None:
                    p.done.extend(BEYOND_CREATED.get(info.state, []))  # one call did more
        observed = self._observed(mem, info, candidate)
        reached = lifecycle.desired_reached(p.desired, observed)
        if reached:
            mem.retry.attempts = 0
            self._remember_stable(p, spec, info)
            u = mem.update
            if u is not None and u.outcome is None and candidate is None:
                mem.update = None  # the revision runs without the swap (the old one died)
        if mem.recovering_from and reached:
            p.done.append(
                (
                    "Recovered",
                    "pipeline redeployed after an operator "
                    f"restart (previous instance {mem.recovering_from})",
                )
            )
            mem.recovering_from = None
        self._tell(p)
        await self._publish(p, info, None, candidate)
        mem.key, mem.seen = p.key, (fingerprint(info), fingerprint(candidate))
        return self._next_look(p, reached)

    async def _look(self, p: _Pass) -> tuple[InstanceInfo | None, InstanceInfo | None]:
        """The engine's view of both slots (the candidate: a warm swap's other instance)."""
        info = await self.engine.status(p.key)
        return info, await self.engine.status(p.key.candidate)

    async def finalize(self, resource: Resource, log: Log) -> None:
        """Deletion: stop (bounded) and delete the instance. Never raises, never hangs.

        A pass in flight stops before its next step, and none deploys this resource again."""
        uid = resource.key.uid
        self._finalizing.add(uid)
        try:
            async with self._passes.setdefault(uid, asyncio.Lock()):
                await self._finalize(resource, log)
        finally:
            self._finalizing.discard(uid)
            self._passes.pop(uid, None)
            self._finalized[uid] = None
            while len(self._finalized) > FINALIZED_REMEMBERED:
                self._finalized.popitem(last=False)

    async def _finalize(self, resource: Resource, log: Log) -> None:
        resource.deleting = True
        p = _Pass(resource, self._remember(resource), _desired(resource, None, ""), log)
        for _ in range(MAX_STEPS):
            info, candidate = await self._look(p)
            observed = self._observed(p.mem, info, candidate)
            action = lifecycle.next_step(p.desired, observed, self._clock())
            if action is Action.Nothing:
                break
            try:
                await self._with_progress(p, info, action, None)
            except PipelineFailure as failure:
                # The resource must not hang in deletion; the engine has let go of it.
                self._event(p, "Warning", failure.reason.name, failure.message)
                log.warning("while deleting: %s", failure, extra=resource.key.log_extra)
        try:
            # A create still in flight (its pass was cancelled; engine operations are
            # shielded) is not in the engine's status until it ends. delete() waits for it
            # and removes what it made, output included; with nothing there it is a no-op.
            await self.engine.delete(p.key.candidate)
            await self.engine.delete(p.key)
        except PipelineFailure as failure:
            self._event(p, "Warning", failure.reason.name, failure.message)
            log.warning("while deleting: %s", failure, extra=resource.key.log_extra)
        self._tell(p)
        self.forget(resource.key.uid)
        if self.metrics is not None:
            self.metrics.forget(resource.key)

    # -- pieces --

    @staticmethod
    def _observed(
        mem: Memory, info: InstanceInfo | None, candidate: InstanceInfo | None = None
    ) -> Observed:
        return Observed(
            instance=info.state if info else InstanceState.Absent,
            instance_revision=info.revision if info else None,
            validated_generation=mem.spec.validated_generation,
            failure=mem.retry.failure,
            restarts=mem.retry.restarts,
            retry_at=mem.retry.retry_at,
            candidate=candidate.state if candidate else InstanceState.Absent,
            candidate_revision=candidate.revision if candidate else None,
            update=mem.update,
            stable_revision=mem.stable.revision if mem.stable else None,
        )

    def _check_health(self, p: _Pass, info: InstanceInfo | None) -> None:
        """Juturna never reports a dead node thread; the engine does, and it is a failure."""
        if info is None or info.state is InstanceState.Absent:
            return
        if not info.crashes and info.failure is None:
            return
        if lifecycle.current_failure(p.desired, self._observed(p.mem, info)) is not None:
            return
        if info.failure is not None:
            self._record_failure(p, info.failure)  # e.g. the runtime is unreachable
            return
        failure = PipelineFailure(FailureReason.NodeFailed, Step.run, info.crashes[0].describe())
        self._record_failure(p, failure)

    def _record_failure(self, p: _Pass, failure: PipelineFailure) -> None:
        p.mem.retry.failure = FailureRecord(
            failure.reason, failure.step, failure.message, p.desired.generation
        )
        if failure.reason.retryable:
            p.mem.retry.retry_at = self._clock() + lifecycle.backoff_delay(
                p.desired.backoff_seconds, p.mem.retry.attempts
            )
            p.mem.retry.attempts += 1
        p.log.warning("%s", failure)
        self._tell(p)  # what was done before it failed comes first
        self._event(p, "Warning", failure.reason.name, failure.message)
        if self.metrics is not None:
            self.metrics.failed(p.key, failure.reason.name)

    async def _discard(self, p: _Pass) -> None:
        try:
            await self.engine.delete(p.key, keep_output=True)  # the retry's instance gets it
        except PipelineFailure as failure:
            p.log.warning("could not discard a failed instance: %s", failure)

    async def _with_progress(
        self, p: _Pass, info: InstanceInfo | None, action: Action, spec: PipelineSpec | None
    ) -> None:
        """Run one action; if it outlives the progress threshold, say so in status first,
        and again if the engine moves on to another step within it (a deploy) that outlives
        the threshold too: a warmup of a moment after a pod's long start costs no write."""
        task = asyncio.ensure_future(self._act(p, action, spec))
        threshold = self.settings.progress_threshold_s
        if not (await asyncio.wait({task}, timeout=threshold))[0]:
            # A long step (a pod starting, a model loading) waits aside: it must not hold
            # one of the passes every other Pipeline shares.
            async with self.released():
                shown: tuple[Action, str | None] | None = None
                seen: tuple[Action, str | None] | None = None
                seen_at = 0.0
                told: set[str | None] = set()  # the pods a WarmingUpNew named (None: none)
                while True:
                    # A candidate's steps show under Updating; the phase is the serving one's.
                    step = None if action in CANDIDATE_STEPS else self.engine.step_under_way(p.key)
                    now = STEP_ACTION.get(step, action) if step is not None else action
                    candidate = self._candidate_under_way(p, action)
                    pod = candidate.pod[0] if candidate is not None and candidate.pod else None
                    if pod not in told and self._warming_up(p, action, pod):
                        told.add(pod)
                        self._tell_warming_up(p, info, pod)
                    if (now, pod) != seen:
                        seen, seen_at = (now, pod), time.monotonic()
                    if seen != shown and (shown is None or time.monotonic() - seen_at >= threshold):
                        await self._publish(p, info, now, candidate)
                        shown = seen
                    if (await asyncio.wait({task}, timeout=threshold))[0]:
                        break
        try:
            await task
        except PipelineFailure:
            raise
        except Exception as exc:
            # Never left to kopf's retry-forever with nothing in status: an error no engine
            # foresaw is classified like any other (5xx for the step), and the user sees it.
            log.exception("unexpected error in %s", action, extra=p.key.log_extra)
            raise classify(exc, Step(action.value.lower())) from exc

    async def _act(self, p: _Pass, action: Action, spec: PipelineSpec | None) -> None:
        if action is Action.Validate:
            assert spec is not None
            validated = await asyncio.to_thread(
                graph.validate,
                spec,
                self.settings.plugin_roots,
                self.settings.runtimes,
                self.settings.code_policy(spec.runtime),
                self.settings.pod_policy(spec.runtime, p.key.namespace),
                plugins_here=not self._plugins_in_pod(spec),
            )
            p.mem.spec.validated_generation = p.desired.generation
            p.mem.spec.warnings = validated.warnings
            p.mem.spec.listeners = tuple(validated.listeners)
            for warning in validated.warnings:
                self._event(p, "Warning", "UnknownConfigurationKey", warning)
        elif action in (Action.Create, Action.CreateCandidate):
            assert spec is not None
            config = spec.to_juturna_config(p.key.juturna_name)
            candidate = action is Action.CreateCandidate
            plan = replace(
                self._plan(p, spec),
                # A candidate stops at Ready: it starts only when it is to take over.
                until=InstanceState.Ready if candidate else UNTIL[p.desired.state],
            )
            if candidate:
                self._begin_update(p)
                key = p.key.candidate
                pid = await self.engine.create(key, config, p.desired.revision, plan)
                p.done.append(
                    (
                        "WarmingUpNew",
                        f"revision {p.desired.revision} created beside the serving one "
                        f"(instance {pid})",
                    )
                )
            else:
                pid = await self.engine.create(p.key, config, p.desired.revision, plan)
                p.done.append(("Created", f"pipeline instance {pid} created"))
        elif action is Action.RestoreStable:
            await self._restore_stable(p)
        elif action is Action.WarmupCandidate:
            await self.engine.warmup(p.key.candidate)
            p.done.append(("WarmingUpNew", f"revision {p.desired.revision} warmed up"))
        elif action is Action.StartCandidate:
            await self.engine.start(p.key.candidate)
            p.done.append(("Switching", f"revision {p.desired.revision} started"))
        elif action is Action.Switch:
            await self.engine.promote(p.key)
            assert p.mem.update is not None
            drain = p.desired.swap.drain_s if p.desired.swap else 0.0
            p.mem.update = replace(p.mem.update, drain_until=self._clock() + drain)
            # A failure of the instance that served concerns it, not the one now serving.
            p.mem.retry.failure, p.mem.retry.retry_at = None, None
            p.done.append(
                (
                    "Draining",
                    f"revision {p.desired.revision} took over; the previous one drains for "
                    f"{drain:g} s",
                )
            )
        elif action is Action.DeleteCandidate:
            await self.engine.delete(p.key.candidate, keep_output=not p.resource.deleting)
        elif action is Action.Delete:
            # Unless the resource goes for good or stops, the engine may keep what the next
            # deploy can reuse (the pod engine: a healthy pod).
            release = p.resource.deleting or p.desired.state is DesiredState.Stopped
            # Output stays with the resource: only its deletion wipes it.
            await self.engine.delete(p.key, release, keep_output=not p.resource.deleting)
            p.done.append(("Deleted", "pipeline instance deleted"))
        else:
            act, reason, message = {
                Action.Warmup: (self.engine.warmup, "WarmedUp", "all nodes warmed up"),
                Action.Start: (self.engine.start, "Started", "pipeline started"),
                Action.Stop: (self.engine.stop, "Stopped", "pipeline stopped"),
            }[action]
            await act(p.key)
            p.done.append((reason, message))

    @staticmethod
    def _remember_stable(p: _Pass, spec: PipelineSpec | None, info: InstanceInfo | None) -> None:
        """The spec now running as asked, if it is not the one remembered already."""
        running = info is not None and info.state is InstanceState.Running
        stable = p.mem.stable
        if spec is None or not running or (stable and stable.revision == p.desired.revision):
            return
        p.mem.stable = StableSpec(spec, p.desired.revision, p.mem.spec.listeners)

    async def _restore_stable(self, p: _Pass) -> None:
        """The revision that served before an aborted update, deployed again: its instance
        went, and the spec's revision is the one that failed."""
        stable = p.mem.stable
        assert stable is not None
        config = stable.spec.to_juturna_config(p.key.juturna_name)
        plan = replace(self._plan(p, stable.spec, stable.listeners), until=InstanceState.Running)
        pid = await self.engine.create(p.key, config, stable.revision, plan)
        failed = lifecycle.update_failed(p.desired, self._observed(p.mem, None))
        why = f" ({failed.reason.name}: {failed.message})" if failed is not None else ""
        p.done.append(
            (
                "RestoredStable",
                f"the instance of revision {stable.revision} went after the update to revision "
                f"{p.desired.revision} had failed{why}: revision {stable.revision} deployed "
                f"again (instance {pid})",
            )
        )

    def _plan(
        self,
        p: _Pass,
        spec: PipelineSpec,
        listeners: tuple[listening.Listener, ...] | None = None,
    ) -> Plan:
        """What a create of this spec needs besides Juturna's config (``listeners``: this
        spec's, where it is not the resource's current one)."""
        return Plan(
            runtime=spec.runtime,
            template=spec.template.model_dump(mode="json") if spec.template else None,
            listeners=p.mem.spec.listeners if listeners is None else listeners,
            plugins=self._plugin_check(p, spec) if self._plugins_in_pod(spec) else None,
        )

    # -- warm swaps --

    def _candidate_under_way(self, p: _Pass, action: Action) -> InstanceInfo | None:
        """What a long candidate step shows of the instance it prepares: the new revision and,
        once the engine has chosen it, its pod (``status.update.pod``)."""
        if action not in CANDIDATE_STEPS:
            return None
        candidate = InstanceInfo(p.key.candidate, "", p.desired.revision, InstanceState.Absent)
        pod = self.engine.pod_under_way(p.key.candidate)
        candidate.pod = (pod, None) if pod is not None else None
        return candidate

    def _warming_up(self, p: _Pass, action: Action, pod: str | None) -> bool:
        """Whether a long candidate step is the new revision's warmup: a pod's create (once
        it has its pod, where it warms up), or a create whose deploy warms up, or a warmup."""
        if action is Action.WarmupCandidate:
            return True
        if action is not Action.CreateCandidate:
            return False
        return pod is not None or self.engine.step_under_way(p.key.candidate) is Step.warmup

    def _tell_warming_up(self, p: _Pass, info: InstanceInfo | None, pod: str | None) -> None:
        """The update's first step, as it begins (a warmup takes as long as a model load);
        ``pod``: the pod it warms up in (engines of a pod per instance)."""
        serving = info.revision if info is not None else "none"
        where, keeps = (
            (f" in pod {pod}", "keeps the Pipeline's address")
            if pod is not None
            else ("", "serves on")
        )
        self._event(
            p,
            "Normal",
            "WarmingUpNew",
            f"revision {p.desired.revision} warms up{where} beside the serving one "
            f"(revision {serving}), which {keeps} until it is ready",
        )

    def _desired(self, resource: Resource, spec: PipelineSpec | None, mem: Memory) -> Desired:
        return _desired(resource, spec, mem.spec.revision, self._swap_policy(spec, mem)[0])

    def _swap_policy(self, spec: PipelineSpec | None, mem: Memory) -> tuple[SwapPolicy | None, str]:
        """How this spec's changes land: a warm swap's bounds, or None and why not (asked of
        the engine once per generation)."""
        if spec is None:
            return None, ""
        asked = (mem.spec.parsed_generation, mem.spec.listeners)
        if mem.spec.swap_asked != asked:
            mem.spec.swap, mem.spec.swap_asked = self._ask_swap(spec, mem), asked
        return mem.spec.swap

    def _ask_swap(self, spec: PipelineSpec, mem: Memory) -> tuple[SwapPolicy | None, str]:
        update = spec.update
        if update.strategy == UpdateStrategy.Recreate:
            return None, ""
        why_not = self.engine.warm_swap(Plan(runtime=spec.runtime, listeners=mem.spec.listeners))
        if why_not is not None:
            return None, why_not
        return (
            SwapPolicy(
                timeout_s=float(update.timeoutSeconds),
                drain_s=update.drainSeconds,
                fallback_recreate=update.fallback == UpdateFallback.Recreate,
            ),
            "",
        )

    def _tell_recreate(self, p: _Pass, action: Action, observed: Observed) -> None:
        """One Normal Event, once per generation, where a running pipeline is replaced in
        place although its spec did not ask for that: why the engine cannot warm-swap it."""
        if (
            action is not Action.Stop
            or observed.instance is not InstanceState.Running
            or observed.instance_revision == p.desired.revision
            or p.desired.state is not DesiredState.Running
            or p.mem.recreate_told == p.desired.generation
        ):
            return
        spec = p.mem.spec.parsed
        if not isinstance(spec, PipelineSpec) or spec.update.strategy == UpdateStrategy.Recreate:
            return
        why_not = self._swap_policy(spec, p.mem)[1]
        u = lifecycle.current_update(p.desired, observed)
        if u is not None and u.outcome is UpdateOutcome.FellBack:
            return  # its Warning said why
        if why_not:
            p.mem.recreate_told = p.desired.generation
            self._event(
                p, "Normal", "Recreate", f"the update replaces the instance in place: {why_not}"
            )

    def _restore_update(self, p: _Pass) -> None:
        """What a previous process's status said of an update, once the spec is parsed."""
        mem, desired = p.mem, p.desired
        now = self._clock()
        if mem.restored_update is not None:
            if mem.restored_update == desired.revision and desired.swap is not None:
                # A swap under way when that process stopped: its candidate is adopted and it
                # goes on (its clock starts again: the deadline was that process's).
                mem.update = UpdateAttempt(
                    desired.revision, desired.generation, now, now + desired.swap.timeout_s
                )
            mem.restored_update = None
        if mem.update_failed_before is not None:
            failure = mem.update_failed_before
            if failure.generation == desired.generation:
                mem.update = UpdateAttempt(
                    desired.revision,
                    desired.generation,
                    now,
                    now,
                    failure=failure,
                    outcome=UpdateOutcome.Aborted,
                )
            mem.update_failed_before = None

    def _begin_update(self, p: _Pass) -> None:
        """A new attempt toward the desired revision, unless one goes on (a retry)."""
        u = p.mem.update
        if u is not None and u.revision == p.desired.revision and u.outcome is None:
            return
        assert p.desired.swap is not None
        now = self._clock()
        if u is not None and u.outcome is None:
            self._update_ended(p, u, "Cancelled")  # a newer spec came first
        p.mem.update = UpdateAttempt(
            p.desired.revision, p.desired.generation, now, now + p.desired.swap.timeout_s
        )

    def _update_ended(self, p: _Pass, u: UpdateAttempt, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.update_ended(p.key, outcome, self._clock() - u.started)

    def _check_candidate(self, p: _Pass, candidate: InstanceInfo | None) -> None:
        """A candidate's node that died, or its runtime gone, fails the attempt's candidate
        (not the serving instance)."""
        u = p.mem.update
        if candidate is None or u is None or u.failure is not None or u.outcome is not None:
            return
        if candidate.revision != u.revision or u.drain_until is not None:
            return  # the old instance draining: its end is near anyway
        if candidate.failure is not None:
            failure = candidate.failure
        elif candidate.crashes:
            failure = PipelineFailure(
                FailureReason.NodeFailed, Step.run, candidate.crashes[0].describe()
            )
        else:
            return
        p.mem.update = replace(u, failure=self._candidate_record(p, failure))
        self._event(p, "Warning", failure.reason.name, f"revision {u.revision}: {failure.message}")

    def _candidate_record(self, p: _Pass, failure: PipelineFailure) -> FailureRecord:
        return FailureRecord(failure.reason, failure.step, failure.message, p.desired.generation)

    async def _candidate_failed(self, p: _Pass, failure: PipelineFailure) -> None:
        """A candidate's step failed: it goes, and its attempt retries after a backoff (a
        transient reason, within the deadline) or ends; the serving instance is untouched
        and spends no restart."""
        u = p.mem.update
        assert u is not None
        record = self._candidate_record(p, failure)
        delay = lifecycle.backoff_delay(p.desired.backoff_seconds, u.attempts)
        p.mem.update = replace(
            u, failure=record, retry_at=self._clock() + delay, attempts=u.attempts + 1
        )
        p.log.warning("revision %s: %s", u.revision, failure)
        self._tell(p)
        self._event(p, "Warning", failure.reason.name, f"revision {u.revision}: {failure.message}")
        try:
            await self.engine.delete(p.key.candidate, keep_output=True)
        except PipelineFailure as err:
            p.log.warning("could not discard a failed candidate: %s", err)

    async def _end_update(self, p: _Pass, action: Action, observed: Observed) -> None:
        """Abort (the old instance serves on) or fall back to Recreate (no room for two)."""
        u = p.mem.update
        assert u is not None
        assert p.desired.swap is not None
        failure = u.failure
        waited = f"revision {u.revision} was not ready within {p.desired.swap.timeout_s:g} s"
        if failure is None:
            failure = FailureRecord(
                FailureReason.UpdateTimedOut, Step.create, waited, p.desired.generation
            )
        elif failure.retryable:  # it was still being retried: the deadline ended it
            failure = replace(failure, message=f"{failure.message} ({waited})")
        try:
            await self.engine.delete(p.key.candidate, keep_output=True)
        except PipelineFailure as err:
            p.log.warning("could not remove the update's candidate: %s", err)
        if action is Action.FallBack:
            outcome = UpdateOutcome.FellBack
            self._event(
                p,
                "Warning",
                "UpdateFallback",
                f"no room for revision {u.revision} beside the serving one within "
                f"{p.desired.swap.timeout_s:g} s ({failure.message}); it replaces the serving "
                "one in place",
            )
        else:
            outcome = UpdateOutcome.Aborted
            self._event(
                p,
                "Warning",
                "UpdateFailed",
                f"{failure.message}; revision {observed.instance_revision} serves on",
            )
            if self.metrics is not None:
                self.metrics.failed(p.key, failure.reason.name)
        self._update_ended(p, u, outcome.value)
        p.mem.update = replace(u, failure=failure, generation=p.desired.generation, outcome=outcome)

    def _candidate_removed(self, p: _Pass, observed: Observed) -> None:
        """The candidate slot emptied: after a switch the update is done; before it, a
        newer spec, a revert, a stop or a deletion cancelled it."""
        u = p.mem.update
        if u is None or u.outcome is not None or u.failure is not None:
            return
        if u.drain_until is not None and observed.instance_revision == u.revision:
            p.done.append(("Updated", f"revision {u.revision} serves; the previous one is gone"))
            self._update_ended(p, u, "Succeeded")
            p.mem.update = None
        elif u.revision != p.desired.revision or p.desired.swap is None or p.resource.deleting:
            p.done.append(("UpdateCancelled", f"revision {u.revision} removed before it served"))
            self._update_ended(p, u, "Cancelled")
            p.mem.update = None

    def _plugins_in_pod(self, spec: PipelineSpec) -> bool:
        """Engine pod: the pipeline loads its runtime image's plugins, not the operator's."""
        return self.settings.engine_for(spec.runtime) == "pod"

    def _plugin_check(self, p: _Pass, spec: PipelineSpec) -> PluginCheck:
        def warn(warning: str) -> None:  # once per generation, as a local validation does
            if warning not in p.mem.spec.warnings:
                p.mem.spec.warnings.append(warning)
                self._event(p, "Warning", "UnknownConfigurationKey", warning)

        return PluginCheck(
            spec.model_dump(mode="json", by_alias=True, exclude_none=True),
            self.settings.code_policy(spec.runtime),
            warn,
        )

    def _tell(self, p: _Pass) -> None:
        """One Normal Event for the steps done since the last one, named after the last."""
        if p.done:
            reason = p.done[-1][0]
            message = "; ".join(message for _, message in p.done)
            self._event(p, "Normal", reason, message)
            # The same progress in the operator's log (`kubectl logs`), at INFO: below the
            # level kopf posts as Events, so it costs no API call.
            p.log.info("%s: %s", reason, message)
            p.done.clear()

    def _event(self, p: _Pass, kind: str, reason: str, message: str) -> None:
        self._post_event(p.key, kind, reason, message)

    def _next_look(self, p: _Pass, reached: bool) -> float:
        """A backoff's end; the resync for a Pipeline with nothing pending (its desired
        state reached, or failed for good: the health loop and the watch queue it for any
        change); else the health interval."""
        interval = self.settings.health_interval_s
        observed = self._observed(p.mem, None)
        u = p.mem.update
        if u is not None and u.outcome is None:
            # A swap's next moment: its drain's end, its candidate's retry, its deadline.
            due = [t for t in (u.drain_until, u.retry_at, u.deadline) if t is not None]
            return max(0.0, min([interval, *(t - self._clock() for t in due)]))
        retry_at = p.mem.retry.retry_at
        if retry_at is not None and not lifecycle.is_terminal(p.desired, observed):
            return max(0.0, min(interval, retry_at - self._clock()))
        if (reached and p.mem.retry.failure is None) or lifecycle.is_terminal(p.desired, observed):
            return SETTLED_RESYNC_S
        return interval

    # -- status --

    async def _publish(
        self,
        p: _Pass,
        info: InstanceInfo | None,
        in_progress: Action | None,
        candidate: InstanceInfo | None = None,
    ) -> None:
        """Write the status, unless it says nothing new (each write is an API call)."""
        if p.resource.deleting and in_progress is None:
            return
        facts = Facts(
            desired=p.desired,
            observed=self._observed(p.mem, info, candidate),
            in_progress=in_progress,
            warnings=tuple(p.mem.spec.warnings),
            restarts=p.mem.retry.restarts,
            node_total=len(p.resource.spec.get("nodes") or []),
            info=info,
            addresses=_addresses(info, p.mem.spec.listeners),
            candidate=candidate,
        )
        status = await p.mem.written.publish(p.key, facts, p.resource.status, self._write_status)
        if status is not None and self.metrics is not None:
            ready = in_progress is None and lifecycle.desired_reached(p.desired, facts.observed)
            self.metrics.observed(
                p.key, status["phase"], p.mem.retry.restarts, ready, p.resource.status.get("phase")
            )


def _addresses(
    info: InstanceInfo | None, listeners: tuple[listening.Listener, ...]
) -> tuple[Address, ...]:
    """Where the pipeline takes input, while an instance exists: the engine's Service (pod),
    or where the configuration binds (the engines beside the operator)."""
    if info is None or info.state is InstanceState.Absent:
        return ()
    return info.addresses if info.addresses is not None else listening.local_addresses(listeners)


def _desired(
    resource: Resource, spec: PipelineSpec | None, revision: str, swap: SwapPolicy | None = None
) -> Desired:
    policy = spec.restartPolicy if spec else RestartPolicy()  # its defaults: the API's
    return Desired(
        # A state this operator does not know (a newer CRD's) is read as Running, the
        # default; an old word for one it knows (Ready) means that one.
        state=desired_state(resource.spec.get("state") or "Running") or DesiredState.Running,
        generation=resource.generation,
        revision=revision,
        max_restarts=policy.maxRestarts,
        backoff_seconds=policy.backoffSeconds,
        deleting=resource.deleting,
        swap=swap,
    )
