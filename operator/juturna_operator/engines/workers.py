"""Worker processes, whichever engine runs them: started (forked by the zygote, or the
plain way when no zygote starts), waited for until they serve, and ended.

One ``WorkerProcesses`` per engine keeps its workers' files in one folder: for each owner
(a worker's name: the uid of the pipeline it was started for, and an id where needed) its
bearer token, its port file and its log. A worker is a ``juturna_operator.worker`` process; which
pipelines it runs, and what survives an operator restart, are the engine's.

Workers are forked from a zygote (``juturna_operator.zygote``): one process per engine,
started with the workers' scrubbed environment, that has imported and warmed the worker's
app once; a worker is then healthy in tens of milliseconds instead of seconds. The zygote
reaps its children and tells the engine how each ended, so a worker's death and its signal
are known at once, as with ``Popen.poll``. A zygote that dies is replaced (the log says so);
one that fails to start ``ZYGOTE_START_ATTEMPTS`` times in a row leaves the engine starting
each worker the plain way (``python -m juturna_operator.worker``), as the log says too.

Each start has a spawn id, in the worker's command line (``--spawn-id``). When a zygote's
answer is lost (it died after fork(), or answered after ``zygote.SPAWN_TIMEOUT_S``), the
engine kills that zygote and ends whatever carries the spawn id before it asks the next one:
one worker per start, never a second one that nobody knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

from juturna_operator.domain import InstanceState
from juturna_operator.engines.client import (
    CHUNK_BYTES,
    JUTURNA_STATE,
    AnswerTooLarge,
    CappedBody,
    JuturnaClient,
    listed_name,
)
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import Settings
from juturna_operator.worker import WORKER_MARKER
from juturna_operator.zygote import Forked, KnownProcess, ZygoteGone, ZygoteHandle, start_time

log = logging.getLogger(__name__)

WORKER_READY_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 2.0
# Health checks a live worker may leave unanswered in a row before it counts as stuck: one
# slow answer (a loaded machine, a node holding the GIL, a process stopped for a moment) is
# not a dead runtime, and taking it for one killed the worker and wiped its output.
HEALTH_MISSES = 3
KILL_GRACE_S = 2.0
# Zygotes that die before they are ready, in a row, before the engine stops starting them.
ZYGOTE_START_ATTEMPTS = 3


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")  # any process's, any bytes


def processes_with(text: str) -> list[int]:
    """The PIDs whose command line contains ``text``."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [pid for pid in pids if text in cmdline(pid)]


def new_spawn_id() -> str:
    """A start's id, in its worker's command line: how a worker whose start was never
    confirmed is found (all have the same length: the zygote makes room for one)."""
    return secrets.token_hex(16)


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


def worker_client(port: int, token: str) -> JuturnaClient:
    """The client for our worker on loopback ``port``: one connect retry (a worker that
    refuses is starting, or gone: the engine's own checks tell which)."""
    return JuturnaClient(f"http://127.0.0.1:{port}", token=token, connect_retries=1)


def describe_exit(what: str, child: Child) -> str:
    """How a worker process ended, for status: ``what`` names it ("worker process 42")."""
    code = child.exit_code()
    if code is None:
        return f"{what} is gone"
    if code < 0:
        return f"{what} was killed by {signal.Signals(-code).name}"
    return f"{what} exited with code {code}"


