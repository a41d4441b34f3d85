"""Processes the local tooling starts and stops by PID: the plane's (``controlplane.py``), the
node's (``node.py``), Argo CD's (``argocd.py``) and the operator's (``operator_process.py``).

The one module under all of them: the plane and the node share these pieces without importing
each other, and every start of several processes undoes itself the same way on failure
(``stopped_on_failure``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

LOG_TAIL_LINES = 25
READY_POLL_S = 0.2


def free_port() -> int:
    """A loopback port that is free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` of a component's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def processes_mentioning(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains ``marker`` (our state folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory in KiB (0 for a zombie; OSError once it is gone);
    ``field="VmHWM"``: its peak since it started, or since ``reset_peak_rss``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> None:
    """Make a process's peak resident memory (VmHWM) its current one, from now on (Linux's
    ``clear_refs``; the process must be ours)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system, in seconds) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_pid(pid: int, marker: str, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, one process we started; ``marker`` guards against a reused PID."""
    if pid not in processes_mentioning(marker):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not pid_alive(pid):
                return
            time.sleep(0.05)


def stop_popen(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace_s: float = 20.0
) -> None:
    """``sig``, then SIGKILL after ``grace_s``, to a child we started (nothing if it ended)."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the process that started us dies.

    SIGKILL, not SIGTERM: a test plane's state is disposable, and kube-apiserver's graceful
    shutdown can linger for a long time once etcd is gone."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Component:
    """One process we start, its output appended to its log; ``env``: its whole environment
    (None: ours)."""

    name: str
    args: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self, tied: bool = False) -> None:
        """``tied``: the component dies with this process (tests); else it outlives it."""
        with open(self.log, "ab") as log:
            # A session of its own, so a Ctrl-C in `make` (or of a test run) reaches it only
            # through us, never mid-teardown.
            self.popen = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=exit_with_parent if tied else None,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def exited(self) -> bool:
        return self.popen is not None and self.popen.poll() is not None

    @property
    def returncode(self) -> int | str:
        """Its exit code, for a message ("?" while none is known)."""
        code = self.popen.returncode if self.popen else None
        return "?" if code is None else code


def wait_ready(
    component: Component,
    ready: Callable[[], bool],
    timeout_s: float,
    failure: Callable[[bool], Exception],
) -> None:
    """Poll ``ready`` until it holds. If the component exits first, raise ``failure(True)``;
    if ``timeout_s`` passes, ``failure(False)``: each owner words its own cause and fix."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if component.exited():
            raise failure(True)
        if ready():
            return
        time.sleep(READY_POLL_S)
    raise failure(False)


class Starter:
    """What starts components one after another (the plane, the node, Argo CD): ``_launch``
    starts one into ``components`` with its log in ``log_folder``; ``_wait`` waits until it
    is ready, or raises the owner's ``_failure`` (each words its own cause and fix)."""

    components: list[Component]
    ready_timeout_s: float

    @property
    def log_folder(self) -> Path:
        raise NotImplementedError

    @property
    def tied(self) -> bool:
        """The components die with this process (tests)."""
        raise NotImplementedError

    def _failure(self, comp: Component, what: str, exited: bool) -> Exception:
        raise NotImplementedError

    def _launch(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Component:
        comp = Component(name, args, self.log_folder / f"{name}.log", env)
        comp.start(tied=self.tied)
        self.components.append(comp)
        return comp

    def _wait(self, comp: Component, ready: Callable[[], bool], what: str) -> None:
        wait_ready(
            comp, ready, self.ready_timeout_s, lambda exited: self._failure(comp, what, exited)
        )


@contextlib.contextmanager
def stopped_on_failure(stop: Callable[[], object]) -> Iterator[None]:
    """Run a start of several steps; when one fails, or Ctrl-C interrupts it, ``stop`` what
    the steps before it started, then raise that same error.

    Why one helper: the plane, the node (containerd, kubelet, kube-scheduler, kube-proxy,
    CoreDNS) and Argo CD each start processes one after another, and any of them can fail
    halfway. What started before it would live on, holding ports, mounts, the pod bridge or
    iptables rules, and trip the next start or test session. ``stop`` is the owner's whole
    teardown, by PID from what it recorded as it went, so it is safe after any prefix of the
    steps, and its leftovers check proves it. The error reaches the user as the failing step
    worded it."""
    try:
        yield
    except BaseException:
        stop()
        raise
