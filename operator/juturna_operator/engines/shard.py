"""The shard engine: many pipelines per worker process, for dense pipelines.

A shard is one worker process (``juturna_operator.worker``, forked from the zygote like the
process engine's workers) that runs up to ``JUTURNA_OPERATOR_SHARD_SIZE`` pipelines with
Juturna's ``PipelineManager``, all of one namespace. The engine talks to each shard over
loopback HTTP with its own bearer token, in few calls:

* one call takes a new pipeline to Running (the worker's deploy: create, carry the
  resource's output folder over, warm up, start), and names the step that failed;
* one call returns the health of every pipeline of a shard: a health check asked for while
  one is in flight, or answered less than ``HEALTH_FRESH_S`` ago, shares that answer.

Shards outlive the operator process, like the process engine's workers: a restarted
operator finds them and their pipelines through their records (``<workdir>/.shards``),
checks each PID with its start time, and adopts them; nothing is deployed again. A create
the previous process left in flight is found on its shard by the pipeline's name.

What a shard contains, and what it costs:

* a node that raises fails its own pipeline only (the worker's health route names the
  pipeline of each thread that died, a plugin's own threads included; one no pipeline
  started fails none);
* a deploy that gives no answer (a timeout, a dropped connection) may have built its
  pipeline all the same: it is found by its name and held, so the delete after the failure
  removes it; the sweep deletes whatever a live shard runs that the engine does not hold;
* a stopping operator (``close``) lets operations in flight end, ``CLOSE_WAIT_S`` at most;
  one cut short keeps its record, and the next process finds its pipeline by its name;
* a shard that dies (a segfault, the kernel's OOM killer, a kill) fails every pipeline it
  ran at once, each with the process's exit in its status; each is restarted by its own
  ``restartPolicy`` (a restart counted), on another shard, its output folder kept. Pipelines
  on other shards are untouched;
* a shard that runs but answers no health check ``HEALTH_MISSES`` times in a row counts as
  dead too, and is ended when its pipelines are redeployed;
* a stop that hangs in a shard cannot be cured by ending the process (other pipelines run
  there): after the stop timeout the pipeline is left there, stuck, and its resource gets
  ``StopTimeout``; the shard takes no new pipelines and is ended once the others have left;
* a shard has no more rights than a worker: the workers' scrubbed environment, and pipelines
  of one namespace only, so a Pipeline shares a process with no other tenant's.

A shard ends when its last pipeline leaves it.

A warm swap's candidate is a second pipeline of the same resource, on whichever shard of
its namespace has room (the active one's, often), with a record of its own; each record
says its slot, so a restarted operator adopts each pipeline in the slot it had. A Pipeline
that listens on a port of this machine is not swapped (two instances would bind it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from juturna_operator.domain import WHOLE_RUNTIME, InstanceState, NodeCrash, PipelineKey, Slot
from juturna_operator.engines.base import (
    WARMUP_TIMEOUT_S,
    InstanceInfo,
    LocalSlots,
    Plan,
    apply_health,
    held,
    vacant,
)
from juturna_operator.engines.client import (
    AnswerTooLarge,
    HalfBuilt,
    JuturnaClient,
    NoAnswer,
    listed_name,
)
from juturna_operator.engines.workers import (
    HEALTH_MISSES,
    HEALTH_TIMEOUT_S,
    Child,
    WorkerProcesses,
    describe_exit,
    done_already,
    named_in,
    pipeline_named,
    wipe_output,
    worker_client,
    write_record,
)
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import Settings
from juturna_operator.zygote import KnownProcess, same_process

log = logging.getLogger(__name__)

# A health answer younger than this serves every pipeline of its shard: one call per shard
# and round instead of one per pipeline (health checks come every few seconds for each).
HEALTH_FRESH_S = 1.0
# How long a stopping operator lets operations in flight end (a deploy's warmup); within the
# 30 s Kubernetes gives a pod to stop, after the 5 s its reconcile passes get.
CLOSE_WAIT_S = 15.0


@dataclass
class ShardRecord:
    """A shard process, as a restarted operator finds it: ``.shards/<name>.json``."""

    name: str
    namespace: str
    pid: int
    start_time: int
    port: int = 0


@dataclass
class PlacedRecord:
    """One pipeline on a shard: ``.shards/pipelines/<file>.json``."""

    namespace: str
    name: str
    uid: str
    revision: str
    shard: str
    pipeline_id: str = ""  # empty while its deploy is in flight
    state: str = InstanceState.Created.value
    # The record's file name: the uid, or, for a second instance of the resource, the uid
    # and an instance id ("": an older record's, the uid).
    file: str = ""
    slot: str = Slot.active.value  # a Slot's value, or RETIRED (``place_slots``)
    active_since: int = 0  # ns since the epoch: when a promote made it active (0: ever)
    made: int = 0  # ns since the epoch: when it was created

    @property
    def file_name(self) -> str:
        return f"{self.file or self.uid}.json"

    @property
    def key(self) -> PipelineKey:
        slot = Slot.active if self.slot == Slot.active else Slot.candidate
        return PipelineKey(self.namespace, self.name, self.uid, slot)


@dataclass(eq=False)
class _Shard:
    record: ShardRecord
    child: Child
    token: str
    client: JuturnaClient | None = None
    pipelines: set[PipelineKey] = field(default_factory=set)  # placed, or being placed
    stuck: set[str] = field(default_factory=set)  # pipeline ids a hung stop left here
    health: dict[str, Any] | None = None  # the last answer of its health route
    health_at: float = 0.0  # when the request for it went out (monotonic)
    asking: asyncio.Future[dict[str, Any] | PipelineFailure] | None = None
    asked_at: float = 0.0
    misses: int = 0
    # Its health answer was over the size cap: every pipeline here fails with this, none is
    # added, and the shard is ended when the first of them is redeployed (as when unresponsive).
    refused: PipelineFailure | None = None

    def connect(self, port: int) -> JuturnaClient:
        self.record.port = port
        self.client = worker_client(port, self.token)
        return self.client

    @property
    def talk(self) -> JuturnaClient:
        assert self.client is not None  # connected before any pipeline is placed
        return self.client

    def alive(self) -> bool:
        return self.child.running()

    def unresponsive(self) -> bool:
        return self.misses >= HEALTH_MISSES

    def unusable(self) -> bool:
        """Alive but no longer to be asked: unresponsive, or its health answer was refused."""
        return self.unresponsive() or self.refused is not None

    def takes_more(self, namespace: str, size: int) -> bool:
        return (
            self.record.namespace == namespace
            and len(self.pipelines) < size
            and not self.stuck
            and not self.unusable()
            and self.alive()
        )

    def exit_description(self) -> str:
        return describe_exit(f"shard process {self.record.pid}", self.child)


@dataclass(eq=False)
class _Placed:
    record: PlacedRecord
    shard: _Shard
    changed_at: float = 0.0  # when its last step ended (monotonic): older health predates it

    @property
    def state(self) -> InstanceState:
        return InstanceState(self.record.state)


class ShardEngine(LocalSlots):
    """Runs pipelines many to a worker process (a shard), one namespace per shard."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings
        self._workdir = settings.workdir
        self._state_dir = settings.workdir / ".shards"
        self._records = self._state_dir / "pipelines"
        self._records.mkdir(parents=True, exist_ok=True)
        self._procs = WorkerProcesses(settings, self._state_dir)
        self._shards: dict[str, _Shard] = {}
        self._placed: dict[PipelineKey, _Placed] = {}
        self._adopted: set[PipelineKey] = set()  # from a previous process, not yet claimed
        self._placing: asyncio.Lock | None = None  # made on the event loop, at first use
        self._closing = False
        self.close_wait_s = CLOSE_WAIT_S
        self._adopt_or_reap()
        self._procs.start_zygote()

    # -- records --

    def _adopt_or_reap(self) -> None:
        """Adopt the shards and pipelines a previous operator process left; reap the rest.

        A shard that died meanwhile is kept, dead, with its pipelines: each then reports
        the crash, and the lifecycle redeploys it (or the sweep removes it)."""
        for path in self._state_dir.glob("*.json"):
            try:
                record = ShardRecord(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            token = self._procs.token_file(record.name)
            child = KnownProcess(record.pid, record.start_time)
            alive = same_process(record.pid, record.start_time)
            if alive and (not token.exists() or not record.port):
                log.warning("reaping shard %s: it cannot be reached", record.pid)
                self._procs.kill(child)
            shard = _Shard(record, child, token.read_text().strip() if token.exists() else "")
            if shard.token and record.port:
                shard.connect(record.port)
            self._shards[record.name] = shard
        found_of: dict[str, list[_Placed]] = defaultdict(list)
        for path in self._records.glob("*.json"):
            try:
                placed = PlacedRecord(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            on = self._shards.get(placed.shard)
            if on is not None and not placed.pipeline_id and on.alive():
                found = pipeline_named(on.record.port, on.token, placed.key.juturna_name)
                placed.pipeline_id, placed.state = found or ("", placed.state)
            if on is None or not placed.pipeline_id:
                path.unlink(missing_ok=True)  # its create never reached the shard
                continue
            found_of[placed.uid].append(_Placed(placed, on))
        for found_here in found_of.values():
            kept, strays = self.adopted_slots(found_here, lambda p: p.record)
            for placed_here in kept:
                write_record(self._records / placed_here.record.file_name, placed_here.record)
                key = placed_here.record.key
                self._placed[key] = placed_here
                placed_here.shard.pipelines.add(key)
                self._adopted.add(key)
                pipeline = placed_here.record.pipeline_id
                log.info("adopted pipeline %s (%s)", pipeline, key.slot, extra=key.log_extra)
            for stray in strays:
                # A third instance: forgotten, its pipeline removed by the sweep (unheld).
                log.warning("forgetting pipeline %s: a third instance", stray.record.pipeline_id)
                (self._records / stray.record.file_name).unlink(missing_ok=True)
        for gone in [s for s in self._shards.values() if not s.pipelines and not s.alive()]:
            self._forget_shard(gone)
        live = {s.record.pid for s in self._shards.values() if s.alive()}
        log.info("adopted %d shard(s) running %d pipeline(s)", len(live), len(self._placed))
        self._procs.reap_strays(live)

    async def _save(self, placed: _Placed) -> None:
        """Write its record: after each step, which health answers must then postdate."""
        placed.changed_at = time.monotonic()
        path = self._records / placed.record.file_name
        await asyncio.to_thread(write_record, path, placed.record)

    def _forget_shard(self, shard: _Shard) -> None:
        self._shards.pop(shard.record.name, None)
        self._procs.forget(shard.record.name)

    # -- shards --

    async def _place(self, key: PipelineKey) -> _Shard:
        """A shard of ``key``'s namespace with room (the fullest: fewer processes), or a new
        one; ``key`` holds its place from now on."""
        if self._placing is None:
            self._placing = asyncio.Lock()
        async with self._placing:
            size = self._settings.shard_size
            roomy = [s for s in self._shards.values() if s.takes_more(key.namespace, size)]
            shard = max(roomy, key=lambda s: len(s.pipelines)) if roomy else None
            if shard is None:
                shard = await self._start_shard(key)
            shard.pipelines.add(key)
            return shard

    async def _start_shard(self, key: PipelineKey) -> _Shard:
        name = f"shard-{secrets.token_hex(6)}"
        token = await asyncio.to_thread(self._procs.new_token, name)
        child, port_file, log_file = await asyncio.to_thread(self._procs.spawn, name, key.log_extra)
        record = ShardRecord(name, key.namespace, child.pid, child.start_time)
        shard = self._shards[name] = _Shard(record, child, token)
        shard.pipelines.add(key)  # its place, from the start: the sweep ends empty shards
        try:
            await self._procs.wait_ready(child, port_file, log_file, shard.connect)
            await asyncio.to_thread(write_record, self._state_dir / f"{name}.json", record)
        except BaseException:
            await self._end_shard(shard)
            raise
        log.info("started shard %s, pid %s", name, child.pid, extra=key.log_extra)
        return shard

    async def _end_shard(self, shard: _Shard) -> None:
        """End a shard process for good, with whatever still runs in it."""
        self._shards.pop(shard.record.name, None)  # placed on no more, from this moment
        await self._procs.end(shard.child, shard.client)
        await asyncio.to_thread(self._forget_shard, shard)
        log.info("ended shard %s (pid %s)", shard.record.name, shard.record.pid)

    async def _unplace(self, placed: _Placed, keep_output: bool) -> None:
        """Forget a pipeline (its shard no longer holds it), and end its shard if that was
        its last pipeline: an idle shard holds tens of MiB, and a new one forks in
        milliseconds."""
        key, shard = placed.record.key, placed.shard
        self._placed.pop(key, None)
        shard.pipelines.discard(key)
        (self._records / placed.record.file_name).unlink(missing_ok=True)
        if not keep_output:
            await asyncio.to_thread(wipe_output, self._workdir, key.juturna_name)
        if not shard.pipelines:
            await self._end_shard(shard)

    async def _health(self, shard: _Shard, since: float) -> dict[str, Any] | PipelineFailure:
        """The shard's health answer, shared by every pipeline of the shard that asks within
        ``HEALTH_FRESH_S`` of it, or while it is in flight: one asked for at ``since`` or
        later (a pipeline's last step ended at ``since``: an older answer predates it)."""
        now = time.monotonic()
        if shard.health is not None and since <= shard.health_at > now - HEALTH_FRESH_S:
            return shard.health
        if shard.asking is None or shard.asking.done() or shard.asked_at < since:
            shard.asked_at = now
            shard.asking = asyncio.ensure_future(self._ask_health(shard, now))
        return await asyncio.shield(shard.asking)

    async def _ask_health(self, shard: _Shard, asked_at: float) -> dict[str, Any] | PipelineFailure:
        try:
            health: dict[str, Any] = await shard.talk.request(
                "GET", "/operator/health", Step.run, HEALTH_TIMEOUT_S
            )
        except AnswerTooLarge as failure:
            shard.refused = PipelineFailure(
                failure.reason,
                Step.run,
                f"shard process {shard.record.pid}, running {len(shard.pipelines)} "
                f"pipeline(s): {failure.message}",
            )
            log.warning("%s", shard.refused.message)
            return failure
        except PipelineFailure as failure:
            await asyncio.sleep(0.2)  # a shard killed a moment ago refuses before it is reaped
            if shard.alive():
                shard.misses += 1
                log.warning(
                    "shard %s gave no answer to its health check (%d in a row; %d make it "
                    "stuck): %s",
                    shard.record.pid,
                    shard.misses,
                    HEALTH_MISSES,
                    failure.message,
                )
            return failure
        if asked_at >= shard.health_at:
            shard.health, shard.health_at = health, asked_at
        shard.misses = 0
        return health

    # -- the Engine interface --

    async def _create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan
    ) -> str:
        vacant(self._placed, key)
        # The resource's first record is named after its uid (as before two slots); a
        # second one beside it gets an instance id too.
        taken = any(p.record.file_name == f"{key.uid}.json" for p in self._placed.values())
        shard = await self._place(key)
        record = PlacedRecord(key.namespace, key.name, key.uid, revision, shard.record.name)
        record.file = f"{key.uid}-{secrets.token_hex(4)}" if taken else key.uid
        record.slot, record.made = key.slot.value, time.time_ns()
        placed = self._placed[key] = _Placed(record, shard)
        try:
            await self._save(placed)  # before the deploy: a restart finds it by its name
            record.pipeline_id, state = await self._deploy(
                key, shard.talk, config, plan.until, on_worker=True
            )
        except HalfBuilt as failure:
            # Held like any instance, so the delete that follows a failed step takes it down.
            await self._hold(placed, failure.pipeline_id, failure.state.value)
            raise
        except PipelineFailure as failure:
            # Closing drops the connections of requests in flight, and the shard's client.
            no_answer = failure.reason is FailureReason.RuntimeUnavailable and not self._closing
            built = await self._built_anyway(shard, key) if no_answer else None
            if built is None:
                await self._let_go(placed, failure)
                raise
            await self._hold(placed, *built)
            raise PipelineFailure(
                failure.reason,
                failure.step,
                f"{failure.message}; shard process {shard.record.pid} built pipeline {built[0]} "
                "all the same, which goes with this failed attempt",
            ) from failure
        except BaseException as error:
            await self._let_go(placed, error)
            raise
        record.state = state.value
        await self._save(placed)
        return record.pipeline_id

    async def _hold(self, placed: _Placed, pipeline_id: str, state: str) -> None:
        placed.record.pipeline_id, placed.record.state = pipeline_id, state
        await self._save(placed)

    async def _built_anyway(self, shard: _Shard, key: PipelineKey) -> tuple[str, str] | None:
        """The pipeline (id, state) a deploy that gave no answer (a timeout, a dropped
        connection) built all the same, found on its shard by its name; None if it built
        none, or the shard cannot tell: the sweep removes what it built later."""
        health = await self._health(shard, time.monotonic())
        return None if isinstance(health, PipelineFailure) else named_in(health, key.juturna_name)

    async def _let_go(self, placed: _Placed, error: BaseException) -> None:
        """After a create that failed with nothing known to be built: unplace it, unless the
        operator is stopping (closed, or its event loop cancelling what is in flight: no
        ``Exception``). Then its record stays, and the next operator process looks for the
        pipeline by its name."""
        if not self._closing and isinstance(error, Exception):
            await self._unplace(placed, keep_output=True)  # a previous instance's output stays

    async def _warmup(self, key: PipelineKey) -> None:
        placed = held(self._placed, key, Step.warmup)
        async with done_already(FailureReason.AlreadyWarmedUp):
            await placed.shard.talk.warmup(placed.record.pipeline_id, WARMUP_TIMEOUT_S)
        placed.record.state = InstanceState.Ready.value
        await self._save(placed)

    async def _start(self, key: PipelineKey) -> None:
        placed = held(self._placed, key, Step.start)
        async with done_already(FailureReason.AlreadyRunning):
            await placed.shard.talk.start(placed.record.pipeline_id)
        placed.record.state = InstanceState.Running.value
        await self._save(placed)

    async def _stop(self, key: PipelineKey) -> None:
        placed = held(self._placed, key, Step.stop)
        if placed.state is InstanceState.Running and placed.shard.alive():
            await self._stop_bounded(placed, Step.stop)
        placed.record.state = InstanceState.Spent.value
        await self._save(placed)

    async def _stop_bounded(self, placed: _Placed, step: Step) -> None:
        """Stop within the stop timeout; a stop that hangs leaves the pipeline stuck in its
        shard, which takes no more pipelines and ends once the others have left."""
        timeout = self._settings.stop_timeout_s
        try:
            async with done_already(FailureReason.NotRunning):
                await placed.shard.talk.stop(placed.record.pipeline_id, timeout)
        except NoAnswer as failure:
            shard = placed.shard
            shard.stuck.add(placed.record.pipeline_id)
            others = len(shard.pipelines) - 1
            await self._unplace(placed, keep_output=True)
            raise PipelineFailure(
                FailureReason.StopTimeout,
                step,
                f"stop did not finish within {timeout:g} s; pipeline {placed.record.pipeline_id} "
                f"is left stuck in shard process {shard.record.pid}, which takes no new "
                f"pipelines and is ended once its {others} other pipeline(s) have left",
            ) from failure

    # -- a warm swap's primitive --

    async def _promote(self, key: PipelineKey) -> None:
        promoted = await self.promote_recorded(
            key,
            self._placed,
            lambda p: p.record,
            lambda p: p.shard.alive(),
            lambda p: f"pipeline {p.record.pipeline_id} in shard process {p.shard.record.pid}",
            self._save,
        )
        if promoted is None:
            return
        new, old = promoted
        for placed in (new, old):  # each shard holds its pipeline under its new slot
            if placed is not None:
                placed.shard.pipelines.difference_update((key, key.candidate))
        new.shard.pipelines.add(key)
        if old is not None:
            old.shard.pipelines.add(key.candidate)
            ids = new.record.pipeline_id, old.record.pipeline_id
            log.info("pipeline %s serves; pipeline %s retired", *ids, extra=key.log_extra)

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        await self.exclusive(key, self._delete, key, keep_output)
        self.drop_lock(key)

    async def _delete(self, key: PipelineKey, keep_output: bool) -> None:
        placed = self._placed.get(key)
        if placed is None:
            if not keep_output:  # the output an earlier delete kept
                await asyncio.to_thread(wipe_output, self._workdir, key.juturna_name)
            return
        shard = placed.shard
        if shard.unusable() and shard.alive():
            # Its pipelines are being redeployed elsewhere: no request would be answered (or
            # read).
            await self._end_shard(shard)
        if shard.alive() and placed.record.pipeline_id:
            if placed.state is InstanceState.Running:
                try:
                    await self._stop_bounded(placed, Step.delete)
                except PipelineFailure as failure:
                    if failure.reason is FailureReason.StopTimeout:
                        raise  # left stuck in the shard, which ends once emptied
                    log.warning("stopping before delete: %s", failure, extra=key.log_extra)
            try:
                # Juturna's delete wipes the folder, or leaves it for the next instance.
                await shard.talk.delete(placed.record.pipeline_id, wipe=not keep_output)
            except PipelineFailure as failure:
                if failure.reason is not FailureReason.InvalidPipelineId:
                    shard.stuck.add(placed.record.pipeline_id)  # the shard ends once emptied
                    await self._unplace(placed, keep_output)
                    raise
        await self._unplace(placed, keep_output)

    async def status(self, key: PipelineKey) -> InstanceInfo | None:
        placed = self._placed.get(key)
        if placed is None:
            return None
        record, shard = placed.record, placed.shard
        info = InstanceInfo(key, record.pipeline_id, record.revision, placed.state)
        pid = f"pid {shard.record.pid}"
        if shard.refused is not None and not self.busy(key):
            # Its health answer was over the size cap: the cause, even once the shard is ended.
            info.failure = shard.refused
            return info
        if not shard.alive():
            cause = f"{shard.exit_description()}; it ran {len(shard.pipelines)} pipeline(s)"
            info.crashes = [NodeCrash(WHOLE_RUNTIME, pid, cause)]
            return info
        if not record.pipeline_id or self.busy(key):
            return info  # its deploy is under way: the step says how far
        health = await self._health(shard, placed.changed_at)
        if isinstance(health, PipelineFailure):
            if shard.refused is not None:  # this very answer
                info.failure = shard.refused
                return info
            if not shard.alive():
                info.crashes = [NodeCrash(WHOLE_RUNTIME, pid, shard.exit_description())]
                return info
            if shard.unresponsive():
                cause = (
                    f"shard process {shard.record.pid} runs but gave no answer to "
                    f"{shard.misses} health checks in a row (the last: {health.message})"
                )
                info.crashes = [NodeCrash(WHOLE_RUNTIME, pid, cause)]
                return info
            if shard.health is None:
                return info
            health = shard.health  # the last known state until it answers again
        apply_health(info, health, shared=True)
        return info

    async def sweep(self, keep: dict[str, str | None]) -> list[str]:
        """Remove adopted pipelines whose resource is gone (deleted while no operator ran) and
        the pipelines of live shards that the engine does not hold; end the shards that run
        nothing."""
        removed = await self._sweep_unheld()
        for key in list(self._adopted):
            placed = self._placed.get(key)
            if placed is None or key.juturna_name in keep:
                self._adopted.discard(key)  # gone, or its resource exists: the lifecycle's
            elif not self.busy(key):
                log.warning("sweep: removing %s, whose resource is gone", key, extra=key.log_extra)
                with contextlib.suppress(PipelineFailure):
                    await self.exclusive(key, self._delete, key, False)
                self._adopted.discard(key)
                removed.append(placed.record.pipeline_id)
        for shard in list(self._shards.values()):
            if not shard.pipelines:
                await self._end_shard(shard)
        return removed

    def _holds(self, shard: _Shard, pipeline_id: str, name: str) -> bool:
        """Whether ``pipeline_id`` (called ``name``) on ``shard`` is the engine's: placed
        there, left stuck there, or maybe what an operation under way makes (a deploy whose
        id is not known yet). Read afresh at each decision: a create may end meanwhile."""
        if pipeline_id in shard.stuck:
            return True
        for key in list(shard.pipelines):
            placed = self._placed.get(key)
            if placed is not None and placed.record.pipeline_id == pipeline_id:
                return True
            in_flight = placed is None or not placed.record.pipeline_id or self.busy(key)
            if key.juturna_name == name and in_flight:
                return True
        return False

    async def _sweep_unheld(self) -> list[str]:
        """Delete the pipelines of live shards that the engine does not hold: ones a deploy
        built after its answer was lost and its shard was asked (or could not answer)."""
        removed = []
        for shard in list(self._shards.values()):
            if not shard.pipelines or not shard.alive() or shard.unusable():
                continue  # ended below (none left), or with its pipelines' redeploy
            health = await self._health(shard, time.monotonic())
            if isinstance(health, PipelineFailure):
                continue
            listed = [i for entry in health["pipelines"] for i in entry.items()]
            for pipeline_id, status in listed:
                name = listed_name(pipeline_id, status)
                if self._holds(shard, pipeline_id, name):
                    continue
                log.warning(
                    "sweep: removing pipeline %s (%s) from shard %s: the engine does not hold it",
                    pipeline_id,
                    name,
                    shard.record.pid,
                )
                try:
                    await shard.talk.delete(pipeline_id)
                except PipelineFailure as failure:
                    if failure.reason is not FailureReason.InvalidPipelineId:
                        log.warning("sweep: %s", failure)
                        shard.stuck.add(pipeline_id)  # the shard ends once emptied
                    continue
                removed.append(pipeline_id)
        return removed

    async def close(self) -> None:
        """Leave the shards running: the next operator process adopts them. Operations in
        flight (a deploy's warmup) may end first, for ``close_wait_s`` at most: one cut
        short keeps its record, and the next process finds its pipeline by its name."""
        self._closing = True
        await self.settle(self.close_wait_s)
        for shard in self._shards.values():
            if shard.client is not None:
                await shard.client.close()
        await self._procs.close()
