"""The status write is skipped when the object already says the same thing."""

from __future__ import annotations

from juturna_operator.status import same_status


def test_nested_nones_are_not_differences() -> None:
    # What the operator builds (pydantic dump) and what the API server keeps of it.
    built = {
        "phase": "Running",
        "failure": None,
        "conditions": [{"type": "Ready", "status": "True", "message": None}],
    }
    stored = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    assert same_status(built, stored)


def test_a_real_difference_or_a_field_to_delete_is_one() -> None:
    built = {"phase": "Running", "failure": None}
    assert not same_status(built, {"phase": "Standby"})
    assert not same_status(built, {"phase": "Running", "failure": {"reason": "NodeFailed"}})
