"""The pod engine's benchmark, on the local real node (``make bench-pods``).

For N Pipelines of the example (engine pod), created as fast as the client can, it measures
apply → Ready, beside the floor: N bare Pods of the same image running the same worker
(the Pod the engine would build, with its token Secret), created the same way, in the same
run, Ready by the same probe. It also counts the API writes the operator adds per Pipeline
beyond its pod and Secret (kube-apiserver's own request counter) and the resident memory of
each pipeline's pod (its worker process, seen from the node).

    make bench-pods      (.venv/bin/python bench/pods.py [--n 1 20] [--repetitions 3] [--out D])

At the largest N it also measures the operator's steady state once every Pipeline is
Running: its CPU seconds per second and the health requests it sends the pods per second
(``juturna_operator_health_requests_total``), over ``--steady`` seconds.

The goals (issue 28): p50 within 1.10 times the bare-pod floor at N = 1, 20 and 100, as the
median of the repetitions' ratios (each repetition's bare and operator rows taken by turns),
with the spread reported; at most 4 writes per Pipeline beyond the pod and its Secret; the
steady CPU at N = 100 at most 1/10 of the polling design's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "operator")]

from controlplane import ControlPlane, ensure_binaries  # noqa: E402
from harness import BenchOperator, PipelineWatch, apiserver_requests  # noqa: E402
from node import PODMAN, Node, build_operator_image  # noqa: E402
from processes import cpu_seconds, processes_mentioning, rss_kib  # noqa: E402
from report import percentile  # noqa: E402
from workload import pipeline_manifest  # noqa: E402

from juturna_operator.api import GROUP, PLURAL, VERSION  # noqa: E402
from juturna_operator.domain import PipelineKey  # noqa: E402
from juturna_operator.engines.pod import runtime_pod, token_secret  # noqa: E402
from juturna_operator.settings import Settings  # noqa: E402

IMAGE = "localhost/juturna-operator:bench"
WRITES = {"POST", "PUT", "PATCH", "DELETE"}
WORKERS = "juturna_operator.worker --folder /var/lib/juturna "
# What every pod asks for, bare or the operator's: 100 pods on a 2-core node with the default
# request (100m CPU) would leave 80 of them Unschedulable.
RESOURCES = {"requests": {"cpu": "10m", "memory": "128Mi"}}


class PodWatch:
    """When each pod of a namespace is first Ready (stamped by a watch), by name."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.ready_at: dict[str, float] = {}
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._core, self._namespace = core, namespace
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(
                    self._core.list_namespaced_pod, self._namespace, timeout_seconds=30
                ):
                    pod = event["object"]
                    ready = any(
                        c.type == "Ready" and c.status == "True"
                        for c in (pod.status.conditions or [])
                    )
                    if ready:
                        with self.changed:
                            self.ready_at.setdefault(pod.metadata.name, time.monotonic())
                            self.changed.notify_all()
                    if self._stop.is_set():
                        return
            except Exception:  # a dropped watch: start again
                time.sleep(0.2)

    def wait(self, names: list[str], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: all(n in self.ready_at for n in names), timeout)

    def close(self) -> None:
        self._stop.set()


def writes_since(kubeconfig: Path, before: Counter[tuple[str, str, str]]) -> Counter[str]:
    """Every client's write requests since ``before``, by verb and resource."""
    writes: Counter[str] = Counter()
    for (verb, resource, sub), count in (apiserver_requests(kubeconfig) - before).items():
        if verb in WRITES:
            writes[f"{verb}/{resource}{'/' + sub if sub else ''}"] += count
    return writes


def floor(
    kubeconfig: Path, core: client.CoreV1Api, namespace: str, n: int, settings: Settings
) -> tuple[list[float], Counter[str]]:
    """N bare pods of the engine's own Pod spec, each with its Secret: create → Ready, in
    seconds, and the writes of every client (ours, the scheduler's, the kubelet's)."""
    pods = PodWatch(core, namespace)
    before = apiserver_requests(kubeconfig)
    started: dict[str, float] = {}
    names = []
    try:
        for i in range(n):
            key = PipelineKey(namespace, f"bare{i:03d}", str(uuid.uuid4()))
            body = runtime_pod(key, "bench", settings)
            del body["metadata"]["ownerReferences"]  # no Pipeline owns a bare pod
            name = body["metadata"]["name"]
            started[name] = time.monotonic()
            # As the engine: the pod, then its token in a Secret the pod controls.
            made = core.create_namespaced_pod(namespace, body)
            core.create_namespaced_secret(
                namespace, token_secret(key, "bench-token", name, made.metadata.uid)
            )
            names.append(name)
        if not pods.wait(names, 300):
            raise RuntimeError(f"bare pods not Ready in 300 s: {set(names) - set(pods.ready_at)}")
        time.sleep(2)  # as with_operator waits
        return [pods.ready_at[name] - started[name] for name in names], writes_since(
            kubeconfig, before
        )
    finally:
        pods.close()
        for name in names:  # each Secret goes with its pod (the garbage collector)
            core.delete_namespaced_pod(name, namespace, grace_period_seconds=1)
        wait_no_pods(core, namespace)


