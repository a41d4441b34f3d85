"""Warm swaps in milliseconds: the lifecycle's decisions about two instances, driven through
the reconcile loop with the fake engine (two slots) and a clock the test moves.

Each test reads what a user reads (phase, conditions, ``status.update``, Events) and checks
the one invariant of an update: at no moment does the Pipeline have no running instance,
nor two once the drain is over."""

from __future__ import annotations

import asyncio
from typing import Any

from fake_engine import LOG, NODES, UID, FakeEngine, Harness
from juturna_operator.api import DesiredState
from juturna_operator.domain import InstanceState, PipelineKey
from juturna_operator.engines.base import Plan
from juturna_operator.lifecycle import (
    Action,
    Desired,
    FailureRecord,
    Observed,
    SwapPolicy,
    UpdateAttempt,
    UpdateOutcome,
    next_step,
)
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.reconciler import Resource

KEY = PipelineKey("ns", "p", UID)


class SwapEngine(FakeEngine):
    """The fake engine with a candidate slot, and faults for a candidate's steps."""

    def __init__(self) -> None:
        super().__init__(swaps=True)
        self.fail_candidate: list[PipelineFailure] = []  # raised by the next candidate creates
        self.running_seen: list[int] = []  # running instances after each engine call

    def _count(self) -> None:
        running = [i for i in self.instances.values() if i.state is InstanceState.Running]
        self.running_seen.append(len(running))

    async def create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Any
    ) -> str:  # type: ignore[override]
        if key.slot == "candidate" and self.fail_candidate:
            raise self.fail_candidate.pop(0)
        pid = await super().create(key, config, revision, plan)
        if plan.until is not InstanceState.Created:
            await self.warmup(key)
        if plan.until is InstanceState.Running:
            await self.start(key)
        self._count()
        return pid

    async def start(self, key: PipelineKey) -> None:
        await super().start(key)
        self._count()

    async def promote(self, key: PipelineKey) -> None:
        await super().promote(key)
        self._count()

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        await super().delete(key, release, keep_output)
        self._count()

    async def stop(self, key: PipelineKey) -> None:
        await super().stop(key)
        self._count()

    def slot(self, key: PipelineKey) -> tuple[str, str] | None:
        info = self.instances.get(key)
        return None if info is None else (info.state.value, info.revision)


def running_harness(**update: Any) -> Harness:
    h = Harness(SwapEngine())
    h.spec["update"] = {"drainSeconds": 5, **update}
    h.reconcile()
    assert h.status["phase"] == "Running"
    return h


def change(h: Harness, rate: float = 5.0) -> None:
    """A configuration change: a new revision of the pipeline itself."""
    nodes = [dict(NODES[0], configuration={"rate": rate}), NODES[1]]
    h.spec = dict(h.spec, nodes=nodes)
    h.generation += 1


def conditions(h: Harness) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in h.status["conditions"]}


def engine(h: Harness) -> SwapEngine:
    assert isinstance(h.engine, SwapEngine)
    return h.engine


def test_a_change_warms_the_new_revision_beside_the_old_then_switches_and_drains() -> None:
    h = running_harness()
    old = h.status["lastStableRevision"]
    events_before = len(h.events)
    change(h)
    h.reconcile()  # created, warmed up, started, switched: the drain runs
    e = engine(h)
    new = e.instances[KEY].revision
    assert new != old
    assert e.slot(KEY) == ("Running", new)
    assert e.slot(KEY.candidate) == ("Running", old), "the old one drains, still running"
    assert h.status["phase"] == "Running"
    assert conditions(h)["Updating"] == ("True", "Draining")
    assert h.status["update"] == {
        "step": "Draining",
        "revision": new,
        "previousRevision": old,
        "pod": None,
    }
    assert conditions(h)["Ready"] == ("True", "DesiredStateReached")
    h.now += 4.9
    h.reconcile()
    assert e.slot(KEY.candidate) == ("Running", old), "drains for drainSeconds"
    h.now += 0.2
    h.reconcile()
    assert e.slot(KEY.candidate) is None
    assert conditions(h)["Updating"] == ("False", "NotUpdating")
    assert h.status["update"] is None
    assert h.status["lastStableRevision"] == new
    reasons = [r for _, r, _ in h.events[events_before:]]
    assert reasons == ["Draining", "Updated"]
    assert 0 not in e.running_seen, "never no running instance"
    assert e.running_seen[-1] == 1, "one once the drain is over"
    assert h.reconciler._memory[UID].update is None


