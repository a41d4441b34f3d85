"""The zygote: a pre-imported, single-threaded process that forks the process engine's workers.

A worker started with ``python -m juturna_operator.worker`` spends about 1.7 s and 2.4 s of
CPU importing Juturna, FastAPI and uvicorn before it serves, and holds 84 MiB of its own. The
zygote does that once: it imports the worker's app, warms it with one in-process request,
freezes what it holds (``gc.freeze()``: the children's collector never touches those pages,
so they stay shared), and forks one worker per request of the process engine. A forked
worker is healthy in about 50 ms and holds about 10 MiB of its own.

The operator is never forked (it runs threads and an event loop); the zygote is a process of
its own that the engine starts, with the scrubbed environment workers get, and talks to over
a socket pair (``--control-fd``), one JSON object per line:

* zygote -> engine, once: ``{"ready": <pid>}``;
* engine -> zygote: ``{"id": n, "argv": [...], "log": path, "title": [...], "spawn_id": s}``:
  fork a worker that runs ``worker.main(argv)`` with ``log`` as stdout and stderr; ``s`` is
  in ``title`` (``--spawn-id s``) and in the child's command line from fork() on (``carrying``),
  so that the engine finds and ends a child whose answer it never got;
* zygote -> engine: ``{"id": n, "pid": p, "start_time": t}`` (or ``{"id": n, "error": m}``);
* zygote -> engine, whenever a worker ends: ``{"exited": p, "code": c}`` (negative: the
  signal), as ``Popen.returncode`` says it: the zygote is their parent and reaps them.

The zygote ends when its socket reaches EOF (the engine closed it, or the operator died); its
workers do not: they run in sessions of their own and a restarted operator adopts them.

In a forked worker: a session of its own, every inherited descriptor closed, stdin from
``/dev/null``, random state reseeded (``random`` reseeds itself at fork; numpy's global
generator is reseeded here), import caches dropped (plugins are never imported by the zygote,
and new plugin code takes effect at the next worker), and its command line rewritten to the
one a plainly started worker has (``ps`` and adoption tell workers apart by it).

A lost answer: the zygote forked, but the engine never heard of the child (the zygote died
right after fork(), or answered after ``SPAWN_TIMEOUT_S``). The engine then kills the zygote
and ends every process whose command line holds the request's spawn id, before it asks a new
zygote: otherwise two workers served one Pipeline, and the first outlived it and the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib
import json
import logging
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

ZYGOTE_MARKER = "juturna_operator.zygote"
READY_TIMEOUT_S = 60.0  # imports on a loaded machine; the engine falls back beyond that
SPAWN_TIMEOUT_S = 10.0  # a fork answers in milliseconds
# A fault for the tests, off unless the operator's environment has this variable: what the
# zygote does after fork(), before it answers (``Fault``). Only the first zygote an operator
# process starts takes it (it leaves the operator's environment then), so the one that
# replaces it forks normally; the zygote drops it from its own before it forks a worker.
FAULT_VARIABLE = "JUTURNA_OPERATOR_TEST_ZYGOTE_FAULT"

log = logging.getLogger(__name__)


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22): with
    the PID, it names one process, where a PID alone may have been reused since."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def same_process(pid: int, started: int) -> bool:
    """True if ``pid`` runs, is not a zombie, and started at ``started`` (clock ticks since
    boot; 0: unknown, for records written before start times were kept)."""
    return pid_alive(pid) and started in (0, start_time(pid))


def thread_count() -> int:
    """Threads of this process, native ones included (``threading`` knows only its own)."""
    return len(os.listdir("/proc/self/task"))


# -- the zygote process ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    """What a zygote does after fork(), before it answers, when ``FAULT_VARIABLE`` says so
    (tests only): nothing, wait ``delay_s``, or die by SIGKILL."""

    delay_s: float = 0.0
    die: bool = False

    @classmethod
    def parse(cls, value: str) -> Fault:
        """``""`` (no fault), ``die-after-fork`` or ``answer-delay:<seconds>``; ValueError
        naming the variable for anything else."""
        if not value:
            return cls()
        if value == "die-after-fork":
            return cls(die=True)
        kind, _, seconds = value.partition(":")
        with contextlib.suppress(ValueError):
            delay = float(seconds)
            if kind == "answer-delay" and math.isfinite(delay) and delay >= 0:
                return cls(delay_s=delay)
        raise ValueError(
            f'{FAULT_VARIABLE}="{value}": expected "die-after-fork" or "answer-delay:<seconds>"'
        )

    def after_fork(self) -> None:
        if self.die:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay_s)


async def _request(app: Any, path: str, token: str) -> int:
    """One GET through the ASGI app, in process: the status code it answers."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {token}".encode()), (b"host", b"zygote")],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(message["status"]))

    await app(scope, receive, send)
    return statuses[0]


