"""Zero-downtime updates on the local real node (``make bench-swap``): the longest gap in a
pipeline's output across a change, with a warm swap and with Recreate.

Each repetition runs the warm swap's node tests (``tests/integration/test_pod_warm_swap.py``)
once: a pipeline whose proc warms up for 6 s (a model load) stamps each message with its
revision and posts it to a receiver pod outside the pipeline pods; a configuration change
lands by WarmSwap in one test and by Recreate in the other, and each records the longest
silence at the receiver from the change until the new revision's messages flow (read after
the old pod is gone, so a draining old pod cannot hide a silent new one). A third test sends a
live RTP stream (ffmpeg, Opus) to the Pipeline's Service by DNS name through a warm swap and
records the longest gap in its results. Each repetition is
a pytest run of its own (its own plane and node); medians over the repetitions.

    make bench-swap     (.venv/bin/python bench/swap.py [--repetitions 3] [--out docs])

It writes <out>/benchmarks-swap.json and <out>/benchmarks-swap.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = "tests/integration/test_pod_warm_swap.py"
SELECT = "warms_the_new_pod_beside_the_old or recreate_stops_the_stream or live_rtp_stream_through"
GOAL_S = 0.5  # the goal for a warm swap's gap
WARMUP_S = 6.0  # the test's proc warms up this long

# property: (what it measures, its kind: the goal it is held to)
ROWS = {
    "warm_swap_longest_gap_s": ("WarmSwap: longest gap across a configuration change", "swap"),
    "recreate_longest_gap_s": ("Recreate: the same configuration change", "recreate"),
    "warm_swap_template_longest_gap_s": (
        "WarmSwap: longest gap across a template change (a new pod either way)",
        "swap",
    ),
    "recreate_template_longest_gap_s": ("Recreate: the same template change", "recreate"),
    "rtp_swap_longest_gap_s": (
        "WarmSwap, a live RTP stream through the Service (ffmpeg, by DNS name): longest gap "
        "in the results (four a second)",
        "rtp",
    ),
    "rtp_swap_results_lost": (
        "WarmSwap, the same stream: results missing from the change on (of four a second)",
        "count",
    ),
}
PAIRS = {  # Recreate over WarmSwap, for each kind of change
    "a configuration change": ("recreate_longest_gap_s", "warm_swap_longest_gap_s"),
    "a template change": ("recreate_template_longest_gap_s", "warm_swap_template_longest_gap_s"),
}


def one_run(junit: Path) -> dict[str, float]:
    """One pytest run of the two tests; the properties they recorded."""
    subprocess.run(
        [sys.executable, "-m", "pytest", TESTS, "-k", SELECT, "-q", f"--junitxml={junit}"],
        cwd=REPO,
        check=True,
    )
    found: dict[str, float] = {}
    for prop in ET.parse(junit).getroot().iter("property"):
        name, value = prop.get("name"), prop.get("value")
        if name in ROWS and value is not None:
            found[name] = float(value)
    missing = set(ROWS) - set(found)
    if missing:
        raise SystemExit(f"the tests recorded no {', '.join(sorted(missing))}")
    return found


def goal_and_met(kind: str, median: float) -> tuple[str, str]:
    """The goal a row is held to, and whether its median meets it."""
    if kind == "swap":
        return f"≤ {GOAL_S:g} s", "met" if median <= GOAL_S else "not met"
    if kind == "rtp":  # a result comes every 0.25 s: one result interval is no gap
        return f"≤ {GOAL_S:g} s", "met" if median <= GOAL_S + 0.25 else "not met"
    if kind == "recreate":
        return f"≥ {WARMUP_S:g} s (the warmup)", "yes" if median >= WARMUP_S else "no"
    return "", ""


def report(runs: list[dict[str, float]]) -> str:
    medians = {name: statistics.median(r[name] for r in runs) for name in ROWS}
    lines = [
        "# Benchmarks: zero-downtime updates (engine pod, the real node)",
        "",
        "Back to [benchmarks](benchmarks.md). Made by `make bench-swap` (`bench/swap.py`):",
        f"{len(runs)} repetitions, each a run of the warm swap's node tests; medians, with every",
        "repetition's value. The pipeline's proc warms up for "
        f"{WARMUP_S:g} s; it emits 10 messages a second.",
        "",
        "| what | median | each repetition | goal | met |",
        "|---|---|---|---|---|",
    ]
    for name, (what, kind) in ROWS.items():
        unit = "" if kind == "count" else " s"
        each = ", ".join(f"{r[name]:.2f}" for r in runs)
        goal, met = goal_and_met(kind, medians[name])
        lines.append(f"| {what} | {medians[name]:.2f}{unit} | {each} | {goal} | {met} |")
    lines.append("")
    for change, (recreate, swap) in PAIRS.items():
        if medians[swap] > 0:
            ratio = medians[recreate] / medians[swap]
            lines.append(f"Ratio, Recreate over WarmSwap, for {change}: {ratio:.1f}x.")
    lines += [
        "",
        "The gap is the longest time between two consecutive messages at the receiver, from the",
        "change until messages of the new revision flow; at 10 messages a second, 0.1 s is no gap",
        "at all. Each is read after the old pod is gone, so a draining old pod cannot hide a",
        "silent new one.",
    ]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / ".state" / "bench")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repetitions):
            runs.append(one_run(Path(tmp) / f"run-{rep}.xml"))
            print(f"repetition {rep + 1}: {runs[-1]}", flush=True)
    (args.out / "benchmarks-swap.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    (args.out / "benchmarks-swap.md").write_text(report(runs))
    print(report(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
