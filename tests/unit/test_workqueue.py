"""The reconcile queue: each key once, never two passes of one key at once, later looks
from one timer heap, cancelled passes, and a clean stop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from juturna_operator.workqueue import WorkQueue


class Recorder:
    """A process function that records passes and how many of each key ran at once."""

    def __init__(self, hold_s: float = 0.0, next_look: float | None = None) -> None:
        self.hold_s, self.next_look = hold_s, next_look
        self.passes: list[str] = []
        self.running: dict[str, int] = {}
        self.most_at_once: dict[str, int] = {}
        self.started = asyncio.Event()

    async def __call__(self, key: str) -> float | None:
        self.running[key] = self.running.get(key, 0) + 1
        self.most_at_once[key] = max(self.most_at_once.get(key, 0), self.running[key])
        self.started.set()
        try:
            await asyncio.sleep(self.hold_s)
            self.passes.append(key)
        finally:
            self.running[key] -= 1
        return self.next_look


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=10))


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110  (the recorders signal nothing finer)
            await asyncio.sleep(0.005)


def test_a_key_added_many_times_while_it_waits_is_processed_once() -> None:
    async def test() -> None:
        record = Recorder()
        queue = WorkQueue(record, workers=4)
        for _ in range(50):
            queue.add("a")
        queue.add("b")
        assert queue.waiting() == 2
        queue.start()
        await until(lambda: len(record.passes) == 2)
        await asyncio.sleep(0.05)
        assert sorted(record.passes) == ["a", "b"]
        await queue.stop(grace_s=1)

    run(test)


def test_a_key_added_while_in_flight_is_processed_again_after_never_at_once() -> None:
    async def test() -> None:
        record = Recorder(hold_s=0.05)
        queue = WorkQueue(record, workers=8)
        queue.start()
        queue.add("a")
        await record.started.wait()
        for _ in range(20):  # eight idle workers, and not one may take it meanwhile
            queue.add("a")
            await asyncio.sleep(0.001)
        assert queue.processing("a")
        await until(lambda: len(record.passes) == 2)
        await asyncio.sleep(0.1)
        assert record.passes == ["a", "a"]
        assert record.most_at_once == {"a": 1}
        await queue.stop(grace_s=1)

    run(test)


def test_workers_are_bounded_and_other_keys_run_side_by_side() -> None:
    async def test() -> None:
        record = Recorder(hold_s=0.05)
        queue = WorkQueue(record, workers=3)
        queue.start()
        for i in range(9):
            queue.add(f"k{i}")
        await asyncio.sleep(0.02)
        assert sum(record.running.values()) == 3
        assert queue.waiting() == 6
        await until(lambda: len(record.passes) == 9)
        assert sorted(record.passes) == [f"k{i}" for i in range(9)]
        await queue.stop(grace_s=1)

    run(test)


def test_the_next_look_a_pass_asks_for_comes_from_the_timer() -> None:
    async def test() -> None:
        record = Recorder(next_look=0.1)
        queue = WorkQueue(record, workers=2)
        queue.start()
        loop = asyncio.get_running_loop()
        began = loop.time()
        queue.add("a")
        await until(lambda: len(record.passes) == 3)
        elapsed = loop.time() - began
        assert 0.2 <= elapsed < 1.0, elapsed  # two looks after 0.1 s each
        assert queue.scheduled() == 1  # the fourth, already due in 0.1 s
        await queue.stop(grace_s=1)
        assert queue.scheduled() == 0

    run(test)


def test_a_pass_supersedes_the_look_it_was_waiting_for() -> None:
    """A watch event before the health check: that pass schedules the next look, and the
    earlier one does not come as well."""

    async def test() -> None:
        record = Recorder(next_look=0.3)
        queue = WorkQueue(record, workers=2)
        queue.start()
        queue.add("a")
        await until(lambda: len(record.passes) == 1)
        await asyncio.sleep(0.15)
        queue.add("a")  # an event, halfway to the look due at 0.3 s
        await until(lambda: len(record.passes) == 2)
        await asyncio.sleep(0.25)  # past the first look's time, before the second's
        assert len(record.passes) == 2
        await until(lambda: len(record.passes) == 3)
        await queue.stop(grace_s=1)

    run(test)


def test_the_sooner_of_two_looks_wins() -> None:
    async def test() -> None:
        record = Recorder()
        queue = WorkQueue(record, workers=1)
        queue.start()
        queue.add_after("a", 5.0)
        queue.add_after("a", 0.05)
        queue.add_after("a", 3.0)
        queue.add_after("b", 0.1)
        assert queue.scheduled() == 2
        await until(lambda: len(record.passes) == 2)
        assert record.passes == ["a", "b"]
        assert queue.scheduled() == 0
        await queue.stop(grace_s=1)

    run(test)


def test_a_pass_that_raises_is_tried_again_after_the_error_delay() -> None:
    async def test() -> None:
        attempts: list[float] = []
        loop = asyncio.get_running_loop()

        async def flaky(key: str) -> float | None:
            attempts.append(loop.time())
            if len(attempts) == 1:
                raise RuntimeError("the API server said no")
            return None

        queue = WorkQueue(flaky, workers=1, retry_after_error_s=0.1)
        queue.start()
        queue.add("a")
        await until(lambda: len(attempts) == 2)
        assert attempts[1] - attempts[0] >= 0.09
        await asyncio.sleep(0.15)
        assert len(attempts) == 2  # the second pass asked for no later look
        await queue.stop(grace_s=1)

    run(test)


def test_a_cancelled_pass_ends_and_its_worker_goes_on() -> None:
    async def test() -> None:
        record = Recorder(hold_s=60)
        queue = WorkQueue(record, workers=1)
        queue.start()
        queue.add("stuck")
        await record.started.wait()
        assert queue.cancel("stuck")
        assert not queue.cancel("absent")
        record.hold_s = 0
        queue.add("next")
        await until(lambda: record.passes == ["next"])
        assert not queue.processing("stuck")
        await queue.stop(grace_s=1)

    run(test)


def test_stop_lets_a_pass_finish_within_the_grace_and_takes_no_more() -> None:
    async def test() -> None:
        record = Recorder(hold_s=0.1, next_look=0.01)
        queue = WorkQueue(record, workers=1)
        queue.start()
        queue.add("a")
        queue.add("b")
        await record.started.wait()
        await queue.stop(grace_s=2)
        assert record.passes == ["a"]  # finished; b never began, and no later look came
        queue.add("c")
        queue.add_after("c", 0.01)
        await asyncio.sleep(0.05)
        assert record.passes == ["a"]
        assert all(task.get_name() != "reconcile-worker-0" for task in asyncio.all_tasks())

    run(test)


def test_stop_cancels_a_pass_that_outlives_the_grace() -> None:
    async def test() -> None:
        record = Recorder(hold_s=60)
        queue = WorkQueue(record, workers=2)
        queue.start()
        queue.add("hung")
        await record.started.wait()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await queue.stop(grace_s=0.1)
        assert loop.time() - began < 1
        assert record.running == {"hung": 0}
        assert record.passes == []
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("reconcile")] == []

    run(test)


def test_a_queue_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        WorkQueue(Recorder(), workers=0)


def test_a_pass_that_waits_aside_gives_its_place_to_the_others() -> None:
    """The fairness fix: with one worker, a pass waiting inside ``released()`` does not keep
    another key from its pass; once the wait ends, the queue is back to one worker."""

    async def test() -> None:
        queue: WorkQueue[str] = WorkQueue(lambda key: process(key), workers=1)
        done: list[str] = []
        waited = asyncio.Event()
        go_on = asyncio.Event()

        async def process(key: str) -> None:
            if key == "stuck":
                async with queue.released():
                    waited.set()
                    await go_on.wait()
            done.append(key)

        queue.start()
        queue.add("stuck")
        await waited.wait()
        queue.add("other")
        await until(lambda: done == ["other"])
        go_on.set()
        await until(lambda: done == ["other", "stuck"])
        await until(lambda: len(queue._workers) == 1)
        # Still serving, one pass at a time.
        queue.add("again")
        await until(lambda: done[-1] == "again")
        await queue.stop(1.0)

    run(test)


def test_without_release_a_waiting_pass_holds_its_worker() -> None:
    """The same, without ``released()``: the other key waits (what the fix is for)."""

    async def test() -> None:
        done: list[str] = []
        go_on = asyncio.Event()

        async def process(key: str) -> None:
            if key == "stuck":
                await go_on.wait()
            done.append(key)

        queue: WorkQueue[str] = WorkQueue(process, workers=1)
        queue.start()
        queue.add("stuck")
        queue.add("other")
        await asyncio.sleep(0.2)
        assert done == []
        go_on.set()
        await until(lambda: done == ["stuck", "other"])
        await queue.stop(1.0)

    run(test)


class Counts:
    """A queue observer that keeps what it heard (the metrics' own is a prometheus one)."""

    def __init__(self) -> None:
        self.adds, self.retries = 0, 0
        self.waits: list[float] = []
        self.works: list[float] = []

    def added(self) -> None:
        self.adds += 1

    def waited(self, seconds: float) -> None:
        self.waits.append(seconds)

    def worked(self, seconds: float) -> None:
        self.works.append(seconds)

    def retried(self) -> None:
        self.retries += 1


def test_the_observer_hears_what_client_go_counts() -> None:
    """An add counts once per time a key becomes due (not each call); the wait runs from
    then to its pass, the work is the pass; each delayed add is a retry, as in client-go."""

    async def test() -> None:
        counts = Counts()
        record = Recorder(hold_s=0.3)
        queue = WorkQueue(record, workers=1, observer=counts)
        for _ in range(5):
            queue.add("a")
        queue.add("b")
        assert (counts.adds, queue.depth()) == (2, 2)
        await asyncio.sleep(0.05)  # both wait, unstarted
        queue.start()
        await until(lambda: queue.in_flight_s() != [])
        assert queue.depth() == 1  # "a" taken, "b" due
        queue.add("a")  # due again while its pass runs: counted, and in the depth
        assert (counts.adds, queue.depth()) == (3, 2)
        await until(lambda: len(record.passes) == 3)
        assert record.passes == ["a", "b", "a"]
        assert (queue.depth(), queue.in_flight_s()) == (0, [])
        assert (len(counts.waits), len(counts.works)) == (3, 3)
        assert counts.waits[0] >= 0.05  # "a" waited for the start
        assert counts.waits[1] >= 0.35  # "b" waited for the start and for a's pass
        assert all(0.29 <= w < 3 for w in counts.works)
        queue.add_after("c", 60)
        queue.add_after("c", 0)  # due now: a retry that is also an add
        assert (counts.retries, counts.adds) == (2, 4)
        await queue.stop(grace_s=1)

    run(test)


def test_in_flight_says_how_long_each_pass_has_run() -> None:
    async def test() -> None:
        record = Recorder(hold_s=60)
        queue = WorkQueue(record, workers=2)
        assert queue.workers == 2
        queue.start()
        queue.add("a")
        await record.started.wait()
        await asyncio.sleep(0.1)
        queue.add("b")
        await until(lambda: len(queue.in_flight_s()) == 2)
        longest, shortest = sorted(queue.in_flight_s(), reverse=True)
        assert longest - shortest >= 0.099  # "a" began at least 0.1 s before "b"
        await queue.stop(grace_s=0.01)
        assert queue.in_flight_s() == []

    run(test)
