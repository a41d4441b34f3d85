"""The shard memory benchmark (``make bench-shard``) at a few cycles, so that it cannot rot.

No figure is asserted but what the shard keeps: nothing of the deleted pipelines, whose
crashes its log shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import REPO


def test_the_shard_benchmark_measures_each_checkpoint(tmp_path: Path) -> None:
    options = ["--cycles", "6", "--every", "3", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "bench/shard_growth.py", *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "benchmarks-shard.json").read_text())
    assert [r["cycles"] for r in rows] == [0, 3, 6]
    for r in rows:
        assert r["rss_kib"] > 0
        assert r["crashes_logged"] == r["cycles"]  # each cycle's pipeline crashed
        assert (r["crashes_kept"], r["start_locks"], r["programs"]) == (0, 1, 0)
        assert r["loggers"] == rows[0]["loggers"]
    assert "| 6 |" in (tmp_path / "benchmarks-shard.md").read_text()
