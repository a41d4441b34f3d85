"""Pure lifecycle decisions: from desired and observed state to the next step and the status.

No I/O, no clock, no Kubernetes: every input is passed in, so the whole table of
transitions is unit-tested. The reconciler calls ``next_step`` in a loop, lets the
engine act, and writes what ``report`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from juturna_operator.api import (
    Condition,
    ConditionType,
    DesiredState,
    Phase,
    RestartPolicy,
    UpdatePolicy,
    UpdateStep,
)
from juturna_operator.domain import InstanceState
from juturna_operator.reasons import FailureReason, Step

BACKOFF_CAP_S = 300.0


class Action(StrEnum):
    """What the reconciler does next."""

    Validate = "Validate"
    Create = "Create"
    Warmup = "Warmup"
    Start = "Start"
    Stop = "Stop"
    Delete = "Delete"
    Retry = "Retry"  # a backoff ran out: count a restart, then deploy again
    Wait = "Wait"  # a backoff (or a drain) is running
    Nothing = "Nothing"
    # A warm swap: the candidate slot's steps, the switch, and the ends of an attempt.
    CreateCandidate = "CreateCandidate"
    WarmupCandidate = "WarmupCandidate"
    StartCandidate = "StartCandidate"
    Switch = "Switch"  # the candidate takes the address and the active slot
    DeleteCandidate = "DeleteCandidate"  # a drained old instance, or a candidate not wanted
    RetryCandidate = "RetryCandidate"  # a candidate's backoff ran out: try again, no restart
    AbortUpdate = "AbortUpdate"  # the candidate goes; the old instance serves on
    FallBack = "FallBack"  # no room for two: the candidate goes, the change lands by Recreate
    # After an aborted update the old instance went (its pod died): what ran is deployed
    # again, not the revision that failed.
    RestoreStable = "RestoreStable"


CANDIDATE_STEPS: dict[Action, UpdateStep] = {
    Action.CreateCandidate: UpdateStep.WarmingUpNew,
    Action.WarmupCandidate: UpdateStep.WarmingUpNew,
    Action.StartCandidate: UpdateStep.Switching,
    Action.Switch: UpdateStep.Switching,
}


PROGRESS_PHASE: dict[Action, Phase] = {
    Action.Validate: Phase.Pending,
    Action.Create: Phase.Creating,
    Action.RestoreStable: Phase.Creating,
    Action.Warmup: Phase.WarmingUp,
    Action.Start: Phase.Starting,
    Action.Stop: Phase.Stopping,
    Action.Delete: Phase.Stopping,
}


@dataclass(frozen=True)
class SwapPolicy:
    """A warm swap's bounds (``spec.update``), for a Pipeline whose changes land that way."""

    timeout_s: float = UpdatePolicy.model_fields["timeoutSeconds"].default  # one source
    drain_s: float = UpdatePolicy.model_fields["drainSeconds"].default
    fallback_recreate: bool = True  # no room for two: land the change by Recreate


@dataclass(frozen=True)
class Desired:
    """What the resource asks for."""

    state: DesiredState
    generation: int
    revision: str = ""  # identifies the pipeline itself: a state change keeps the revision
    max_restarts: int = RestartPolicy.model_fields["maxRestarts"].default  # one source
    backoff_seconds: float = RestartPolicy.model_fields["backoffSeconds"].default
    deleting: bool = False
    swap: SwapPolicy | None = None  # None: a change replaces the instance in place (Recreate)


@dataclass(frozen=True)
class FailureRecord:
    """The last attempt's failure, and the generation it belongs to."""

    reason: FailureReason
    step: Step
    message: str
    generation: int

    @property
    def retryable(self) -> bool:
        return self.reason.retryable


class UpdateOutcome(StrEnum):
    """How a warm swap attempt ended without its switch."""

    Aborted = "Aborted"  # the old instance serves on; the spec's revision does not run
    FellBack = "FellBack"  # no room for two: the change lands by Recreate


@dataclass(frozen=True)
class UpdateAttempt:
    """One warm swap attempt: the revision it deploys, its deadline, its candidate's last
    failure (retried within the deadline, never spending the running instance's restarts)."""

    revision: str
    generation: int
    started: float  # monotonic seconds
    deadline: float  # the start + timeoutSeconds
    failure: FailureRecord | None = None
    retry_at: float | None = None
    attempts: int = 0  # candidates that failed: the backoff's exponent
    drain_until: float | None = None  # set by the switch: the old instance goes after it
    outcome: UpdateOutcome | None = None