def preload() -> None:
    """Import and warm everything a worker needs before it serves, then freeze it."""
    import secrets

    import uvicorn

    from juturna_operator import worker

    token = secrets.token_urlsafe(16)  # replaced in each worker by its own
    app = worker.build_app(token)
    uvicorn.Config(app, log_level="warning", lifespan="off").load()  # its protocol modules
    status = asyncio.run(_request(app, "/operator/health", token))
    if status != 200:
        raise RuntimeError(f"the warm-up request got {status}")
    # numpy's OpenBLAS starts a thread pool at import and stops it at every fork (its own
    # pthread_atfork handler): one throwaway fork leaves this process a single thread.
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    if thread_count() != 1:
        raise RuntimeError(f"the zygote runs {thread_count()} threads: forking it is unsafe")
    gc.collect()
    gc.freeze()


def carrying(own: list[str], title: list[str], spawn_id: str) -> list[str]:
    """The zygote's command line ``own`` (its ``--title-room`` padding last) with the padding
    resized and ``--spawn-id <spawn_id>`` after it, so that ``spawn_id`` lies at the byte
    where ``title`` (the worker's command line) has it. Set just before fork(), it is the
    child's command line from its first instant, and the child's rewrite to ``title`` leaves
    those bytes as they are: a read of /proc/<pid>/cmdline in the middle of that write still
    finds the spawn id. (Were the zygote's part the longer, the two would not line up: the
    spawn id is then found before and after the child's rewrite, not during it.)"""
    at = "\0".join(title).index(spawn_id)
    head = "\0".join([*own[:-1], ""])
    flag = "\0--spawn-id\0"
    return [*own[:-1], " " * max(at - len(head) - len(flag), 0), "--spawn-id", spawn_id]


