"""The operator as a process of its own, as in production: the one launcher of the tests
(``tests/support.py``) and the benchmarks (``bench/harness.py``, ``bench/engine_costs.py``).

It starts ``juturna-operator run`` with a given environment, its output appended to a log,
waits until kopf has authenticated in this start's part of that log, and stops or kills
exactly the process it started, by PID.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from processes import exit_with_parent, pid_alive, stop_popen

# kopf logs this once it can watch: before it, a Pipeline created would wait unseen.
UP_LINE = b"Initial authentication has finished"


class OperatorStartError(RuntimeError):
    """The operator exited, or did not authenticate in time; the message ends with its log."""


class OperatorProcess:
    """``python -m juturna_operator.cli run <where>`` with ``env`` (the whole environment).

    ``where`` is ``["-A"]`` or ``["-n", namespace, ...]``; ``env`` and ``where`` are read at
    each start, so a caller may change them between a stop and the next start. ``tied``: the
    operator gets SIGKILL when this process dies (a killed test run takes it along)."""

    def __init__(
        self,
        log: Path,
        env: dict[str, str],
        where: list[str],
        *,
        tied: bool = True,
        stop_signal: int = signal.SIGTERM,
        grace_s: float = 20.0,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.log, self.env, self.where = log, env, where
        self.tied, self.stop_signal, self.grace_s = tied, stop_signal, grace_s
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """What is run; a subclass may wrap it (the benchmark's profiler)."""
        return [sys.executable, "-m", "juturna_operator.cli", "run", *self.where]

    def start(self) -> None:
        """Start, and return once kopf has authenticated in this start's part of the log."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                env=self.env,
                preexec_fn=exit_with_parent if self.tied else None,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while UP_LINE not in self._log_bytes()[offset:]:
            if self.proc.poll() is not None:
                raise OperatorStartError(f"operator exited:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise OperatorStartError(
                    f"operator not up in {self.start_timeout_s:g} s:\n{self.log_text()[-3000:]}"
                )
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the operator was never started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and pid_alive(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no cleanup runs."""
        assert self.proc is not None, "the operator was never started"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """``stop_signal`` (SIGTERM), then SIGKILL after ``grace_s``."""
        if self.proc is not None:
            stop_popen(self.proc, self.stop_signal, self.grace_s)

    def _log_bytes(self) -> bytes:
        return self.log.read_bytes() if self.log.exists() else b""

    def log_text(self) -> str:
        return self._log_bytes().decode(errors="replace")
