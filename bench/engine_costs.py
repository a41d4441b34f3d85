"""Per-engine cost of a pipeline: apply -> Ready latency and memory (RSS) per pipeline.

    KUBECONFIG=... python bench/engine_costs.py [--pipelines 10]

Runs against the cluster of KUBECONFIG (``make cluster-up`` gives one), with the CRD
installed. For each engine it starts the operator as its own process (and, for the service
engine, a ``juturna serve`` on loopback), creates the example pipeline N times one after
another, and reports the median and maximum time from the create call to Ready=True, and
the growth in resident memory per Ready pipeline: the operator's own for ``inprocess``, the
operator's plus its workers' for ``process``, the operator's plus the service's for
``service``. Everything it starts is stopped by PID; everything it creates is deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests")]

from operator_process import OperatorProcess  # noqa: E402
from processes import processes_mentioning, rss_kib  # noqa: E402

from juturna_operator.api import GROUP, PLURAL, VERSION  # noqa: E402
from support import JuturnaServe  # noqa: E402

EXAMPLE = yaml.safe_load((REPO / "examples" / "pipeline.yaml").read_text())


def total_rss_kib(pids: list[int]) -> int:
    """Resident memory of these processes together; one already gone counts 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += rss_kib(pid)
    return total


def measure(engine: str, n: int, objects: client.CustomObjectsApi, core: client.CoreV1Api) -> dict:
    base = Path(tempfile.mkdtemp(prefix=f"bench-{engine}-"))
    work = base / "work"
    env = {
        **os.environ,
        "JUTURNA_OPERATOR_PLUGIN_PATH": str(REPO / "examples" / "plugins"),
        "JUTURNA_OPERATOR_WORKDIR": str(work),
        "JUTURNA_OPERATOR_ENGINE": engine,
    }
    serve = None
    if engine == "service":
        serve = JuturnaServe(work, base / "serve.log").start()
        env["JUTURNA_OPERATOR_RUNTIMES"] = json.dumps({"local": {"url": serve.url}})
        env["JUTURNA_OPERATOR_DEFAULT_RUNTIME"] = "local"
    ns = f"bench-{engine}-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    # Only its own namespace: other Pipelines in the cluster are not the benchmark's.
    op = OperatorProcess(base / "operator.log", env, ["-n", ns], tied=False, grace_s=30)
    try:
        op.start()
        time.sleep(1)

        def pids() -> list[int]:
            extra = processes_mentioning(f"--folder {work} ")
            return [op.pid, *extra, *([serve.proc.pid] if serve and serve.proc else [])]

        before = total_rss_kib(pids())
        latencies = []
        for i in range(n):
            body = copy.deepcopy(EXAMPLE)
            body["metadata"] = {"name": f"p{i}"}
            started = time.monotonic()
            objects.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
            while True:
                got = objects.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, f"p{i}")
                conds = (got.get("status") or {}).get("conditions") or []
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                    break
                time.sleep(0.01)
            latencies.append(time.monotonic() - started)
        time.sleep(1)
        after = total_rss_kib(pids())
        for i in range(n):
            objects.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, f"p{i}")
        while objects.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
            time.sleep(0.1)
    finally:
        op.stop()
        if serve is not None:
            serve.stop()
        core.delete_namespace(ns)
        shutil.rmtree(base, ignore_errors=True)
    return {
        "engine": engine,
        "p50_ms": statistics.median(latencies) * 1000,
        "max_ms": max(latencies) * 1000,
        "rss_per_pipeline_mib": (after - before) / n / 1024,
        "rss_before_mib": before / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=10)
    parser.add_argument("--engines", default="inprocess,process,service")
    args = parser.parse_args()
    config.load_kube_config()
    objects, core = client.CustomObjectsApi(), client.CoreV1Api()
    rows: list[dict[str, Any]] = [
        measure(e, args.pipelines, objects, core) for e in args.engines.split(",")
    ]
    print("| engine | apply → Ready p50 | max | RSS per pipeline | RSS before |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['p50_ms']:.0f} ms | {r['max_ms']:.0f} ms | "
            f"{r['rss_per_pipeline_mib']:.1f} MiB | {r['rss_before_mib']:.0f} MiB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