def test_a_candidate_that_fails_for_good_is_removed_and_the_old_one_serves_on() -> None:
    h = running_harness()
    old = h.status["lastStableRevision"]
    engine(h).fail_candidate = [
        PipelineFailure(FailureReason.InvalidSpec, Step.create, "the API server refuses it")
    ]
    change(h)
    h.reconcile()
    e = engine(h)
    assert e.slot(KEY) == ("Running", old)
    assert e.slot(KEY.candidate) is None
    assert h.status["phase"] == "Running"
    conds = conditions(h)
    assert conds["Running"] == ("True", "Started")
    assert conds["Ready"] == ("False", "UpdateFailed")
    assert conds["Updating"] == ("False", "UpdateFailed")
    assert h.status["failure"] == {
        "reason": "InvalidSpec",
        "code": 422,
        "step": "create",
        "message": "the API server refuses it",
    }
    assert h.status["lastStableRevision"] == old
    assert h.status["restarts"] == 0
    ready = next(c for c in h.status["conditions"] if c["type"] == "Ready")
    assert ready["message"].endswith(f"revision {old} serves on")
    assert ("Warning", "UpdateFailed") in [(k, r) for k, r, _ in h.events]
    # It stays so: no retry, no teardown, until the spec changes.
    h.now += 600
    h.reconcile()
    assert e.slot(KEY) == ("Running", old)
    assert e.slot(KEY.candidate) is None
    change(h, rate=7.0)  # the next change starts a new attempt
    h.reconcile()
    assert e.slot(KEY)[1] != old
    assert conditions(h)["Ready"] == ("True", "DesiredStateReached")


def test_a_transient_candidate_failure_is_retried_within_the_timeout_spending_no_restart() -> None:
    h = running_harness(timeoutSeconds=60)
    h.spec["restartPolicy"] = {"maxRestarts": 0, "backoffSeconds": 2}
    old = h.status["lastStableRevision"]
    flaky = PipelineFailure(FailureReason.WarmupFailed, Step.warmup, 'node "src": model busy')
    engine(h).fail_candidate = [flaky, flaky]
    change(h)
    h.reconcile()
    e = engine(h)
    assert e.slot(KEY) == ("Running", old)
    assert conditions(h)["Updating"][0] == "True"
    updating = next(c for c in h.status["conditions"] if c["type"] == "Updating")
    assert "retried after WarmupFailed" in updating["message"]
    assert h.status["failure"] is None, "the serving Pipeline shows it only under Updating"
    assert h.status["update"]["step"] == "WarmingUpNew"
    h.now += 2
    h.reconcile()  # second failure: backoff 4 s
    h.now += 4
    h.reconcile()
    assert e.slot(KEY)[1] != old
    assert h.status["restarts"] == 0
    assert 0 not in e.running_seen


def test_a_candidate_not_ready_within_the_timeout_is_abandoned_with_the_last_failure() -> None:
    h = running_harness(timeoutSeconds=10)
    h.spec["restartPolicy"] = {"backoffSeconds": 4}
    flaky = PipelineFailure(FailureReason.RuntimeUnavailable, Step.create, "pod went away")
    engine(h).fail_candidate = [flaky] * 10
    change(h)
    for _ in range(6):
        h.reconcile()
        h.now += 4
    assert conditions(h)["Updating"] == ("False", "UpdateFailed")
    failure = h.status["failure"]
    assert failure["reason"] == "RuntimeUnavailable"
    assert failure["code"] == 503
    assert failure["message"].startswith("pod went away (revision ")
    assert failure["message"].endswith(" was not ready within 10 s)")
    assert engine(h).slot(KEY.candidate) is None
    assert h.status["phase"] == "Running"


def test_no_room_for_two_falls_back_to_recreate_by_default_and_aborts_with_none() -> None:
    for fallback, lands in (("Recreate", True), ("None", False)):
        h = running_harness(timeoutSeconds=10, fallback=fallback)
        h.spec["restartPolicy"] = {"backoffSeconds": 4}
        old = h.status["lastStableRevision"]
        unschedulable = PipelineFailure(
            FailureReason.Unschedulable, Step.create, "0/1 nodes are available: 1 Insufficient gpu"
        )
        engine(h).fail_candidate = [unschedulable] * 10
        change(h)
        for _ in range(6):
            h.reconcile()
            h.now += 4
        e = engine(h)
        events = [(k, r) for k, r, _ in h.events]
        if lands:
            assert e.slot(KEY)[1] != old, "the change landed the Recreate way"
            assert ("Warning", "UpdateFallback") in events
            assert conditions(h)["Ready"] == ("True", "DesiredStateReached")
        else:
            assert e.slot(KEY) == ("Running", old)
            assert h.status["failure"]["reason"] == "Unschedulable"
            assert conditions(h)["Ready"] == ("False", "UpdateFailed")


