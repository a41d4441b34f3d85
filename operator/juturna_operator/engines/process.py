"""The process engine: pipelines in worker processes, one or many to a process.

A worker (``juturna_operator.worker``, forked from the zygote, ``workers.WorkerProcesses``)
runs up to ``JUTURNA_OPERATOR_PIPELINES_PER_PROCESS`` pipelines with Juturna's
``PipelineManager``, all of one namespace; 1, the default, gives each pipeline a process of
its own. The engine talks to each worker over loopback HTTP with its own bearer token, in few
calls:

* one call takes a new pipeline to Running (the worker's deploy: create, carry the
  resource's output folder over, warm up, start), and names the step that failed;
* one call returns the health of every pipeline of a worker: a health check asked for while
  one is in flight, or answered less than ``HEALTH_FRESH_S`` ago, shares that answer.

Workers outlive the operator process on purpose: a restarted operator finds them and their
pipelines through their records (``<workdir>/.workers/<worker>.json`` for each process,
``<workdir>/.workers/pipelines/<uid>.json`` for each pipeline, ``<uid>-<id>`` for a second
instance of a resource), checks each PID with its start time (forked workers share the
zygote's executable, and a PID may have been reused), and adopts them, each pipeline in the
slot its record says; nothing is deployed again. A create the previous process left in
flight is found on its worker by the pipeline's name. The records of earlier versions (the
process engine's ``.workers/<uid>.json``, one per worker and pipeline, and the shard engine's
``.shards/``) are read into these at start.

A worker is named after the pipeline it was started for (its uid: ``--owner <uid>`` in its
command line), or, where a worker of that name runs, that and an id.

What a worker contains, and what it costs:

* a node that raises fails its own pipeline only (the worker's health route names the
  pipeline of each thread that died, a plugin's own threads included; one no pipeline
  started fails none, or, one pipeline to a process, that one);
* a worker killed from outside is seen at the next health check; one that runs but does not
  answer (stopped, starved) keeps its last known state until it has missed ``HEALTH_MISSES``
  checks in a row, and only then counts as dead, and is ended when its pipelines are
  redeployed;
* a worker that dies (a segfault, the kernel's OOM killer, a kill) fails every pipeline it
  ran at once, each with the process's exit in its status; each is restarted by its own
  ``restartPolicy`` (a restart counted), on another worker, its output folder kept.
  Pipelines on other workers are untouched;
* a deletion does not wait out a long warmup of a pipeline alone in its worker: the worker
  is ended, and the operation in progress fails at once;
* a stop that hangs is bounded by the stop timeout: a pipeline alone in its worker goes
  with it (SIGTERM, then SIGKILL); one beside others is left there, stuck, and the worker
  takes no new pipelines and is ended once the others have left; either way ``StopTimeout``;
* a deploy that gives no answer (a timeout, a dropped connection) may have built its
  pipeline all the same: it is found by its name and held, so the delete after the failure
  removes it; the sweep deletes whatever a live worker runs that the engine does not hold;
* a stopping operator (``close``) lets operations in flight end, ``CLOSE_WAIT_S`` at most;
  one cut short keeps its record, and the next process finds its pipeline by its name;
* a worker has no more rights than it needs: the workers' scrubbed environment, and
  pipelines of one namespace only, so a Pipeline shares a process with no other tenant's;
* new plugin code is picked up by a redeploy on a new worker.

A worker ends when its last pipeline leaves it: an idle one holds tens of MiB, and a new one
forks in milliseconds.

A warm swap's candidate is a second pipeline of the same resource, on whichever worker of
its namespace has room (a new one, one pipeline to a process), with a record of its own;
each record says its slot, so a restarted operator adopts each pipeline in the slot it had.
A Pipeline that listens on a port of this machine is not swapped (two instances would bind
it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
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
    cmdline,
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
from juturna_operator.worker import WORKER_MARKER
from juturna_operator.zygote import KnownProcess, same_process, start_time

log = logging.getLogger(__name__)

# A health answer younger than this serves every pipeline of its worker: one call per worker
# and round instead of one per pipeline (health checks come every few seconds for each).
HEALTH_FRESH_S = 1.0
# How long a stopping operator lets operations in flight end (a deploy's warmup); within the
# 30 s Kubernetes gives a pod to stop, after the 5 s its reconcile passes get.
CLOSE_WAIT_S = 15.0


@dataclass
class WorkerRecord:
    """A worker process, as a restarted operator finds it: ``.workers/<name>.json``."""

    name: str
    namespace: str
    pid: int
    start_time: int
    port: int = 0


@dataclass(kw_only=True)
class SlotFields:
    """A record's place in a warm swap (``base.SlotRecord``)."""

    slot: str = Slot.active.value  # a Slot's value, or RETIRED (``place_slots``)
    active_since: int = 0  # ns since the epoch: when a promote made it active (0: ever)
    made: int = 0  # ns since the epoch: when it was created