def write_record(path: Path, record: Any) -> None:
    """A dataclass as JSON at ``path``, atomically (a restart reads whole records only).
    Not through ``<owner>.tmp``, which a worker's port file once shared: a worker forked in
    milliseconds wrote its port while the record was saved, and one rename failed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(record)))
    os.replace(tmp, path)


def wipe_output(workdir: Path, juturna_name: str) -> None:
    """Remove every folder of a resource's instances: by its Juturna name, not a pipeline
    id, which a record may lack (one resource has one instance at a time)."""
    for folder in workdir.glob(f"{juturna_name}_*"):
        shutil.rmtree(folder, ignore_errors=True)


def named_in(health: dict[str, Any], juturna_name: str) -> tuple[str, str] | None:
    """The id and state of the newest pipeline called ``juturna_name`` in a worker's health
    answer (listed in the order they were made), or None: what a deploy made on the worker
    when its answer is lost, or when the operator process that sent it died."""
    found = None
    for entry in health.get("pipelines", []):
        for pipeline_id, status in entry.items():
            if listed_name(pipeline_id, status) == juturna_name:
                state = JUTURNA_STATE.get(status.get("self"), InstanceState.Created)
                found = pipeline_id, state.value
    return found


def pipeline_named(port: int, token: str, juturna_name: str) -> tuple[str, str] | None:
    """``named_in`` the health answer of the worker at ``port`` (None if it does not answer,
    or if its answer is over the size cap). Blocking; called at an engine's start."""
    url = f"http://127.0.0.1:{port}/operator/health"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token.strip()}"})
    try:
        with urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT_S) as answer:
            body = CappedBody(Step.run, url, answer.headers.get("Content-Length"))
            while chunk := answer.read(CHUNK_BYTES):
                body.add(chunk)
        return named_in(json.loads(body.content()), juturna_name)
    except AnswerTooLarge as failure:
        # The worker's next health check fails its pipeline(s), with this message.
        log.warning("cannot look for %s: %s", juturna_name, failure.message)
        return None
    except (OSError, ValueError, KeyError, AttributeError):
        return None


@contextlib.asynccontextmanager
async def done_already(reason: FailureReason) -> AsyncIterator[None]:
    """A step the worker answers with ``reason`` (already warm, already running, not
    running) was done already: an operator process killed between the worker's step and
    saving the new state left the record one step behind. Without this, an adopted worker
    refused that step on every retry, for good (found by the fault suite)."""
    try:
        yield
    except PipelineFailure as failure:
        if failure.reason is not reason:
            raise
        log.info("the worker had done this step already: %s", failure.message)


def end_group(leader: int) -> None:
    """SIGKILL what is left of a worker's process group once the worker is gone: the
    programs its nodes started (ffmpeg from Juturna's media nodes) are in it, and would live
    on, re-parented to PID 1. Every worker leads a session of its own (``setsid`` in the
    zygote's child, ``start_new_session`` without a zygote), so the group's id is its PID."""
    if leader == os.getpgrp():
        return  # never the operator's own group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signal.SIGKILL)


