"""The zygote's pure parts: its test fault's parsing."""

from __future__ import annotations

import re

import pytest

from juturna_operator.zygote import FAULT_VARIABLE, Fault


def test_the_fault_is_off_unless_named() -> None:
    assert Fault.parse("") == Fault(delay_s=0.0, die=False)
    assert Fault.parse("die-after-fork") == Fault(die=True)
    assert Fault.parse("answer-delay:12") == Fault(delay_s=12.0)
    assert Fault.parse("answer-delay:0.5") == Fault(delay_s=0.5)


@pytest.mark.parametrize(
    "value",
    ["die", "answer-delay", "answer-delay:", "answer-delay:-1", "answer-delay:nan",
     "answer-delay:inf", "answer-delay:soon", "delay:3", "die-after-fork:1"],
)  # fmt: skip
def test_a_bad_fault_is_refused_naming_the_variable(value: str) -> None:
    message = f'{FAULT_VARIABLE}="{value}": expected "die-after-fork" or "answer-delay:<seconds>"'
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Fault.parse(value)