@dataclass
class PipelineRecord(SlotFields):
    """One pipeline on a worker: ``.workers/pipelines/<file>.json``."""

    namespace: str
    name: str
    uid: str
    revision: str
    worker: str  # its worker's name
    pipeline_id: str = ""  # empty while its deploy is in flight
    state: str = InstanceState.Created.value
    # The record's file name: the uid, or, for a second instance of the resource, the uid
    # and an instance id ("": an older record's, the uid).
    file: str = ""

    @property
    def file_name(self) -> str:
        return f"{self.file or self.uid}.json"

    @property
    def key(self) -> PipelineKey:
        slot = Slot.active if self.slot == Slot.active else Slot.candidate
        return PipelineKey(self.namespace, self.name, self.uid, slot)


@dataclass
class LegacyRecord(SlotFields):
    """The process engine's record of a worker and its one pipeline, before one engine
    served both densities (``.workers/<owner>.json``): read into a ``WorkerRecord`` and a
    ``PipelineRecord`` at start (``migrate_records``)."""

    namespace: str
    name: str
    uid: str
    revision: str
    pid: int
    port: int
    pipeline_id: str = ""
    state: str = InstanceState.Created.value
    start_time: int = 0  # 0: a record from before start times were kept
    owner: str = ""  # its worker's ``--owner`` ("": an older record's, the uid)


def pipeline_record(data: dict[str, Any]) -> PipelineRecord:
    """A pipeline's record as read from its file; the shard engine's named its worker
    ``shard``."""
    if "shard" in data:
        data = {**data, "worker": data["shard"]}
        del data["shard"]
    return PipelineRecord(**data)


def migrate_records(workdir: Path, state_dir: Path, records: Path) -> None:
    """Read the records an earlier operator version left into this engine's: the process
    engine's (``.workers/<owner>.json``: one worker, one pipeline, in one record) become a
    worker's record and its pipeline's; the shard engine's (``.shards/``) move here with the
    files of their workers (tokens, logs: a running worker keeps writing to its moved log).
    Each step leaves what a second run finishes, if the operator is killed in here."""
    for path in state_dir.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue  # not a record: the adoption drops it
        if not isinstance(data, dict) or "uid" not in data:
            continue  # a worker's record already
        try:
            legacy = LegacyRecord(**data)
        except TypeError:
            continue  # the adoption drops it
        owner = legacy.owner or legacy.uid
        started = legacy.start_time
        if not started and WORKER_MARKER in cmdline(legacy.pid) and owner in cmdline(legacy.pid):
            started = start_time(legacy.pid) or 0  # a record from before start times were kept
        pipeline = PipelineRecord(
            legacy.namespace,
            legacy.name,
            legacy.uid,
            legacy.revision,
            owner,
            legacy.pipeline_id,
            legacy.state,
            file=owner,
            slot=legacy.slot,
            active_since=legacy.active_since,
            made=legacy.made,
        )
        write_record(records / pipeline.file_name, pipeline)
        worker = WorkerRecord(owner, legacy.namespace, legacy.pid, started, legacy.port)
        write_record(path, worker)
    old = workdir / ".shards"
    if not old.is_dir():
        return
    for path in (old / "pipelines").glob("*.json"):
        path.replace(records / path.name)
    for path in old.iterdir():
        if path.is_file() and not path.name.startswith("zygote"):
            path.replace(state_dir / path.name)
    shutil.rmtree(old, ignore_errors=True)


