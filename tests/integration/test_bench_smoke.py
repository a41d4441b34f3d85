"""The benchmark harness, at N = 5 and one repetition, so that it cannot rot.

No timing is asserted (the machine is shared and noisy): only that every measurement is
made and the report is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    (run,) = results["scenarios"][0]["runs"]
    assert len(run["latencies_s"]) == 5
    assert all(latency > 0 for latency in run["latencies_s"])
    for key in ("writes_per_pipeline", "requests_per_pipeline", "base_rss_mib", "delete_all_s"):
        assert run[key] > 0, key
    assert run["recovery_s"] > 0
    assert run["recovered_redeployed"] == 5  # in-process instances die with the operator
    (base,) = results["baselines"]
    assert len(base["direct"][0]["latencies_s"]) == len(base["serve"][0]["latencies_s"]) == 5
    # One deletion floor per method, each in its own process.
    assert base["direct"][0]["delete_sequential_s"] > 0
    assert base["direct"][1]["delete_threaded_s"] > 0
    assert not (tmp_path / "benchmarks.partial.json").exists()  # the run completed
    report = (tmp_path / "benchmarks.md").read_text()
    assert "### Targets" in report
    assert "| inprocess | 5 |" in report
    assert (tmp_path / "benchmarks-latency-cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
