"""What the process engine promises with many pipelines per process (a shard: a worker of
``pipelines_per_process`` > 1): one namespace per shard, one call to deploy, one health call
per shard, adoption after a restart, and each failure kept to what it concerns (a node: its
pipeline; a shard: its pipelines; a hung stop: bounded)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import time
import tracemalloc
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import pid_alive, processes_mentioning

from juturna_operator.api import PipelineSpec
from juturna_operator.domain import WHOLE_RUNTIME, InstanceState, PipelineKey
from juturna_operator.engines import base
from juturna_operator.engines.base import InstanceInfo, Plan
from juturna_operator.engines.client import listed_name
from juturna_operator.engines.process import ProcessEngine
from juturna_operator.engines.workers import pipeline_named
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import Settings
from support import PLUGIN_ROOTS, answered_size, chain, nodes, wait_until

RUNNING = Plan(until=InstanceState.Running)
TICKER = (
    ("src", "source", "ticker", {"rate": 20}),
    ("amp", "proc", "scale", {}),
    ("out", "sink", "jsonl", {}),
)


Specs = tuple[tuple[str, str, str, dict[str, Any]], ...]


def through(name: str, mark: str, configuration: dict[str, Any], rate: float = 20) -> Specs:
    """A ticker, then the proc node ``name`` (``mark``: one of the faulty plugin's), then a
    sink."""
    return (
        ("src", "source", "ticker", {"rate": rate}),
        (name, "proc", mark, configuration),
        ("out", "sink", "jsonl", {}),
    )


def counted(seconds: float) -> Specs:
    """A pipeline whose warmup takes ``seconds`` (a model load), noting each in warmups.log."""
    return through("mid", "counted", {"seconds": seconds, "fail": ""})


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    """Shards of three, in a workdir of this test's own. Teardown proves no shard of it is
    left (and ends, by PID, any that is, before failing)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    yield Settings(
        plugin_roots=PLUGIN_ROOTS, workdir=workdir, stop_timeout_s=2, pipelines_per_process=3
    )
    left = processes_mentioning(f"--folder {workdir} ")
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"worker processes left behind: {left}"


def key_in(namespace: str) -> PipelineKey:
    return PipelineKey(namespace, f"p-{uuid.uuid4().hex[:6]}", str(uuid.uuid4()))


def config_of(key: PipelineKey, specs: tuple[tuple[str, str, str, dict[str, Any]], ...]) -> dict:
    spec = PipelineSpec.model_validate(
        {
            "plugins": ["tones", "faulty"],
            "nodes": nodes(*specs),
            "links": chain(*(name for name, *_ in specs)),
        }
    )
    return spec.to_juturna_config(key.juturna_name)


def shard_of(key: PipelineKey, workdir: Path) -> str:
    return str(
        json.loads((workdir / ".workers" / "pipelines" / f"{key.uid}.json").read_text())["worker"]
    )


def shard_request(workdir: Path, shard: str, path: str, body: Any = None) -> Any:
    """A request to a shard's own HTTP API with its token, as the engine makes them."""
    state = workdir / ".workers"
    port = json.loads((state / f"{shard}.json").read_text())["port"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {(state / f'{shard}.token').read_text().strip()}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def named_on_shard(workdir: Path, shard: str, key: PipelineKey) -> list[str]:
    """The ids of the pipelines the shard runs under ``key``'s name."""
    health = shard_request(workdir, shard, "/operator/health")
    return [
        pipeline_id
        for entry in health["pipelines"]
        for pipeline_id, status in entry.items()
        if listed_name(pipeline_id, status) == key.juturna_name
    ]


def shard_pids(workdir: Path) -> list[int]:
    return sorted(processes_mentioning(f"--folder {workdir} "))


def output_of(workdir: Path, key: PipelineKey, pipeline_id: str) -> Path:
    return workdir / f"{key.juturna_name}_{pipeline_id}" / "out" / "output.jsonl"


async def deploy(engine: ProcessEngine, key: PipelineKey, specs: Any = TICKER) -> str:
    return await engine.create(key, config_of(key, specs), "r1", RUNNING)


class Driven:
    """A dense process engine driven from a test, with the keys it deployed: ``end`` deletes them,
    sweeps and closes the engine."""

    def __init__(self, settings: Settings) -> None:
        self.runner = asyncio.Runner()
        self.engine = self.runner.run(self._make(settings))
        self.keys: list[PipelineKey] = []
        self.ended = False

    @staticmethod
    async def _make(settings: Settings) -> ProcessEngine:
        return ProcessEngine(settings)

    def run(self, coroutine: Any) -> Any:
        return self.runner.run(coroutine)

    def deploy(self, *keys: PipelineKey, specs: Any = TICKER) -> dict[PipelineKey, InstanceInfo]:
        """Deploy ``keys`` at once, to Running; their status."""
        self.keys.extend(keys)

        async def all_of() -> dict[PipelineKey, InstanceInfo]:
            await asyncio.gather(*(deploy(self.engine, k, specs) for k in keys))
            infos = {k: await self.engine.status(k) for k in keys}
            return {k: i for k, i in infos.items() if i is not None}

        infos: dict[PipelineKey, InstanceInfo] = self.run(all_of())
        assert set(infos) == set(keys)
        return infos

    def status(self, key: PipelineKey) -> InstanceInfo | None:
        info: InstanceInfo | None = self.run(self.engine.status(key))
        return info

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True

        async def end() -> None:
            for k in self.keys:
                await self.engine.delete(k)
            await self.engine.sweep({})
            await self.engine.close()

        try:
            self.run(end())
        finally:
            self.runner.close()


@pytest.fixture
def driven(settings: Settings) -> Iterator[Driven]:
    d = Driven(settings)
    try:
        yield d
    finally:
        d.end()


def crashed(driven: Driven, key: PipelineKey) -> bool:
    info = driven.status(key)
    return info is not None and bool(info.crashes)


def assert_unharmed(driven: Driven, key: PipelineKey) -> None:
    """``key``'s pipeline (of ``TICKER``) runs on: no crash, each node Running."""
    info = driven.status(key)
    assert info is not None
    assert info.state is InstanceState.Running
    assert info.crashes == []
    assert info.nodes == {"src": "Running", "amp": "Running", "out": "Running"}


def deploy_in_flight(driven: Driven, key: PipelineKey, workdir: Path) -> asyncio.Task[str]:
    """A deploy of ``key`` whose warmup takes 3 s, under way on ``driven``'s loop: returned
    once that warmup has begun in its shard."""
    in_flight = driven.runner.get_loop().create_task(deploy(driven.engine, key, counted(3)))
    driven.keys.append(key)

    def warming() -> bool:
        driven.run(asyncio.sleep(0.05))  # lets the engine's deploy go out
        return bool(list(workdir.glob(f"{key.juturna_name}_*/mid/warmups.log")))

    wait_until(warming, 20, "the slow warmup begun")
    return in_flight


def wait_for_output(workdir: Path, infos: dict[PipelineKey, InstanceInfo]) -> None:
    for k, info in infos.items():
        path = output_of(workdir, k, info.pipeline_id)
        wait_until(path.exists, 10, f"{k}'s output")


def test_pipelines_fill_shards_of_their_own_namespace_and_run(
    settings: Settings, driven: Driven
) -> None:
    """Five pipelines of one namespace fill two shards of three; two of another namespace
    get a shard of their own. Each reaches Running with one deploy; deleted, they leave
    nothing: no folder, no record, no shard."""
    a = [key_in("a") for _ in range(5)]
    b = [key_in("b") for _ in range(2)]
    infos = driven.deploy(*a, *b)
    wait_for_output(settings.workdir, infos)
    shards: dict[str, list[PipelineKey]] = {}
    for k in a + b:
        shards.setdefault(shard_of(k, settings.workdir), []).append(k)
    assert sorted(len(keys) for keys in shards.values()) == [2, 2, 3]
    for keys in shards.values():
        assert len({k.namespace for k in keys}) == 1, "a shard ran two namespaces' pipelines"
    assert len(shard_pids(settings.workdir)) == 3
    for info in infos.values():
        assert info.state is InstanceState.Running
        assert info.nodes == {"src": "Running", "amp": "Running", "out": "Running"}
        assert info.crashes == []
    driven.end()
    assert shard_pids(settings.workdir) == []
    assert not list(settings.workdir.glob("*_*")), "a pipeline folder was left"
    assert not list((settings.workdir / ".workers").glob("*.json"))
    assert not list((settings.workdir / ".workers" / "pipelines").glob("*.json"))


def test_a_node_that_raises_fails_its_own_pipeline_only(settings: Settings, driven: Driven) -> None:
    """Two pipelines in one shard; a node of one raises at runtime: only that pipeline's
    status names the crash (the shard's health route says whose node died)."""
    calm, crashing = key_in("a"), key_in("a")
    crasher = through("mid", "crasher", {"after": 3})
    driven.deploy(calm)
    driven.deploy(crashing, specs=crasher)
    assert shard_of(calm, settings.workdir) == shard_of(crashing, settings.workdir)

    wait_until(lambda: crashed(driven, crashing), 10, "the crash seen")
    info = driven.status(crashing)
    assert info is not None
    assert [(c.node, c.error) for c in info.crashes] == [("mid", "RuntimeError: kaboom in mid")]
    assert info.nodes["mid"] == "Failed"
    assert_unharmed(driven, calm)


def test_a_killed_shard_fails_each_of_its_pipelines_naming_it_and_the_others_run_on(
    settings: Settings, driven: Driven
) -> None:
    """SIGKILL to one shard: each of its pipelines reports the shard's death and how many
    pipelines it took; the other shard's pipelines run on. A redeploy (what the restart
    policy does: delete keeping the output, then create) lands on a live shard and keeps
    the output the pipeline had written."""
    keys = [key_in("a") for _ in range(4)]  # shards of three: 3 + 1
    infos = driven.deploy(*keys)
    wait_for_output(settings.workdir, infos)
    by_shard: dict[str, list[PipelineKey]] = {}
    for k in keys:
        by_shard.setdefault(shard_of(k, settings.workdir), []).append(k)
    victims = max(by_shard.values(), key=len)
    [survivor] = min(by_shard.values(), key=len)
    [pid] = processes_mentioning(f"--owner {shard_of(victims[0], settings.workdir)} ")
    written = output_of(settings.workdir, victims[0], infos[victims[0]].pipeline_id)
    wait_until(lambda: len(written.read_text().splitlines()) >= 3, 10, "some output")
    before = written.read_text().splitlines()
    os.kill(pid, signal.SIGKILL)

    def dead(k: PipelineKey) -> bool:
        info = driven.status(k)
        return info is not None and bool(info.crashes)

    wait_until(lambda: all(dead(k) for k in victims), 10, "the shard's death seen")
    for k in victims:
        info = driven.status(k)
        assert info is not None
        [crash] = info.crashes
        assert crash.node == WHOLE_RUNTIME
        assert crash.error == f"worker process {pid} was killed by SIGKILL; it ran 3 pipeline(s)"
    alive = driven.status(survivor)
    assert alive is not None
    assert alive.crashes == []
    assert alive.state is InstanceState.Running

    victim = victims[0]

    async def redeploy() -> str:
        await driven.engine.delete(victim, release=False, keep_output=True)
        return await deploy(driven.engine, victim)

    new_id = driven.run(redeploy())
    assert shard_of(victim, settings.workdir) == shard_of(survivor, settings.workdir)
    carried = output_of(settings.workdir, victim, new_id)
    wait_until(lambda: len(carried.read_text().splitlines()) > len(before), 10, "new output")
    assert carried.read_text().splitlines()[: len(before)] == before


def test_a_restarted_operator_adopts_the_shards_and_deploys_nothing_again(
    settings: Settings, driven: Driven
) -> None:
    """The engine is closed (the operator stops) and another starts on the same folder: it
    adopts every shard and pipeline, with the same ids and processes, including a deploy
    that was still warming up, whose warmup it joins rather than run twice."""
    keys = [key_in("a") for _ in range(4)]
    infos = driven.deploy(*keys)
    slow = key_in("a")
    in_flight = deploy_in_flight(driven, slow, settings.workdir)
    warmups = settings.workdir
    pids = shard_pids(settings.workdir)

    second = Driven(settings)  # the restarted operator
    try:
        for k in keys:
            adopted = second.status(k)
            assert adopted is not None
            assert adopted.pipeline_id == infos[k].pipeline_id
            assert adopted.state is InstanceState.Running
            assert adopted.nodes == {"src": "Running", "amp": "Running", "out": "Running"}
        mid = second.status(slow)
        assert mid is not None
        assert mid.state is InstanceState.Created  # its record still says so

        async def finish() -> InstanceInfo | None:
            await second.engine.warmup(slow)  # joins the warmup in flight
            await second.engine.start(slow)
            return await second.engine.status(slow)

        done = second.run(finish())
        assert done is not None
        assert done.state is InstanceState.Running
        [log] = warmups.glob(f"{slow.juturna_name}_*/mid/warmups.log")
        assert log.read_text().splitlines() == ["begin built=1", "end built=1"]
        assert shard_pids(settings.workdir) == pids, "a shard was started or lost"
        driven.run(asyncio.wait([in_flight]))  # the first engine's call, answered
        second.keys = [*keys, slow]
    finally:
        second.end()
        driven.keys.clear()  # the second engine deleted them
        driven.end()
    assert shard_pids(settings.workdir) == []


def test_the_records_the_shard_engine_left_are_adopted(settings: Settings, driven: Driven) -> None:
    """An operator of the version before one engine served both densities ran engine
    ``shard``: its records (``.shards/<shard>.json``, its token and log, and
    ``.shards/pipelines/<uid>.json`` naming the shard) are read in by the process engine at
    start. Every pipeline is adopted, with the same ids, on the same process; ``.shards``
    goes."""
    keys = [key_in("a") for _ in range(2)]
    infos = driven.deploy(*keys)
    pids = shard_pids(settings.workdir)
    assert len(pids) == 1
    driven.run(driven.engine.close())  # the old operator stops; its shard runs on
    driven.ended = True
    driven.runner.close()
    state, old = settings.workdir / ".workers", settings.workdir / ".shards"
    (old / "pipelines").mkdir(parents=True)
    for path in (state / "pipelines").glob("*.json"):
        record = json.loads(path.read_text())
        record["shard"] = record.pop("worker")
        (old / "pipelines" / path.name).write_text(json.dumps(record))
        path.unlink()
    for path in state.iterdir():
        if path.is_file() and not path.name.startswith("zygote"):
            path.replace(old / path.name)

    second = Driven(settings)  # the new version's operator
    try:
        second.keys = keys
        for k in keys:
            adopted = second.status(k)
            assert adopted is not None
            assert adopted.pipeline_id == infos[k].pipeline_id
            assert adopted.state is InstanceState.Running
            assert adopted.crashes == []
        assert shard_pids(settings.workdir) == pids, "a shard was started or lost"
        assert not old.exists()
    finally:
        second.end()
    assert shard_pids(settings.workdir) == []


def test_a_stop_that_hangs_is_bounded_and_its_shard_ends_when_the_others_leave(
    settings: Settings, driven: Driven
) -> None:
    """A sink that never returns makes the stop hang: StopTimeout after the stop timeout,
    naming the shard; the pipeline is left there, the shard takes no new pipeline, and it
    ends once its other pipeline is deleted."""
    hanging = (
        ("src", "source", "ticker", {"rate": 2000}),
        ("out", "sink", "hang", {}),
    )
    stuck, other = key_in("a"), key_in("a")
    stuck_id = driven.deploy(stuck, specs=hanging)[stuck].pipeline_id
    driven.deploy(other)
    shard = shard_of(stuck, settings.workdir)
    [pid] = processes_mentioning(f"--owner {shard} ")
    time.sleep(3)  # 2000 messages a second fill both 999-message queues: stop blocks
    began = time.monotonic()
    with pytest.raises(PipelineFailure) as raised:
        driven.run(driven.engine.stop(stuck))
    took = time.monotonic() - began
    assert raised.value.reason is FailureReason.StopTimeout
    assert raised.value.message == (
        f"stop did not finish within 2 s; pipeline {stuck_id} is left "
        f"stuck in worker process {pid}, which takes no new pipelines and is ended once its "
        "1 other pipeline(s) have left"
    )
    assert took < 2 + 3, took
    assert driven.status(stuck) is None  # nothing the lifecycle could act on is left
    later = key_in("a")
    driven.deploy(later)
    assert shard_of(later, settings.workdir) != shard
    driven.run(driven.engine.delete(other))
    wait_until(lambda: pid not in shard_pids(settings.workdir), 10, "the stuck shard ended")


def test_a_shard_that_stops_answering_is_a_failure_naming_it_and_is_ended(
    settings: Settings, driven: Driven
) -> None:
    """A shard stopped (SIGSTOP: it runs, and answers nothing) keeps its pipelines' last
    known state through two missed health checks; the third makes each of them a failure
    naming the shard, and the delete that the restart policy makes ends the shard."""
    keys = [key_in("a"), key_in("a")]
    driven.deploy(*keys)
    [pid] = processes_mentioning(f"--owner {shard_of(keys[0], settings.workdir)} ")
    os.kill(pid, signal.SIGSTOP)
    try:
        seen: list[InstanceInfo | None] = []

        def stuck() -> bool:
            seen.append(driven.status(keys[0]))
            return bool(seen[-1] and seen[-1].crashes)

        wait_until(stuck, 30, "the stuck shard seen")
        assert len(seen) >= 3, "fewer than three health checks made it a failure"
        first = seen[0]
        assert first is not None
        assert first.crashes == []  # a miss: the last known state stands
        assert first.nodes == {"src": "Running", "amp": "Running", "out": "Running"}
        last = seen[-1]
        assert last is not None
        [crash] = last.crashes
        assert crash.node == WHOLE_RUNTIME
        assert crash.error.startswith(
            f"worker process {pid} runs but gave no answer to 3 health checks in a row (the last: "
        )
        driven.run(driven.engine.delete(keys[0], release=False, keep_output=True))
        wait_until(lambda: pid not in shard_pids(settings.workdir), 10, "the stuck shard ended")
        other = driven.status(keys[1])
        assert other is not None
        assert other.crashes  # its shard is gone: its own failure, then its redeploy
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_a_helper_thread_that_raises_fails_its_own_pipeline_only(
    settings: Settings, driven: Driven
) -> None:
    """Round 3, item 8: a thread a plugin starts of its own (in its ``start()``, and one that
    thread starts) that raises is a crash of that plugin's node and pipeline, found by where
    the thread was started and by thread ancestry. The shard's other pipeline, and one placed
    there after the crashed one is deleted, see no crash."""
    helper = through("amp", "helper", {"after": 0.5, "depth": 1})
    calm, helped = key_in("a"), key_in("a")
    driven.deploy(calm)
    driven.deploy(helped, specs=helper)
    shard = shard_of(calm, settings.workdir)
    assert shard_of(helped, settings.workdir) == shard
    wait_until(lambda: crashed(driven, helped), 10, "the helper's crash seen")
    assert_unharmed(driven, calm)
    info = driven.status(helped)
    assert info is not None
    assert [(c.node, c.thread, c.error) for c in info.crashes] == [
        ("amp", "helper-amp", "RuntimeError: helper of amp failed")
    ]
    assert info.nodes["amp"] == "Failed"
    driven.run(driven.engine.delete(helped))
    driven.keys.remove(helped)
    later = key_in("a")
    driven.deploy(later)
    assert shard_of(later, settings.workdir) == shard
    for k in (later, calm):
        assert_unharmed(driven, k)


def retained(workdir: Path, shard: str) -> dict[str, Any]:
    kept: dict[str, Any] = shard_request(workdir, shard, "/operator/retained")
    return kept


def test_a_deleted_pipeline_leaves_nothing_in_its_shard(settings: Settings, driven: Driven) -> None:
    """Round 3, item 14: a shard lives on through many pipelines, so each deleted one takes
    what the shard kept of it: its crashes (sent in every health answer), its start lock and
    Juturna's loggers of its name. What the shard's remaining pipeline has stays."""
    crasher = through("mid", "crasher", {"after": 3})
    calm = key_in("a")
    gone = [key_in("a"), key_in("a")]
    driven.deploy(calm)
    driven.deploy(*gone, specs=crasher)
    shard = shard_of(calm, settings.workdir)
    assert {shard_of(k, settings.workdir) for k in gone} == {shard}
    wait_until(lambda: all(crashed(driven, k) for k in gone), 10, "both crashes seen")
    before = retained(settings.workdir, shard)
    assert (before["pipelines"], before["crashes"], before["start_locks"]) == (3, 2, 3)
    for k in (calm, *gone):
        assert f"jt.{k.juturna_name}" in before["loggers"]
    for k in gone:
        driven.run(driven.engine.delete(k))
        driven.keys.remove(k)
    after = retained(settings.workdir, shard)
    assert (after["pipelines"], after["crashes"], after["start_locks"]) == (1, 0, 1)
    assert shard_request(settings.workdir, shard, "/operator/health")["crashes"] == []
    left = [name for name in after["loggers"] if any(k.juturna_name in name for k in gone)]
    assert left == [], "loggers of deleted pipelines are kept"
    assert {f"jt.{calm.juturna_name}", f"jt.{calm.juturna_name}.amp"} <= set(after["loggers"])
    assert_unharmed(driven, calm)


def test_a_program_a_deleted_pipelines_node_started_ends_with_it(
    settings: Settings, driven: Driven
) -> None:
    """Item 10 on shards: a program that a node starts and never ends (here a plugin's
    ``sleep``; ffmpeg, for Juturna's media nodes) ends when its pipeline is deleted from a
    shard that lives on for its other pipelines, instead of when the shard ends."""
    spawner = through("spawner", "spawner", {"seconds": 600}, rate=4)
    calm, spawns = key_in("a"), key_in("a")
    driven.deploy(calm)
    pipeline_id = driven.deploy(spawns, specs=spawner)[spawns].pipeline_id
    shard = shard_of(calm, settings.workdir)
    assert shard_of(spawns, settings.workdir) == shard
    child_pid = settings.workdir / f"{spawns.juturna_name}_{pipeline_id}" / "spawner" / "child.pid"
    wait_until(child_pid.exists, 10, "the node's program")
    program = int(child_pid.read_text())
    assert pid_alive(program)
    [pid] = processes_mentioning(f"--owner {shard} ")
    driven.run(driven.engine.delete(spawns))
    driven.keys.remove(spawns)
    wait_until(lambda: not pid_alive(program), 10, f"the node's program {program} ended")
    assert pid_alive(pid)  # the shard runs on
    assert retained(settings.workdir, shard)["programs"] == 0
    assert_unharmed(driven, calm)


def test_a_deploy_whose_answer_is_lost_leaves_no_pipeline_behind(
    settings: Settings, driven: Driven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 3, item 9: a deploy that gives no answer in time has built its pipeline all the
    same. The engine finds it by its name and holds it, so the delete that follows the
    failure (the reconciler's discard) removes it, and the retry leaves one pipeline, not
    two; deleted, none."""
    calm, slow = key_in("a"), key_in("a")
    driven.deploy(calm)
    shard = shard_of(calm, settings.workdir)
    [pid] = processes_mentioning(f"--owner {shard} ")
    port = json.loads((settings.workdir / ".workers" / f"{shard}.json").read_text())["port"]
    monkeypatch.setattr(base, "WARMUP_TIMEOUT_S", 1.0)
    driven.keys.append(slow)
    with pytest.raises(PipelineFailure) as raised:
        driven.run(deploy(driven.engine, slow, counted(3)))
    [built] = named_on_shard(settings.workdir, shard, slow)
    assert raised.value.reason is FailureReason.RuntimeUnavailable
    assert raised.value.message == (
        f"http://127.0.0.1:{port}/operator/deploy gave no answer within 1 s; worker process "
        f"{pid} built pipeline {built} all the same, which goes with this failed attempt"
    )
    held = driven.status(slow)
    assert held is not None
    assert held.pipeline_id == built
    monkeypatch.undo()
    # What the reconciler does after a failed create: discard the instance, deploy again.
    driven.run(driven.engine.delete(slow, release=False, keep_output=True))
    assert named_on_shard(settings.workdir, shard, slow) == []
    again = driven.run(deploy(driven.engine, slow))
    assert named_on_shard(settings.workdir, shard, slow) == [again]
    driven.run(driven.engine.delete(slow))
    driven.keys.remove(slow)
    assert named_on_shard(settings.workdir, shard, slow) == []


def test_the_sweep_removes_pipelines_the_engine_does_not_hold_from_live_shards(
    settings: Settings, driven: Driven
) -> None:
    """Round 3, item 9: a pipeline in a live shard that no record of the engine holds (a
    deploy whose answer was lost before it could be found) is removed by the sweep, its
    folder too; the shard's own pipeline runs on."""
    calm, lost = key_in("a"), key_in("a")
    calm_id = driven.deploy(calm)[calm].pipeline_id
    shard = shard_of(calm, settings.workdir)
    ghost = shard_request(
        settings.workdir,
        shard,
        "/operator/deploy",
        {"config": config_of(lost, TICKER), "until": "Running"},
    )["pipeline_id"]
    assert named_on_shard(settings.workdir, shard, lost) == [ghost]
    removed = driven.run(driven.engine.sweep({calm.juturna_name: calm_id}))
    assert removed == [ghost]
    assert named_on_shard(settings.workdir, shard, lost) == []
    assert not list(settings.workdir.glob(f"{lost.juturna_name}_*"))
    assert_unharmed(driven, calm)
    assert named_on_shard(settings.workdir, shard, calm) == [calm_id]


@pytest.mark.parametrize("close_wait_s", [10.0, 0.5], ids=["waited", "bounded"])
def test_an_operator_stopped_during_a_deploy_leaves_one_pipeline_for_the_next(
    settings: Settings, driven: Driven, close_wait_s: float
) -> None:
    """Round 3, item 9: the operator stops (SIGTERM: the engine is closed, then its event
    loop ends, cancelling what is still in flight) while a deploy warms up. ``close()`` lets
    the deploy finish within its bound; a deploy that outlasts the bound keeps its record.
    Either way the next operator process finds the one pipeline, and deploys none again."""
    calm, slow = key_in("a"), key_in("a")
    driven.deploy(calm)
    driven.engine.close_wait_s = close_wait_s
    in_flight = deploy_in_flight(driven, slow, settings.workdir)
    shard = shard_of(slow, settings.workdir)
    began = time.monotonic()
    driven.run(driven.engine.close())
    took = time.monotonic() - began
    driven.ended = True
    driven.runner.close()  # the operator's loop ends: what is still in flight is cancelled
    assert took < close_wait_s + 1.5, took
    [built] = named_on_shard(settings.workdir, shard, slow)
    record = json.loads(
        (settings.workdir / ".workers" / "pipelines" / f"{slow.uid}.json").read_text()
    )
    if close_wait_s > 3:  # the deploy ended within close(), and saved its outcome
        assert in_flight.result() == built
        assert (record["pipeline_id"], record["state"]) == (built, "Running")
    else:  # cut short (its connection closed): its record is kept as it was, without an id
        assert in_flight.cancelled() or isinstance(in_flight.exception(), PipelineFailure)
        assert (record["pipeline_id"], record["state"]) == ("", "Created")
    second = Driven(settings)  # the restarted operator
    second.keys = [calm, slow]
    try:
        adopted = second.status(slow)
        assert adopted is not None
        assert adopted.pipeline_id == built
        if adopted.state is not InstanceState.Running:
            assert close_wait_s < 3  # only a close that gave up before the warmup ended

            async def finish() -> None:
                await second.engine.warmup(slow)  # joins the warmup in flight
                await second.engine.start(slow)

            second.run(finish())
        running = second.status(slow)
        assert running is not None
        assert running.state is InstanceState.Running
        assert named_on_shard(settings.workdir, shard, slow) == [built]
    finally:
        second.end()


def test_a_thread_that_dies_after_its_pipeline_is_deleted_leaves_no_crash(
    settings: Settings, driven: Driven
) -> None:
    """Round 3, item 14: a thread of a deleted pipeline that outlives it and then raises (a
    helper still sleeping when the pipeline was stopped) is logged by its shard, and kept
    nowhere: the shard's crash list holds no entry for a pipeline it no longer runs."""
    late = through("amp", "helper", {"after": 1.5, "depth": 0})
    calm, gone = key_in("a"), key_in("a")
    driven.deploy(calm)
    driven.deploy(gone, specs=late)
    shard = shard_of(calm, settings.workdir)
    driven.run(driven.engine.delete(gone))  # before its helper raises
    driven.keys.remove(gone)
    shard_log = settings.workdir / ".workers" / f"{shard}.log"
    wait_until(lambda: "helper of amp failed" in shard_log.read_text(), 10, "the late crash")
    assert shard_request(settings.workdir, shard, "/operator/health")["crashes"] == []
    assert retained(settings.workdir, shard)["crashes"] == 0


# A node that dies with a 60 MB message at its first message: the worker's health route
# repeats the message, so the shard's health answer is that large.
LOUD = (
    ("src", "source", "ticker", {"rate": 20}),
    ("loud", "proc", "crasher", {"after": 0, "words": 60_000_000}),
    ("out", "sink", "jsonl", {}),
)


def test_a_health_answer_over_the_cap_fails_the_shards_pipelines_reading_none_of_it(
    settings: Settings, driven: Driven, caplog: pytest.LogCaptureFixture
) -> None:
    """A shard's health answer grows to 60 MB: each pipeline of that shard fails with
    AnswerTooLarge naming the shard, the answer's size and the cap, and this process (the
    operator's engine) holds none of the answer at any moment. The shard takes no new
    pipeline, ends with the first redeploy, and its pipelines keep naming that cause; another
    namespace's shard runs on. A restarted engine's look for a deploy in flight on that shard
    (``pipeline_named``, at its start) reads none of it either, and the orphan sweep does not
    ask it."""
    calm, loud, other = key_in("a"), key_in("a"), key_in("b")
    driven.deploy(calm, other)
    driven.deploy(loud, specs=LOUD)
    shard = shard_of(loud, settings.workdir)
    assert shard_of(calm, settings.workdir) == shard
    [pid] = processes_mentioning(f"--owner {shard} ")
    port = json.loads((settings.workdir / ".workers" / f"{shard}.json").read_text())["port"]

    def refused() -> bool:
        info = driven.status(loud)
        return info is not None and info.failure is not None

    tracemalloc.start()
    try:
        wait_until(refused, 30, "the oversized health answer refused")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes held while the shard answered 60 MB"
    info = driven.status(loud)
    assert info is not None
    failure = info.failure
    assert failure is not None
    assert (failure.reason, failure.step) == (FailureReason.AnswerTooLarge, Step.run)
    head = f"worker process {pid}, running 2 pipeline(s): http://127.0.0.1:{port}"
    assert answered_size(failure.message, re.escape(f"{head}/operator/health")) > 60e6
    mate = driven.status(calm)
    assert mate is not None
    assert mate.failure is not None
    assert (mate.failure.reason, mate.failure.message) == (failure.reason, failure.message)
    bystander = driven.status(other)
    assert bystander is not None
    assert (bystander.failure, bystander.crashes) == (None, [])
    assert bystander.nodes == {"src": "Running", "amp": "Running", "out": "Running"}

    token = (settings.workdir / ".workers" / f"{shard}.token").read_text()
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, "juturna_operator.engines.workers"):
            found = pipeline_named(port, token, loud.juturna_name)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found is None
    assert peak < 1_000_000, f"{peak} bytes held while looking for a pipeline by its name"
    assert f"cannot look for {loud.juturna_name}: http://127.0.0.1:{port}/operator/health " in (
        caplog.text
    )

    # The orphan sweep asks the refused shard nothing (it would be refused again): it ends
    # with the redeploy, pipelines and all. The other shard is swept as usual.
    caplog.clear()
    with caplog.at_level(logging.WARNING, "juturna_operator.engines.process"):
        keep: dict[str, str | None] = {k.juturna_name: None for k in (calm, loud, other)}
        assert driven.run(driven.engine.sweep(keep)) == []
    asked = [r.getMessage() for r in caplog.records if "over the size cap" in r.getMessage()]
    assert asked == [], asked

    later = key_in("a")
    driven.deploy(later)
    assert shard_of(later, settings.workdir) != shard, "the refused shard took a pipeline"
    driven.run(driven.engine.delete(loud, release=False, keep_output=True))  # a redeploy's
    wait_until(lambda: pid not in shard_pids(settings.workdir), 10, "the refused shard ended")
    mate = driven.status(calm)
    assert mate is not None
    assert mate.failure is not None
    assert mate.failure.message == failure.message  # the cause, not the shard's end


def test_the_teardowns_of_a_refused_shards_pipelines_at_once_all_succeed(
    settings: Settings, driven: Driven
) -> None:
    """The pipelines of a shard whose health answer was refused fail at the same health
    check, and are torn down at once (stop, then delete): each teardown succeeds. The first
    delete ends the shard and closes its client while the other's requests to it may still
    be on their way (a retry after the refused connection): they fail as the runtime's
    absence, which ending it expects, not with httpx's RuntimeError."""
    keys = [key_in("a"), key_in("a")]
    driven.deploy(keys[0])
    driven.deploy(keys[1], specs=LOUD)
    shard = shard_of(keys[0], settings.workdir)
    [pid] = processes_mentioning(f"--owner {shard} ")

    def refused(k: PipelineKey) -> bool:
        info = driven.status(k)
        return info is not None and info.failure is not None

    wait_until(lambda: all(refused(k) for k in keys), 30, "the refusal seen by both")

    async def one(k: PipelineKey) -> None:  # what the lifecycle does with a failed instance
        await driven.engine.stop(k)
        await driven.engine.delete(k, release=False, keep_output=True)

    async def teardown() -> list[BaseException | None]:
        return await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)

    assert driven.run(teardown()) == [None, None]
    wait_until(lambda: pid not in shard_pids(settings.workdir), 10, "the refused shard ended")
    assert [driven.status(k) for k in keys] == [None, None]


def test_a_candidate_is_a_second_pipeline_and_a_promote_survives_a_restart(
    settings: Settings, driven: Driven
) -> None:
    """A warm swap's two instances on the engine alone: the candidate is a second pipeline
    of the resource, with a record of its own. A promote needs a started candidate, swaps the
    slots, and changes nothing when repeated. An engine started after a kill between the
    promote's two record writes (both marked active) adopts the later one as active and the
    other, retired, as the candidate: never two actives."""
    k = key_in("a")
    records = settings.workdir / ".workers" / "pipelines"
    old = driven.deploy(k)[k].pipeline_id
    ready = Plan(until=InstanceState.Ready)
    new = driven.run(driven.engine.create(k.candidate, config_of(k, TICKER), "r2", ready))
    assert len(list(records.glob(f"{k.uid}*.json"))) == 2
    with pytest.raises(PipelineFailure) as refused:
        driven.run(driven.engine.promote(k))
    assert refused.value.reason is FailureReason.NotRunning
    assert refused.value.message.endswith(
        "is Ready, not Running: only a started instance serves the Pipeline"
    )
    driven.run(driven.engine.start(k.candidate))

    def slots(d: Driven) -> tuple[str | None, str | None]:
        a, c = d.status(k), d.status(k.candidate)
        return (a.pipeline_id if a else None, c.pipeline_id if c else None)

    driven.run(driven.engine.promote(k))
    assert slots(driven) == (new, old)
    driven.run(driven.engine.promote(k))  # the candidate slot holds the retired one: nothing
    assert slots(driven) == (new, old)
    # A kill between the promote's writes: the old record still says active (earlier).
    for path in records.glob(f"{k.uid}*.json"):
        record = json.loads(path.read_text())
        if record["pipeline_id"] == old:
            assert record["slot"] == "retired"
            path.write_text(json.dumps(record | {"slot": "active"}))

    second = Driven(settings)  # the restarted operator
    try:
        assert slots(second) == (new, old)
        second.run(second.engine.promote(k))  # adopted retired: never promoted back
        assert slots(second) == (new, old)
        second.run(second.engine.delete(k.candidate, keep_output=True))
        assert slots(second) == (new, None)
        second.keys = [k]
    finally:
        second.end()
        driven.keys.clear()  # the second engine deleted them
        driven.end()
    assert list(records.glob(f"{k.uid}*.json")) == []
