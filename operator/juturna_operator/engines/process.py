"""The process engine: one supervised worker process per pipeline.

Each worker (``juturna_operator.worker``) serves Juturna's own HTTP API for one pipeline;
this engine drives it with ``JuturnaClient``. A worker is a real containment boundary:

* a node that raises is reported by the worker's health route (``NodeFailed``);
* a stop that hangs is ended by killing the worker (SIGTERM, then SIGKILL): ``StopTimeout``;
* a worker killed from outside is seen at the next health check; one that runs but does not
  answer (stopped, starved) keeps its last known state until it has missed ``HEALTH_MISSES``
  checks in a row, and only then is a crash;
* new plugin code is picked up, since every deploy imports it in a fresh process.

Workers are forked from a zygote (``juturna_operator.zygote``): one process per engine,
started with the workers' scrubbed environment, that has imported and warmed the worker's
app once; a worker is then healthy in tens of milliseconds instead of seconds. The zygote
reaps its children and tells the engine how each ended, so a worker's death and its signal
are known at once, as with ``Popen.poll``. A zygote that dies is replaced (the log says so);
one that fails to start ``ZYGOTE_START_ATTEMPTS`` times in a row leaves the engine starting
each worker the plain way (``python -m juturna_operator.worker``), as the log says too.

Workers outlive the operator process on purpose: a restarted operator finds them through
their state files (``<workdir>/.workers/<uid>.json``), checks that each PID still names the
process the record saw start (PID and start time: forked workers share the zygote's
executable, and a PID may have been reused), and adopts it; anything else is reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from juturna_operator.domain import WHOLE_RUNTIME, InstanceState, NodeCrash, PipelineKey
from juturna_operator.engines.base import (
    WARMUP_TIMEOUT_S,
    InstanceInfo,
    LockedEngine,
    Plan,
    apply_health,
    carry_output,
    held,
    vacant,
)
from juturna_operator.engines.client import JuturnaClient
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import Settings
from juturna_operator.worker import WORKER_MARKER
from juturna_operator.zygote import (
    Forked,
    KnownProcess,
    ZygoteGone,
    ZygoteHandle,
    pid_alive,
    same_process,
    start_time,
)

log = logging.getLogger(__name__)

WORKER_READY_TIMEOUT_S = 60.0
KILL_GRACE_S = 2.0
HEALTH_TIMEOUT_S = 2.0
# Health checks a live worker may leave unanswered in a row before it counts as stuck: one
# slow answer (a loaded machine, a node holding the GIL, a process stopped for a moment) is
# not a dead runtime, and taking it for one killed the worker and wiped its output.
HEALTH_MISSES = 3
# Zygotes that die before they are ready, in a row, before the engine stops starting them.
ZYGOTE_START_ATTEMPTS = 3


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# What a worker inherits from the operator's environment: what Python and Juturna's nodes
# need to run (ffmpeg on PATH, a home, a locale, a temporary folder, shared libraries, the
# CA certificates for nodes that call HTTPS).
# Nothing else: a Pipeline author reads any variable of the worker's environment with
# "$JT_ENV_<NAME>" (docs/juturna.md, pitfall 12), and the operator's holds its settings, the
# Kubernetes service address and whatever secrets the administrator passed it.
INHERITED_VARIABLES = frozenset(
    {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH"}
    | {"SSL_CERT_FILE", "SSL_CERT_DIR"}
)
INHERITED_PREFIXES = ("LC_",)


def worker_environment(plugin_roots: list[Path]) -> dict[str, str]:
    """A worker's whole environment: the few variables of ``INHERITED_VARIABLES`` (and
    ``LC_*``) taken from the operator's, and ``PYTHONPATH`` with the plugin roots first
    (plugin folders are import paths) followed by the operator's own ``PYTHONPATH``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name in INHERITED_VARIABLES or name.startswith(INHERITED_PREFIXES)
    }
    paths = [*map(str, plugin_roots), os.environ.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return env


@dataclass
class WorkerRecord:
    """What survives an operator restart: written to ``.workers/<uid>.json``."""

    namespace: str
    name: str
    uid: str
    revision: str
    pid: int
    port: int
    pipeline_id: str = ""
    state: str = InstanceState.Created.value
    start_time: int = 0  # the PID's start time (/proc/<pid>/stat field 22): its identity

    @property
    def key(self) -> PipelineKey:
        return PipelineKey(self.namespace, self.name, self.uid)


class Child(Protocol):
    """A worker process as the engine watches it, whoever its parent is."""

    pid: int
    start_time: int  # /proc/<pid>/stat field 22; 0 if unknown

    def running(self) -> bool:
        """True until it has exited (a zombie not yet reaped counts as running)."""
        ...

    def exit_code(self) -> int | None:
        """Its ``Popen.returncode`` once known (negative: the signal); None if unknown."""
        ...

    def wait(self, timeout: float) -> None:
        """Until it exits; ``subprocess.TimeoutExpired`` after ``timeout``."""
        ...


class Plain:
    """A worker started the plain way, a child of the operator itself."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen, self.pid = popen, popen.pid
        self.start_time = start_time(popen.pid) or 0  # not reaped yet: the PID is its own

    def running(self) -> bool:
        return self.popen.poll() is None

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> None:
        self.popen.wait(timeout)


class _Worker:
    def __init__(self, record: WorkerRecord, child: Child, token: str) -> None:
        self.record = record
        self.child = child
        self.token = token
        self.client = self._client()
        self.last_health: dict[str, Any] | None = None  # the last answer of its health route
        self.misses = 0  # health checks unanswered since then

    def _client(self) -> JuturnaClient:
        return JuturnaClient(
            f"http://127.0.0.1:{self.record.port}", token=self.token, connect_retries=1
        )

    def connect(self, port: int) -> None:
        self.record.port = port
        self.client = self._client()

    @property
    def state(self) -> InstanceState:
        return InstanceState(self.record.state)

    def alive(self) -> bool:
        return self.child.running()

    def exit_description(self) -> str:
        code = self.child.exit_code()
        if code is None:
            return f"worker process {self.record.pid} is gone"
        if code < 0:
            return f"worker process {self.record.pid} was killed by {signal.Signals(-code).name}"
        return f"worker process {self.record.pid} exited with code {code}"


class ProcessEngine(LockedEngine):
    """Runs each pipeline in a worker process of its own."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings
        self._workdir = settings.workdir
        self._state_dir = settings.workdir / ".workers"
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._workers: dict[PipelineKey, _Worker] = {}
        self._adopted: set[PipelineKey] = set()  # from a previous process, not yet claimed
        self._adopt_or_reap()
        self._zygote_lock = threading.Lock()
        self._zygote: ZygoteHandle | None = None
        self._zygote_start_failures = 0  # in a row
        self._closing = False
        self._start_zygote()

    # -- worker processes --

    def _adopt_or_reap(self) -> None:
        """Adopt the workers a previous operator process left; reap everything else."""
        adopted: set[int] = set()
        for path in self._state_dir.glob("*.json"):
            try:
                record = WorkerRecord(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if record.start_time:
                ours = same_process(record.pid, record.start_time)
            else:  # a record from before start times were kept: a worker started plainly
                line = cmdline(record.pid)
                ours = pid_alive(record.pid) and WORKER_MARKER in line and record.uid in line
            token = self._token_file(record.uid)
            child = KnownProcess(record.pid, record.start_time)
            if ours and record.pipeline_id and token.exists():
                self._workers[record.key] = _Worker(record, child, token.read_text().strip())
                self._adopted.add(record.key)
                adopted.add(record.pid)
                log.info("adopted worker %s", record.pid, extra=record.key.log_extra)
                continue
            if ours:
                # The previous process died inside create, before it saved the worker's port
                # and pipeline id: nobody can talk to this worker, so it goes; the lifecycle
                # creates the instance again (found by the fault suite: a leaked folder).
                log.warning(
                    "reaping worker %s: %s",
                    record.pid,
                    "its token is gone" if record.pipeline_id else "its create never finished",
                    extra=record.key.log_extra,
                )
                self._kill(child)
            self._forget(record)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) not in adopted:
                line = cmdline(int(entry.name))
                if WORKER_MARKER in line and f"--folder {self._workdir} " in line:
                    log.warning("reaping a worker with no state: pid %s", entry.name)
                    pid = int(entry.name)
                    self._kill(KnownProcess(pid, start_time(pid) or 0))

    def _token_file(self, uid: str) -> Path:
        return self._state_dir / f"{uid}.token"

    def _new_token(self, uid: str) -> str:
        """A token for one worker alone, in a file only this user can read."""
        token = secrets.token_urlsafe(32)
        path = self._token_file(uid)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return token

    # -- the zygote --

    def _worker_command(self, uid: str) -> tuple[list[str], Path, Path]:
        """A worker's arguments (after ``python -m juturna_operator.worker``), its port file
        and its log file."""
        port_file = self._state_dir / f"{uid}.port"
        arguments = [
            "--folder",
            str(self._workdir),
            "--port-file",
            str(port_file),
            "--owner",
            uid,
            "--token-file",
            str(self._token_file(uid)),
        ]
        return arguments, port_file, self._state_dir / f"{uid}.log"

    def _start_zygote(self) -> None:
        """Start a zygote (it preloads in the background), unless starting them failed
        ``ZYGOTE_START_ATTEMPTS`` times in a row; the caller holds no lock."""
        # Room for the longest title a worker takes: every uid has the same length.
        arguments, _, _ = self._worker_command("0" * 36)
        room = len("\0".join([sys.executable, "-m", WORKER_MARKER, *arguments]))
        env = worker_environment(self._settings.plugin_roots)
        with self._zygote_lock:
            if self._closing or self._zygote is not None:
                return
            if self._zygote_start_failures >= ZYGOTE_START_ATTEMPTS:
                return
            try:
                self._zygote = ZygoteHandle(
                    env, self._state_dir / "zygote.log", room, on_gone=self._zygote_gone
                )
            except OSError as err:
                self._zygote_start_failures += 1
                log.error("could not start a zygote for the workers: %s", err)
            else:
                log.info("started the workers' zygote, pid %s", self._zygote.pid)

    def _drop_zygote(self, zygote: ZygoteHandle, reason: str) -> bool:
        """Forget a zygote that died or failed; True if another one should start. Its
        workers live on (sessions of their own); the engine watches them by PID and start
        time from now on."""
        with self._zygote_lock:
            if self._zygote is not zygote or self._closing:
                return False  # handled already, or the engine is closing
            self._zygote = None
            ready = zygote.was_ready()
            self._zygote_start_failures = 0 if ready else self._zygote_start_failures + 1
            given_up = self._zygote_start_failures >= ZYGOTE_START_ATTEMPTS
        if given_up:
            log.error(
                "%s; %d zygotes in a row failed before they were ready: workers start the "
                "plain way from now on (python -m %s, seconds each)",
                reason,
                ZYGOTE_START_ATTEMPTS,
                WORKER_MARKER,
            )
            return False
        log.warning("%s; starting a new zygote (its workers run on)", reason)
        return True

    def _zygote_gone(self, zygote: ZygoteHandle, reason: str) -> None:
        if self._drop_zygote(zygote, reason):
            self._start_zygote()

    def _fork(self, arguments: list[str], log_file: Path) -> Forked | None:
        """A worker forked by the zygote; None when there is no zygote to fork it."""
        title = [sys.executable, "-m", WORKER_MARKER, *arguments]
        for _ in range(ZYGOTE_START_ATTEMPTS):
            zygote = self._zygote
            if zygote is None:
                return None
            try:
                return zygote.spawn(arguments, log_file, title)
            except ZygoteGone as gone:
                self._zygote_gone(zygote, f"could not fork a worker: {gone}")
                zygote.close()
        return None

    # -- worker processes --

    def _spawn(self, key: PipelineKey) -> tuple[Child, Path, Path]:
        arguments, port_file, log_file = self._worker_command(key.uid)
        port_file.unlink(missing_ok=True)
        forked = self._fork(arguments, log_file)
        if forked is not None:
            return forked, port_file, log_file
        log.info("starting a worker the plain way: no zygote", extra=key.log_extra)
        with open(log_file, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", WORKER_MARKER, *arguments],
                env=worker_environment(self._settings.plugin_roots),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to the operator does not reach it
            )
        return Plain(popen), port_file, log_file

    @staticmethod
    def _port_of(child: Child, port_file: Path, log_file: Path) -> int | None:
        """The worker's port once it has written it; a clear failure if it died first."""
        if not child.running():
            tail = log_file.read_text(errors="replace")[-1500:]
            raise PipelineFailure(
                FailureReason.CreateFailed,
                Step.create,
                f"the worker process exited with code {child.exit_code()} before it was "
                f"ready: {tail}",
            )
        return int(port_file.read_text()) if port_file.exists() else None

    async def _wait_ready(self, worker: _Worker, port_file: Path, log_file: Path) -> None:
        """The ready handshake: the port file appears, then the health route answers."""
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        pause = 0.01  # a forked worker is up in tens of ms; a plain one takes seconds
        while time.monotonic() < deadline:
            port = await asyncio.to_thread(self._port_of, worker.child, port_file, log_file)
            if port is not None:
                worker.connect(port)
                try:
                    await worker.client.request("GET", "/operator/health", Step.create, 2.0)
                    return
                except PipelineFailure:
                    pass
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.08)
        raise PipelineFailure(
            FailureReason.RuntimeUnavailable,
            Step.create,
            f"the worker process was not ready within {WORKER_READY_TIMEOUT_S:g} s",
        )

    @staticmethod
    def _kill(child: Child) -> None:
        """SIGTERM, then SIGKILL after a grace period; until it is gone (reaped, when it is
        a child of ours or of the zygote)."""
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
            if not child.running():
                return
            try:
                os.kill(child.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not child.running():
                    return
                time.sleep(0.02)
        child.wait(5)

    def _save(self, worker: _Worker) -> None:
        path = self._state_dir / f"{worker.record.uid}.json"
        # Not <uid>.tmp, which the worker's port file once shared: a worker forked in
        # milliseconds wrote its port while the record was saved, and one rename failed.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(worker.record)))
        os.replace(tmp, path)

    def _forget(self, record: WorkerRecord, keep_output: bool = False) -> None:
        if not keep_output:
            self._wipe(record.key)
        # The record goes last: a process killed in here leaves it, and the next one finishes
        # the job at start (killed after the record went, it leaked the folder in a full run).
        for suffix in (".port", ".port.tmp", ".log", ".token", ".json.tmp", ".json"):
            (self._state_dir / f"{record.uid}{suffix}").unlink(missing_ok=True)

    def _wipe(self, key: PipelineKey) -> None:
        # By the resource's Juturna name, not the pipeline id, which a record may lack; one
        # resource has one worker at a time, so these folders are all its instances'.
        for folder in self._workdir.glob(f"{key.juturna_name}_*"):
            shutil.rmtree(folder, ignore_errors=True)

    async def _end(self, worker: _Worker, keep_output: bool = False) -> None:
        """Stop the worker process for good and remove what it left (``keep_output``: all
        but the pipeline's folder, which the resource's next instance takes over)."""
        if worker.alive():
            with contextlib.suppress(PipelineFailure):
                await worker.client.request("POST", "/operator/shutdown", Step.delete, 2.0)
            await asyncio.to_thread(self._kill, worker.child)
        await worker.client.close()
        self._workers.pop(worker.record.key, None)
        await asyncio.to_thread(self._forget, worker.record, keep_output)

    async def _set_state(self, worker: _Worker, state: InstanceState) -> None:
        worker.record.state = state.value
        await asyncio.to_thread(self._save, worker)

    @staticmethod
    @contextlib.asynccontextmanager
    async def _already(reason: FailureReason) -> AsyncIterator[None]:
        """A step the worker answers with ``reason`` (already warm, already running, not
        running) was done already: an operator process killed between the worker's step and
        saving the new state left the record one step behind. Without this, the adopted
        worker refused that step on every retry, for good (found by the fault suite)."""
        try:
            yield
        except PipelineFailure as failure:
            if failure.reason is not reason:
                raise
            log.info("the worker had done this step already: %s", failure.message)

    # -- the Engine interface --

    async def _create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan
    ) -> str:
        vacant(self._workers, key)
        token = await asyncio.to_thread(self._new_token, key.uid)
        child, port_file, log_file = await asyncio.to_thread(self._spawn, key)
        record = WorkerRecord(key.namespace, key.name, key.uid, revision, child.pid, 0)
        record.start_time = child.start_time
        worker = self._workers[key] = _Worker(record, child, token)  # known from its first moment
        await asyncio.to_thread(self._save, worker)
        try:
            await self._wait_ready(worker, port_file, log_file)
            record.pipeline_id = await worker.client.create(config)
            await asyncio.to_thread(carry_output, self._workdir, key, record.pipeline_id)
            await self._set_state(worker, InstanceState.Created)
        except BaseException:
            await self._end(worker, keep_output=True)  # a previous instance's output stays
            raise
        return record.pipeline_id

    async def _warmup(self, key: PipelineKey) -> None:
        worker = held(self._workers, key, Step.warmup)
        async with self._already(FailureReason.AlreadyWarmedUp):
            await worker.client.warmup(worker.record.pipeline_id, WARMUP_TIMEOUT_S)
        await self._set_state(worker, InstanceState.Ready)

    async def _start(self, key: PipelineKey) -> None:
        worker = held(self._workers, key, Step.start)
        async with self._already(FailureReason.AlreadyRunning):
            await worker.client.start(worker.record.pipeline_id)
        await self._set_state(worker, InstanceState.Running)

    async def _stop(self, key: PipelineKey) -> None:
        worker = held(self._workers, key, Step.stop)
        if worker.state is not InstanceState.Running or not worker.alive():
            await self._set_state(worker, InstanceState.Spent)
            return
        timeout = self._settings.stop_timeout_s
        try:
            async with self._already(FailureReason.NotRunning):
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

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        worker = self._workers.get(key)
        if worker is not None and self.busy(key):
            # A deletion does not wait out a long warmup: ending the process makes the
            # operation in progress fail at once.
            await asyncio.to_thread(self._kill, worker.child)
        await self.exclusive(key, self._delete, key, keep_output)
        self.drop_lock(key)

    async def _delete(self, key: PipelineKey, keep_output: bool) -> None:
        worker = self._workers.get(key)
        if worker is not None:
            # Ending the process frees everything Juturna held, without Juturna's slow
            # delete (two gc.collect() calls); _end removes the folder unless it is kept.
            await self._end(worker, keep_output)
        elif not keep_output:
            await asyncio.to_thread(self._wipe, key)  # kept by an earlier end (a redeploy)

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
        with self._zygote_lock:
            self._closing = True
            zygote, self._zygote = self._zygote, None
        if zygote is not None:
            await asyncio.to_thread(zygote.close)
