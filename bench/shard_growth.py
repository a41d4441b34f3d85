"""A long-lived shard's memory (a worker of the process engine with many pipelines per
process): one shard's resident memory after 0, 500, 1000, 1500 and
2000 deploy/delete cycles (``make bench-shard``).

A shard ends when its last pipeline leaves it, so one pipeline stays on it throughout; each
cycle then deploys one more pipeline to Running on that shard and deletes it, as a restart
policy does after a crash: the cycle's pipeline is the example's with a plugin thread that
raises at once (``faulty``'s ``proc/helper``), so each leaves a crash, Juturna's loggers of
its name and a start lock behind it, unless the shard forgets them. At each checkpoint it
reads the shard's resident memory (VmRSS) and what the shard keeps (its health answer's
crashes; ``GET /operator/retained``: start locks, Juturna's loggers, programs), and counts
the crashes the shard logged. No cluster: the engine is driven directly, as its tests do.

    make bench-shard   (.venv/bin/python bench/shard_growth.py [--cycles 2000] [--every 500]
                        [--out docs])

It writes <out>/benchmarks-shard.json and <out>/benchmarks-shard.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "operator")]

from processes import rss_kib  # noqa: E402

from juturna_operator.api import PipelineSpec  # noqa: E402
from juturna_operator.domain import InstanceState, PipelineKey  # noqa: E402
from juturna_operator.engines.base import Plan  # noqa: E402
from juturna_operator.engines.process import ProcessEngine  # noqa: E402
from juturna_operator.settings import Settings  # noqa: E402

PLUGIN_ROOTS = [REPO / "examples" / "plugins", REPO / "tests" / "plugins"]
RUNNING = Plan(until=InstanceState.Running)
# A fast ticker: a stop waits out the source's sleep (docs/juturna.md, pitfall 10).
TICKER = {"name": "src", "type": "source", "mark": "ticker", "configuration": {"rate": 50}}
SINK = {"name": "out", "type": "sink", "mark": "jsonl", "configuration": {}}
CALM = {"name": "amp", "type": "proc", "mark": "scale", "configuration": {}}
CRASHING = {
    "name": "amp",
    "type": "proc",
    "mark": "helper",
    "configuration": {"after": 0, "depth": 0},
}


def config(key: PipelineKey, middle: dict[str, Any]) -> dict[str, Any]:
    spec = PipelineSpec.model_validate(
        {
            "plugins": ["tones", "faulty"],
            "nodes": [TICKER, middle, SINK],
            "links": [{"from": "src", "to": "amp"}, {"from": "amp", "to": "out"}],
        }
    )
    return spec.to_juturna_config(key.juturna_name)


class Shard:
    """The one shard of the engine's work folder: its PID, log and HTTP API."""

    def __init__(self, workdir: Path) -> None:
        state = workdir / ".workers"
        [record] = state.glob("*.json")  # its worker's (pipelines have theirs below)
        name = record.stem
        described = json.loads(record.read_text())
        self.pid, self.port = int(described["pid"]), int(described["port"])
        self.token = (state / f"{name}.token").read_text().strip()
        self.log = state / f"{name}.log"

    def get(self, path: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.load(answer)

    def crashes_logged(self) -> int:
        return self.log.read_text().count("crashed: RuntimeError")

    def checkpoint(self, cycles: int, began: float) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while self.crashes_logged() < cycles and time.monotonic() < deadline:
            time.sleep(0.05)  # the last cycle's crash, if it came after its delete
        health = self.get("/operator/health")
        try:
            kept: dict[str, Any] | None = self.get("/operator/retained")
        except urllib.error.HTTPError:
            kept = None  # code from before the route
        row: dict[str, Any] = {
            "cycles": cycles,
            "elapsed_s": time.monotonic() - began,
            "rss_kib": rss_kib(self.pid),
            "crashes_logged": self.crashes_logged(),
            "crashes_kept": len(health["crashes"]),
            "health_bytes": len(json.dumps(health)),
        }
        if kept is not None:
            row |= {
                "start_locks": kept["start_locks"],
                "loggers": len(kept["loggers"]),
                "programs": kept["programs"],
            }
        return row


async def cycles(workdir: Path, total: int, every: int) -> list[dict[str, Any]]:
    engine = ProcessEngine(
        Settings(
            plugin_roots=PLUGIN_ROOTS, workdir=workdir, stop_timeout_s=10, pipelines_per_process=32
        )
    )
    resident = PipelineKey("bench", "resident", str(uuid.uuid4()))
    await engine.create(resident, config(resident, CALM), "r1", RUNNING)
    shard = Shard(workdir)
    rows = []
    began = time.monotonic()
    try:
        for done in range(total + 1):
            if done % every == 0:
                rows.append(await asyncio.to_thread(shard.checkpoint, done, began))
                print(json.dumps(rows[-1]), file=sys.stderr)
            if done == total:
                break
            key = PipelineKey("bench", f"c{done:05d}", str(uuid.uuid4()))
            await engine.create(key, config(key, CRASHING), "r1", RUNNING)
            await engine.delete(key)
    finally:
        await engine.delete(resident)
        await engine.sweep({})
        await engine.close()
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    first, last = rows[0], rows[-1]
    slope = (last["rss_kib"] - first["rss_kib"]) * 1024 / max(1, last["cycles"])
    kept = "start_locks" in first
    lines = [
        "# A long-lived shard's memory (bench/shard_growth.py)",
        "",
        f"Made by `make bench-shard` on {time.strftime('%Y-%m-%d')}; do not edit by hand. One "
        "run on a 2-core machine shared with other work.",
        "",
        "One shard keeps one pipeline throughout; each cycle deploys another pipeline to "
        "Running on it (the example's, with a plugin thread that raises at once) and deletes "
        "it. Resident memory (VmRSS) of the shard process, and what it keeps, at each "
        "checkpoint.",
        "",
        "| cycles | shard RSS | since the last row, per cycle | crashes logged | crashes kept "
        "| health answer | "
        + ("start locks | Juturna loggers | programs | " if kept else "")
        + "elapsed |",
        "|---" * (10 if kept else 7) + "|",
    ]
    for before, r in zip([None, *rows], rows, strict=False):
        step = (
            f"{(r['rss_kib'] - before['rss_kib']) * 1024 / (r['cycles'] - before['cycles']):.0f} B"
            if before is not None
            else "-"
        )
        extra = f"{r['start_locks']} | {r['loggers']} | {r['programs']} | " if kept else ""
        lines.append(
            f"| {r['cycles']} | {r['rss_kib'] / 1024:.1f} MiB | {step} | {r['crashes_logged']} | "
            f"{r['crashes_kept']} | {r['health_bytes']} B | {extra}{r['elapsed_s']:.0f} s |"
        )
    lines += [
        "",
        f"Growth from {first['cycles']} to {last['cycles']} cycles: "
        f"{(last['rss_kib'] - first['rss_kib']) / 1024:.1f} MiB, {slope:.0f} B per cycle.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--every", type=int, default=500, help="cycles between checkpoints")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as folder:
        workdir = Path(folder) / "work"
        workdir.mkdir()
        rows = asyncio.run(cycles(workdir, args.cycles, args.every))
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(rows)
    (args.out / "benchmarks-shard.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "benchmarks-shard.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
