"""The benchmark's report: JSON, a markdown table with the targets marked, and a CDF plot."""

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


# (what, target text, scenario filter, value getter, limit): one row of the targets table.
TARGETS: list[tuple[str, str, tuple[str, int], Callable[[list[dict[str, Any]]], float], float]] = [
    (
        "p50 apply → Ready, in-process, N = 100",
        "≤ 150 ms",
        ("inprocess", 100),
        lambda runs: _pct(runs, 50),
        150,
    ),
    (
        "p99 apply → Ready, in-process, N = 100",
        "≤ 1000 ms",
        ("inprocess", 100),
        lambda runs: _pct(runs, 99),
        1000,
    ),
    (
        "all Ready, in-process, N = 1000",
        "≤ 60 s",
        ("inprocess", 1000),
        lambda runs: _median(runs, lambda r: r["all_ready_s"]),
        60,
    ),
    (
        "writes per pipeline to Ready (in-process, N = 100)",
        "≤ 4",
        ("inprocess", 100),
        lambda runs: _median(runs, lambda r: r["writes_per_pipeline"]),
        4,
    ),
    (
        "operator restart, 1000 Running (in-process): all Ready again",
        "≤ 60 s",
        ("inprocess", 1000),
        lambda runs: _median(runs, lambda r: r["recovery_s"]),
        60,
    ),
    (
        "operator base RSS",
        "≤ 150 MB",
        ("inprocess", 100),
        lambda runs: _median(runs, lambda r: r["base_rss_mib"]) * 1.048576,
        150,
    ),
    (
        "RSS per in-process pipeline (N = 100)",
        "≤ 1 MB",
        ("inprocess", 100),
        lambda runs: _median(runs, lambda r: r["rss_per_pipeline_mib"]) * 1.048576,
        1,
    ),
    (
        "process engine, N = 50: all Ready",
        "≤ 30 s",
        ("process", 50),
        lambda runs: _median(runs, lambda r: r["all_ready_s"]),
        30,
    ),
]


def _scenarios(results: dict[str, Any]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    return {(s["scenario"]["engine"], s["scenario"]["n"]): s["runs"] for s in results["scenarios"]}


def _baselines(results: dict[str, Any]) -> dict[int, dict[str, list[dict[str, Any]]]]:
    return {b["n"]: b for b in results["baselines"]}


def markdown(results: dict[str, Any]) -> str:
    scenarios, baselines = _scenarios(results), _baselines(results)
    out = [
        f"Mode `{results['mode']}`, {results['repetitions']} repetition(s) per row; every figure "
        "is the median over repetitions (latency percentiles: the median of each repetition's "
        "percentile). Latency: from the client's create call to the watch event that shows "
        "`Ready=True` for the current generation.",
        "",
        "### apply → Ready",
        "",
        "| engine | N | p50 | p95 | p99 | all Ready | xdirect (p50) | xserve (p50) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (engine, n), runs in scenarios.items():
        base = baselines.get(n)
        ratio_direct = ratio_serve = "-"
        if base is not None and engine == "inprocess":
            p50 = _pct(runs, 50)
            ratio_direct = f"{p50 / _pct(base['direct'], 50):.1f}x"
            ratio_serve = f"{p50 / _pct(base['serve'], 50):.1f}x"
        out.append(
            f"| {engine} | {n} | {_pct(runs, 50):.0f} ms | {_pct(runs, 95):.0f} ms | "
            f"{_pct(runs, 99):.0f} ms | "
            f"{_seconds(_median(runs, lambda r: r['all_ready_s']), _count(runs, 'ready'))} | "
            f"{ratio_direct} | {ratio_serve} |"
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
        "| base RSS | RSS / pipeline | CPU / pipeline | worker RSS | recovery | delete all |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (engine, n), runs in scenarios.items():

        def med(key: str, runs: list[dict[str, Any]] = runs) -> float | None:
            values = [r[key] for r in runs if key in r]
            return statistics.median(values) if values else None

        worker = med("worker_rss_mib")
        recovery = _median(runs, lambda r: r.get("recovery_s", -1.0))
        out.append(
            f"| {engine} | {n} | {med('writes_per_pipeline'):.1f} | "
            f"{med('requests_per_pipeline'):.1f} | {med('modified_events_per_pipeline'):.1f} | "
            f"{med('base_rss_mib'):.0f} MiB | {med('rss_per_pipeline_mib'):.2f} MiB | "
            f"{med('cpu_s_per_pipeline') * 1000:.0f} ms | "
            f"{f'{worker:.0f} MiB' if worker is not None else '-'} | "
            f"{'-' if recovery == -1.0 else _seconds(recovery, _count(runs, 'recovered'))} | "
            f"{_seconds(_median(runs, lambda r: r['delete_all_s']), _count(runs, 'deleted'))} |"
        )
    kinds = {}
    for (engine, n), runs in scenarios.items():
        kinds[f"{engine}, N = {n}"] = runs[0].get("writes_by_kind", {})
    out += ["", "Writes per pipeline by kind (first repetition):", ""]
    out += [
        f"- {k}: " + ", ".join(f"{w} {v:.2f}" for w, v in sorted(d.items()))
        for k, d in kinds.items()
    ]
    out += [
        "",
        "Deletion floor (bare Juturna: stop and `delete_pipeline`, same pipelines; measured "
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
    out += ["", "### Targets", "", "| what | target | measured | met |", "|---|---|---|---|"]
    for what, target, key, value, limit in TARGETS:
        runs = scenarios.get(key)
        if runs is None:
            out.append(f"| {what} | {target} | not measured in this mode | - |")
            continue
        if not all(_has(r, what) for r in runs):
            out.append(f"| {what} | {target} | not measured: not all were Ready | **no** |")
            continue
        v = value(runs)
        shown = f"{v:.2f}" if v != math.inf else "not reached within the limit"
        out.append(f"| {what} | {target} | {shown} | {'yes' if v <= limit else '**no**'} |")
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


def _has(run: dict[str, Any], what: str) -> bool:
    return "restart" not in what or "recovery_s" in run


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