@dataclass(eq=False)
class _Worker:
    record: WorkerRecord
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
    # added, and the worker is ended when the first of them is redeployed (as when unresponsive).
    refused: PipelineFailure | None = None
    ending: bool = False  # killed by a deletion: it takes no more pipelines

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
            and not self.ending
            and not self.unusable()
            and self.alive()
        )

    def exit_description(self) -> str:
        return describe_exit(f"worker process {self.record.pid}", self.child)


@dataclass(eq=False)
class _Placed:
    record: PipelineRecord
    worker: _Worker
    changed_at: float = 0.0  # when its last step ended (monotonic): older health predates it

    @property
    def state(self) -> InstanceState:
        return InstanceState(self.record.state)


class ProcessEngine(LocalSlots):
    """Runs pipelines in worker processes, ``pipelines_per_process`` at most to one, one
    namespace per worker."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings
        self._workdir = settings.workdir
        self._state_dir = settings.workdir / ".workers"
        self._records = self._state_dir / "pipelines"
        self._records.mkdir(parents=True, exist_ok=True)
        migrate_records(self._workdir, self._state_dir, self._records)
        self._procs = WorkerProcesses(settings, self._state_dir)
        self._workers: dict[str, _Worker] = {}
        self._placed: dict[PipelineKey, _Placed] = {}
        self._adopted: set[PipelineKey] = set()  # from a previous process, not yet claimed
        self._placing: asyncio.Lock | None = None  # made on the event loop, at first use
        self._closing = False
        self.close_wait_s = CLOSE_WAIT_S
        self._adopt_or_reap()
        self._procs.start_zygote()

    # -- records --

    def _adopt_or_reap(self) -> None:
        """Adopt the workers and pipelines a previous operator process left; reap the rest.

        A worker that died meanwhile is kept, dead, with its pipelines: each then reports
        the crash, and the lifecycle redeploys it (or the sweep removes it)."""
        for path in self._state_dir.glob("*.json"):
            try:
                record = WorkerRecord(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            token = self._procs.token_file(record.name)
            child = KnownProcess(record.pid, record.start_time)
            alive = same_process(record.pid, record.start_time)
            if alive and (not token.exists() or not record.port):
                log.warning("reaping worker %s: it cannot be reached", record.pid)
                self._procs.kill(child)
            worker = _Worker(record, child, token.read_text().strip() if token.exists() else "")
            if worker.token and record.port:
                worker.connect(record.port)
            self._workers[record.name] = worker
        found_of: dict[str, list[_Placed]] = defaultdict(list)
        for path in self._records.glob("*.json"):
            try:
                placed = pipeline_record(json.loads(path.read_text()))
            except (ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            on = self._workers.get(placed.worker)
            if on is not None and not placed.pipeline_id and on.alive():
                found = pipeline_named(on.record.port, on.token, placed.key.juturna_name)
                placed.pipeline_id, placed.state = found or ("", placed.state)
            if on is None or not placed.pipeline_id:
                path.unlink(missing_ok=True)  # its create never reached the worker
                continue
            found_of[placed.uid].append(_Placed(placed, on))
        for found_here in found_of.values():
            kept, strays = self.adopted_slots(found_here, lambda p: p.record)
            for placed_here in kept:
                write_record(self._records / placed_here.record.file_name, placed_here.record)
                key = placed_here.record.key
                self._placed[key] = placed_here
                placed_here.worker.pipelines.add(key)
                self._adopted.add(key)
                pipeline = placed_here.record.pipeline_id
                log.info("adopted pipeline %s (%s)", pipeline, key.slot, extra=key.log_extra)
            for stray in strays:
                # A third instance: forgotten, its pipeline removed by the sweep (unheld).
                log.warning("forgetting pipeline %s: a third instance", stray.record.pipeline_id)
                (self._records / stray.record.file_name).unlink(missing_ok=True)
        for gone in [s for s in self._workers.values() if not s.pipelines and not s.alive()]:
            self._forget_worker(gone)
        live = {s.record.pid for s in self._workers.values() if s.alive()}
        log.info("adopted %d worker(s) running %d pipeline(s)", len(live), len(self._placed))
        self._procs.reap_strays(live)

    async def _save(self, placed: _Placed) -> None:
        """Write its record: after each step, which health answers must then postdate."""
        placed.changed_at = time.monotonic()
        path = self._records / placed.record.file_name
        await asyncio.to_thread(write_record, path, placed.record)

    def _forget_worker(self, worker: _Worker) -> None:
        self._workers.pop(worker.record.name, None)
        self._procs.forget(worker.record.name)

    # -- workers --

    async def _place(self, key: PipelineKey, name: str) -> _Worker:
        """A worker of ``key``'s namespace with room (the fullest: fewer processes), or a new
        one, called ``name`` unless a worker has that name; ``key`` holds its place from now
        on."""
        if self._placing is None:
            self._placing = asyncio.Lock()
        async with self._placing:
            size = self._settings.pipelines_per_process
            roomy = [s for s in self._workers.values() if s.takes_more(key.namespace, size)]
            worker = max(roomy, key=lambda s: len(s.pipelines)) if roomy else None
            if worker is None:
                taken = name in self._workers
                worker = await self._start_worker(
                    key, f"{key.uid}-{secrets.token_hex(4)}" if taken else name
                )
            worker.pipelines.add(key)
            return worker

    async def _start_worker(self, key: PipelineKey, name: str) -> _Worker:
        token = await asyncio.to_thread(self._procs.new_token, name)
        child, port_file, log_file = await asyncio.to_thread(self._procs.spawn, name, key.log_extra)
        record = WorkerRecord(name, key.namespace, child.pid, child.start_time)
        worker = self._workers[name] = _Worker(record, child, token)
        worker.pipelines.add(key)  # its place, from the start: the sweep ends empty workers
        try:
            await self._procs.wait_ready(child, port_file, log_file, worker.connect)
            await asyncio.to_thread(write_record, self._state_dir / f"{name}.json", record)
        except BaseException:
            await self._end_worker(worker)
            raise
        log.info("started worker %s, pid %s", name, child.pid, extra=key.log_extra)
        return worker

    async def _end_worker(self, worker: _Worker) -> None:
        """End a worker process for good, with whatever still runs in it."""
        self._workers.pop(worker.record.name, None)  # placed on no more, from this moment
        await self._procs.end(worker.child, worker.client)
        await asyncio.to_thread(self._forget_worker, worker)
        log.info("ended worker %s (pid %s)", worker.record.name, worker.record.pid)

    async def _unplace(self, placed: _Placed, keep_output: bool) -> None:
        """Forget a pipeline (its worker no longer holds it), and end its worker if that was
        its last pipeline: an idle worker holds tens of MiB, and a new one forks in
        milliseconds."""
        key, worker = placed.record.key, placed.worker
        self._placed.pop(key, None)
        worker.pipelines.discard(key)
        (self._records / placed.record.file_name).unlink(missing_ok=True)
        if not keep_output:
            await asyncio.to_thread(wipe_output, self._workdir, key.juturna_name)
        if not worker.pipelines and self._workers.get(worker.record.name) is worker:  # not ended
            await self._end_worker(worker)

    async def _health(self, worker: _Worker, since: float) -> dict[str, Any] | PipelineFailure:
        """The worker's health answer, shared by every pipeline of the worker that asks within
        ``HEALTH_FRESH_S`` of it, or while it is in flight: one asked for at ``since`` or
        later (a pipeline's last step ended at ``since``: an older answer predates it). A
        worker of one pipeline is asked at each check: there is nobody to share with, and a
        death must be seen at once."""
        now = time.monotonic()
        fresh_s = HEALTH_FRESH_S if len(worker.pipelines) > 1 else 0.0
        if worker.health is not None and since <= worker.health_at > now - fresh_s:
            return worker.health
        if worker.asking is None or worker.asking.done() or worker.asked_at < since:
            worker.asked_at = now
            worker.asking = asyncio.ensure_future(self._ask_health(worker, now))
        return await asyncio.shield(worker.asking)

    async def _ask_health(
        self, worker: _Worker, asked_at: float
    ) -> dict[str, Any] | PipelineFailure:
        try:
            health: dict[str, Any] = await worker.talk.request(
                "GET", "/operator/health", Step.run, HEALTH_TIMEOUT_S
            )
        except AnswerTooLarge as failure:
            worker.refused = PipelineFailure(
                failure.reason,
                Step.run,
                f"worker process {worker.record.pid}, running {len(worker.pipelines)} "
                f"pipeline(s): {failure.message}"
                if len(worker.pipelines) > 1
                else failure.message,
            )
            log.warning("%s", worker.refused.message)
            return failure
        except PipelineFailure as failure:
            await asyncio.sleep(0.2)  # a worker killed a moment ago refuses before it is reaped
            if worker.alive():
                worker.misses += 1
                log.warning(
                    "worker %s gave no answer to its health check (%d in a row; %d make it "
                    "stuck): %s",
                    worker.record.pid,
                    worker.misses,
                    HEALTH_MISSES,
                    failure.message,
                )
            return failure
        if asked_at >= worker.health_at:
            worker.health, worker.health_at = health, asked_at
        worker.misses = 0
        return health

    # -- the Engine interface --

    async def _create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan
    ) -> str:
        vacant(self._placed, key)
        # The resource's first record is named after its uid (as before two slots); a
        # second one beside it gets an instance id too.
        taken = any(p.record.file_name == f"{key.uid}.json" for p in self._placed.values())
        file = f"{key.uid}-{secrets.token_hex(4)}" if taken else key.uid
        worker = await self._place(key, file)
        record = PipelineRecord(key.namespace, key.name, key.uid, revision, worker.record.name)
        record.file = file
        record.slot, record.made = key.slot.value, time.time_ns()
        placed = self._placed[key] = _Placed(record, worker)
        try:
            await self._save(placed)  # before the deploy: a restart finds it by its name
            record.pipeline_id, state = await self._deploy(
                key, worker.talk, config, plan.until, on_worker=True
            )
        except HalfBuilt as failure:
            # Held like any instance, so the delete that follows a failed step takes it down.
            await self._hold(placed, failure.pipeline_id, failure.state.value)
            raise
        except PipelineFailure as failure:
            # Closing drops the connections of requests in flight, and the worker's client.
            no_answer = failure.reason is FailureReason.RuntimeUnavailable and not self._closing
            built = await self._built_anyway(worker, key) if no_answer else None
            if built is None:
                await self._let_go(placed, failure)
                raise
            await self._hold(placed, *built)
            raise PipelineFailure(
                failure.reason,
                failure.step,
                f"{failure.message}; worker process {worker.record.pid} built pipeline {built[0]} "
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

    async def _built_anyway(self, worker: _Worker, key: PipelineKey) -> tuple[str, str] | None:
        """The pipeline (id, state) a deploy that gave no answer (a timeout, a dropped
        connection) built all the same, found on its worker by its name; None if it built
        none, or the worker cannot tell: the sweep removes what it built later."""
        health = await self._health(worker, time.monotonic())
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
            await placed.worker.talk.warmup(placed.record.pipeline_id, WARMUP_TIMEOUT_S)
        placed.record.state = InstanceState.Ready.value
        await self._save(placed)

    async def _start(self, key: PipelineKey) -> None:
        placed = held(self._placed, key, Step.start)
        async with done_already(FailureReason.AlreadyRunning):
            await placed.worker.talk.start(placed.record.pipeline_id)
        placed.record.state = InstanceState.Running.value
        await self._save(placed)

    async def _stop(self, key: PipelineKey) -> None:
        placed = held(self._placed, key, Step.stop)
        if placed.state is InstanceState.Running and placed.worker.alive():
            await self._stop_bounded(placed, Step.stop)
        placed.record.state = InstanceState.Spent.value
        await self._save(placed)

    async def _stop_bounded(self, placed: _Placed, step: Step) -> None:
        """Stop within the stop timeout; a stop that hangs leaves the pipeline stuck in its
        worker, which takes no more pipelines and ends once the others have left."""
        timeout = self._settings.stop_timeout_s
        try:
            async with done_already(FailureReason.NotRunning):
                await placed.worker.talk.stop(placed.record.pipeline_id, timeout)
        except NoAnswer as failure:
            worker = placed.worker
            worker.stuck.add(placed.record.pipeline_id)
            others = len(worker.pipelines) - 1
            # Alone in its worker, the pipeline goes with it (_unplace ends an empty worker).
            await self._unplace(placed, keep_output=True)
            where = (
                f"pipeline {placed.record.pipeline_id} is left stuck in worker process "
                f"{worker.record.pid}, which takes no new pipelines and is ended once its "
                f"{others} other pipeline(s) have left"
                if others
                else f"the worker process {worker.record.pid} was killed (SIGTERM, then SIGKILL)"
            )
            raise PipelineFailure(
                FailureReason.StopTimeout,
                step,
                f"stop did not finish within {timeout:g} s; {where}",
            ) from failure

    # -- a warm swap's primitive --

    async def _promote(self, key: PipelineKey) -> None:
        promoted = await self.promote_recorded(
            key,
            self._placed,
            lambda p: p.record,
            lambda p: p.worker.alive(),
            lambda p: (
                f"pipeline {p.record.pipeline_id} in worker process {p.worker.record.pid}"
                if len(p.worker.pipelines) > 1
                else f"worker process {p.worker.record.pid}"
            ),
            self._save,
        )
        if promoted is None:
            return
        new, old = promoted
        for placed in (new, old):  # each worker holds its pipeline under its new slot
            if placed is not None:
                placed.worker.pipelines.difference_update((key, key.candidate))
        new.worker.pipelines.add(key)
        if old is not None:
            old.worker.pipelines.add(key.candidate)
            ids = new.record.pipeline_id, old.record.pipeline_id
            log.info("pipeline %s serves; pipeline %s retired", *ids, extra=key.log_extra)

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        placed = self._placed.get(key)
        if placed is not None and self.busy(key) and placed.worker.pipelines == {key}:
            # A deletion does not wait out a long warmup: ending the worker of this pipeline
            # alone makes the operation in progress fail at once.
            placed.worker.ending = True
            await asyncio.to_thread(self._procs.kill, placed.worker.child)
        await self.exclusive(key, self._delete, key, keep_output)
        self.drop_lock(key)

    async def _delete(self, key: PipelineKey, keep_output: bool) -> None:
        placed = self._placed.get(key)
        if placed is None:
            if not keep_output:  # the output an earlier delete kept
                await asyncio.to_thread(wipe_output, self._workdir, key.juturna_name)
            return
        worker = placed.worker
        if worker.pipelines == {key} or (worker.unusable() and worker.alive()):
            # Alone in its worker, a pipeline goes with it: that frees everything Juturna
            # held, without Juturna's slow delete (two gc.collect() calls), and a worker that
            # answers nothing is no obstacle. An unusable worker's pipelines are being
            # redeployed elsewhere: no request would be answered (or read). Ended first, so
            # that nothing writes in the folder _unplace may wipe.
            await self._end_worker(worker)
        if worker.alive() and placed.record.pipeline_id:
            if placed.state is InstanceState.Running:
                try:
                    await self._stop_bounded(placed, Step.delete)
                except PipelineFailure as failure:
                    if failure.reason is FailureReason.StopTimeout:
                        raise  # left stuck in the worker, which ends once emptied
                    log.warning("stopping before delete: %s", failure, extra=key.log_extra)
            try:
                # Juturna's delete wipes the folder, or leaves it for the next instance.
                await worker.talk.delete(placed.record.pipeline_id, wipe=not keep_output)
            except PipelineFailure as failure:
                if failure.reason is not FailureReason.InvalidPipelineId:
                    worker.stuck.add(placed.record.pipeline_id)  # the worker ends once emptied
                    await self._unplace(placed, keep_output)
                    raise
        await self._unplace(placed, keep_output)

    async def status(self, key: PipelineKey) -> InstanceInfo | None:
        placed = self._placed.get(key)
        if placed is None:
            return None
        record, worker = placed.record, placed.worker
        info = InstanceInfo(key, record.pipeline_id, record.revision, placed.state)
        pid = f"pid {worker.record.pid}"
        if worker.refused is not None and not self.busy(key):
            # Its health answer was over the size cap: the cause, even once the worker is ended.
            info.failure = worker.refused
            return info
        if not worker.alive():
            cause = worker.exit_description()
            if len(worker.pipelines) > 1:
                cause += f"; it ran {len(worker.pipelines)} pipeline(s)"
            info.crashes = [NodeCrash(WHOLE_RUNTIME, pid, cause)]
            return info
        if not record.pipeline_id or self.busy(key):
            return info  # its deploy is under way: the step says how far
        health = await self._health(worker, placed.changed_at)
        if isinstance(health, PipelineFailure):
            if worker.refused is not None:  # this very answer
                info.failure = worker.refused
                return info
            if not worker.alive():
                info.crashes = [NodeCrash(WHOLE_RUNTIME, pid, worker.exit_description())]
                return info
            if worker.unresponsive():
                cause = (
                    f"worker process {worker.record.pid} runs but gave no answer to "
                    f"{worker.misses} health checks in a row (the last: {health.message})"
                )
                info.crashes = [NodeCrash(WHOLE_RUNTIME, pid, cause)]
                return info
            if worker.health is None:
                return info
            health = worker.health  # the last known state until it answers again
        # One pipeline to a process: a crash in no pipeline's thread is that one's.
        apply_health(info, health, shared=self._settings.pipelines_per_process > 1)
        return info

    async def sweep(self, keep: dict[str, str | None]) -> list[str]:
        """Remove adopted pipelines whose resource is gone (deleted while no operator ran) and
        the pipelines of live workers that the engine does not hold; end the workers that run
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
        for worker in list(self._workers.values()):
            if not worker.pipelines:
                await self._end_worker(worker)
        return removed

    def _holds(self, worker: _Worker, pipeline_id: str, name: str) -> bool:
        """Whether ``pipeline_id`` (called ``name``) on ``worker`` is the engine's: placed
        there, left stuck there, or maybe what an operation under way makes (a deploy whose
        id is not known yet). Read afresh at each decision: a create may end meanwhile."""
        if pipeline_id in worker.stuck:
            return True
        for key in list(worker.pipelines):
            placed = self._placed.get(key)
            if placed is not None and placed.record.pipeline_id == pipeline_id:
                return True
            in_flight = placed is None or not placed.record.pipeline_id or self.busy(key)
            if key.juturna_name == name and in_flight:
                return True
        return False

    async def _sweep_unheld(self) -> list[str]:
        """Delete the pipelines of live workers that the engine does not hold: ones a deploy
        built after its answer was lost and its worker was asked (or could not answer)."""
        removed = []
        for worker in list(self._workers.values()):
            if not worker.pipelines or not worker.alive() or worker.unusable():
                continue  # ended below (none left), or with its pipelines' redeploy
            if worker.client is None:
                continue  # still starting: nothing of it to sweep (a create of its own)
            health = await self._health(worker, time.monotonic())
            if isinstance(health, PipelineFailure):
                continue
            listed = [i for entry in health["pipelines"] for i in entry.items()]
            for pipeline_id, status in listed:
                name = listed_name(pipeline_id, status)
                if self._holds(worker, pipeline_id, name):
                    continue
                log.warning(
                    "sweep: removing pipeline %s (%s) from worker %s: the engine does not hold it",
                    pipeline_id,
                    name,
                    worker.record.pid,
                )
                try:
                    await worker.talk.delete(pipeline_id)
                except PipelineFailure as failure:
                    if failure.reason is not FailureReason.InvalidPipelineId:
                        log.warning("sweep: %s", failure)
                        worker.stuck.add(pipeline_id)  # the worker ends once emptied
                    continue
                removed.append(pipeline_id)
        return removed

    async def close(self) -> None:
        """Leave the workers running: the next operator process adopts them. Operations in
        flight (a deploy's warmup) may end first, for ``close_wait_s`` at most: one cut
        short keeps its record, and the next process finds its pipeline by its name."""
        self._closing = True
        await self.settle(self.close_wait_s)
        for worker in self._workers.values():
            if worker.client is not None:
                await worker.client.close()
        await self._procs.close()