@dataclass(frozen=True)
class Observed:
    """What the operator knows: the engine's instance plus the operator's own memory."""

    instance: InstanceState = InstanceState.Absent
    instance_revision: str | None = None  # the revision the instance was built from
    validated_generation: int | None = None
    failure: FailureRecord | None = None
    restarts: int = 0
    retry_at: float | None = None  # monotonic seconds
    # A warm swap's candidate slot: the next revision warming up, or the old one draining.
    candidate: InstanceState = InstanceState.Absent
    candidate_revision: str | None = None
    update: UpdateAttempt | None = None
    # The last revision that ran as asked, where the operator still holds its spec.
    stable_revision: str | None = None


def backoff_delay(backoff_seconds: float, restarts: int) -> float:
    """The wait before restart number ``restarts + 1``: doubling, capped."""
    return float(min(BACKOFF_CAP_S, backoff_seconds * (2**restarts)))


def current_failure(desired: Desired, observed: Observed) -> FailureRecord | None:
    """The failure that concerns this generation (older ones are moot after a spec change)."""
    f = observed.failure
    return f if f is not None and f.generation == desired.generation else None


def is_terminal(desired: Desired, observed: Observed) -> bool:
    """True when nothing more will be tried until the spec changes."""
    f = current_failure(desired, observed)
    if f is None:
        return False
    if not f.retryable:
        return True
    return f.reason.counts_as_restart and observed.restarts >= desired.max_restarts


def _teardown(instance: InstanceState) -> Action:
    if instance is InstanceState.Running:
        return Action.Stop
    if instance is InstanceState.Absent:
        return Action.Nothing
    return Action.Delete


_TOWARD: dict[DesiredState, dict[InstanceState, Action]] = {
    DesiredState.Running: {
        InstanceState.Absent: Action.Create,
        InstanceState.Created: Action.Warmup,
        InstanceState.Ready: Action.Start,
        InstanceState.Running: Action.Nothing,
        InstanceState.Spent: Action.Delete,  # start after stop is a no-op in Juturna: recreate
    },
    DesiredState.Standby: {
        InstanceState.Absent: Action.Create,
        InstanceState.Created: Action.Warmup,
        InstanceState.Ready: Action.Nothing,
        InstanceState.Running: Action.Stop,
        InstanceState.Spent: Action.Nothing,
    },
}


def current_update(desired: Desired, observed: Observed) -> UpdateAttempt | None:
    """The swap attempt toward the desired revision: one under way, or one that ended for this
    generation (the next spec change, even of ``spec.update`` alone, starts a new attempt)."""
    u = observed.update
    if u is None or u.revision != desired.revision:
        return None
    return u if u.outcome is None or u.generation == desired.generation else None


def update_failed(desired: Desired, observed: Observed) -> FailureRecord | None:
    """The failure that ended this generation's update while the old instance serves on."""
    u = current_update(desired, observed)
    if u is None or u.outcome is not UpdateOutcome.Aborted:
        return None
    return u.failure


def _serving_old(desired: Desired, observed: Observed) -> bool:
    """The instance runs an older revision than the spec's, and nothing failed it."""
    return (
        observed.instance is InstanceState.Running
        and observed.instance_revision != desired.revision
        and current_failure(desired, observed) is None
    )


def draining(desired: Desired, observed: Observed, now: float) -> bool:
    """After a switch: the old instance, in the candidate slot, keeps running a while."""
    u = observed.update
    return (
        u is not None
        and u.drain_until is not None
        and now < u.drain_until
        and observed.candidate is not InstanceState.Absent
        and observed.candidate_revision != desired.revision
        and observed.instance is InstanceState.Running
    )


_CANDIDATE_TOWARD: dict[InstanceState, Action] = {
    InstanceState.Absent: Action.CreateCandidate,
    InstanceState.Created: Action.WarmupCandidate,
    InstanceState.Ready: Action.StartCandidate,
    InstanceState.Running: Action.Switch,
    InstanceState.Spent: Action.DeleteCandidate,
}


