"""The in-process engine on the real PipelineManager: Juturna's own errors, crashes, leaks.

"Pitfall N": docs/juturna.md."""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from juturna.cli.commands.exceptions import InvalidPipelineIdException, NotRunningException
from juturna.components._pipeline_manager import PipelineManager

from juturna_operator.api import PipelineSpec
from juturna_operator.domain import InstanceState, PipelineKey
from juturna_operator.engines.inprocess import InProcessEngine
from juturna_operator.reasons import FailureReason, PipelineFailure, Step, classify
from juturna_operator.settings import Settings
from support import PLUGIN_ROOTS


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessEngine]:
    # Juturna sets its base folder once per process (Pitfall 6): one engine per test process.
    workdir = Path(PipelineManager._base_folder or tmp_path_factory.mktemp("engine"))
    eng = InProcessEngine(Settings(plugin_roots=PLUGIN_ROOTS, workdir=workdir, stop_timeout_s=3))
    yield eng
    asyncio.run(eng.close())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def config(key: PipelineKey, middle: str = "scale", rate: float = 50, **cfg: Any) -> dict[str, Any]:
    spec = PipelineSpec.model_validate(
        {
            "plugins": ["tones", "faulty"],
            "nodes": [
                {
                    "name": "src",
                    "type": "source",
                    "mark": "ticker",
                    "configuration": {"rate": rate},
                },
                {"name": "mid", "type": "proc", "mark": middle, "configuration": cfg},
                {"name": "out", "type": "sink", "mark": "jsonl"},
            ],
            "links": [{"from": "src", "to": "mid"}, {"from": "mid", "to": "out"}],
        }
    )
    return spec.to_juturna_config(key.juturna_name)


def key() -> PipelineKey:
    return PipelineKey("ns", "p", str(uuid.uuid4()))


def crashed(engine: InProcessEngine, k: PipelineKey) -> Any:
    """The instance's status once a crash is in it (or after 5 s)."""
    deadline = time.monotonic() + 5
    while not run(engine.status(k)).crashes and time.monotonic() < deadline:
        time.sleep(0.05)
    return run(engine.status(k))


def reason_of(coro: Any) -> PipelineFailure:
    with pytest.raises(PipelineFailure) as err:
        run(coro)
    return err.value


def test_juturna_conflicts_map_to_their_reasons(engine: InProcessEngine) -> None:
    k = key()
    run(engine.create(k, config(k), "r1"))
    f = reason_of(engine.start(k))
    assert (f.reason, f.reason.code) == (FailureReason.NotReady, 409)
    run(engine.warmup(k))
    f = reason_of(engine.warmup(k))
    assert (f.reason, f.reason.code) == (FailureReason.AlreadyWarmedUp, 409)
    run(engine.start(k))
    f = reason_of(engine.start(k))
    assert (f.reason, f.reason.code) == (FailureReason.AlreadyRunning, 409)
    assert f.message.startswith("The pipeline is already running. (AlreadyRunningException")
    run(engine.stop(k))
    manager = PipelineManager()
    pid = run(engine.status(k)).pipeline_id
    with pytest.raises(NotRunningException) as err:
        manager.stop_pipeline(pid)
    assert classify(err.value, Step.stop).reason is FailureReason.NotRunning
    with pytest.raises(InvalidPipelineIdException) as err:
        manager.pipeline_status("no-such-id")
    assert classify(err.value, Step.run).reason is FailureReason.InvalidPipelineId
    run(engine.delete(k))
    assert run(engine.status(k)) is None


def test_a_failed_warmup_leaves_nothing_registered(engine: InProcessEngine) -> None:
    manager = PipelineManager()
    before = len(manager)
    k = key()
    run(engine.create(k, config(k, "boom", model="w.bin"), "r1"))
    f = reason_of(engine.warmup(k))
    assert f.reason is FailureReason.WarmupFailed
    assert f.message == 'node "mid": FileNotFoundError: model file w.bin not found'
    run(engine.delete(k))  # what the reconciler does after a failed deploy step (Pitfall 4)
    assert len(manager) == before
    assert not list(engine._settings.workdir.glob(f"{k.juturna_name}_*"))


