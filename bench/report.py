"""The benchmark's report: JSON, markdown tables with issue 17's goals marked, and a CDF plot."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

FINDINGS = Path(__file__).with_name("findings.md")  # hand-written: what the profiles showed


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _median(runs: list[dict[str, Any]], pick: Callable[[dict[str, Any]], float | None]) -> float:
    """Median over repetitions; a value not reached within the limit (None) counts as
    infinite, so a target is never met by a partial row."""
    values = [pick(r) for r in runs]
    return statistics.median(math.inf if v is None else v for v in values)


def _seconds(value: float, done: str = "") -> str:
    return f"{value:.2f} s" if value != math.inf else f"not within the limit{done}"


def _pct(runs: list[dict[str, Any]], q: float) -> float:
    """Median over repetitions of each repetition's q-th percentile, in ms."""
    return _median(runs, lambda r: percentile(r["latencies_s"], q)) * 1000


FLOOR = "floor"  # the engine name of the floor's rows (bench/floor.py)
FLOOR_RATIO_GOAL = 1.5  # issue 17: p50 within 1.5x of the floor's
Runs = list[dict[str, Any]]
Scenarios = dict[tuple[str, int], Runs]


def _all_ready_s(runs: Runs) -> float:
    return _median(runs, lambda r: r["all_ready_s"])


def _worker_start(runs: Runs, key: str) -> float | None:
    """Median over repetitions of each repetition's median worker ``key`` (None: none
    measured)."""
    medians = [
        statistics.median(start[key] for start in r["worker_starts"])
        for r in runs
        if r.get("worker_starts")
    ]
    return statistics.median(medians) if medians else None


# A goal's check: its measured value as text and whether it is met, from the scenarios;
# None when the rows it needs were not run in this mode.
Check = Callable[[Scenarios], tuple[str, bool] | None]


def _floor_ratio(scenarios: Scenarios) -> tuple[str, bool] | None:
    runs, floor = scenarios.get(("inprocess", 100)), scenarios.get((FLOOR, 100))
    if runs is None or floor is None:
        return None
    ratio = _pct(runs, 50) / _pct(floor, 50)
    text = f"{_pct(runs, 50):.0f} ms = {ratio:.2f}x the floor's {_pct(floor, 50):.0f} ms"
    return text, ratio <= FLOOR_RATIO_GOAL


def _same_writes(scenarios: Scenarios) -> tuple[str, bool] | None:
    runs, floor = scenarios.get(("inprocess", 100)), scenarios.get((FLOOR, 100))
    if runs is None or floor is None:
        return None
    ours = _median(runs, lambda r: r["writes_per_pipeline"])
    theirs = _median(floor, lambda r: r["writes_per_pipeline"])
    return f"operator {ours:.2f}, floor {theirs:.2f}", abs(ours - theirs) <= 0.1


def _within(
    key: tuple[str, int], pick: Callable[[Runs], float], limit: float, unit: str = "s"
) -> Check:
    def check(scenarios: Scenarios) -> tuple[str, bool] | None:
        runs = scenarios.get(key)
        if runs is None:
            return None
        value = pick(runs)
        if value == math.inf:
            return "not reached within the limit", False
        return f"{value:.2f} {unit}", value <= limit

    return check


def _worker(key: str, limit: float, scale: float, unit: str) -> Check:
    """One worker's start (``key``), at N = 1; N = 50's median beside it."""

    def check(scenarios: Scenarios) -> tuple[str, bool] | None:
        runs = scenarios.get(("process", 1))
        if runs is None:
            return None
        value = _worker_start(runs, key)
        if value is None:
            return "not measured: no worker record found at Ready", False
        text = f"{value * scale:.0f} {unit}"
        many = _worker_start(scenarios.get(("process", 50)) or [], key)
        if many is not None:
            text += f" (N = 50: {many * scale:.0f} {unit})"
        return text, value * scale <= limit

    return check


def _restart(scenarios: Scenarios) -> tuple[str, bool] | None:
    """The restart with 1000 Running on shards (engine process, many pipelines per process),
    the dense pipelines kept across a restart (in-process instances die with the operator:
    its row is below)."""
    runs = scenarios.get(("shard", 1000))
    if runs is None:
        return None
    if not all(r.get("recovery_s") is not None for r in runs):
        return "not measured: not all were Ready again within the limit", False
    value = _median(runs, lambda r: r["recovery_s"])
    redeployed = _median(runs, lambda r: r.get("recovered_redeployed", 0))
    return f"{value:.2f} s (redeployed: {redeployed:.0f} of 1000)", value <= 10 and not redeployed


