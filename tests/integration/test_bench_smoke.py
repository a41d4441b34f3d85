"""The benchmark harness in smoke mode (N = 5 in-process with its floor row, one process
worker; one repetition), so that it cannot rot.

No timing is asserted (the machine is shared and noisy): only that every measurement is
made, the floor makes the operator's writes, and the report is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from juturna_operator.api import DesiredState
from juturna_operator.domain import InstanceState, PipelineKey
from juturna_operator.engines.base import InstanceInfo
from juturna_operator.lifecycle import Desired, Observed
from juturna_operator.status import Facts, build_status
from support import REPO, assert_sole_operator

pytestmark = [pytest.mark.cluster, pytest.mark.own_operator]


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("crd")
def test_the_harness_measures_everything_at_n_5(kubeconfig: Path, tmp_path: Path) -> None:
    assert_sole_operator(kubeconfig)
    options = ["--mode", "smoke", "--use-kubeconfig", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "harness.py", *options],
        cwd=REPO / "bench",
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    rows = {(s["scenario"]["engine"], s["scenario"]["n"]): s["runs"] for s in results["scenarios"]}
    assert list(rows) == [("floor", 5), ("inprocess", 5), ("process", 1)]
    (run,) = rows["inprocess", 5]
    assert len(run["latencies_s"]) == 5
    assert all(latency > 0 for latency in run["latencies_s"])
    for key in ("writes_per_pipeline", "requests_per_pipeline", "base_rss_mib", "delete_all_s"):
        assert run[key] > 0, key
    assert run["recovery_s"] > 0
    assert run["recovered_redeployed"] == 5  # in-process instances die with the operator
    # The floor is measured as the operator is, and makes the same writes per Pipeline.
    (floor,) = rows["floor", 5]
    assert len(floor["latencies_s"]) == floor["ready"] == floor["deleted"] == 5
    assert all(latency > 0 for latency in floor["latencies_s"])
    # The same kinds of write; only counts may differ (a slow pass adds a progress status).
    assert set(floor["writes_by_kind"]) == set(run["writes_by_kind"]), (floor, run)
    assert all(count == 1 for count in floor["writes_by_kind"].values()), floor
    # The operator's own finalizer: one PATCH of the object per Pipeline, as the floor's.
    assert run["writes_by_kind"]["PATCH/pipelines"] == 1, run["writes_by_kind"]
    assert floor["cpu_s_per_pipeline"] > 0
    # One worker's start, read from its record and /proc at the Ready event.
    (process,) = rows["process", 1]
    (start,) = process["worker_starts"]
    for key in ("wall_s", "cpu_s", "pss_mib"):
        assert start[key] > 0, (key, start)
    (base,) = results["baselines"]
    assert len(base["direct"][0]["latencies_s"]) == len(base["serve"][0]["latencies_s"]) == 5
    # One deletion floor per method, each in its own process.
    assert base["direct"][0]["delete_sequential_s"] > 0
    assert base["direct"][1]["delete_threaded_s"] > 0
    assert not (tmp_path / "benchmarks.partial.json").exists()  # the run completed
    report = (tmp_path / "benchmarks.md").read_text()
    assert "### Goals (issue 17)" in report
    assert "| floor | 5 |" in report
    # The first such row is apply → Ready's, with the two xfloor columns after "all Ready".
    operator_row = next(
        line for line in report.splitlines() if line.startswith("| inprocess | 5 |")
    )
    assert re.search(r"\| \d+\.\d\dx \| \d+\.\d\dx \|", operator_row), operator_row  # xfloor
    # The worker-start goals are measured at N = 1, so smoke mode fills them in.
    assert re.search(
        r"\| process engine, one worker's start: wall .* ms \| (yes|\*\*no\*\*) \|", report
    )
    assert (tmp_path / "benchmarks-latency-cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bench_module(name: str) -> ModuleType:
    """A module of bench/ by its file (bench/ is not on the path: its names are generic)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_floor_writes_the_status_the_operator_writes_on_running() -> None:
    """The floor's status is ``build_status``'s for a Running pipeline, field for field (but
    the transition times): when the operator's status changes shape, this fails, and the
    floor must follow (issue 17: the same writes per Pipeline)."""
    floor, workload = bench_module("floor"), bench_module("workload")
    body: dict[str, Any] = workload.pipeline_manifest("p0001")
    body["metadata"] |= {"namespace": "bench", "uid": "u-1", "generation": 3}
    nodes = [node["name"] for node in body["spec"]["nodes"]]
    info = InstanceInfo(
        PipelineKey("bench", "p0001", "u-1"),
        "pid-1",
        "rev",
        InstanceState.Running,
        dict.fromkeys(nodes, "Running"),
    )
    facts = Facts(
        Desired(DesiredState.Running, 3, "rev"),
        Observed(InstanceState.Running, "rev", 3),
        None,
        (),
        0,
        len(nodes),
        info,
    )

    def timeless(status: dict[str, Any]) -> dict[str, Any]:
        conditions = [c | {"lastTransitionTime": "-"} for c in status["conditions"]]
        return status | {"conditions": conditions}

    operators = timeless(build_status(facts, {}))
    floors = timeless(floor.running_status(body, "pid-1", "rev"))
    assert floors == operators