def set_title(args: list[str]) -> bool:
    """Rewrite this process's command line (``/proc/self/cmdline``) to ``args``, within the
    room the zygote's own arguments leave; False if it does not fit or the write fails."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        arg_start, arg_end = int(fields[45]), int(fields[46])  # fields 48 and 49
        data = b"\0".join(a.encode() for a in args) + b"\0"
        room = arg_end - arg_start
        if len(data) > room:
            return False
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(arg_start)
            mem.write(data.ljust(room, b"\0"))
        return True
    except (OSError, IndexError, ValueError):
        return False


class Zygote:
    """The zygote's loop: fork on request, reap and report the children."""

    def __init__(self, control: socket.socket, fault: Fault) -> None:
        self.control = control
        self.fault = fault
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        self.control.sendall(json.dumps(message).encode() + b"\n")

    def serve(self) -> int:
        """Serve until the engine's end of the socket closes."""
        for end in (self.wake_r, self.wake_w):
            end.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
        self.selector.register(self.control, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.send({"ready": os.getpid()})
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while self.wake_r.recv(512):
                            pass
                elif not self.read():
                    return 0  # the engine is gone: so is the zygote, not its workers
            self.reap()

    def read(self) -> bool:
        """Handle the requests received; False at EOF."""
        data = self.control.recv(65536)
        if not data:
            return False
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.fork(json.loads(line))
        return True

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    def fork(self, request: dict[str, Any]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # The child inherits this command line: it carries the spawn id from fork() on.
        if not set_title(carrying(sys.orig_argv, request["title"], request["spawn_id"])):
            print("could not write the spawn id into the command line", file=sys.stderr)
        try:
            pid = os.fork()
        except OSError as err:
            set_title(sys.orig_argv)
            self.send({"id": request["id"], "error": f"fork failed: {err}"})
            return
        if pid == 0:
            self.become_worker(request)  # never returns
        self.fault.after_fork()
        set_title(sys.orig_argv)  # the zygote's own again
        # The child cannot have been reaped yet: its PID still names it.
        self.send({"id": request["id"], "pid": pid, "start_time": start_time(pid)})

    def become_worker(self, request: dict[str, Any]) -> None:
        """In the forked child: shed the zygote, then run the worker until it exits."""
        code = 1
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # The zygote's own objects first: a descriptor closed under a live object would be
            # closed again when it is collected, maybe by then one of the worker's.
            self.selector.close()
            for end in (self.control, self.wake_r, self.wake_w):
                end.close()
            log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            null_fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null_fd, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # whatever else was inherited
            numpy = sys.modules.get("numpy")
            if numpy is not None:
                numpy.random.seed()  # seeded once in the zygote, shared by every fork
            importlib.invalidate_caches()  # plugin code is read fresh
            if not set_title(request["title"]):
                print("could not rewrite the command line to the worker's", file=sys.stderr)
            sys.argv = [sys.argv[0], *request["argv"]]
            from juturna_operator import worker

            code = worker.main(request["argv"])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="juturna-operator-zygote")
    parser.add_argument("--control-fd", type=int, required=True, help="the engine's socket")
    # Room for the workers' command lines: a child can only rewrite its own within the
    # bytes the zygote's arguments take.
    parser.add_argument("--title-room", default="", help="padding; its length is the room")
    args = parser.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    try:
        fault = Fault.parse(os.environ.pop(FAULT_VARIABLE, ""))  # not the workers'
        preload()
    except Exception as err:
        traceback.print_exc()
        with contextlib.suppress(OSError):
            control.sendall(json.dumps({"failed": f"{type(err).__name__}: {err}"}).encode() + b"\n")
        return 1
    return Zygote(control, fault).serve()


# -- the engine's handle ---------------------------------------------------------------------


class ZygoteGone(Exception):
    """The zygote died or never started: what it said last, or how it exited."""


class KnownProcess:
    """A process known by its PID and start time alone (not a child of this one): a worker
    another operator process started, or one whose zygote is gone."""

    def __init__(self, pid: int, started: int) -> None:
        self.pid, self.start_time = pid, started

    def running(self) -> bool:
        return same_process(self.pid, self.start_time)

    def exit_code(self) -> int | None:
        return None  # its parent reaped it, not us

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)


class Forked(KnownProcess):
    """A worker forked by a zygote, as the engine sees it: ``running`` and ``exit_code`` as
    ``Popen.poll`` would say them while the zygote lives (it reaps and reports its children);
    after the zygote's death, whether the PID still names the process it forked."""

    def __init__(self, zygote: ZygoteHandle, pid: int, started: int) -> None:
        super().__init__(pid, started)
        self.zygote = zygote

    def exit_code(self) -> int | None:
        return self.zygote.exit_code(self.pid)

    def running(self) -> bool:
        if self.exit_code() is not None:
            return False
        if self.zygote.alive():
            return True  # a zombie counts as running until the zygote reaps it, as with Popen
        return super().running()


