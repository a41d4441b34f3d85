"""The lifecycle table: every desired/observed pair, failures, backoff, phase and conditions.

"Pitfall N": docs/juturna.md."""

from __future__ import annotations

import pytest

from juturna_operator.api import Condition, ConditionType, DesiredState, Phase
from juturna_operator.domain import InstanceState as I
from juturna_operator.lifecycle import (
    Action,
    Desired,
    FailureRecord,
    Observed,
    backoff_delay,
    conditions,
    desired_reached,
    next_step,
    phase,
)
from juturna_operator.reasons import FailureReason, Step

GEN = 3


def desired(state: DesiredState = DesiredState.Running, **kw: object) -> Desired:
    return Desired(state=state, generation=GEN, revision=f"r{GEN}", **kw)  # type: ignore[arg-type]


def observed(instance: I = I.Absent, gen: int | None = GEN, **kw: object) -> Observed:
    return Observed(
        instance=instance,
        instance_revision=None if instance is I.Absent else f"r{gen}",
        validated_generation=kw.pop("validated", GEN),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def fail(reason: FailureReason, step: Step = Step.warmup, gen: int = GEN) -> FailureRecord:
    return FailureRecord(reason, step, "boom", gen)


@pytest.mark.parametrize(
    ("state", "instance", "action"),
    [
        (DesiredState.Running, I.Absent, Action.Create),
        (DesiredState.Running, I.Created, Action.Warmup),
        (DesiredState.Running, I.Ready, Action.Start),
        (DesiredState.Running, I.Running, Action.Nothing),
        (DesiredState.Running, I.Spent, Action.Delete),  # Pitfall 3: recreate, not start
        (DesiredState.Standby, I.Absent, Action.Create),
        (DesiredState.Standby, I.Created, Action.Warmup),
        (DesiredState.Standby, I.Ready, Action.Nothing),
        (DesiredState.Standby, I.Running, Action.Stop),
        (DesiredState.Standby, I.Spent, Action.Nothing),
        (DesiredState.Stopped, I.Absent, Action.Nothing),
        (DesiredState.Stopped, I.Created, Action.Delete),
        (DesiredState.Stopped, I.Ready, Action.Delete),
        (DesiredState.Stopped, I.Running, Action.Stop),
        (DesiredState.Stopped, I.Spent, Action.Delete),
    ],
)
def test_the_table(state: DesiredState, instance: I, action: Action) -> None:
    assert next_step(desired(state), observed(instance), now=0) is action


def test_a_state_change_alone_keeps_the_instance() -> None:
    # Same revision, new generation: stop the running instance, no redeploy.
    o = observed(I.Running)
    assert next_step(Desired(DesiredState.Standby, GEN + 1, f"r{GEN}"), o, 0) is Action.Validate
    o = observed(I.Running, validated=GEN + 1)
    assert next_step(Desired(DesiredState.Standby, GEN + 1, f"r{GEN}"), o, 0) is Action.Stop


def test_a_new_generation_is_validated_first_and_the_old_instance_keeps_running() -> None:
    o = observed(I.Running, gen=GEN - 1, validated=GEN - 1)
    assert next_step(desired(), o, 0) is Action.Validate


def test_a_validated_new_generation_redeploys() -> None:
    assert next_step(desired(), observed(I.Running, gen=GEN - 1), 0) is Action.Stop
    assert next_step(desired(), observed(I.Spent, gen=GEN - 1), 0) is Action.Delete


def test_an_invalid_new_generation_leaves_the_old_instance_alone() -> None:
    o = observed(
        I.Running,
        gen=GEN - 1,
        validated=GEN - 1,
        failure=fail(FailureReason.InvalidGraph, Step.validate),
    )
    assert next_step(desired(), o, 0) is Action.Nothing
    assert phase(desired(), o) is Phase.Running
    assert not desired_reached(desired(), o)


def test_a_4xx_failure_waits_for_a_spec_change() -> None:
    o = observed(failure=fail(FailureReason.PluginNotFound, Step.validate))
    assert next_step(desired(), o, now=1e9) is Action.Nothing
    assert phase(desired(), o) is Phase.Failed


def test_a_failure_of_an_older_generation_is_moot() -> None:
    o = observed(failure=fail(FailureReason.PluginNotFound, Step.validate, gen=GEN - 1))
    assert next_step(desired(), o, 0) is Action.Create


def test_a_retryable_failure_backs_off_then_retries() -> None:
    o = observed(failure=fail(FailureReason.WarmupFailed), retry_at=10.0)
    assert next_step(desired(), o, now=9.9) is Action.Wait
    assert phase(desired(), o) is Phase.Pending
    assert next_step(desired(), o, now=10.0) is Action.Retry


def test_a_crashed_instance_is_torn_down_before_the_backoff() -> None:
    o = observed(I.Running, failure=fail(FailureReason.NodeFailed, Step.run), retry_at=99.0)
    assert next_step(desired(), o, now=0) is Action.Stop
    o = observed(I.Spent, failure=fail(FailureReason.NodeFailed, Step.run), retry_at=99.0)
    assert next_step(desired(), o, now=0) is Action.Delete


def test_restarts_exhausted_is_failed_and_torn_down() -> None:
    d = desired(max_restarts=2)
    o = observed(I.Running, failure=fail(FailureReason.NodeFailed, Step.run), restarts=2)
    assert next_step(d, o, now=1e9) is Action.Stop
    o = observed(I.Absent, failure=fail(FailureReason.NodeFailed, Step.run), restarts=2)
    assert next_step(d, o, now=1e9) is Action.Nothing
    assert phase(d, o) is Phase.Failed


def test_deletion_tears_down_whatever_there_is() -> None:
    d = desired(deleting=True)
    assert next_step(d, observed(I.Running), 0) is Action.Stop
    assert next_step(d, observed(I.Spent), 0) is Action.Delete
    assert next_step(d, observed(I.Created), 0) is Action.Delete
    assert next_step(d, observed(I.Absent), 0) is Action.Nothing
    # Even a permanent failure does not keep an instance alive through deletion.
    o = observed(I.Running, failure=fail(FailureReason.InvalidGraph, Step.validate))
    assert next_step(d, o, 0) is Action.Stop
    assert phase(d, o) is Phase.Deleting


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_delay(5, n) for n in range(4)] == [5, 10, 20, 40]
    assert backoff_delay(5, 20) == 300


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (Action.Create, Phase.Creating),
        (Action.Warmup, Phase.WarmingUp),
        (Action.Start, Phase.Starting),
        (Action.Stop, Phase.Stopping),
    ],
)
def test_phase_while_a_step_runs(action: Action, expected: Phase) -> None:
    assert phase(desired(), observed(), in_progress=action) is expected


