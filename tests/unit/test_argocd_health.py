"""The Argo CD health check (argocd/juturna.io/Pipeline/health.lua), run as Argo CD runs it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from support import ARGOCD_HEALTH, health

HERE = ARGOCD_HEALTH
TESTS = yaml.safe_load((HERE / "health_test.yaml").read_text())["tests"]


@pytest.mark.parametrize("case", TESTS, ids=[t["inputPath"] for t in TESTS])
def test_health_table(case: dict[str, Any]) -> None:
    obj = yaml.safe_load((HERE / case["inputPath"]).read_text())
    assert health(obj) == case["healthStatus"]


def test_every_state_and_outcome_is_covered() -> None:
    statuses = {t["healthStatus"]["status"] for t in TESTS}
    assert statuses == {"Progressing", "Healthy", "Degraded"}
