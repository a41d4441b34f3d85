"""`make run` as a user runs it, in a terminal: Ctrl-C leaves nothing running.

The test drives `make run` through a real pseudo-terminal, in a session of its own with the
pty as its controlling terminal: writing ^C to the master makes the kernel send SIGINT to the
whole foreground process group (make, bash, kubectl, whatever runs), exactly as a user's
Ctrl-C does. The demo runs in a copy of the repository (its own `.state/`: a developer's
`make run` in this clone cannot collide with it) against the session's control plane
(KUBECONFIG), so it starts no plane of its own."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from controlplane import ControlPlane
from processes import free_port, pid_alive, processes_mentioning

from support import REPO, Kubectl, assert_sole_operator

pytestmark = [pytest.mark.cluster, pytest.mark.own_operator]

CLEANUP = "== deleting the demo pipeline and stopping the operator"
GROWS = re.compile(r"^\s+(\d+) lines, last: ", re.MULTILINE)
KEEPS_RUNNING = "== the operator keeps running"
# Not copied: the venv is linked (same interpreter, same editable install), the rest is state.
SKIP = shutil.ignore_patterns(
    ".git", ".venv", ".state", ".pytest_cache", ".ruff_cache", "__pycache__", "*.egg-info"
)


class Terminal:
    """A command on a fresh pseudo-terminal, its session leader; collects what it prints."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,  # setsid() runs before preexec_fn: make leads a session
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # ...with the pty
        )
        os.close(slave)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Always drained: a full pty buffer would block the demo's writes.
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: every process holding the slave has gone
                return
            if not data:
                return
            self._chunks.append(data)

    @property
    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, ready: Callable[[str], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready(self.text):
            assert self.proc.poll() is None, f"make exited before {what}:\n{self.text}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s:\n{self.text}"
            time.sleep(0.1)

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def close(self) -> None:
        if self.proc.poll() is None:  # a failed test: end make's whole session by its group id
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        os.close(self.master)


@pytest.fixture
def demo_repo(tmp_path: Path) -> Path:
    """A copy of this clone; its pyproject.toml keeps its time, so make sees the venv current."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=SKIP, symlinks=True)
    (copy / ".venv").symlink_to(REPO / ".venv")
    return copy


@pytest.fixture
def demo_cleanup(demo_repo: Path, kubectl: Kubectl) -> Iterator[None]:
    """Whatever a failed run left: the operator and workers by PID, then the Pipeline."""
    yield
    pid_file = demo_repo / ".state" / "operator.pid"
    workdir = str(demo_repo / ".state" / "work")
    pids = processes_mentioning(workdir)
    if pid_file.exists():
        pids.append(int(pid_file.read_text()))
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    left = kubectl("get", "pipeline", "tones", "-n", "default", check=False)
    if left.returncode == 0:
        kubectl(
            "patch", "pipeline", "tones", "-n", "default", "--type=merge",
            "-p", '{"metadata":{"finalizers":null}}', check=False,
        )  # fmt: skip
        kubectl("delete", "pipeline", "tones", "-n", "default", "--wait=true", check=False)


def output_grew(text: str) -> bool:
    counts = [int(n) for n in GROWS.findall(text)]
    return len(counts) >= 2 and counts[-1] > counts[0]


def demo_env(control_plane: ControlPlane, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "KUBECONFIG": str(control_plane.kubeconfig),  # the session's plane: run.sh starts none
        "JUTURNA_OPERATOR_METRICS_PORT": str(free_port()),  # 9090 may be taken on this machine
        "TERM": "dumb",
    }
    env.pop("RUN_SECONDS", None)
    env.pop("MAKEFLAGS", None)
    return env | extra


def assert_nothing_left(
    text: str, state: Path, operator: int, workers: list[int], kubectl: Kubectl
) -> None:
    """The demo's operator and workers are gone, by PID; so is its Pipeline, finalizer done."""
    assert CLEANUP in text, text
    assert not pid_alive(operator), f"the operator {operator} still runs after the demo:\n{text}"
    alive = [pid for pid in workers if pid_alive(pid)]
    assert not alive, f"worker processes {alive} still run after the demo:\n{text}"
    assert not processes_mentioning(str(state / "work")), text
    # The operator's finalizer ran (nobody else removes it): the instance's folder is gone too.
    assert not list((state / "work").glob("default__tones__*")), text
    gone = kubectl("get", "pipeline", "tones", "-n", "default", check=False)
    assert gone.returncode != 0, f"the Pipeline tones is still there:\n{gone.stdout}\n{text}"
    assert "NotFound" in gone.stderr, gone.stderr
    assert not (state / "operator.pid").exists(), text
    # run.sh used the cluster KUBECONFIG named and started no plane of its own.
    assert "using the cluster of the current kubeconfig context" in text, text
    assert not (state / "cluster.json").exists(), text
    assert "== done: nothing of the demo runs any more" in text, text


def demo_processes(state: Path, text: str) -> tuple[int, list[int]]:
    """The operator's PID (run.sh records it) and the worker processes it started."""
    operator = int((state / "operator.pid").read_text())
    workers = processes_mentioning(f"--folder {state / 'work'} ")
    assert pid_alive(operator), text
    assert workers, f"no worker process for the demo pipeline:\n{text}"
    return operator, workers


@pytest.mark.usefixtures("crd", "demo_cleanup")
@pytest.mark.parametrize(
    "when",
    [
        "while_the_output_grows",  # bash waits on a foreground `sleep`: it gets the ^C too
        "once_the_operator_is_in_the_foreground",  # bash is in `wait` on the operator
        "twice",  # an impatient user: a second ^C while the cleanup runs
    ],
)
def test_ctrl_c_deletes_the_pipeline_and_stops_the_operator(
    when: str, demo_repo: Path, control_plane: ControlPlane, kubectl: Kubectl
) -> None:
    assert_sole_operator(control_plane.kubeconfig)
    state = demo_repo / ".state"
    term = Terminal(["make", "run"], demo_repo, demo_env(control_plane))
    try:
        if when == "while_the_output_grows":
            term.wait_for(lambda t: len(GROWS.findall(t)) >= 1, "output lines", 120)
        else:
            term.wait_for(lambda t: KEEPS_RUNNING in t, "operator in the foreground", 120)
            assert output_grew(term.text), term.text
        operator, workers = demo_processes(state, term.text)

        started = time.monotonic()
        term.ctrl_c()
        if when == "twice":
            term.wait_for(lambda t: CLEANUP in t, "cleanup message", 30)
            term.ctrl_c()
        try:
            term.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"make still runs 90 s after Ctrl-C:\n{term.text}")
        # make waits for the recipe's cleanup (through a second ^C too), then dies of SIGINT.
        assert term.proc.returncode == -signal.SIGINT, (term.proc.returncode, term.text)
        took = time.monotonic() - started
    finally:
        term.close()

    print(term.text)  # what the user saw (pytest shows it with -s, or on failure)
    assert_nothing_left(term.text, state, operator, workers, kubectl)
    assert took < 60, f"the cleanup took {took:.1f} s:\n{term.text}"


@pytest.mark.usefixtures("crd", "demo_cleanup")
def test_run_seconds_cleans_up_the_same_way(
    demo_repo: Path, control_plane: ControlPlane, kubectl: Kubectl
) -> None:
    """RUN_SECONDS (unattended runs) ends through the same cleanup, and exits 0."""
    assert_sole_operator(control_plane.kubeconfig)
    state = demo_repo / ".state"
    term = Terminal(["make", "run"], demo_repo, demo_env(control_plane, RUN_SECONDS="3"))
    try:
        term.wait_for(lambda t: len(GROWS.findall(t)) >= 3, "output lines", 120)
        operator, workers = demo_processes(state, term.text)
        assert term.proc.wait(timeout=90) == 0, term.text
    finally:
        term.close()
    print(term.text)
    assert_nothing_left(term.text, state, operator, workers, kubectl)