@pytest.mark.parametrize(
    ("state", "instance", "expected"),
    [
        (DesiredState.Running, I.Running, Phase.Running),
        (DesiredState.Standby, I.Ready, Phase.Standby),
        (DesiredState.Standby, I.Spent, Phase.Standby),
        (DesiredState.Stopped, I.Absent, Phase.Stopped),
        (DesiredState.Running, I.Absent, Phase.Pending),
    ],
)
def test_phase_at_rest(state: DesiredState, instance: I, expected: Phase) -> None:
    assert phase(desired(state), observed(instance)) is expected


def by_type(conds: list[Condition]) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in conds}


def test_conditions_when_running() -> None:
    conds = conditions(desired(), observed(I.Running), [], "T1")
    assert by_type(conds) == {
        "Created": ("True", "Created"),
        "WarmedUp": ("True", "WarmedUp"),
        "Running": ("True", "Started"),
        "Ready": ("True", "DesiredStateReached"),
        "Updating": ("False", "NotUpdating"),
    }
    assert all(c.observedGeneration == GEN and c.lastTransitionTime == "T1" for c in conds)


def test_ready_is_true_for_a_warm_standby() -> None:
    conds = by_type(conditions(desired(DesiredState.Standby), observed(I.Ready), [], "T"))
    assert conds["Ready"] == ("True", "DesiredStateReached")
    assert conds["Running"] == ("False", "NotRunning")
    assert conds["WarmedUp"] == ("True", "WarmedUp")


def test_ready_is_true_when_stopped_as_asked() -> None:
    conds = by_type(conditions(desired(DesiredState.Stopped), observed(I.Absent), [], "T"))
    assert conds["Ready"] == ("True", "DesiredStateReached")
    assert conds["Created"] == ("False", "Stopped")


def test_a_failure_shows_in_the_condition_of_its_step_and_in_ready() -> None:
    o = observed(failure=fail(FailureReason.WarmupFailed, Step.warmup), retry_at=5)
    conds = {c.type: c for c in conditions(desired(), o, [], "T")}
    assert conds[ConditionType.WarmedUp].reason == "WarmupFailed"
    assert conds[ConditionType.WarmedUp].message == "boom"
    assert conds[ConditionType.Ready].status == "False"
    assert conds[ConditionType.Ready].reason == "WarmupFailed"


def test_the_status_of_another_generation_is_not_ready() -> None:
    conds = by_type(conditions(desired(), observed(I.Running, gen=GEN - 1), [], "T"))
    assert conds["Ready"] == ("False", "Progressing")


def test_last_transition_time_moves_only_on_a_status_change() -> None:
    first = conditions(desired(), observed(I.Running), [], "T1")
    again = conditions(desired(), observed(I.Running), first, "T2")
    assert [c.lastTransitionTime for c in again] == ["T1"] * 5
    stopped = {
        c.type: c for c in conditions(desired(DesiredState.Standby), observed(I.Spent), first, "T3")
    }
    assert stopped[ConditionType.Running].lastTransitionTime == "T3"
    assert stopped[ConditionType.Created].lastTransitionTime == "T1"


def test_warnings_go_into_the_created_message() -> None:
    conds = {c.type: c for c in conditions(desired(), observed(I.Running), [], "T", "note")}
    assert conds[ConditionType.Created].message == "note"


def test_an_unreachable_runtime_never_exhausts_the_restart_budget() -> None:
    d = desired(max_restarts=1)
    o = observed(
        failure=fail(FailureReason.RuntimeUnavailable, Step.create), restarts=5, retry_at=10.0
    )
    assert next_step(d, o, now=11.0) is Action.Retry
    assert phase(d, o) is Phase.Pending