def test_a_second_change_during_a_swap_wins_and_a_revert_cancels() -> None:
    h = running_harness()
    old = h.status["lastStableRevision"]
    e = engine(h)
    # The first change's candidate stays Ready: its start waits (a pass ends at MAX_STEPS
    # in real life; here the engine holds it at Ready by refusing one start).
    change(h, rate=5.0)
    e.fail_start = FailureReason.RuntimeUnavailable
    h.reconcile()
    e.fail_start = None
    assert e.slot(KEY.candidate) is None  # the failed start's candidate went
    change(h, rate=6.0)  # a newer spec
    h.now += 100
    h.reconcile()
    newest = e.slot(KEY)[1]
    assert newest not in (old, None)
    assert e.running_seen.count(0) == 0
    # A revert during a swap: back to the serving revision, the candidate goes.
    e.fail_start = FailureReason.RuntimeUnavailable
    change(h, rate=7.0)
    h.now += 100
    h.reconcile()
    e.fail_start = None
    h.spec = dict(h.spec, nodes=[dict(NODES[0], configuration={"rate": 6.0}), NODES[1]])
    h.generation += 1
    h.now += 100
    h.reconcile()
    assert e.slot(KEY) == ("Running", newest)
    assert e.slot(KEY.candidate) is None
    assert conditions(h)["Ready"] == ("True", "DesiredStateReached")
    assert conditions(h)["Updating"] == ("False", "NotUpdating")