def test_a_node_crash_is_seen_and_mapped_to_its_pipeline(engine: InProcessEngine) -> None:
    k, other = key(), key()
    for kk, middle, cfg in ((k, "crasher", {"after": 2}), (other, "scale", {})):
        run(engine.create(kk, config(kk, middle, **cfg), "r1"))
        run(engine.warmup(kk))
        run(engine.start(kk))
    info = crashed(engine, k)
    assert info.state is InstanceState.Running  # Juturna itself still says running
    assert [(c.node, c.error) for c in info.crashes] == [("mid", "RuntimeError: kaboom in mid")]
    assert info.nodes["mid"] == "Failed"
    assert run(engine.status(other)).crashes == []  # same thread names, other pipeline
    for kk in (k, other):
        run(engine.delete(kk))


def test_a_source_that_dies_as_it_starts_is_its_pipelines_crash(
    engine: InProcessEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ticker at 1e-300 Hz dies in its first sleep, inside start_pipeline, before its
    thread could be registered (found by the fuzzer: a bare traceback on stderr, and the
    pipeline's crash told only as a dead thread). It is the pipeline's crash, named."""
    k = key()
    run(engine.create(k, config(k, rate=1e-300), "r1"))
    run(engine.warmup(k))
    run(engine.start(k))
    info = crashed(engine, k)
    assert [(c.node, c.error) for c in info.crashes] == [
        ("src", "OverflowError: timestamp out of range for platform time_t")
    ]
    assert "Traceback" not in capsys.readouterr().err
    run(engine.delete(k))


def test_pipeline_names_are_safe_folder_names() -> None:
    k = PipelineKey("team-a", "my.pipe", "0123456789abcdef")
    assert k.juturna_name == "team-a__my.pipe__01234567"
    assert "/" not in k.juturna_name


def node_threads(*names: str) -> list[str]:
    """The live Juturna node threads of the given nodes (thread names are Juturna's)."""
    wanted = {f"_{kind}_{name}" for name in names for kind in ("source", "worker", "update")}
    return [t.name for t in threading.enumerate() if t.name in wanted]


def all_node_threads() -> int:
    return sum(
        t.name.startswith(("_source_", "_worker_", "_update_")) for t in threading.enumerate()
    )


def camera_config(k: PipelineKey, **cam: Any) -> tuple[dict[str, Any], list[str]]:
    """A ticking source and a camera source (``nostart``: its start raises, after its threads
    started) into a proc and a sink; node names unique to this pipeline, for its threads.
    The camera starts last, when everything else already runs (Juturna starts sources last)."""
    tag = uuid.uuid4().hex[:6]  # Juturna's thread names are not unique across pipelines
    src, cam_, mid, out = names = [f"{n}_{tag}" for n in ("src", "cam", "mid", "out")]
    spec = PipelineSpec.model_validate(
        {
            "plugins": ["tones", "faulty"],
            "nodes": [
                {"name": src, "type": "source", "mark": "ticker", "configuration": {"rate": 50}},
                {"name": cam_, "type": "source", "mark": "nostart", "configuration": cam},
                {"name": mid, "type": "proc", "mark": "scale", "configuration": {}},
                {"name": out, "type": "sink", "mark": "jsonl", "configuration": {}},
            ],
            "links": [
                {"from": src, "to": mid},
                {"from": cam_, "to": mid},
                {"from": mid, "to": out},
            ],
        }
    )
    return spec.to_juturna_config(k.juturna_name), names


def no_node_threads_left(names: list[str], what: str) -> None:
    deadline = time.monotonic() + 10
    while node_threads(*names) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node_threads(*names) == [], f"{what}: still running"


def test_a_failed_start_leaves_no_node_running(engine: InProcessEngine) -> None:
    """A source whose start raises starts last, after a ticking source and the rest already
    run: Juturna's start raises half-way and its delete stops nothing (the pipeline is not
    "running"). After StartFailed and the delete the reconciler calls, nothing may run; four
    retries leave no thread behind."""
    before = all_node_threads()
    for attempt in range(4):
        k = key()
        cfg, names = camera_config(k)
        cam = names[1]
        run(engine.create(k, cfg, "r1"))
        run(engine.warmup(k))
        f = reason_of(engine.start(k))
        assert (f.reason, f.reason.code, f.step) == (FailureReason.StartFailed, 500, Step.start)
        assert f.message == f'node "{cam}": OSError: {cam}: cannot open /dev/video9'
        run(engine.delete(k))  # what the reconciler's _discard does after it
        assert run(engine.status(k)) is None
        no_node_threads_left(names, f"attempt {attempt}")
    assert all_node_threads() == before


def test_a_start_that_hangs_fails_and_leaves_no_node_running(engine: InProcessEngine) -> None:
    """The camera's start hangs after the ticking source started: StartFailed after the stop
    timeout naming the node; what had started is stopped at once, the rest when the start
    returns."""
    module = importlib.import_module("faulty.nodes.source._nostart.nostart")
    module.RELEASE.clear()
    limit = engine._settings.stop_timeout_s
    k = key()
    cfg, names = camera_config(k, block_s=3600)
    cam = names[1]
    try:
        run(engine.create(k, cfg, "r1"))
        run(engine.warmup(k))
        f = reason_of(asyncio.wait_for(engine.start(k), limit + 30))
        assert (f.reason, f.reason.code, f.step) == (FailureReason.StartFailed, 500, Step.start)
        assert f.message == (
            f'start did not finish within {limit:g} s (node "{cam}" still in it). The instance '
            "was abandoned and its folder removed; the start's thread stays in the operator "
            "process until it returns (the process engine can kill it instead)"
        )
        assert run(engine.status(k)) is None
        assert not list(engine._settings.workdir.glob(f"{k.juturna_name}_*"))
        run(engine.delete(k))  # the reconciler's _discard: nothing left to do
        no_node_threads_left([n for n in names if n != cam], "the nodes started before it")
    finally:
        module.RELEASE.set()
    no_node_threads_left(names, "once its start returned")


@pytest.fixture
def stall(engine: InProcessEngine) -> Iterator[ModuleType]:
    """The ``stall`` test plugin's module (its warmup blocks until released); released at the
    end, so that no blocked warmup thread outlives the test."""
    module = importlib.import_module("faulty.nodes.proc._stall.stall")
    module.RELEASE.clear()
    yield module
    module.RELEASE.set()
    deadline = time.monotonic() + 10
    while (module.STALLED or call_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not module.STALLED
    assert call_threads() == [], "warmup threads left behind"


def call_threads() -> list[str]:
    """The engine's threads of warmups and starts still running."""
    return [t.name for t in threading.enumerate() if t.name.startswith("juturna-warmup-")]


async def until(check: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not met in {within_s:g} s"
        await asyncio.sleep(0.05)


def test_a_hung_warmup_does_not_hold_up_its_deletion(
    engine: InProcessEngine, stall: ModuleType
) -> None:
    """A warmup that never returns holds the instance; a delete waits for it at most the stop
    timeout, then abandons the instance: gone from status, its folder removed, the blocked
    thread named as left in the process."""
    k = key()
    limit = engine._settings.stop_timeout_s

    async def scenario() -> tuple[PipelineFailure, float, Path, BaseException]:
        await engine.create(k, config(k, "stall"), "r1")
        warming = asyncio.ensure_future(engine.warmup(k))
        await until(lambda: len(stall.STALLED) == 1, 30, "the warmup blocked")
        folder = Path(next(iter(stall.STALLED))).parent
        began = time.monotonic()
        with pytest.raises(PipelineFailure) as err:
            await asyncio.wait_for(engine.delete(k), limit + 30)
        took = time.monotonic() - began
        with pytest.raises(PipelineFailure) as warm:
            await asyncio.wait_for(warming, 10)
        return err.value, took, folder, warm.value

    failure, took, folder, warm_failure = run(scenario())
    assert took < limit + 5
    assert (failure.reason, failure.reason.code, failure.step) == (
        FailureReason.StopTimeout,
        504,
        Step.delete,
    )
    assert failure.message == (
        f'delete waited {limit:g} s for the warmup in flight (node "mid" still in it). The '
        "instance was abandoned and its folder removed; the warmup's thread stays in the "
        "operator process until it returns (the process engine can kill it instead)"
    )
    assert warm_failure.message.startswith("the instance was deleted while its warmup ran")
    assert run(engine.status(k)) is None
    assert not folder.exists()
    assert len(stall.STALLED) == 1  # as the message says: the thread is still blocked


def test_hung_warmups_leave_room_for_other_pipelines(
    engine: InProcessEngine, stall: ModuleType
) -> None:
    """As many hung warmups as the engine runs calls at once (max_concurrency) used to fill
    its pool for good: no other pipeline could be created. Now a healthy one still deploys,
    and the hung ones are deleted, each within the stop timeout."""
    n = engine._settings.max_concurrency
    limit = engine._settings.stop_timeout_s
    stuck = [key() for _ in range(n)]
    k = key()

    async def deploy() -> None:
        await engine.create(k, config(k), "r1")
        await engine.warmup(k)
        await engine.start(k)

    async def scenario() -> list[BaseException | None]:
        for s in stuck:
            await engine.create(s, config(s, "stall"), "r1")
        warming = [asyncio.ensure_future(engine.warmup(s)) for s in stuck]
        await until(lambda: len(stall.STALLED) == n, 60, f"{n} warmups blocked")
        await asyncio.wait_for(deploy(), limit + 30)
        info = await engine.status(k)
        assert info is not None
        assert info.state is InstanceState.Running
        await engine.delete(k)
        began = time.monotonic()
        deleted = await asyncio.gather(*(engine.delete(s) for s in stuck), return_exceptions=True)
        assert time.monotonic() - began < limit + 10
        await asyncio.wait_for(asyncio.gather(*warming, return_exceptions=True), 10)
        return deleted

    deleted = run(scenario())
    assert all(isinstance(d, PipelineFailure) for d in deleted), deleted
    assert {d.reason for d in deleted if isinstance(d, PipelineFailure)} == {
        FailureReason.StopTimeout
    }
    assert all(run(engine.status(s)) is None for s in [*stuck, k])


def test_a_warmup_that_outlives_its_timeout_fails_naming_the_node(
    engine: InProcessEngine, stall: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "warmup_timeout_s", 2.0, raising=False)
    k = key()
    run(engine.create(k, config(k, "stall"), "r1"))
    f = reason_of(asyncio.wait_for(engine.warmup(k), 30))
    assert (f.reason, f.reason.code, f.step) == (FailureReason.WarmupFailed, 500, Step.warmup)
    assert f.message == (
        'warmup did not finish within 2 s (node "mid" still in it). The instance was '
        "abandoned and its folder removed; the warmup's thread stays in the operator process "
        "until it returns (the process engine can kill it instead)"
    )
    assert run(engine.status(k)) is None
    assert not list(engine._settings.workdir.glob(f"{k.juturna_name}_*"))
    run(engine.delete(k))  # what the reconciler does after a failed warmup: nothing left


def test_warmups_beyond_the_bound_of_hung_ones_are_refused(
    engine: InProcessEngine, stall: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hung calls keep their threads; past a bound, new warmups are refused (a 503, retried
    without spending restarts) instead of piling up threads."""
    monkeypatch.setattr(engine, "max_hung_calls", 1, raising=False)
    limit = engine._settings.stop_timeout_s
    hung, k = key(), key()

    async def scenario() -> PipelineFailure:
        await engine.create(hung, config(hung, "stall"), "r1")
        warming = asyncio.ensure_future(engine.warmup(hung))
        await until(lambda: engine.hung_calls() == 1, limit + 30, "the warmup counted as hung")
        await engine.create(k, config(k), "r1")
        with pytest.raises(PipelineFailure) as err:
            await engine.warmup(k)
        await engine.delete(k)
        with pytest.raises(PipelineFailure):
            await engine.delete(hung)
        with pytest.raises(PipelineFailure):
            await warming
        return err.value

    f = run(scenario())
    assert (f.reason, f.reason.code, f.step) == (
        FailureReason.RuntimeUnavailable,
        503,
        Step.warmup,
    )
    assert f.message == (
        f"1 warmup or start still runs in the operator process after {limit:g} s (at most 1 "
        "may; a hung one ends only when it returns or the operator restarts); this warmup is "
        "retried when fewer run"
    )


def test_a_create_stuck_behind_a_full_pool_does_not_hold_up_its_deletion(
    engine: InProcessEngine,
) -> None:
    """Every pool thread busy (here: blocked on purpose), a create waits in the queue; its
    delete gives up after the stop timeout, and the create, once it runs, undoes itself."""
    manager = PipelineManager()
    before = len(manager)
    limit = engine._settings.stop_timeout_s
    gate = threading.Event()
    k = key()

    async def scenario() -> tuple[PipelineFailure, float, BaseException]:
        blockers = [engine._pool.submit(gate.wait, 60) for _ in range(engine._pool._max_workers)]
        creating = asyncio.ensure_future(engine.create(k, config(k), "r1"))
        await asyncio.sleep(0.2)
        began = time.monotonic()
        try:
            with pytest.raises(PipelineFailure) as err:
                await asyncio.wait_for(engine.delete(k), limit + 30)
            took = time.monotonic() - began
        finally:
            gate.set()
        with pytest.raises(PipelineFailure) as created:
            await asyncio.wait_for(creating, 30)
        for blocker in blockers:
            blocker.result(10)
        return err.value, took, created.value

    failure, took, create_failure = run(scenario())
    assert took < limit + 5
    assert (failure.reason, failure.step) == (FailureReason.StopTimeout, Step.delete)
    assert failure.message == (
        f"delete waited {limit:g} s for the create in flight; nothing was registered yet, and "
        "what it makes is deleted"
    )
    assert (create_failure.reason, create_failure.message) == (
        FailureReason.CreateFailed,
        f"{k} was deleted while its create ran",
    )
    assert run(engine.status(k)) is None
    assert len(manager) == before


def test_a_candidate_is_a_second_pipeline_and_its_hung_warmup_leaves_the_folder(
    engine: InProcessEngine, stall: ModuleType
) -> None:
    """A warm swap's two instances on the engine alone: a candidate whose warmup hangs is
    abandoned by its delete, and the Pipeline's folder, which the candidate took over at its
    create, stays with the active instance writing on in it (also when the hung warmup
    returns). A promote needs a started candidate, swaps the slots, and changes nothing when
    repeated."""
    k = key()
    limit = engine._settings.stop_timeout_s
    workdir = engine._settings.workdir

    def folders() -> list[Path]:
        return [p for p in workdir.glob(f"{k.juturna_name}_*") if p.is_dir()]

    def lines() -> int:
        [folder] = folders()
        return len((folder / "out" / "output.jsonl").read_text().splitlines())

    async def scenario() -> PipelineFailure:
        await engine.create(k, config(k, label="A", factor=1), "r1")
        await engine.warmup(k)
        await engine.start(k)
        await engine.create(k.candidate, config(k, "stall", seconds=60), "r2")
        warming = asyncio.ensure_future(engine.warmup(k.candidate))
        await until(lambda: len(stall.STALLED) == 1, 30, "the candidate's warmup blocked")
        with pytest.raises(PipelineFailure) as err:
            await asyncio.wait_for(engine.delete(k.candidate, keep_output=True), limit + 30)
        with pytest.raises(PipelineFailure):
            await asyncio.wait_for(warming, 10)
        return err.value

    failure = run(scenario())
    assert failure.message == (
        f'delete waited {limit:g} s for the warmup in flight (node "mid" still in it). The '
        "instance was abandoned and its folder kept (the Pipeline's other instance writes in "
        "it); the warmup's thread stays in the operator process until it returns (the process "
        "engine can kill it instead)"
    )
    assert run(engine.status(k.candidate)) is None
    before = lines()
    stall.RELEASE.set()  # the hung warmup returns: its pipeline is disposed of, not the folder
    time.sleep(0.5)
    assert lines() > before

    async def swap() -> tuple[str | None, ...]:
        candidate_id = await engine.create(k.candidate, config(k, label="B", factor=1), "r3")
        with pytest.raises(PipelineFailure) as refused:
            await engine.promote(k)
        assert refused.value.reason is FailureReason.NotRunning
        assert refused.value.message == (
            f"the candidate instance of {k} (pipeline {candidate_id}) is Created, not Running: "
            "only a started instance serves the Pipeline"
        )
        await engine.warmup(k.candidate)
        await engine.start(k.candidate)
        ids = [(await engine.status(s)) for s in (k, k.candidate)]
        await engine.promote(k)
        await engine.promote(k)  # the candidate slot holds the retired one: nothing
        now = [(await engine.status(s)) for s in (k, k.candidate)]
        await engine.delete(k.candidate, keep_output=True)
        return tuple(i.pipeline_id if i else None for i in ids + now)

    old, new, active, retired = run(swap())
    assert (active, retired) == (new, old)
    assert run(engine.status(k.candidate)) is None
    before = lines()
    time.sleep(0.3)
    assert lines() > before  # the new instance writes on in the one folder
    run(engine.delete(k))
    assert folders() == []
