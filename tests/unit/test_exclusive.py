"""``Exclusive.exclusive`` within a ``Bound``: how long an operation waits for its instance's
lock, and what it does when it waited too long (pure asyncio, no cluster)."""

from __future__ import annotations

import asyncio
from typing import NoReturn

import pytest

from juturna_operator.domain import PipelineKey
from juturna_operator.engines.base import Bound, Exclusive, KeyLock

KEY = PipelineKey("ns", "p", "0123456789")
LIMIT = 0.05


class GaveUp(Exception):
    pass


class Engine(Exclusive):
    """Operations that take as long as told; ``give_up`` records and raises as an engine's
    would (the in-process engine's marks the lock abandoned and lets go of the key)."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[str] = []
        self.gave_up: list[tuple[str, float]] = []
        self.began = asyncio.Event()  # an operation holds the lock

    def give_up(self, key: PipelineKey, lock: KeyLock, waited_s: float) -> NoReturn:
        self.gave_up.append((lock.holder, waited_s))
        lock.abandoned = True
        if self._locks.get(key) is lock:
            del self._locks[key]
        raise GaveUp(f"waited {waited_s:g} s for the {lock.holder}")

    async def _warmup(self, seconds: float) -> str:
        self.began.set()
        await asyncio.sleep(seconds)
        self.ran.append("warmup")
        return "warm"

    async def _stop(self, seconds: float) -> str:
        self.began.set()
        await asyncio.sleep(seconds)
        self.ran.append("stop")
        return "stopped"

    async def _delete(self) -> str:
        self.ran.append("delete")
        return "deleted"

    def bound(self) -> Bound:
        return Bound(LIMIT, self.give_up, frozenset({"stop"}))


async def _holding(engine: Engine, operation: str, seconds: float) -> asyncio.Task[str]:
    """``operation`` started on KEY, and holding its lock by the time this returns."""
    task = asyncio.ensure_future(engine.exclusive(KEY, getattr(engine, operation), seconds))
    await engine.began.wait()
    return task


def test_a_free_lock_is_taken_at_once_and_the_result_returned() -> None:
    async def scenario() -> None:
        engine = Engine()
        assert await engine.exclusive(KEY, engine._delete, bound=engine.bound()) == "deleted"
        assert engine.ran == ["delete"]
        assert engine.gave_up == []
        assert not engine.busy(KEY)

    asyncio.run(scenario())


def test_an_operation_in_flight_that_ends_within_the_bound_is_waited_for() -> None:
    async def scenario() -> None:
        engine = Engine()
        warmup = await _holding(engine, "_warmup", LIMIT / 5)
        assert await engine.exclusive(KEY, engine._delete, bound=engine.bound()) == "deleted"
        assert await warmup == "warm"
        assert engine.ran == ["warmup", "delete"]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("operation", "holder", "waited_s"),
    [
        ("_warmup", "warmup", LIMIT),
        # A stop ends within the bound by itself: given up on only after twice the bound.
        ("_stop", "stop", 2 * LIMIT),
    ],
)
def test_an_operation_in_flight_past_the_bound_is_given_up_on_and_named(
    operation: str, holder: str, waited_s: float
) -> None:
    async def scenario() -> None:
        engine = Engine()
        hung = await _holding(engine, operation, 6 * LIMIT)
        with pytest.raises(GaveUp, match=f"waited {waited_s:g} s for the {holder}"):
            await engine.exclusive(KEY, engine._delete, bound=engine.bound())
        assert engine.gave_up == [(holder, waited_s)]
        assert "delete" not in engine.ran
        # The key moved on: a later operation does not wait behind the hung one.
        assert not engine.busy(KEY)
        assert await engine.exclusive(KEY, engine._delete) == "deleted"
        await hung

    asyncio.run(scenario())


def test_a_holder_that_ends_by_itself_gets_the_bound_once_more() -> None:
    """A stop ends within the bound by itself: waited for up to twice the bound."""

    async def scenario() -> None:
        engine = Engine()
        stop = await _holding(engine, "_stop", 1.5 * LIMIT)
        assert await engine.exclusive(KEY, engine._delete, bound=engine.bound()) == "deleted"
        assert await stop == "stopped"
        assert engine.gave_up == []
        assert engine.ran == ["stop", "delete"]

    asyncio.run(scenario())


def test_without_a_bound_an_operation_waits_as_long_as_it_takes() -> None:
    async def scenario() -> None:
        engine = Engine()
        warmup = await _holding(engine, "_warmup", 4 * LIMIT)
        assert await engine.exclusive(KEY, engine._delete) == "deleted"
        assert engine.gave_up == []
        assert await warmup == "warm"

    asyncio.run(scenario())


def test_a_final_operation_drops_the_lock_even_when_its_caller_is_cancelled() -> None:
    async def scenario() -> None:
        engine = Engine()
        caller = asyncio.ensure_future(
            engine.exclusive(KEY, engine._warmup, LIMIT, bound=engine.bound(), final=True)
        )
        await engine.began.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await engine.settle(10 * LIMIT)  # the shielded operation runs on to its end
        assert engine.ran == ["warmup"]
        assert KEY not in engine._locks

    asyncio.run(scenario())


def test_a_final_operation_keeps_the_lock_another_one_waits_for() -> None:
    """A new lock beside a waited-for one would let two operations run at once."""

    async def scenario() -> None:
        engine = Engine()
        first = asyncio.ensure_future(engine.exclusive(KEY, engine._warmup, LIMIT, final=True))
        await engine.began.wait()
        lock = engine._locks[KEY]
        second = asyncio.ensure_future(engine.exclusive(KEY, engine._warmup, 0))
        await first
        assert engine._locks.get(KEY) is lock  # the second still waits for it
        await second
        assert engine.ran == ["warmup", "warmup"]

    asyncio.run(scenario())