def _swap_step(desired: Desired, observed: Observed, now: float) -> Action | None:
    """A warm swap's next step, or None where the rest of ``next_step`` decides."""
    swapping = desired.swap is not None and desired.state is DesiredState.Running
    candidate = observed.candidate
    if candidate is not InstanceState.Absent and (
        not swapping or observed.candidate_revision != desired.revision
    ):
        # The old instance after the switch (drained first), or a candidate no longer wanted:
        # a newer spec, a revert, Stopped, standby, Recreate.
        return (
            Action.Wait if swapping and draining(desired, observed, now) else Action.DeleteCandidate
        )
    if not swapping or desired.swap is None:
        return None
    u = current_update(desired, observed)
    if u is not None and u.outcome is not None:
        return None  # ended: aborted (the old one serves on) or fell back to Recreate
    if candidate is InstanceState.Absent and not _serving_old(desired, observed):
        return None  # nothing serves an older revision: no swap
    if observed.validated_generation != desired.generation:
        return Action.Validate
    if u is not None and u.failure is not None:
        if not u.failure.retryable:
            return Action.AbortUpdate
        if now >= u.deadline:
            no_room = u.failure.reason is FailureReason.Unschedulable
            return (
                Action.FallBack
                if no_room and desired.swap.fallback_recreate
                else Action.AbortUpdate
            )
        if candidate is not InstanceState.Absent:
            return Action.DeleteCandidate  # clear the failed candidate before the backoff
        if u.retry_at is not None and now < u.retry_at:
            return Action.Wait
        return Action.RetryCandidate
    if u is not None and now >= u.deadline and candidate is not InstanceState.Running:
        return Action.AbortUpdate  # not ready in time
    return _CANDIDATE_TOWARD[candidate]


def next_step(desired: Desired, observed: Observed, now: float) -> Action:
    """The one next action that moves ``observed`` toward ``desired``."""
    instance = observed.instance
    if desired.deleting:
        if observed.candidate is not InstanceState.Absent:
            return Action.DeleteCandidate
        return _teardown(instance)
    swap = _swap_step(desired, observed, now)
    if swap is not None:
        return swap

    failure = current_failure(desired, observed)
    if failure is not None:
        if is_terminal(desired, observed):
            # A crashed or failed instance of this generation is not kept; an older
            # generation's instance keeps running while the new spec is refused.
            stale = observed.instance_revision == desired.revision
            return _teardown(instance) if stale and failure.retryable else Action.Nothing
        if instance is not InstanceState.Absent and (
            observed.instance_revision == desired.revision or failure.step is Step.run
        ):
            # Clear the failed instance before the backoff (an older revision's too, where
            # it is what failed: the spec changed after it crashed).
            return _teardown(instance)
        if observed.retry_at is not None and now < observed.retry_at:
            return Action.Wait
        return Action.Retry

    if desired.state is DesiredState.Stopped:
        return _teardown(instance)
    if observed.validated_generation != desired.generation:
        return Action.Validate
    if update_failed(desired, observed) is not None:
        if _serving_old(desired, observed):
            return Action.Nothing  # the update failed: the old instance serves on
        if (
            instance is InstanceState.Absent
            and desired.state is DesiredState.Running
            and observed.stable_revision not in (None, desired.revision)
        ):
            return Action.RestoreStable  # and then it went: what ran, not what failed
    if instance is not InstanceState.Absent and observed.instance_revision != desired.revision:
        return _teardown(instance)  # the pipeline itself changed: redeploy
    return _TOWARD[desired.state][instance]


# --- what to report -----------------------------------------------------------------------


def phase(desired: Desired, observed: Observed, in_progress: Action | None = None) -> Phase:
    """The one-word summary for printer columns (conditions are the contract)."""
    if desired.deleting:
        return Phase.Deleting
    if in_progress in PROGRESS_PHASE:
        return PROGRESS_PHASE[in_progress]
    instance = observed.instance
    failure = current_failure(desired, observed)
    if failure is not None and instance is InstanceState.Absent:
        return Phase.Failed if is_terminal(desired, observed) else Phase.Pending
    return {
        InstanceState.Running: Phase.Running,
        InstanceState.Ready: Phase.Standby,
        InstanceState.Spent: Phase.Standby,
        InstanceState.Created: Phase.Creating,
        InstanceState.Absent: (
            Phase.Stopped if desired.state is DesiredState.Stopped else Phase.Pending
        ),
    }[instance]


def desired_reached(desired: Desired, observed: Observed) -> bool:
    """The instance is what the current generation asks for, and nothing failed."""
    if current_failure(desired, observed) is not None or desired.deleting:
        return False
    instance = observed.instance
    if desired.state is DesiredState.Stopped:
        return instance is InstanceState.Absent
    if observed.instance_revision != desired.revision:
        return False
    if desired.state is DesiredState.Running:
        return instance is InstanceState.Running
    return instance in (InstanceState.Ready, InstanceState.Spent)


