"""The zygote's pure parts: the command line that carries a start's spawn id, and its test
fault's parsing."""

from __future__ import annotations

import re

import pytest

from juturna_operator.zygote import FAULT_VARIABLE, Fault, carrying

SPAWN_ID = "5f0c" * 8
ZYGOTE = ["/venv/bin/python", "-m", "juturna_operator.zygote", "--control-fd", "5"]
WORKER = [
    "/venv/bin/python", "-m", "juturna_operator.worker", "--folder", "/work",
    "--port-file", "/work/.workers/0123.port", "--owner", "0123", "--token-file",
    "/work/.workers/0123.token", "--spawn-id", SPAWN_ID,
]  # fmt: skip


def area(args: list[str], room: int) -> bytes:
    """A command line as the kernel holds it: NUL-separated, NUL-padded to ``room``."""
    return ("\0".join(args) + "\0").encode().ljust(room, b"\0")


def test_the_spawn_id_lies_where_the_workers_command_line_has_it() -> None:
    own = [*ZYGOTE, "--title-room", " " * 200]
    title = carrying(own, WORKER, SPAWN_ID)
    assert title[:6] == own[:6]
    assert title[-2:] == ["--spawn-id", SPAWN_ID]
    assert set(title[6]) == {" "}
    assert "\0".join(title).index(SPAWN_ID) == "\0".join(WORKER).index(SPAWN_ID)
    # The child rewrites its inherited command line to the worker's in one write: a read
    # of it at any moment of that write (a prefix new, the rest old) holds the spawn id.
    room = len(area(own, 0))
    before, after = area(title, room), area(WORKER, room)
    for written in range(room + 1):
        assert SPAWN_ID.encode() in after[:written] + before[written:], written


def test_a_zygote_line_longer_than_the_workers_still_carries_the_spawn_id() -> None:
    own = [*ZYGOTE, "--with-a-much-longer-argument-than-the-worker-has" * 6, "--title-room", ""]
    title = carrying(own, WORKER, SPAWN_ID)
    assert title == [*own[:-1], "", "--spawn-id", SPAWN_ID]


def test_the_fault_is_off_unless_named() -> None:
    assert Fault.parse("") == Fault(delay_s=0.0, die=False)
    assert Fault.parse("die-after-fork") == Fault(die=True)
    assert Fault.parse("answer-delay:12") == Fault(delay_s=12.0)
    assert Fault.parse("answer-delay:0.5") == Fault(delay_s=0.5)


@pytest.mark.parametrize(
    "value",
    ["die", "answer-delay", "answer-delay:", "answer-delay:-1", "answer-delay:nan",
     "answer-delay:inf", "answer-delay:soon", "delay:3", "die-after-fork:1"],
)  # fmt: skip
def test_a_bad_fault_is_refused_naming_the_variable(value: str) -> None:
    message = f'{FAULT_VARIABLE}="{value}": expected "die-after-fork" or "answer-delay:<seconds>"'
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Fault.parse(value)