def wait_default_service_account(core: client.CoreV1Api, namespace: str) -> None:
    """ServiceAccount admission refuses pods until the namespace's `default` exists."""
    deadline = time.monotonic() + 30
    while True:
        try:
            core.read_namespaced_service_account("default", namespace)
            return
        except client.ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def plane_and_node() -> Iterator[tuple[ControlPlane, Node]]:
    """The operator's image built, a plane and a node with it and the CRD; both stopped
    after."""
    build_operator_image(IMAGE)
    plane = ControlPlane(ensure_binaries(), die_with_parent=True).start()
    try:
        node = Node(plane, plane.binaries).start()
        try:
            node.load_podman_image(IMAGE, PODMAN)
            node.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
            established = ["wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}"]
            deadline = time.monotonic() + 60
            # Just after the apply the CRD may have no conditions yet: kubectl wait fails.
            while node.kubectl(*established, check=False).returncode != 0:
                if time.monotonic() > deadline:
                    node.kubectl(*established)  # its error, raised
                time.sleep(0.2)
            yield plane, node
        finally:
            node.stop()
    finally:
        plane.stop()


def pod_engine_operator(kubeconfig: Path, namespace: str, base: Path) -> BenchOperator:
    """The operator on ``namespace`` with the pod engine, its pods running ``IMAGE``."""
    return BenchOperator(
        kubeconfig,
        namespace,
        "pod",
        base,
        {
            "JUTURNA_OPERATOR_RUNTIME_IMAGE": IMAGE,
            "JUTURNA_OPERATOR_RUNTIME_PULL_POLICY": "Never",
            "JUTURNA_OPERATOR_POD_DEFAULT_RESOURCES": json.dumps(RESOURCES),
        },
    )


def wait_no_pods(core: client.CoreV1Api, namespace: str) -> None:
    deadline = time.monotonic() + 120
    while core.list_namespaced_pod(namespace).items:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pods left in {namespace}")
        time.sleep(0.5)


def health_requests(metrics_port: int) -> float | None:
    """The operator's count of health requests to pipeline pods (None: it has no such
    metric)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if line.startswith("juturna_operator_health_requests_total "):
            return float(line.split()[1])
    return None


def steady_state(op: BenchOperator, seconds: float) -> dict[str, float | None]:
    """The operator's CPU seconds per second and health requests per second while every
    Pipeline runs and nothing changes."""
    cpu, asks, began = cpu_seconds(op.pid), health_requests(op.metrics_port), time.monotonic()
    time.sleep(seconds)
    took = time.monotonic() - began
    asked = health_requests(op.metrics_port)
    return {
        "cpu_per_s": (cpu_seconds(op.pid) - cpu) / took,
        "health_requests_per_s": None if asks is None or asked is None else (asked - asks) / took,
    }


def with_operator(
    kubeconfig: Path,
    objects: client.CustomObjectsApi,
    namespace: str,
    n: int,
    op: BenchOperator,
    steady_s: float = 0.0,
) -> dict[str, Any]:
    """N example Pipelines (engine pod): apply → Ready, writes per Pipeline, RSS per pod;
    with ``steady_s``, the operator's steady state after (``steady_state``)."""
    seen = PipelineWatch(objects, namespace)
    before = apiserver_requests(kubeconfig)
    started: dict[str, float] = {}
    names = [f"p{i:03d}" for i in range(n)]
    try:
        for name in names:
            started[name] = time.monotonic()
            objects.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, pipeline_manifest(name)
            )
        if not seen.wait(lambda: all(n in seen.ready_at for n in names), 300):
            raise RuntimeError(f"Pipelines not Ready in 300 s: {set(names) - set(seen.ready_at)}")
        latencies = [seen.ready_at[name] - started[name] for name in names]
        time.sleep(2)  # writes that follow Ready (none expected) are counted too
        writes = writes_since(kubeconfig, before)
        events = len(
            client.CoreV1Api(objects.api_client)
            .list_namespaced_event(namespace, field_selector="involvedObject.kind=Pipeline")
            .items
        )
        workers = processes_mentioning(WORKERS)
        rss = statistics.median(rss_kib(p) for p in workers) / 1024 if workers else 0.0
        steady = steady_state(op, steady_s) if steady_s else None
    finally:
        seen.close()
        for name in names:
            objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    # The benchmark's own writes (its creates of the Pipelines) are not the operator's.
    writes["POST/pipelines"] -= n
    return {
        "latencies": latencies,
        "writes": writes,
        "rss_mib": rss,
        "events": events / n,
        "steady": steady,
    }