# Issue 17's goals: (what, goal, check).
GOALS: list[tuple[str, str, Check]] = [
    (
        "p50 apply → Ready, in-process, N = 100",
        f"≤ {FLOOR_RATIO_GOAL}x the floor's p50 (same run)",
        _floor_ratio,
    ),
    (
        "… with the same writes per Pipeline as the floor (in-process, N = 100)",
        "equal (± 0.1)",
        _same_writes,
    ),
    ("all Ready, in-process, N = 1000", "≤ 30 s", _within(("inprocess", 1000), _all_ready_s, 30)),
    (
        "operator restart, 1000 Running (shards): all Ready again, adopted",
        "≤ 10 s, none redeployed",
        _restart,
    ),
    (
        "process engine, one worker's start: wall (start → Ready event)",
        "≤ 100 ms",
        _worker("wall_s", 100, 1000, "ms"),
    ),
    (
        "process engine, one worker's start: CPU (user + system) at Ready",
        "≤ 25 ms",
        _worker("cpu_s", 25, 1000, "ms"),
    ),
    (
        "process engine, one worker's start: proportional set size at Ready",
        "≤ 15 MiB",
        _worker("pss_mib", 15, 1, "MiB"),
    ),
    ("process engine, N = 50: all Ready", "≤ 5 s", _within(("process", 50), _all_ready_s, 5)),
]

# Earlier targets that still hold as limits (memory).
EARLIER: list[tuple[str, str, Check]] = [
    (
        "operator base RSS (in-process, N = 100)",
        "≤ 150 MB",
        _within(
            ("inprocess", 100),
            lambda r: _median(r, lambda x: x["base_rss_mib"]) * 1.048576,
            150,
            "MB",
        ),
    ),
    (
        "RSS per in-process pipeline (N = 100)",
        "≤ 1 MB",
        _within(
            ("inprocess", 100),
            lambda r: _median(r, lambda x: x["rss_per_pipeline_mib"]) * 1.048576,
            1,
            "MB",
        ),
    ),
]


def _scenarios(results: dict[str, Any]) -> Scenarios:
    return {(s["scenario"]["engine"], s["scenario"]["n"]): s["runs"] for s in results["scenarios"]}


def _baselines(results: dict[str, Any]) -> dict[int, dict[str, list[dict[str, Any]]]]:
    return {b["n"]: b for b in results["baselines"]}


