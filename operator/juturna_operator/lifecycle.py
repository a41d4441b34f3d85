"""Pure lifecycle decisions: from desired and observed state to the next step and the status.

No I/O, no clock, no Kubernetes: every input is passed in, so the whole table of
transitions is unit-tested. The reconciler calls ``next_step`` in a loop, lets the
engine act, and writes what ``report`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from juturna_operator.api import Condition, ConditionType, DesiredState, Phase, RestartPolicy
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
    Wait = "Wait"  # a backoff is running
    Nothing = "Nothing"


PROGRESS_PHASE: dict[Action, Phase] = {
    Action.Validate: Phase.Pending,
    Action.Create: Phase.Creating,
    Action.Warmup: Phase.WarmingUp,
    Action.Start: Phase.Starting,
    Action.Stop: Phase.Stopping,
    Action.Delete: Phase.Stopping,
}


@dataclass(frozen=True)
class Desired:
    """What the resource asks for."""

    state: DesiredState
    generation: int
    revision: str = ""  # identifies the pipeline itself: a state change keeps the revision
    max_restarts: int = RestartPolicy.model_fields["maxRestarts"].default  # one source
    backoff_seconds: float = RestartPolicy.model_fields["backoffSeconds"].default
    deleting: bool = False


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


@dataclass(frozen=True)
class Observed:
    """What the operator knows: the engine's instance plus the operator's own memory."""

    instance: InstanceState = InstanceState.Absent
    instance_revision: str | None = None  # the revision the instance was built from
    validated_generation: int | None = None
    failure: FailureRecord | None = None
    restarts: int = 0
    retry_at: float | None = None  # monotonic seconds


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


def next_step(desired: Desired, observed: Observed, now: float) -> Action:
    """The one next action that moves ``observed`` toward ``desired``."""
    instance = observed.instance
    if desired.deleting:
        return _teardown(instance)

    failure = current_failure(desired, observed)
    if failure is not None:
        if is_terminal(desired, observed):
            # A crashed or failed instance of this generation is not kept; an older
            # generation's instance keeps running while the new spec is refused.
            stale = observed.instance_revision == desired.revision
            return _teardown(instance) if stale and failure.retryable else Action.Nothing
        if instance is not InstanceState.Absent and observed.instance_revision == desired.revision:
            return _teardown(instance)  # clear the failed instance before the backoff
        if observed.retry_at is not None and now < observed.retry_at:
            return Action.Wait
        return Action.Retry

    if desired.state is DesiredState.Stopped:
        return _teardown(instance)
    if observed.validated_generation != desired.generation:
        return Action.Validate
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


@dataclass(frozen=True)
class _Cond:
    status: bool
    reason: str
    message: str = ""


def _conditions(desired: Desired, observed: Observed, notes: str) -> dict[ConditionType, _Cond]:
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
    if desired_reached(desired, observed):
        ready = _Cond(True, "DesiredStateReached", f"the pipeline is {desired.state}")
    elif failure is not None:
        ready = _Cond(False, failure.reason.name, failure.message)
    else:
        ready = _Cond(False, "Progressing", f"moving toward {desired.state}")
    return {
        ConditionType.Created: created,
        ConditionType.WarmedUp: warmed,
        ConditionType.Running: run,
        ConditionType.Ready: ready,
    }


def conditions(
    desired: Desired,
    observed: Observed,
    previous: list[Condition],
    now_rfc3339: str,
    notes: str = "",
) -> list[Condition]:
    """The four conditions; ``lastTransitionTime`` moves only when a status changes."""
    before = {c.type: c for c in previous}
    out = []
    for ctype, cond in _conditions(desired, observed, notes).items():
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