class ZygoteHandle:
    """The engine's side of one zygote process: starts it, asks it for workers, and learns
    from it when they end. Thread-safe: the engine forks from its worker threads."""

    def __init__(
        self,
        env: dict[str, str],
        log_file: Path,
        title_room: int,
        on_gone: Callable[[ZygoteHandle, str], None],
    ) -> None:
        """Start a zygote with ``env`` (all of it), its output to ``log_file``; ``on_gone``
        is called (from a thread of its own) when it dies, with why."""
        self._on_gone = on_gone
        fault = os.environ.pop(FAULT_VARIABLE, None)  # the first zygote takes it, alone
        if fault is not None:
            env = {**env, FAULT_VARIABLE: fault}
        ours, theirs = socket.socketpair()
        self._socket = ours
        self.log_file = log_file
        with open(log_file, "ab") as out:
            self._popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    ZYGOTE_MARKER,
                    "--control-fd",
                    str(theirs.fileno()),
                    "--title-room",
                    " " * title_room,
                ],
                env=env,
                pass_fds=[theirs.fileno()],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to the operator does not reach it
            )
        theirs.close()
        self._started = time.monotonic()
        self.pid = self._popen.pid
        self._lock = threading.Lock()
        self._ready: Future[int] = Future()
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._exits: dict[int, int] = {}
        self._gone: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"zygote-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self._socket.makefile("rb")
        last = ""
        try:
            for line in stream:
                message = json.loads(line)
                if "exited" in message:
                    with self._lock:
                        self._exits[int(message["exited"])] = int(message["code"])
                elif "ready" in message:
                    self._ready.set_result(int(message["ready"]))
                    took = time.monotonic() - self._started
                    log.info(
                        "the workers' zygote %s is ready (preloaded in %.1f s)", self.pid, took
                    )
                elif "failed" in message:
                    last = str(message["failed"])
                else:
                    with self._lock:
                        future = self._pending.pop(int(message["id"]), None)
                        # A PID reused by a new child: an older child's exit is not its own.
                        self._exits.pop(int(message.get("pid", 0)), None)
                    if future is not None:
                        future.set_result(message)
        except (OSError, ValueError) as err:
            last = last or f"its socket broke: {err}"
        finally:
            stream.close()
            self._died(last)

    def _died(self, last: str) -> None:
        try:
            code = self._popen.wait(timeout=5)
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        except subprocess.TimeoutExpired:
            how = "closed its socket"
        reason = f"the zygote {self.pid} is gone ({how}{': ' + last if last else ''})"
        with self._lock:
            self._gone = reason
            pending, self._pending = list(self._pending.values()), {}
        if not self._ready.done():
            self._ready.set_exception(ZygoteGone(reason))
        for future in pending:
            future.set_exception(ZygoteGone(reason))
        self._on_gone(self, reason)

    def alive(self) -> bool:
        """True until the zygote's socket closed."""
        return self._gone is None

    def was_ready(self) -> bool:
        """True if it preloaded and served."""
        return self._ready.done() and self._ready.exception() is None

    def exit_code(self, pid: int) -> int | None:
        """How a child of this zygote exited (``Popen.returncode``), once it has."""
        with self._lock:
            return self._exits.get(pid)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until the zygote has preloaded; ``ZygoteGone`` if it died or took too long."""
        try:
            self._ready.result(timeout)
        except TimeoutError:
            self.close()
            raise ZygoteGone(f"the zygote {self.pid} was not ready within {timeout:g} s") from None

    def spawn(self, argv: list[str], log_file: Path, title: list[str], spawn_id: str) -> Forked:
        """Fork a worker running ``worker.main(argv)``, its command line ``title`` (which
        holds ``spawn_id``); ``ZygoteGone`` if the zygote is, or its answer is lost (then the
        caller kills the zygote and ends what carries ``spawn_id``)."""
        self.wait_ready()
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            if self._gone is not None:
                raise ZygoteGone(self._gone)
            self._next_id += 1
            request = {
                "id": self._next_id,
                "argv": argv,
                "log": str(log_file),
                "title": title,
                "spawn_id": spawn_id,
            }
            self._pending[self._next_id] = future
            try:
                self._socket.sendall(json.dumps(request).encode() + b"\n")
            except OSError as err:
                self._pending.pop(self._next_id, None)
                raise ZygoteGone(f"the zygote {self.pid} is gone ({err})") from err
        try:
            answer = future.result(SPAWN_TIMEOUT_S)
        except TimeoutError:
            raise ZygoteGone(
                f"the zygote {self.pid} gave no answer within {SPAWN_TIMEOUT_S:g} s"
            ) from None
        if "error" in answer:
            raise ZygoteGone(f"the zygote {self.pid} could not fork: {answer['error']}")
        return Forked(self, int(answer["pid"]), int(answer["start_time"]))

    def kill(self) -> None:
        """End the zygote at once (SIGKILL), not its workers, and wait until it is gone. Once
        the signal is sent it completes no fork(): a child it made is in /proc already."""
        self._popen.kill()  # nothing once it was reaped: never another process by its PID
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """End the zygote (EOF on its socket), not its workers; wait for it to exit."""
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait(timeout)
        self._reader.join(timeout)
        self._socket.close()


if __name__ == "__main__":
    sys.exit(main())