class WorkerProcesses:
    """Starts an engine's workers, waits until they serve, and ends them."""

    def __init__(self, settings: Settings, state_dir: Path) -> None:
        self._settings = settings
        self._workdir = settings.workdir
        self._state_dir = state_dir
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._zygote_lock = threading.Lock()
        self._zygote: ZygoteHandle | None = None
        self._zygote_start_failures = 0  # in a row
        self._closing = False

    @property
    def zygote_pid(self) -> int | None:
        zygote = self._zygote
        return zygote.pid if zygote is not None else None

    def reap_strays(self, keep: set[int]) -> None:
        """End every worker of this work folder whose PID is not in ``keep``: a previous
        operator process left it, and no record says what it serves."""
        for pid in processes_with(f"{WORKER_MARKER} --folder {self._workdir} "):
            if pid not in keep:
                log.warning("reaping a worker with no state: pid %s", pid)
                self.kill(KnownProcess(pid, start_time(pid) or 0))

    def forget(self, owner: str) -> None:
        """Remove an owner's files: its worker's port, log and token, and the engine's record
        of it (``<owner>.json``), last: a process killed in here leaves the record, and the
        next one finishes the job at start."""
        for suffix in (".port", ".port.tmp", ".log", ".token", ".json.tmp", ".json"):
            (self._state_dir / f"{owner}{suffix}").unlink(missing_ok=True)

    def token_file(self, owner: str) -> Path:
        return self._state_dir / f"{owner}.token"

    def new_token(self, owner: str) -> str:
        """A token for one worker alone, in a file only this user can read."""
        token = secrets.token_urlsafe(32)
        path = self.token_file(owner)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return token

    def _command(self, owner: str, spawn_id: str) -> tuple[list[str], Path, Path]:
        """A worker's arguments (after ``python -m juturna_operator.worker``), its port file
        and its log file."""
        port_file = self._state_dir / f"{owner}.port"
        arguments = [
            "--folder",
            str(self._workdir),
            "--port-file",
            str(port_file),
            "--owner",
            owner,
            "--token-file",
            str(self.token_file(owner)),
            "--spawn-id",
            spawn_id,
        ]
        return arguments, port_file, self._state_dir / f"{owner}.log"

    def start_zygote(self) -> None:
        """Start a zygote (it preloads in the background), unless starting them failed
        ``ZYGOTE_START_ATTEMPTS`` times in a row; the caller holds no lock."""
        # Room for the longest title a worker takes: every uid has the same length.
        arguments, _, _ = self._command("0" * 36, new_spawn_id())
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
            self.start_zygote()

    def _fork(
        self,
        arguments: list[str],
        spawn_id: str,
        port_file: Path,
        log_file: Path,
        about: dict[str, Any],
    ) -> Forked | None:
        """A worker forked by the zygote; None when there is no zygote to fork it."""
        title = [sys.executable, "-m", WORKER_MARKER, *arguments]
        for _ in range(ZYGOTE_START_ATTEMPTS):
            zygote = self._zygote
            if zygote is None:
                return None
            try:
                return zygote.spawn(arguments, log_file, title, spawn_id)
            except ZygoteGone as gone:
                self._zygote_gone(zygote, f"could not fork a worker: {gone}")
                zygote.kill()  # it forks nothing more: whatever it forked is in /proc now
                self._end_unanswered(spawn_id, about)
                port_file.unlink(missing_ok=True)  # maybe that worker's
        return None

    def _end_unanswered(self, spawn_id: str, about: dict[str, Any]) -> None:
        """End the worker a dead zygote forked for the start ``spawn_id`` without the engine
        hearing of it (none, if it never forked). Left running, it served its owner next to
        the worker the next zygote forked, and outlived both the owner and the engine."""
        for pid in processes_with(spawn_id):
            log.warning(
                "ending worker %s: the zygote's answer to its start was lost", pid, extra=about
            )
            self.kill(KnownProcess(pid, start_time(pid) or 0))

    def spawn(self, owner: str, about: dict[str, Any]) -> tuple[Child, Path, Path]:
        """A new worker serving ``owner`` (a worker's name): the process,
        its port file and its log. ``about``: the log's extra fields."""
        spawn_id = new_spawn_id()
        arguments, port_file, log_file = self._command(owner, spawn_id)
        port_file.unlink(missing_ok=True)
        forked = self._fork(arguments, spawn_id, port_file, log_file, about)
        if forked is not None:
            return forked, port_file, log_file
        log.info("starting a worker the plain way: no zygote", extra=about)
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
    def port_of(child: Child, port_file: Path, log_file: Path) -> int | None:
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

    async def wait_ready(
        self,
        child: Child,
        port_file: Path,
        log_file: Path,
        connect: Callable[[int], JuturnaClient],
    ) -> None:
        """The ready handshake: the port file appears (``connect`` is told the port and
        gives the client for it), then the health route answers."""
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        pause = 0.01  # a forked worker is up in tens of ms; a plain one takes seconds
        while time.monotonic() < deadline:
            port = await asyncio.to_thread(self.port_of, child, port_file, log_file)
            if port is not None:
                try:
                    await connect(port).request("GET", "/operator/health", Step.create, 2.0)
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
    def kill(child: Child) -> None:
        """SIGTERM, then SIGKILL after a grace period; until it is gone (reaped, when it is
        a child of ours or of the zygote); then what is left of its process group."""
        try:
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
        finally:
            end_group(child.pid)

    async def end(self, child: Child, client: JuturnaClient | None) -> None:
        """End a worker for good: asked to shut down, then SIGTERM and SIGKILL if it still
        runs, and what is left of its process group; its client closed."""
        if child.running() and client is not None:
            with contextlib.suppress(PipelineFailure):
                await client.request("POST", "/operator/shutdown", Step.delete, 2.0)
        await asyncio.to_thread(self.kill, child)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        """End the zygote (the next operator process starts its own); workers run on."""
        with self._zygote_lock:
            self._closing = True
            zygote, self._zygote = self._zygote, None
        if zygote is not None:
            await asyncio.to_thread(zygote.close)
