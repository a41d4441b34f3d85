"""Failure reasons: one closed set, each with a distinct name, an HTTP-like code and a summary.

Names and codes live together, in one table. ``FailureReason`` is a plain ``Enum`` whose
values are ``(code, summary)`` pairs, and ``@unique`` refuses two members with the same
value: an ``IntEnum`` keyed on the code alone would make ``NotReady`` an alias of
``AlreadyWarmedUp`` (both 409), and the second name would silently disappear.

Codes follow HTTP: 4xx means the spec (or the cluster's configuration) must change and
nothing is retried; 5xx means transient, retried with backoff under the restart policy.
"""

from __future__ import annotations

import json
from enum import Enum, StrEnum, unique
from pathlib import Path

import juturna
from juturna.cli.commands.exceptions import (
    AlreadyRunningException,
    AlreadyWarmedupException,
    InvalidPipelineIdException,
    NotReadyException,
    NotRunningException,
)


@unique
class FailureReason(Enum):
    """Every reason the operator reports in ``status.failure.reason``."""

    # Juturna's PipelineManager exceptions.
    InvalidPipelineId = (404, "Juturna has no pipeline with this id.")
    AlreadyWarmedUp = (409, "The pipeline was already warmed up.")
    NotReady = (409, "The pipeline must be warmed up before it can start.")
    AlreadyRunning = (409, "The pipeline is already running.")
    NotRunning = (409, "The pipeline is not running, so it cannot be stopped.")
    # The operator's own.
    InvalidSpec = (
        422,
        "The spec breaks a structural rule (names, links, plugin folders), or its `template` "
        "asks the pipeline's pod for more than a Pod author gets (engine `pod`).",
    )
    InvalidGraph = (422, "The links form a cycle; Juturna would never run its nodes.")
    PluginNotFound = (422, "A node's type and mark are not found in the built-ins or plugins.")
    PluginPathNotAllowed = (403, "A plugin folder is outside every configured plugin root.")
    UnknownRuntime = (422, "spec.runtime names a runtime the administrator did not configure.")
    CreateFailed = (500, "Juturna could not create the pipeline.")
    WarmupFailed = (500, "A node failed while warming up (its constructor or warmup raised).")
    StartFailed = (500, "The pipeline failed to start.")
    StopFailed = (500, "The pipeline failed to stop.")
    DeleteFailed = (500, "The pipeline instance could not be deleted.")
    NodeFailed = (500, "A node's thread died while the pipeline was running.")
    StopTimeout = (504, "Stopping the pipeline did not finish within the stop timeout.")
    RuntimeUnavailable = (503, "The pipeline runtime could not be reached.")
    AnswerTooLarge = (
        502,
        "The pipeline runtime answered more than the operator reads (its answer size cap).",
    )
    Unschedulable = (503, "No node can take the pipeline's pod yet (the scheduler says why).")
    NameConflict = (
        503,
        "An object the Pipeline needs (its Service or NetworkPolicy; a pod or Secret only if "
        "another owner took its random name) has a name another owner holds.",
    )
    ImagePullFailed = (502, "The runtime image could not be pulled, or is not on the node.")
    PodNotStarted = (
        504,
        "The pipeline's pod was placed but did not start in time (the kubelet's warning says why).",
    )
    UpdateTimedOut = (
        504,
        "A warm swap's new revision was not ready within spec.update.timeoutSeconds; the "
        "old one serves on.",
    )
    ImageNotAllowed = (403, "spec.template.image is set where the administrator allows none.")
    BuiltinNotAllowed = (
        403,
        "A node is a Juturna built-in the administrator did not allow where it runs.",
    )
    EnvironmentNotAllowed = (
        403,
        "A configuration value reads the operator's environment ($JT_ENV_), not allowed.",
    )

    @property
    def code(self) -> int:
        return int(self.value[0])

    @property
    def summary(self) -> str:
        return str(self.value[1])

    @property
    def retryable(self) -> bool:
        """5xx reasons are transient and retried with backoff; 4xx wait for a spec change."""
        return self.code >= 500

    @property
    def set_by_configuration(self) -> bool:
        """A 4xx the administrator's settings decide as much as the spec: an operator that
        starts again (perhaps with the fix) checks again rather than trust the old status."""
        return self in (
            FailureReason.PluginNotFound,
            FailureReason.PluginPathNotAllowed,
            FailureReason.UnknownRuntime,
            FailureReason.ImageNotAllowed,
            FailureReason.BuiltinNotAllowed,
            FailureReason.EnvironmentNotAllowed,
        )

    @property
    def counts_as_restart(self) -> bool:
        """Whether a retry spends the restart policy's budget. An unreachable runtime or a
        cluster with no room is the infrastructure's fault, not the pipeline's: it is retried
        until it answers, or until a node fits."""
        return self.retryable and self not in (
            FailureReason.RuntimeUnavailable,
            FailureReason.Unschedulable,
            FailureReason.NameConflict,
        )


