"""The pipeline every benchmark row runs, operator and baselines alike.

It is the example pipeline (ticker -> scale -> jsonl) with its ticker slowed to
``BENCH_TICK_RATE`` ticks per second (default 0.2, one every 5 s). At the example's 4 Hz,
each running pipeline costs bare Juturna about 3.8 ms of CPU per second under the GIL
(7 threads and 7 hand-offs per tick), so 300 pipelines already take a whole core and
1000 ask for 3.8: the process saturates and nothing finishes, with or without the
operator (docs/benchmarks.md, "Workload"). At 0.2 Hz, 1000 running pipelines cost bare
Juturna about a third of a core, which leaves room to measure the operator.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = yaml.safe_load((REPO / "examples" / "pipeline.yaml").read_text())
TICK_RATE = float(os.environ.get("BENCH_TICK_RATE", "0.2"))


def pipeline_manifest(name: str, state: str = "Running") -> dict[str, Any]:
    """The example Pipeline named ``name``, its ticker at ``TICK_RATE``."""
    body = copy.deepcopy(EXAMPLE)
    body["metadata"] = {"name": name}
    body["spec"]["state"] = state
    for node in body["spec"]["nodes"]:
        if node["mark"] == "ticker":
            node["configuration"]["rate"] = TICK_RATE
    return body