def update_step(
    desired: Desired, observed: Observed, in_progress: Action | None = None
) -> UpdateStep | None:
    """Where a warm swap is, or None when none is under way."""
    if in_progress in CANDIDATE_STEPS:
        return CANDIDATE_STEPS[in_progress]
    candidate = observed.candidate
    if candidate is not InstanceState.Absent:
        if observed.candidate_revision == desired.revision:
            return (
                UpdateStep.Switching
                if candidate is InstanceState.Running
                else UpdateStep.WarmingUpNew
            )
        if (
            observed.instance is InstanceState.Running
            and observed.instance_revision == desired.revision
        ):
            return UpdateStep.Draining
        return None  # a candidate no longer wanted, on its way out
    u = current_update(desired, observed)
    if u is not None and u.outcome is None and _serving_old(desired, observed):
        return UpdateStep.WarmingUpNew  # between a candidate's failure and its retry
    return None


def _updating(desired: Desired, observed: Observed, in_progress: Action | None) -> _Cond:
    failed = update_failed(desired, observed)
    if failed is not None:
        return _Cond(False, "UpdateFailed", failed.message)
    step = update_step(desired, observed, in_progress)
    if step is None:
        return _Cond(False, "NotUpdating")
    serving = observed.instance_revision or "none"
    message = {
        UpdateStep.WarmingUpNew: f"revision {desired.revision} is warming up beside {serving}",
        UpdateStep.Switching: f"revision {desired.revision} is taking over from {serving}",
        UpdateStep.Draining: (
            f"revision {observed.candidate_revision} drains after revision {desired.revision} "
            "took over"
        ),
    }[step]
    u = current_update(desired, observed)
    if step is UpdateStep.WarmingUpNew and u is not None and u.failure is not None:
        message += f"; retried after {u.failure.reason.name}: {u.failure.message}"
    return _Cond(True, step.value, message)


@dataclass(frozen=True)
class _Cond:
    status: bool
    reason: str
    message: str = ""


def _conditions(
    desired: Desired, observed: Observed, notes: str, in_progress: Action | None
) -> dict[ConditionType, _Cond]:
    instance = observed.instance
    failure = current_failure(desired, observed)

    def failed_at(*steps: Step) -> _Cond | None:
        if failure is not None and failure.step in steps:
            return _Cond(False, failure.reason.name, failure.message)
        return None

    exists = instance is not InstanceState.Absent
    warm = instance in (InstanceState.Ready, InstanceState.Running, InstanceState.Spent)
    running = instance is InstanceState.Running
    stopped = desired.state is DesiredState.Stopped

    created = (
        _Cond(True, "Created", notes or "the pipeline instance exists")
        if exists
        else failed_at(Step.validate, Step.create)
        or _Cond(False, "Stopped" if stopped else "NotCreated", notes)
    )
    warmed = (
        _Cond(True, "WarmedUp", "all nodes are warmed up")
        if warm
        else failed_at(Step.warmup) or _Cond(False, "NotWarmedUp")
    )
    run = (
        _Cond(True, "Started", "the pipeline is processing data")
        if running
        else failed_at(Step.start, Step.run) or _Cond(False, "NotRunning")
    )
    failed_update = update_failed(desired, observed)
    updating = _updating(desired, observed, in_progress)
    if desired_reached(desired, observed):
        ready = _Cond(True, "DesiredStateReached", f"the pipeline is {desired.state}")
    elif failed_update is not None and failure is None:
        ready = _Cond(
            False,
            "UpdateFailed",
            f"revision {desired.revision} failed ({failed_update.reason.name}: "
            f"{failed_update.message}); revision {observed.instance_revision} serves on",
        )
    elif failure is not None:
        ready = _Cond(False, failure.reason.name, failure.message)
    else:
        toward = f"moving toward {desired.state}"
        # During an update, what is under way (the MESSAGE column shows it).
        ready = _Cond(
            False, "Progressing", f"{toward}: {updating.message}" if updating.status else toward
        )
    return {
        ConditionType.Created: created,
        ConditionType.WarmedUp: warmed,
        ConditionType.Running: run,
        ConditionType.Ready: ready,
        ConditionType.Updating: updating,
    }


def conditions(
    desired: Desired,
    observed: Observed,
    previous: list[Condition],
    now_rfc3339: str,
    notes: str = "",
    in_progress: Action | None = None,
) -> list[Condition]:
    """The five conditions; ``lastTransitionTime`` moves only when a status changes."""
    before = {c.type: c for c in previous}
    out = []
    for ctype, cond in _conditions(desired, observed, notes, in_progress).items():
        status = "True" if cond.status else "False"
        prior = before.get(ctype)
        since = prior.lastTransitionTime if prior and prior.status == status else now_rfc3339
        out.append(
            Condition(
                type=ctype,
                status=status,
                reason=cond.reason,
                message=cond.message,
                lastTransitionTime=since,
                observedGeneration=desired.generation,
            )
        )
    return out