def api_server_message(body: str | None) -> str | None:
    """The ``message`` of a Kubernetes API error body (a Status object), if it has one: the
    client's exception shows it only JSON-escaped inside the raw body."""
    try:
        message = json.loads(body or "").get("message")
    except (ValueError, AttributeError):
        return None
    return str(message) if message else None


class Step(StrEnum):
    """The lifecycle step during which a failure happened (``status.failure.step``)."""

    validate = "validate"
    create = "create"
    warmup = "warmup"
    start = "start"
    stop = "stop"
    delete = "delete"
    run = "run"


class PipelineFailure(Exception):
    """A classified failure: what went wrong, in which step, in words a person can act on."""

    def __init__(self, reason: FailureReason, step: Step, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.step = step
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason.name} ({self.reason.code}) at {self.step}: {self.message}"


_JUTURNA_EXCEPTIONS: dict[type[Exception], FailureReason] = {
    InvalidPipelineIdException: FailureReason.InvalidPipelineId,
    AlreadyWarmedupException: FailureReason.AlreadyWarmedUp,
    NotReadyException: FailureReason.NotReady,
    AlreadyRunningException: FailureReason.AlreadyRunning,
    NotRunningException: FailureReason.NotRunning,
}

_STEP_REASONS: dict[Step, FailureReason] = {
    Step.create: FailureReason.CreateFailed,
    Step.warmup: FailureReason.WarmupFailed,
    Step.start: FailureReason.StartFailed,
    Step.stop: FailureReason.StopFailed,
    Step.delete: FailureReason.DeleteFailed,
    Step.run: FailureReason.NodeFailed,
}


JUTURNA_DIR = str(Path(juturna.__file__).parent)


def failing_node(exc: BaseException) -> str | None:
    """The node Juturna was building or warming up when ``exc`` was raised.

    Juturna's errors do not say which node failed; its warmup loops keep the name in a
    local ``node_name``, so the innermost Juturna frame that has one names the node.
    """
    name = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        value = frame.f_locals.get("node_name")
        if frame.f_code.co_filename.startswith(JUTURNA_DIR) and isinstance(value, str):
            name = value
        tb = tb.tb_next
    return name


def describe_exception(exc: BaseException) -> str:
    """``Type: message``, the way a person reads an exception in one line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def classify(exc: BaseException, step: Step) -> PipelineFailure:
    """The one place where an exception becomes a failure reason."""
    if isinstance(exc, PipelineFailure):
        return exc
    for exc_type, reason in _JUTURNA_EXCEPTIONS.items():
        if isinstance(exc, exc_type):
            return PipelineFailure(reason, step, f"{reason.summary} ({describe_exception(exc)})")
    if step is Step.validate:
        return PipelineFailure(FailureReason.InvalidSpec, step, describe_exception(exc))
    return PipelineFailure(_STEP_REASONS[step], step, describe_exception(exc))