def added_by_operator(with_op: Counter[str], bare: Counter[str], n: int) -> dict[str, float]:
    """Writes per Pipeline the operator adds beyond the pod and its Secret: the run with the
    operator less the bare run (the same pods and Secrets, scheduled and started by the same
    scheduler and kubelet). Leases and Events are left out here: the kubelet's Events vary
    from run to run; the operator's own are counted on the Pipelines (``pipeline_events``)."""
    noise = ("POST/leases", "PUT/leases", "POST/events", "PATCH/events")
    keys = (set(with_op) | set(bare)) - set(noise)
    return {k: (with_op[k] - bare[k]) / n for k in sorted(keys) if with_op[k] != bare[k]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 20, 100])
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument(
        "--steady", type=float, default=30.0, help="seconds of steady state at the largest N"
    )
    parser.add_argument("--out", type=Path, default=REPO / ".state" / "bench")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    with plane_and_node() as (plane, node):
        api = config.new_client_from_config(str(plane.kubeconfig))
        core, objects = client.CoreV1Api(api), client.CustomObjectsApi(api)
        settings = Settings(
            engine="pod",
            runtime_image=IMAGE,
            runtime_pull_policy="Never",
            metrics_port=0,
            pod_default_resources=RESOURCES,
        )
        for n in args.n:
            for rep in range(args.repetitions):
                namespace = f"bench-{n}-{rep}"
                node.kubectl("create", "namespace", namespace)
                wait_default_service_account(core, namespace)
                bare, bare_writes = floor(plane.kubeconfig, core, namespace, n, settings)
                with tempfile.TemporaryDirectory() as base:
                    op = pod_engine_operator(plane.kubeconfig, namespace, Path(base))
                    op.start()
                    try:
                        steady_s = args.steady if n == max(args.n) else 0.0
                        measured = with_operator(
                            plane.kubeconfig, objects, namespace, n, op, steady_s
                        )
                        wait_no_pods(core, namespace)
                    finally:
                        op.stop()
                added = added_by_operator(measured.pop("writes"), bare_writes, n)
                added["POST/events (on Pipelines)"] = measured.pop("events")
                rows.append({"n": n, "rep": rep, "bare": bare, **measured, "added_writes": added})
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "benchmarks-pods.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "benchmarks-pods.md").write_text(
        "# The pod engine against bare pods (bench/pods.py)\n\n"
        f"Medians over {args.repetitions} repetitions; latencies from the create call to "
        "Ready, seen by a watch. The ratio is the median of the repetitions' own ratios (each "
        "repetition's bare pods, then its operator run), with their spread.\n\n" + report(rows)
    )
    print(report(rows))
    return 0


def report(rows: list[dict[str, Any]]) -> str:
    """Medians over the repetitions, per N."""
    lines = [
        "| N | bare pods p50 | operator p50 | ratio (spread) | operator p95 | writes the "
        "operator adds / Pipeline | by kind (first repetition) | RSS / pipeline pod |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted({r["n"] for r in rows}):
        mine = [r for r in rows if r["n"] == n]
        bare = statistics.median(percentile(r["bare"], 50) for r in mine)
        p50 = statistics.median(percentile(r["latencies"], 50) for r in mine)
        p95 = statistics.median(percentile(r["latencies"], 95) for r in mine)
        beyond = statistics.median(sum(r["added_writes"].values()) for r in mine)
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in mine[0]["added_writes"].items())
        rss = statistics.median(r["rss_mib"] for r in mine)
        ratios = [percentile(r["latencies"], 50) / percentile(r["bare"], 50) for r in mine]
        spread = f"{min(ratios):.2f} to {max(ratios):.2f}x"
        lines.append(
            f"| {n} | {bare:.2f} s | {p50:.2f} s | {statistics.median(ratios):.2f}x ({spread}) "
            f"| {p95:.2f} s | {beyond:.2f} | {kinds} | {rss:.0f} MiB |"
        )
    steady = [(r["n"], r["steady"]) for r in rows if r.get("steady")]
    if steady:
        lines += [
            "",
            "Steady state, every Pipeline Running (median over the repetitions):",
            "",
            "| N | operator CPU (s per s) | health requests to pods / s |",
            "|---|---|---|",
        ]
        for n in sorted({n for n, _ in steady}):
            mine_s = [st for m, st in steady if m == n]
            cpu = statistics.median(st["cpu_per_s"] for st in mine_s)
            asked = [st["health_requests_per_s"] for st in mine_s]
            rate = "—" if None in asked else f"{statistics.median(asked):.2f}"
            lines.append(f"| {n} | {cpu:.3f} | {rate} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
