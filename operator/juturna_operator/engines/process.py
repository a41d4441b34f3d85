"""The process engine: one supervised worker process per pipeline.

Each worker (``juturna_operator.worker``) serves Juturna's own HTTP API for one pipeline;
this engine drives it with ``JuturnaClient``. A worker is a real containment boundary:

* a node that raises is reported by the worker's health route (``NodeFailed``);
* a stop that hangs is ended by killing the worker (SIGTERM, then SIGKILL): ``StopTimeout``;
* a worker killed from outside is seen at the next health check; one that runs but does not
  answer (stopped, starved) keeps its last known state until it has missed ``HEALTH_MISSES``
  checks in a row, and only then is a crash;
* new plugin code is picked up, since every deploy imports it in a fresh process.

Workers are forked from the zygote, or started the plain way when none starts
(``workers.WorkerProcesses``); a worker is healthy in tens of milliseconds. A new pipeline
reaches Running (or Ready) with one request, the worker's deploy, which carries the
resource's output folder over between create and warmup.

Workers outlive the operator process on purpose: a restarted operator finds them through
their state files (``<workdir>/.workers/<owner>.json``: the resource's uid, or the uid and an
instance id for a second instance), checks that each PID still names the process the record
saw start (PID and start time: forked workers share the zygote's executable, and a PID may
have been reused), and adopts it in the slot its record says; anything else is reaped.

A warm swap's candidate is a second worker of the same resource: its own process, port,
token and record. Two workers of one resource never collide unless the pipeline listens on
a port of this machine, so the engine warm-swaps every Pipeline that does not listen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
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
from juturna_operator.engines.client import AnswerTooLarge, JuturnaClient
from juturna_operator.engines.workers import (
    HEALTH_MISSES,
    HEALTH_TIMEOUT_S,
    Child,
    WorkerProcesses,
    cmdline,
    describe_exit,
    done_already,
    pipeline_named,
    wipe_output,
    worker_client,
    write_record,
)
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import Settings
from juturna_operator.worker import WORKER_MARKER
from juturna_operator.zygote import KnownProcess, pid_alive, same_process

log = logging.getLogger(__name__)


@dataclass
class WorkerRecord:
    """What survives an operator restart: written to ``.workers/<owner>.json``."""

    namespace: str
    name: str
    uid: str
    revision: str
    pid: int
    port: int
    pipeline_id: str = ""
    state: str = InstanceState.Created.value
    start_time: int = 0  # the PID's start time (/proc/<pid>/stat field 22): its identity
    # The worker's files' name in .workers/ (its ``--owner``): the uid, or, for a second
    # instance of the resource, the uid and an instance id ("": an older record's, the uid).
    owner: str = ""
    slot: str = Slot.active.value  # a Slot's value, or RETIRED (``place_slots``)
    active_since: int = 0  # ns since the epoch: when a promote made it active (0: ever)
    made: int = 0  # ns since the epoch: when it was created

    @property
    def owner_name(self) -> str:
        return self.owner or self.uid

    @property
    def key(self) -> PipelineKey:
        slot = Slot.active if self.slot == Slot.active else Slot.candidate
        return PipelineKey(self.namespace, self.name, self.uid, slot)


class _Worker:
    def __init__(self, record: WorkerRecord, child: Child, token: str) -> None:
        self.record = record
        self.child = child
        self.token = token
        self.client = self._client()
        self.last_health: dict[str, Any] | None = None  # the last answer of its health route
        self.misses = 0  # health checks unanswered since then

    def _client(self) -> JuturnaClient:
        return worker_client(self.record.port, self.token)

    def connect(self, port: int) -> JuturnaClient:
        self.record.port = port
        self.client = self._client()
        return self.client

    @property
    def state(self) -> InstanceState:
        return InstanceState(self.record.state)

    def alive(self) -> bool:
        return self.child.running()

    def exit_description(self) -> str:
        return describe_exit(f"worker process {self.record.pid}", self.child)


class ProcessEngine(LocalSlots):
    """Runs each pipeline in a worker process of its own."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings
        self._workdir = settings.workdir
        self._state_dir = settings.workdir / ".workers"
        self._procs = WorkerProcesses(settings, self._state_dir)
        self._workers: dict[PipelineKey, _Worker] = {}
        self._adopted: set[PipelineKey] = set()  # from a previous process, not yet claimed
        self._adopt_or_reap()
        self._procs.start_zygote()

    # -- worker processes --

    def _adopt_or_reap(self) -> None:
        """Adopt the workers a previous operator process left, each in the slot its record
        says (``place_slots``: of two marked active, the later); reap everything else."""
        live: dict[str, list[_Worker]] = defaultdict(list)
        dead: list[WorkerRecord] = []
        for path in self._state_dir.glob("*.json"):
            try:
                record = WorkerRecord(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            worker = self._found(record)
            if worker is None:
                dead.append(record)
            else:
                live[record.uid].append(worker)
        adopted: set[int] = set()
        for workers in live.values():
            kept, strays = self.adopted_slots(workers, lambda w: w.record)
            for worker in kept:
                self._save(worker)  # what a killed promote left, settled
                key = worker.record.key
                self._workers[key] = worker
                self._adopted.add(key)
                adopted.add(worker.record.pid)
                log.info("adopted worker %s (%s)", worker.record.pid, key.slot, extra=key.log_extra)
            for stray in strays:
                log.warning("reaping worker %s: a third instance", stray.record.pid)
                self._procs.kill(stray.child)
                dead.append(stray.record)
        for record in dead:
            # The output stays while another instance of the resource lives.
            self._forget(record, keep_output=record.uid in live)
        self._procs.reap_strays(adopted)

    def _found(self, record: WorkerRecord) -> _Worker | None:
        """The worker ``record`` names, if it still runs and can be driven; else it is ended
        (if it runs) and None."""
        owner = record.owner_name
        if record.start_time:
            ours = same_process(record.pid, record.start_time)
        else:  # a record from before start times were kept: a worker started plainly
            line = cmdline(record.pid)
            ours = pid_alive(record.pid) and WORKER_MARKER in line and owner in line
        token = self._procs.token_file(owner)
        child = KnownProcess(record.pid, record.start_time)
        if ours and not record.pipeline_id and token.exists():
            # The previous process died inside the worker's deploy (a warmup lasts
            # minutes): the worker knows the pipeline by its name.
            found = pipeline_named(record.port, token.read_text(), record.key.juturna_name)
            record.pipeline_id, record.state = found or ("", record.state)
        if ours and record.pipeline_id and token.exists():
            return _Worker(record, child, token.read_text().strip())
        if ours:
            # The previous process died inside create, before the worker had its port or
            # its pipeline: nobody can talk to this worker, so it goes; the lifecycle
            # creates the instance again (found by the fault suite: a leaked folder).
            log.warning(
                "reaping worker %s: %s",
                record.pid,
                "its token is gone" if record.pipeline_id else "its create never finished",
                extra=record.key.log_extra,
            )
            self._procs.kill(child)
        return None

    def _save(self, worker: _Worker) -> None:
        write_record(self._state_dir / f"{worker.record.owner_name}.json", worker.record)

    def _forget(self, record: WorkerRecord, keep_output: bool = False) -> None:
        if not keep_output:
            wipe_output(self._workdir, record.key.juturna_name)
        # Killed after the record went, a process once leaked the folder in a full run.
        self._procs.forget(record.owner_name)

    async def _end(self, worker: _Worker, keep_output: bool = False) -> None:
        """Stop the worker process for good and remove what it left (``keep_output``: all
        but the pipeline's folder, which the resource's next instance takes over)."""
        await self._procs.end(worker.child, worker.client)
        self._workers.pop(worker.record.key, None)
        await asyncio.to_thread(self._forget, worker.record, keep_output)

    async def _set_state(self, worker: _Worker, state: InstanceState) -> None:
        worker.record.state = state.value
        await asyncio.to_thread(self._save, worker)

    # -- the Engine interface --

    async def _create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan
    ) -> str:
        vacant(self._workers, key)
        # The resource's first worker's files are named after its uid (as before two
        # slots); a second one beside it gets an instance id too.
        taken = any(w.record.owner_name == key.uid for w in self._workers.values())
        owner = f"{key.uid}-{secrets.token_hex(4)}" if taken else key.uid
        token = await asyncio.to_thread(self._procs.new_token, owner)
        child, port_file, log_file = await asyncio.to_thread(
            self._procs.spawn, owner, key.log_extra
        )
        record = WorkerRecord(key.namespace, key.name, key.uid, revision, child.pid, 0)
        record.start_time, record.owner, record.made = child.start_time, owner, time.time_ns()
        record.slot = key.slot.value
        worker = self._workers[key] = _Worker(record, child, token)  # known from its first moment
        await asyncio.to_thread(self._save, worker)
        try:
            await self._procs.wait_ready(worker.child, port_file, log_file, worker.connect)
            await asyncio.to_thread(self._save, worker)  # its port: a restart finds it
            record.pipeline_id, state = await self._deploy(
                key, worker.client, config, plan.until, on_worker=True
            )
            await self._set_state(worker, state)
        except BaseException:
            await self._end(worker, keep_output=True)  # a previous instance's output stays
            raise
        return record.pipeline_id

    async def _warmup(self, key: PipelineKey) -> None:
        worker = held(self._workers, key, Step.warmup)
        async with done_already(FailureReason.AlreadyWarmedUp):
            await worker.client.warmup(worker.record.pipeline_id, WARMUP_TIMEOUT_S)
        await self._set_state(worker, InstanceState.Ready)

    async def _start(self, key: PipelineKey) -> None:
        worker = held(self._workers, key, Step.start)
        async with done_already(FailureReason.AlreadyRunning):
            await worker.client.start(worker.record.pipeline_id)
        await self._set_state(worker, InstanceState.Running)

    async def _stop(self, key: PipelineKey) -> None:
        worker = held(self._workers, key, Step.stop)
        if worker.state is not InstanceState.Running or not worker.alive():
            await self._set_state(worker, InstanceState.Spent)
            return
        timeout = self._settings.stop_timeout_s
        try:
            async with done_already(FailureReason.NotRunning):
                await worker.client.stop(worker.record.pipeline_id, timeout)
        except PipelineFailure as failure:
            if failure.reason is not FailureReason.RuntimeUnavailable:
                raise
            pid = worker.record.pid
            # The cure for a hung stop: end the process (its output stays with the resource).
            await self._end(worker, keep_output=True)
            raise PipelineFailure(
                FailureReason.StopTimeout,
                Step.stop,
                f"stop did not finish within {timeout:g} s; the worker process {pid} was "
                "killed (SIGTERM, then SIGKILL)",
            ) from failure
        await self._set_state(worker, InstanceState.Spent)

    # -- a warm swap's primitive --

    async def _promote(self, key: PipelineKey) -> None:
        promoted = await self.promote_recorded(
            key,
            self._workers,
            lambda w: w.record,
            lambda w: w.alive(),
            lambda w: f"worker process {w.record.pid}",
            lambda w: asyncio.to_thread(self._save, w),
        )
        if promoted is not None and promoted[1] is not None:
            new, old = promoted[0].record.pid, promoted[1].record.pid
            log.info("worker %s serves; worker %s retired", new, old, extra=key.log_extra)

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        worker = self._workers.get(key)
        if worker is not None and self.busy(key):
            # A deletion does not wait out a long warmup: ending the process makes the
            # operation in progress fail at once.
            await asyncio.to_thread(self._procs.kill, worker.child)
        await self.exclusive(key, self._delete, key, keep_output)
        self.drop_lock(key)

    async def _delete(self, key: PipelineKey, keep_output: bool) -> None:
        worker = self._workers.get(key)
        if worker is not None:
            # Ending the process frees everything Juturna held, without Juturna's slow
            # delete (two gc.collect() calls); _end removes the folder unless it is kept.
            await self._end(worker, keep_output)
        elif not keep_output:  # the output an earlier end kept (a redeploy)
            await asyncio.to_thread(wipe_output, self._workdir, key.juturna_name)

    async def status(self, key: PipelineKey) -> InstanceInfo | None:
        worker = self._workers.get(key)
        if worker is None:
            return None
        info = InstanceInfo(
            key=key,
            pipeline_id=worker.record.pipeline_id,
            revision=worker.record.revision,
            state=worker.state,
        )
        if not worker.alive():
            info.crashes = [
                NodeCrash(WHOLE_RUNTIME, f"pid {worker.record.pid}", worker.exit_description())
            ]
            return info
        pid = worker.record.pid
        try:
            health = await worker.client.request(
                "GET", "/operator/health", Step.run, HEALTH_TIMEOUT_S
            )
        except AnswerTooLarge as failure:
            info.failure = failure  # its pipeline fails; the redeploy ends this worker
            return info
        except PipelineFailure as failure:
            # A worker killed a moment ago refuses connections before it can be reaped: name
            # its signal rather than the refusal when it is gone (a flaky test showed both).
            await asyncio.sleep(0.2)
            if not worker.alive():
                info.crashes = [NodeCrash(WHOLE_RUNTIME, f"pid {pid}", worker.exit_description())]
                return info
            worker.misses += 1
            if worker.misses >= HEALTH_MISSES:
                cause = (
                    f"worker process {pid} runs but gave no answer to {worker.misses} health "
                    f"checks in a row (the last: {failure.message})"
                )
                info.crashes = [NodeCrash(WHOLE_RUNTIME, f"pid {pid}", cause)]
                return info
            log.warning(
                "worker %s gave no answer to its health check (%d in a row; %d make it "
                "stuck), still running: %s",
                pid,
                worker.misses,
                HEALTH_MISSES,
                failure.message,
                extra=key.log_extra,
            )
            if worker.last_health is None:
                return info
            health = worker.last_health  # the last known state until it answers again
        else:
            worker.last_health, worker.misses = health, 0
        apply_health(info, health)
        return info

    async def sweep(self, keep: dict[str, str | None]) -> list[str]:
        """End adopted workers whose resource is gone (deleted while no operator ran).

        Only adopted workers are candidates: their names carry the resource's uid, which
        never comes back, so one missing from ``keep`` is gone for good. Workers this
        process created belong to resources it reconciles, and are never swept.
        """
        removed = []
        for key in list(self._adopted):
            worker = self._workers.get(key)
            if worker is None:
                self._adopted.discard(key)
            elif key.juturna_name in keep:
                self._adopted.discard(key)  # its resource exists: the lifecycle owns it
            elif not self.busy(key):
                log.warning(
                    "sweep: ending worker %s, whose resource is gone",
                    worker.record.pid,
                    extra=key.log_extra,
                )
                await self.exclusive(key, self._end, worker)
                self._adopted.discard(key)
                removed.append(worker.record.pipeline_id)
        return removed

    async def close(self) -> None:
        """Leave the workers running: the next operator process adopts them. The zygote
        ends (the next process starts its own)."""
        for worker in list(self._workers.values()):
            await worker.client.close()
        await self._procs.close()
