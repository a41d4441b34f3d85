"""The Argo CD health check (argocd/juturna.io/Pipeline/health.lua), run as Argo CD runs it:
on Lua 5.1 (gopher-lua's dialect), with an absent message read as an empty one."""

from __future__ import annotations

import copy
from typing import Any

import lupa.lua51
import pytest
import yaml

from support import ARGOCD_HEALTH, health

HERE = ARGOCD_HEALTH
TESTS = yaml.safe_load((HERE / "health_test.yaml").read_text())["tests"]


def load(path: str) -> dict[str, Any]:
    return yaml.safe_load((HERE / path).read_text())


def expected(case: dict[str, Any]) -> dict[str, str]:
    """A table row as Argo CD's harness reads it: HealthStatus has ``message,omitempty``."""
    return {
        "status": case["healthStatus"]["status"],
        "message": case["healthStatus"].get("message", ""),
    }


@pytest.mark.parametrize("case", TESTS, ids=[t["inputPath"] for t in TESTS])
def test_health_table(case: dict[str, Any]) -> None:
    assert health(load(case["inputPath"])) == expected(case)


def test_every_state_and_outcome_is_covered() -> None:
    statuses = {t["healthStatus"]["status"] for t in TESTS}
    assert statuses == {"Progressing", "Healthy", "Degraded"}


def test_every_testdata_file_is_in_the_table() -> None:
    assert {f"testdata/{p.name}" for p in (HERE / "testdata").iterdir()} == {
        t["inputPath"] for t in TESTS
    }


@pytest.mark.parametrize(
    ("path", "where"),
    [
        ("testdata/running.yaml", ("conditions", -1)),
        ("testdata/failed.yaml", ("failure",)),
        ("testdata/warming_up.yaml", ("conditions", -1)),
    ],
)
def test_an_empty_and_an_absent_message_read_alike(path: str, where: tuple[Any, ...]) -> None:
    with_empty, without = load(path), load(path)
    for body, absent in ((with_empty, False), (without, True)):
        holder = body["status"]
        for key in where:
            holder = holder[key]
        if absent:
            del holder["message"]
        else:
            holder["message"] = ""
    assert health(with_empty) == health(without)
    assert health(with_empty)["status"] == health(load(path))["status"]


def test_a_failure_of_an_older_generation_is_progressing_not_degraded() -> None:
    body = load("testdata/failed.yaml")
    assert health(body)["status"] == "Degraded"
    newer = copy.deepcopy(body)
    newer["metadata"]["generation"] = 2  # a fix was applied; the operator has not seen it
    assert health(newer) == {
        "status": "Progressing",
        "message": "Waiting for the juturna-operator to observe generation 2 "
        "(the status describes generation 1)",
    }
    newer["status"]["observedGeneration"] = 2  # the operator tried generation 2: it failed too
    assert health(newer)["status"] == "Degraded"


def test_a_status_without_observed_generation_is_progressing() -> None:
    body = load("testdata/failed.yaml")
    del body["status"]["observedGeneration"]
    assert health(body) == {
        "status": "Progressing",
        "message": "Waiting for the juturna-operator to observe generation 1",
    }


def test_the_check_runs_on_lua_5_1() -> None:
    """Lua 5.1 has no integer subtype: 2 // 1 is a syntax error there, as in gopher-lua."""
    lua = lupa.lua51.LuaRuntime()
    assert lua.lua_version == (5, 1)
    with pytest.raises(lupa.lua51.LuaSyntaxError):
        lua.execute("return 2 // 1")
    # The check itself compiles on 5.1 (health() above runs it there).
    lua.compile((HERE / "health.lua").read_text())
