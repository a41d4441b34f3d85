"""The pieces the plane, the node and Argo CD share (hack/processes.py), with real processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from processes import Component, processes_mentioning, stop_pid, stopped_on_failure, wait_ready


def _sleeper(folder: Path, name: str = "sleeper") -> Component:
    """A process that names ``folder`` on its command line, as every component of ours does."""
    return Component(
        name,
        [sys.executable, "-c", "import time; time.sleep(60)", str(folder)],
        folder / f"{name}.log",
    )


def _stop_all(started: list[Component], folder: Path) -> None:
    for comp in reversed(started):
        stop_pid(comp.pid, str(folder), grace_s=5)
        assert comp.popen is not None
        comp.popen.wait(timeout=5)


@pytest.mark.parametrize(
    "error", [RuntimeError("step 2 failed: its own words"), KeyboardInterrupt()]
)
def test_a_failed_start_stops_what_started_and_raises_the_steps_error(
    tmp_path: Path, error: BaseException
) -> None:
    started: list[Component] = []
    seen: list[list[int]] = []

    def start() -> None:
        with stopped_on_failure(lambda: _stop_all(started, tmp_path)):
            first = _sleeper(tmp_path)
            first.start(tied=True)
            started.append(first)
            seen.append(processes_mentioning(str(tmp_path)))
            raise error  # the second step fails

    with pytest.raises(type(error)) as raised:
        start()
    assert seen == [[started[0].pid]]
    assert raised.value is error
    assert processes_mentioning(str(tmp_path)) == []


def test_a_start_that_succeeds_stops_nothing(tmp_path: Path) -> None:
    stops: list[str] = []
    with stopped_on_failure(lambda: stops.append("stop")):
        comp = _sleeper(tmp_path)
        comp.start(tied=True)
    try:
        assert stops == []
        assert processes_mentioning(str(tmp_path)) == [comp.pid]
    finally:
        _stop_all([comp], tmp_path)


def test_waiting_for_a_component_that_exits_gives_the_owners_message(tmp_path: Path) -> None:
    comp = Component(
        "quitter",
        [sys.executable, "-c", "print('bye'); raise SystemExit(3)"],
        tmp_path / "quitter.log",
    )
    comp.start(tied=True)
    with pytest.raises(RuntimeError) as failed:
        wait_ready(
            comp,
            lambda: False,
            30,
            lambda exited: RuntimeError(f"{comp.name} exited={exited} code={comp.returncode}"),
        )
    assert str(failed.value) == "quitter exited=True code=3"
    assert (tmp_path / "quitter.log").read_text() == "bye\n"


def test_waiting_past_the_timeout_gives_the_owners_message(tmp_path: Path) -> None:
    comp = _sleeper(tmp_path)
    comp.start(tied=True)
    try:
        with pytest.raises(RuntimeError) as failed:
            wait_ready(comp, lambda: False, 0.5, lambda exited: RuntimeError(f"exited={exited}"))
        assert str(failed.value) == "exited=False"
    finally:
        _stop_all([comp], tmp_path)


def test_a_component_never_started_says_so() -> None:
    comp = Component("ghost", ["true"], Path("/nonexistent.log"))
    assert comp.returncode == "?"
    assert not comp.exited()
    with pytest.raises(AssertionError, match="ghost was never started"):
        _ = comp.pid
