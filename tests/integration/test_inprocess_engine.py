"""The in-process engine on the real PipelineManager: Juturna's own errors, crashes, leaks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from juturna.cli.commands.exceptions import InvalidPipelineIdException, NotRunningException
from juturna.components._pipeline_manager import PipelineManager

from juturna_operator.api import PipelineSpec
from juturna_operator.engines.base import InstanceState, PipelineKey
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