def markdown(results: dict[str, Any]) -> str:
    scenarios, baselines = _scenarios(results), _baselines(results)
    out = [
        f"Mode `{results['mode']}`, {results['repetitions']} repetition(s) per row; every figure "
        "is the median over repetitions (latency percentiles: the median of each repetition's "
        "percentile). Latency: from the client's create call to the watch event that shows "
        "`Ready=True` for the current generation. The `floor` rows are `bench/floor.py`, a "
        "framework-free operator that makes the same writes per Pipeline and does no work, run "
        'by turns with the in-process rows of its size (below: "The floor, and why the first '
        "goal is a ratio\"); `xfloor` is an operator row's ratio to the floor's row of the "
        "same N. Steady CPU: the operator process's CPU over 9 s with every Pipeline Running, "
        "in % of one core (in-process, the pipelines' own threads included).",
        "",
        "### apply → Ready",
        "",
        "| engine | N | p50 | p95 | p99 | all Ready | xfloor (p50) | xfloor (all Ready) "
        "| xdirect (p50) | xserve (p50) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (engine, n), runs in scenarios.items():
        base, floor = baselines.get(n), scenarios.get((FLOOR, n))
        ratio_direct = ratio_serve = floor_p50 = floor_all = "-"
        p50 = _pct(runs, 50)
        if base is not None and engine == "inprocess":
            ratio_direct = f"{p50 / _pct(base['direct'], 50):.1f}x"
            ratio_serve = f"{p50 / _pct(base['serve'], 50):.1f}x"
        if floor is not None and engine != FLOOR:
            floor_p50 = f"{p50 / _pct(floor, 50):.2f}x"
            floor_all = _ratio(_all_ready_s(runs), _all_ready_s(floor))
        out.append(
            f"| {engine} | {n} | {p50:.0f} ms | {_pct(runs, 95):.0f} ms | "
            f"{_pct(runs, 99):.0f} ms | "
            f"{_seconds(_all_ready_s(runs), _count(runs, 'ready'))} | "
            f"{floor_p50} | {floor_all} | {ratio_direct} | {ratio_serve} |"
        )
    out += ["", "Baselines, same pipelines, same machine, same run:", ""]
    out += ["| baseline | N | p50 | p95 | p99 | all Ready |", "|---|---|---|---|---|---|"]
    for n, base in baselines.items():
        for kind, label in (
            ("direct", "`PipelineManager.deploy_pipeline`, one process"),
            ("serve", "`POST /pipelines/deploy` on `juturna serve`"),
        ):
            runs = base[kind]
            all_ready = _median(runs, lambda r: r["all_ready_s"])
            out.append(
                f"| {label} | {n} | {_pct(runs, 50):.1f} ms | {_pct(runs, 95):.1f} ms | "
                f"{_pct(runs, 99):.1f} ms | "
                f"{_seconds(all_ready, _count(runs, 'deployed', n))} |"
            )
    out += [
        "",
        "### API cost, resources, recovery, deletion",
        "",
        "| engine | N | writes / pipeline | requests / pipeline | MODIFIED events / pipeline "
        "| base RSS | RSS / pipeline | CPU / pipeline | steady CPU | worker RSS (median, count) "
        "| recovery | delete all |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (engine, n), runs in scenarios.items():

        def med(key: str, runs: list[dict[str, Any]] = runs) -> float | None:
            values = [r[key] for r in runs if key in r]
            return statistics.median(values) if values else None

        worker, workers, steady = med("worker_rss_mib"), med("workers"), med("steady_cpu_pct")
        recovery = _median(runs, lambda r: r.get("recovery_s", -1.0))
        out.append(
            f"| {engine} | {n} | {med('writes_per_pipeline'):.1f} | "
            f"{med('requests_per_pipeline'):.1f} | {med('modified_events_per_pipeline'):.1f} | "
            f"{med('base_rss_mib'):.0f} MiB | {med('rss_per_pipeline_mib'):.2f} MiB | "
            f"{med('cpu_s_per_pipeline') * 1000:.0f} ms | "
            f"{f'{steady:.1f} %' if steady is not None else '-'} | "
            f"{f'{worker:.0f} MiB, {workers:.0f}' if worker and workers else '-'} | "
            f"{'-' if recovery == -1.0 else _seconds(recovery, _count(runs, 'recovered'))} | "
            f"{_seconds(_median(runs, lambda r: r['delete_all_s']), _count(runs, 'deleted'))} |"
        )
    kinds = {}
    for (engine, n), runs in scenarios.items():
        kinds[f"{engine}, N = {n}"] = runs[0].get("writes_by_kind", {})
    out += ["", "Writes per pipeline by kind (first repetition; the floor's should match):", ""]
    out += [
        f"- {k}: " + ", ".join(f"{w} {v:.2f}" for w, v in sorted(d.items()))
        for k, d in kinds.items()
    ]
    out += _worker_starts(scenarios)
    out += [
        "",
        "Deletion by bare Juturna (stop and `delete_pipeline`, same pipelines; measured "
        "once per N, as it takes minutes at N = 1000):",
        "",
        "| N | sequential | thread pool | operator, in-process |",
        "|---|---|---|---|",
    ]
    for n, base in baselines.items():
        # Each method ran in its own process: gather what the runs measured.
        floor = {k: v for r in base["direct"] for k, v in r.items() if k.startswith("delete")}
        runs = scenarios.get(("inprocess", n))
        op = (
            _seconds(_median(runs, lambda r: r["delete_all_s"]), _count(runs, "deleted"))
            if runs
            else "-"
        )
        out.append(
            f"| {n} | {_floor(floor, 'sequential', n)} | {_floor(floor, 'threaded', n)} "
            f"({floor['delete_threads']} threads) | {op} |"
        )
    out += ["", "### Goals (issue 17)", ""]
    out += _checks(GOALS, scenarios)
    out += ["", "Earlier targets that still hold:", ""]
    out += _checks(EARLIER, scenarios)
    return "\n".join(out) + "\n"


def _count(runs: list[dict[str, Any]], key: str, n: int | None = None) -> str:
    """`` (k of N)`` for the first repetition that fell short, else ``""``. N is the run's
    own ``n``, or ``n`` for runs that do not carry it (the baselines)."""
    for run in runs:
        total = run.get("n", n)
        if key in run and run[key] < total:
            return f" ({run[key]} of {total})"
    return ""


def _floor(floor: dict[str, Any], how: str, n: int) -> str:
    seconds, done = floor[f"delete_{how}_s"], floor.get(f"deleted_{how}", n)
    if done >= n:
        return f"{seconds:.1f} s"
    return f"{done} of {n} in {seconds:.0f} s (limit; {done / seconds:.1f}/s)"


def _checks(checks: list[tuple[str, str, Check]], scenarios: Scenarios) -> list[str]:
    out = ["| what | goal | measured | met |", "|---|---|---|---|"]
    for what, goal, check in checks:
        found = check(scenarios)
        if found is None:
            out.append(f"| {what} | {goal} | not measured in this mode | - |")
            continue
        text, met = found
        out.append(f"| {what} | {goal} | {text} | {'yes' if met else '**no**'} |")
    return out


def _ratio(value: float, floor: float) -> str:
    if value == math.inf or floor == math.inf:
        return "-"  # one of them was not all Ready within the limit
    return f"{value / floor:.2f}x"


def _worker_starts(scenarios: Scenarios) -> list[str]:
    """The process engine's worker starts (medians), read at each Pipeline's Ready event."""
    rows = [
        (n, runs)
        for (engine, n), runs in scenarios.items()
        if engine == "process" and any(r.get("worker_starts") for r in runs)
    ]
    if not rows:
        return []
    out = [
        "",
        "Process engine, one worker's start (PIDs from `<workdir>/.workers/<uid>.json`; wall: "
        "from the process's start time in /proc to its Pipeline's Ready event; CPU and "
        "proportional set size (`smaps_rollup`) read at that event; medians):",
        "",
        "| N | workers measured | wall | CPU | PSS |",
        "|---|---|---|---|---|",
    ]
    for n, runs in rows:
        wall, cpu, pss = (_worker_start(runs, k) or 0.0 for k in ("wall_s", "cpu_s", "pss_mib"))
        measured = statistics.median(len(r.get("worker_starts", [])) for r in runs)
        out.append(
            f"| {n} | {measured:.0f} of {n} | {wall * 1000:.0f} ms | {cpu * 1000:.0f} ms | "
            f"{pss:.1f} MiB |"
        )
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (engine, n), runs in _scenarios(results).items():
        values = sorted(v * 1000 for r in runs for v in r["latencies_s"])
        ax.step(
            values,
            [(i + 1) / len(values) for i in range(len(values))],
            where="post",
            label=f"{engine}, N = {n}",
        )
    for n, base in _baselines(results).items():
        values = sorted(v * 1000 for r in base["direct"] for v in r["latencies_s"])
        ax.step(
            values,
            [(i + 1) / len(values) for i in range(len(values))],
            where="post",
            linestyle=":",
            label=f"bare PipelineManager, N = {n}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("apply → Ready (ms, log scale)")
    ax.set_ylabel("fraction of pipelines")
    ax.set_title("juturna-operator: apply → Ready latency (CDF, all repetitions)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> None:
    (out / "benchmarks.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "benchmarks-latency-cdf.png")
    (out / "benchmarks.md").write_text(
        "# Benchmarks\n\n"
        "Made by `make bench` (`bench/harness.py`); do not edit by hand. The machine: 2 cores, "
        "shared and noisy; read ratios and medians, not single figures.\n\n"
        f"Workload: every row, operator and baselines, runs the example pipeline (ticker -> "
        f"scale -> jsonl) with its ticker at {results.get('tick_rate', 0.2):g} Hz "
        "(`bench/workload.py` says why not the example's 4 Hz).\n\n"
        + markdown(results)
        + "\n![apply → Ready CDF](benchmarks-latency-cdf.png)\n\n"
        + FINDINGS.read_text()
    )


if __name__ == "__main__":  # redo the report from a run's JSON (e.g. after editing findings.md)
    import sys

    source = Path(sys.argv[1])
    write_report(json.loads(source.read_text()), source.parent)
