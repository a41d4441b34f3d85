"""The failure reasons: one closed set, distinct names, the right codes and mappings."""

from __future__ import annotations

import pytest
from juturna.cli.commands.exceptions import (
    AlreadyRunningException,
    AlreadyWarmedupException,
    InvalidPipelineIdException,
    NotReadyException,
    NotRunningException,
)

from juturna_operator.reasons import FailureReason, PipelineFailure, Step, classify

EXPECTED_CODES = {
    "InvalidPipelineId": 404,
    "AlreadyWarmedUp": 409,
    "NotReady": 409,
    "AlreadyRunning": 409,
    "NotRunning": 409,
    "InvalidSpec": 422,
    "InvalidGraph": 422,
    "PluginNotFound": 422,
    "PluginPathNotAllowed": 403,
    "UnknownRuntime": 422,
    "CreateFailed": 500,
    "WarmupFailed": 500,
    "StartFailed": 500,
    "StopFailed": 500,
    "DeleteFailed": 500,
    "NodeFailed": 500,
    "StopTimeout": 504,
    "RuntimeUnavailable": 503,
    "AnswerTooLarge": 502,
    "Unschedulable": 503,
    "NameConflict": 503,
    "PodNotStarted": 504,
    "UpdateTimedOut": 504,
    "ImagePullFailed": 502,
    "ImageNotAllowed": 403,
    "BuiltinNotAllowed": 403,
    "EnvironmentNotAllowed": 403,
}


def test_every_name_is_a_distinct_member_even_where_codes_coincide() -> None:
    # __members__ includes aliases; iteration does not. Equal lengths: no alias exists.
    assert len(FailureReason.__members__) == len(list(FailureReason))
    assert {r.name for r in FailureReason} == set(EXPECTED_CODES)
    assert FailureReason.NotReady is not FailureReason.AlreadyWarmedUp


@pytest.mark.parametrize(("name", "code"), sorted(EXPECTED_CODES.items()))
def test_codes_and_retryability(name: str, code: int) -> None:
    reason = FailureReason[name]
    assert reason.code == code
    assert reason.retryable is (code >= 500)
    assert reason.summary.endswith(".")


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (InvalidPipelineIdException("p1"), FailureReason.InvalidPipelineId),
        (AlreadyWarmedupException("p1"), FailureReason.AlreadyWarmedUp),
        (NotReadyException("p1"), FailureReason.NotReady),
        (AlreadyRunningException("p1"), FailureReason.AlreadyRunning),
        (NotRunningException("p1"), FailureReason.NotRunning),
    ],
)
def test_each_juturna_exception_maps_to_its_reason(exc: Exception, reason: FailureReason) -> None:
    failure = classify(exc, Step.start)
    assert failure.reason is reason
    assert failure.step is Step.start
    assert type(exc).__name__ in failure.message


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        (Step.create, FailureReason.CreateFailed),
        (Step.warmup, FailureReason.WarmupFailed),
        (Step.start, FailureReason.StartFailed),
        (Step.stop, FailureReason.StopFailed),
        (Step.delete, FailureReason.DeleteFailed),
        (Step.run, FailureReason.NodeFailed),
        (Step.validate, FailureReason.InvalidSpec),
    ],
)
def test_other_exceptions_map_by_step(step: Step, reason: FailureReason) -> None:
    failure = classify(ValueError("rate must be positive"), step)
    assert failure.reason is reason
    assert failure.message == "ValueError: rate must be positive"


def test_a_classified_failure_passes_through_unchanged() -> None:
    original = PipelineFailure(FailureReason.StopTimeout, Step.stop, "stuck")
    assert classify(original, Step.delete) is original
    assert str(original) == "StopTimeout (504) at stop: stuck"


def test_the_api_docs_list_every_reason_with_its_code() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "pipeline-api.md").read_text()
    for reason in FailureReason:
        assert f"| `{reason.name}` | {reason.code} | {reason.summary} |" in page, reason.name
