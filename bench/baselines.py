"""Bare Juturna, the floor the operator is measured against: the same pipelines, no operator.

    python bench/baselines.py direct N --workdir D     PipelineManager in this process
    python bench/baselines.py serve N --workdir D      POST /pipelines/deploy on `juturna serve`

Prints one JSON object: per-pipeline deploy latencies (seconds; deploy = create, warmup and
start, which is what Ready means to the operator), and, for ``direct``, the deletion floor:
with --floor, stop and delete every pipeline one after another (sequential) or from a pool
of threads (threaded). Runs in its own process, so that its pipelines do not weigh on the caller.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from workload import pipeline_manifest

REPO = Path(__file__).resolve().parents[1]
PLUGIN_ROOT = REPO / "examples" / "plugins"
DELETE_THREADS = 64
FLOOR_LIMIT_S = 150.0
FLOORS = ("sequential", "threaded")
DEPLOY_LIMIT_S = 300.0  # a saturated process deploys for ever: then report how many


def example_config(i: int) -> dict[str, Any]:
    """The example pipeline as the operator hands it to Juturna, under a name of its own."""
    from juturna_operator.api import PipelineSpec

    spec = pipeline_manifest(f"bench{i}")["spec"]
    return PipelineSpec.model_validate(spec).to_juturna_config(f"bench{i}")


def deployed(latencies: list[float], n: int) -> dict[str, Any]:
    """The deploy latencies; all Ready only if all n were deployed within DEPLOY_LIMIT_S."""
    return {
        "latencies_s": latencies,
        "deployed": len(latencies),
        "all_ready_s": sum(latencies) if len(latencies) == n else None,
    }


def direct(n: int, workdir: Path, floor: str | None = None) -> dict[str, Any]:
    sys.path.insert(0, str(PLUGIN_ROOT))  # plugin folders are import paths (JUTURNA.md)
    # ~0.3 s of imports: not part of any timing.
    from juturna.cli.commands.models.api import PipelineConfig
    from juturna.components._pipeline_manager import PipelineManager

    manager = PipelineManager()
    manager.set_base_folder(str(workdir))

    def deploy_all() -> tuple[list[float], list[str]]:
        latencies, ids = [], []
        for i in range(n):
            if sum(latencies) > DEPLOY_LIMIT_S:
                break
            config = PipelineConfig(**example_config(i))
            started = time.perf_counter()
            created = manager.deploy_pipeline(config)
            latencies.append(time.perf_counter() - started)
            ids.append(created.pipeline_id)
        return latencies, ids

    def remove(pipeline_id: str) -> None:
        manager.stop_pipeline(pipeline_id)
        manager.delete_pipeline(pipeline_id, True)

    latencies, ids = deploy_all()
    result = deployed(latencies, n)
    if floor is None:
        return result  # the process exits without deleting: that is not measured here

    # One method per process, on freshly deployed pipelines: deploying a second thousand
    # beside what a capped first method left alive would measure an overloaded process.
    # The floor stops at FLOOR_LIMIT_S (at N = 1000 it can take minutes, and one delete
    # can stall for good once the process is saturated): the count deleted by then is the
    # result, and the rate says the rest. The deadline is kept by this thread, not between
    # deletes.
    threads = 1 if floor == "sequential" else DELETE_THREADS
    started = time.perf_counter()
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    futures = [pool.submit(remove, pipeline_id) for pipeline_id in ids]
    finished, _ = concurrent.futures.wait(futures, timeout=FLOOR_LIMIT_S)
    pool.shutdown(wait=False, cancel_futures=True)
    return result | {
        f"delete_{floor}_s": time.perf_counter() - started,
        f"deleted_{floor}": len(finished),
        **({"delete_threads": threads} if floor == "threaded" else {}),
    }


def serve(n: int, workdir: Path) -> dict[str, Any]:
    import httpx

    sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests")]
    from support import JuturnaServe

    server = JuturnaServe(workdir, workdir.parent / "serve.log").start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            latencies, ids = [], []
            for i in range(n):
                if sum(latencies) > DEPLOY_LIMIT_S:
                    break
                started = time.perf_counter()
                reply = http.post("/pipelines/deploy", json=example_config(i))
                latencies.append(time.perf_counter() - started)
                reply.raise_for_status()
                ids.append(reply.json()["pipe_id"])
        # No cleanup: stopping the server ends its pipelines; the folder is temporary.
    finally:
        server.stop()
    return deployed(latencies, n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["direct", "serve"])
    parser.add_argument("n", type=int)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument(
        "--floor",
        choices=FLOORS,
        help="direct: then delete them all this way (default: deploy latencies only)",
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONPATH", str(PLUGIN_ROOT))
    if args.kind == "direct":
        result = direct(args.n, args.workdir, floor=args.floor)
    else:
        result = serve(args.n, args.workdir)
    print(json.dumps(result), flush=True)
    os._exit(0)  # without waiting for the pipelines' threads: the folder is temporary


if __name__ == "__main__":
    sys.exit(main())