def test_a_deletion_during_a_swap_removes_both() -> None:
    h = running_harness()
    change(h)
    h.reconcile()  # draining: two instances
    e = engine(h)
    assert len(e.instances) == 2
    body = h.body()
    body["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"
    asyncio.run(h.reconciler.finalize(Resource.from_body(body), LOG))
    assert e.instances == {}


def test_an_operator_restart_at_each_step_completes_the_swap() -> None:
    """A new reconciler (a new operator process) with the engine's instances as the old one
    left them and the status it wrote: the swap goes on from where it was."""
    for stop_at in ("WarmingUpNew", "Switching", "Draining"):
        h = running_harness()
        old = h.status["lastStableRevision"]
        e = engine(h)
        change(h)
        if stop_at == "Draining":
            h.reconcile()
        else:
            # Leave the candidate where a killed process would have: warmed up (or started),
            # and the status saying so.
            e.fail_start = FailureReason.RuntimeUnavailable
            h.spec["update"]["timeoutSeconds"] = 600
            mem = h.reconciler._memory[UID]
            h.reconcile()
            e.fail_start = None
            # rebuild the candidate as the killed process had it
            asyncio.run(_candidate(e, h, running=stop_at == "Switching"))
            h.status["update"] = {"step": stop_at, "revision": mem.spec.revision}
        again = Harness(e, status=dict(h.status))
        again.spec, again.generation, again.now = h.spec, h.generation, h.now + 10
        again.reconcile()
        again.now += 10
        again.reconcile()
        new = e.slot(KEY)
        assert new is not None, stop_at
        assert new[1] != old, stop_at
        assert e.slot(KEY.candidate) is None, stop_at
        assert conditions(again)["Ready"] == ("True", "DesiredStateReached"), stop_at
        assert 0 not in e.running_seen, stop_at


async def _candidate(e: SwapEngine, h: Harness, running: bool) -> None:
    spec_nodes = h.spec["nodes"]
    config = {"pipeline": {"name": KEY.juturna_name, "nodes": spec_nodes, "links": []}}
    revision = h.reconciler._memory[UID].spec.revision
    await FakeEngine.create(e, KEY.candidate, config, revision, Plan())
    await FakeEngine.warmup(e, KEY.candidate)
    if running:
        await FakeEngine.start(e, KEY.candidate)


def test_a_change_of_state_alone_never_swaps() -> None:
    h = running_harness()
    h.spec["state"] = "Standby"
    h.generation += 1
    h.reconcile()
    e = engine(h)
    assert e.slot(KEY.candidate) is None
    assert e.created == 1
    assert h.status["phase"] == "Standby"


def test_the_old_instance_dying_during_a_swap_lets_the_candidate_take_over() -> None:
    h = running_harness()
    e = engine(h)
    e.fail_start = FailureReason.RuntimeUnavailable
    change(h)
    h.reconcile()  # the candidate's start fails: it waits for its retry
    e.fail_start = None
    e.crash(KEY)  # meanwhile the old instance's node dies
    h.now += 10
    h.reconcile()  # its failure: the backoff of the instance that served
    assert h.status["failure"]["reason"] == "NodeFailed"
    h.now += 10
    h.reconcile()
    new = e.slot(KEY)
    assert new is not None
    assert new[0] == "Running"
    assert new[1] == h.reconciler._memory[UID].spec.revision
    assert conditions(h)["Ready"] == ("True", "DesiredStateReached")


def test_an_engine_that_cannot_swap_recreates_and_says_why() -> None:
    h = Harness(FakeEngine(swaps=False))
    h.reconcile()
    change(h)
    h.reconcile()
    recreate = [(k, m) for k, r, m in h.events if r == "Recreate"]
    assert recreate == [
        (
            "Normal",
            "the update replaces the instance in place: the fake engine runs one instance "
            "per Pipeline",
        )
    ]
    # Asked for Recreate: no Event, it is what the spec says.
    h2 = Harness(FakeEngine(swaps=True))
    h2.spec["update"] = {"strategy": "Recreate"}
    h2.reconcile()
    change(h2)
    h2.reconcile()
    assert not [r for _, r, _ in h2.events if r == "Recreate"]
    assert KEY.candidate not in h2.engine.instances
    assert h2.engine.created == 2


def test_the_lifecycle_never_spends_restarts_on_a_candidate() -> None:
    """``next_step`` on the states a candidate's failure leaves."""
    desired = Desired(DesiredState.Running, 2, "new", swap=SwapPolicy(timeout_s=60))
    failure = FailureRecord(FailureReason.WarmupFailed, Step.warmup, "busy", 2)
    attempt = UpdateAttempt("new", 2, 0.0, 60.0, failure=failure, retry_at=10.0)
    observed = Observed(InstanceState.Running, "old", validated_generation=2, update=attempt)
    assert next_step(desired, observed, 5.0) is Action.Wait
    assert next_step(desired, observed, 10.0) is Action.RetryCandidate
    assert next_step(desired, observed, 60.0) is Action.AbortUpdate
    aborted = Observed(
        InstanceState.Running,
        "old",
        validated_generation=2,
        update=UpdateAttempt("new", 2, 0.0, 60.0, failure=failure, outcome=UpdateOutcome.Aborted),
    )
    assert next_step(desired, aborted, 61.0) is Action.Nothing


def test_the_engine_is_asked_how_a_change_lands_once_per_generation() -> None:
    """Health passes come every few seconds for every Pipeline: the engine's answer is kept
    for the generation (and its listeners), asked again only after a spec change."""
    h = running_harness()
    e = engine(h)
    asked = e.swap_asked
    for _ in range(5):
        h.now += 10
        h.reconcile()
    assert e.swap_asked == asked
    change(h)
    h.reconcile()
    assert e.swap_asked > asked


class SlowCandidateEngine(SwapEngine):
    """A candidate whose create (pod start, model load) outlives the progress threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_during: list[dict[str, Any]] = []

    async def create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Any
    ) -> str:  # type: ignore[override]
        if key.slot == "candidate":
            self.pods[key] = "p-new"
            await asyncio.sleep(0.3)
        return await super().create(key, config, revision, plan)


def test_a_long_warmup_shows_the_pod_being_prepared_and_posts_its_event_as_it_begins() -> None:
    """Status and Events tell the truth while the new revision warms up, not only after:
    ``status.update`` names the step and the pod being prepared, and ``WarmingUpNew`` is
    posted as the step begins."""
    h = Harness(SlowCandidateEngine())
    h.spec["update"] = {"drainSeconds": 5}
    h.reconcile()
    old = h.status["lastStableRevision"]
    h.reconciler.settings.progress_threshold_s = 0.05
    writes_before, events_before = len(h.writes), len(h.events)
    change(h)
    h.reconcile()
    during = [w for w in h.writes[writes_before:] if (w.get("update") or {}).get("pod")]
    assert during, h.writes[writes_before:]
    assert during[0]["update"] == {
        "step": "WarmingUpNew",
        "revision": engine(h).instances[KEY].revision,
        "previousRevision": old,
        "pod": {"name": "p-new", "node": None},
    }
    assert during[0]["phase"] == "Running", "the phase is the serving instance's"
    ready = next(c for c in during[0]["conditions"] if c["type"] == "Ready")
    assert (ready["reason"], ready["message"]) == (
        "Progressing",
        f"moving toward Running: revision {during[0]['update']['revision']} is warming up "
        f"beside {old}",
    )
    reasons = [r for _, r, _ in h.events[events_before:]]
    assert reasons == ["WarmingUpNew", "Draining"]
    warming = h.events[events_before][2]
    assert warming.startswith(f"revision {during[0]['update']['revision']} warms up in pod p-new")


def test_after_an_aborted_update_the_revision_that_ran_is_restored_if_its_instance_goes() -> None:
    """The update failed (4xx) and the old instance served on; then it went (its pod died).
    What ran is deployed again, not the revision that failed: the stream comes back, and
    Ready stays False with UpdateFailed (the spec's revision still does not run)."""
    h = running_harness()
    old = h.status["lastStableRevision"]
    e = engine(h)
    e.fail_candidate = [
        PipelineFailure(FailureReason.PluginNotFound, Step.validate, 'plugin "nope" not found')
    ]
    change(h)
    h.reconcile()
    assert conditions(h)["Updating"] == ("False", "UpdateFailed")
    new = h.reconciler._memory[UID].spec.revision
    assert new != old
    e.instances.pop(KEY)  # the old instance is gone (its pod died)
    h.reconcile()
    h.now += 60  # any backoff
    h.reconcile()
    assert e.slot(KEY) == ("Running", old), "what ran, deployed again"
    assert e.slot(KEY.candidate) is None
    assert h.status["phase"] == "Running"
    assert conditions(h)["Ready"] == ("False", "UpdateFailed")
    assert h.status["lastStableRevision"] == old
    assert h.status["failure"]["reason"] == "PluginNotFound"
    restored = [m for _, r, m in h.events if r == "RestoredStable"]
    assert restored == [
        f"the instance of revision {old} went after the update to revision {new} had failed "
        f'(PluginNotFound: plugin "nope" not found): revision {old} deployed again '
        "(instance id-2)"  # the failed candidate got no instance
    ]
    # It stays so; the next change starts a new attempt from what runs.
    h.now += 600
    h.reconcile()
    assert e.slot(KEY) == ("Running", old)
    change(h, rate=9.0)
    h.reconcile()
    assert e.slot(KEY)[1] not in (old, new)
    assert conditions(h)["Ready"] == ("True", "DesiredStateReached")


def test_engines_beside_the_operator_swap_only_what_listens_on_no_port() -> None:
    """The reason a local engine gives for a Recreate names each port two instances would
    both bind; a Pipeline that listens on none is swapped."""
    from juturna_operator.engines.base import listening_here
    from juturna_operator.listening import Listener

    assert listening_here(Plan()) is None
    listeners = (Listener("web", "http", 9000, "TCP"), Listener("rtp", "rtp", 20002, "UDP"))
    assert listening_here(Plan(listeners=listeners)) == (
        "runs a Pipeline that listens (TCP 9000, UDP 20002) on this machine's ports: two "
        "instances would collide"
    )


def test_records_of_a_killed_promote_put_each_instance_in_one_slot() -> None:
    """What a local engine's records say after an operator kill (``place_slots`` without a
    Service): the later active mark serves, the other is retired; a candidate never
    promoted stays a candidate; a third instance is a stray; an older record, with no mark,
    is the active one."""
    from juturna_operator.domain import Slot
    from juturna_operator.engines.base import place_slots

    def place(*records: tuple[str, str, int, int]) -> tuple[Any, ...]:
        placed = place_slots(records, lambda r: r[1], lambda r: r[2], lambda r: r[3])
        active, candidate = (r[0] if r else None for r in (placed.active, placed.candidate))
        strays = tuple(r[0] for r in placed.strays)
        return active, candidate, placed.mark(Slot.candidate), strays

    # Killed between the promote's two writes: both marked active, the new one later.
    assert place(("old", "active", 0, 1), ("new", "active", 5, 2)) == (
        "new",
        "old",
        "retired",
        (),
    )
    assert place(("old", "retired", 0, 1), ("new", "active", 5, 2)) == (
        "new",
        "old",
        "retired",
        (),
    )
    # Killed during the warmup: the candidate stays one.
    assert place(("old", "active", 0, 1), ("new", "candidate", 0, 2)) == (
        "old",
        "new",
        "candidate",
        (),
    )
    # A candidate beside a retired one (a new change during a drain) wins the slot.
    assert place(("a", "active", 3, 1), ("b", "retired", 0, 2), ("c", "candidate", 0, 3)) == (
        "a",
        "c",
        "candidate",
        ("b",),
    )
