"""What the operator costs on top of Juturna: apply -> Ready latency, API writes, memory, CPU,
recovery after a crash, and mass deletion, beside bare-Juturna baselines and the floor in the
same run.

    python bench/harness.py --mode quick|full|smoke [--out docs] [--repetitions 3]

quick: N = 1 and 100 (in-process), 1 and 50 (process), 100 (shard: engine process with 32
pipelines per process); full: adds N = 1000 (in-process and shard, each with an operator
restart).
smoke: N = 5 (in-process) and 1 (process), one repetition, under a minute (the test suite
runs it so that it cannot rot).
Each in-process size also runs the floor (``bench/floor.py``: a framework-free operator that
makes the operator's writes per Pipeline and does no work), by turns with the operator's
row of that size, measured the same way; the report gives each operator row as a ratio to it.
The harness starts its own local control plane (or uses $KUBECONFIG with --use-kubeconfig),
runs the operator as its own process as in production, and writes <out>/benchmarks.json,
<out>/benchmarks.md and <out>/benchmarks-latency-cdf.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack")]

from baselines import FLOORS  # noqa: E402
from controlplane import ControlPlane, ensure_binaries  # noqa: E402
from operator_process import OperatorProcess  # noqa: E402
from processes import cpu_seconds, free_port, rss_kib  # noqa: E402
from report import write_report  # noqa: E402
from workload import TICK_RATE, pipeline_manifest  # noqa: E402

from juturna_operator.api import GROUP, PLURAL, VERSION  # noqa: E402
from juturna_operator.zygote import start_time  # noqa: E402

CREATE_THREADS = 16
# Three health intervals with every Pipeline Running (BENCH_STEADY_S: longer, for a closer look).
STEADY_S = float(os.environ.get("BENCH_STEADY_S", "9"))
WRITE_VERBS = {"POST", "PATCH", "PUT", "APPLY"}
FLOOR = "floor"  # the engine name of the floor's rows
# Rows named other than their engine: "shard" is engine process, 32 pipelines per process (the
# shard engine's size, before one engine served both densities).
ROW_ENGINES: dict[str, tuple[str, dict[str, str]]] = {
    "shard": ("process", {"JUTURNA_OPERATOR_PIPELINES_PER_PROCESS": "32"}),
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- what a run is made of --------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    engine: str
    n: int
    recovery: bool = False  # kill the operator with all Running, measure until all Ready again
    repetitions: int | None = None  # fewer than the run's, for the slowest rows
    limit_s: float = 300.0  # each wait (all Ready, recovery, all gone) ends here: a partial row


MODES: dict[str, list[Scenario]] = {
    "smoke": [Scenario("inprocess", 5, recovery=True), Scenario("process", 1)],
    "quick": [
        Scenario("inprocess", 1),
        Scenario("inprocess", 100, recovery=True),
        Scenario("process", 1),
        Scenario("process", 50, recovery=True),
        Scenario("shard", 100, recovery=True),
    ],
    "full": [
        Scenario("inprocess", 1),
        Scenario("inprocess", 100),
        Scenario("inprocess", 1000, recovery=True, limit_s=240),
        Scenario("process", 1),
        Scenario("process", 50, recovery=True),
        Scenario("shard", 100),
        Scenario("shard", 1000, recovery=True, limit_s=240),
    ],
}


def with_floors(scenarios: list[Scenario]) -> list[list[Scenario]]:
    """The scenarios in groups run together: each in-process size's first row with the
    floor's row of that size before it (the one listed, or a new one), the others alone."""
    floors = {s.n: s for s in scenarios if s.engine == FLOOR}
    sizes = {s.n for s in scenarios if s.engine == "inprocess"}
    groups: list[list[Scenario]] = []
    for s in scenarios:
        if s.engine == FLOOR and s.n in sizes:
            continue  # it runs with its in-process row
        if s.engine == "inprocess" and s.n in sizes:
            sizes.discard(s.n)
            groups.append([floors.get(s.n) or Scenario(FLOOR, s.n, limit_s=s.limit_s), s])
        else:
            groups.append([s])
    return groups


# -- observing the cluster --------------------------------------------------------------------


class PipelineWatch:
    """A watch on one namespace's Pipelines, stamping when each is first Ready (for the
    current generation), how many MODIFIED events it caused, and when it was deleted.
    ``on_ready(body, now)`` runs at each first Ready, before a waiter is woken."""

    def __init__(
        self,
        objects: client.CustomObjectsApi,
        namespace: str,
        on_ready: Callable[[dict[str, Any], float], None] | None = None,
    ) -> None:
        self.objects, self.namespace, self.on_ready = objects, namespace, on_ready
        self.ready_at: dict[str, float] = {}
        self.pipeline_id: dict[str, str] = {}
        self.modified: Counter[str] = Counter()
        self.deleted_at: dict[str, float] = {}
        self.changed = threading.Condition()
        self._stop = threading.Event()
        listed = objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        self._version = listed["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.objects.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    resource_version=self._version,
                    timeout_seconds=30,
                ):
                    self._seen(event["type"], event["object"], time.monotonic())
                    self._version = event["object"]["metadata"]["resourceVersion"]
                    if self._stop.is_set():
                        stream.stop()
            except Exception:  # a dropped watch: resume from the last version
                time.sleep(0.2)

    def _seen(self, kind: str, body: dict[str, Any], now: float) -> None:
        name = body["metadata"]["name"]
        status = body.get("status") or {}
        with self.changed:
            if kind == "MODIFIED":
                self.modified[name] += 1
            if kind == "DELETED":
                self.deleted_at.setdefault(name, now)
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or []
            )
            if ready and status.get("observedGeneration") == body["metadata"]["generation"]:
                if name not in self.ready_at and self.on_ready is not None:
                    self.on_ready(body, now)
                self.ready_at.setdefault(name, now)
                self.pipeline_id[name] = status.get("pipelineId") or ""
            self.changed.notify_all()

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until done() or the timeout; short waits keep Ctrl-C working."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.changed:
                if self.changed.wait_for(done, min(1.0, deadline - time.monotonic())):
                    return True
        return False

    def close(self) -> None:
        self._stop.set()


@functools.cache
def kubectl_binary() -> str:
    """kubectl of the plane's own version (no version-skew warning)."""
    return str(ensure_binaries().kubectl)


def apiserver_requests(kubeconfig: Path) -> Counter[tuple[str, str, str]]:
    """apiserver_request_total by (verb, resource, subresource), from kube-apiserver's
    own /metrics."""
    text = subprocess.run(
        [kubectl_binary(), f"--kubeconfig={kubeconfig}", "get", "--raw", "/metrics"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    counts: Counter[tuple[str, str, str]] = Counter()
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, _, value = line.rpartition(" ")
        labels = dict(
            part.split("=", 1)
            for part in labels_text[len("apiserver_request_total{") : -1].split(",")
        )
        key = tuple(labels.get(k, '""').strip('"') for k in ("verb", "resource", "subresource"))
        counts[key] += int(float(value))  # type: ignore[index]
    return counts


def worker_pids(workdir: Path) -> list[int]:
    """The live workers of the process engine, from their records (``.workers/<name>.json``):
    how the engine finds them."""
    pids = []
    for record in (workdir / ".workers").glob("*.json"):
        try:
            pids.append(int(json.loads(record.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            continue  # being written or removed
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def started_at(pid: int) -> float:
    """When a process started, on ``time.monotonic``'s clock (to a clock tick, 10 ms):
    /proc/<pid>/stat's starttime counts from boot, as CLOCK_BOOTTIME does."""
    ticks = start_time(pid)
    if ticks is None:
        raise ProcessLookupError(pid)
    since_boot = ticks / CLOCK_TICKS
    return since_boot - (time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic())


def pss_kib(pid: int) -> int:
    """A process's proportional set size in KiB (its shared pages divided among sharers)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class WorkerStarts:
    """Each worker's start, read when its Pipeline's Ready event arrives: wall time from
    the worker process's start to that event, its CPU (user + system) and PSS then."""

    def __init__(self, workdir: Path) -> None:
        self.records = workdir / ".workers"
        self.starts: list[dict[str, float]] = []

    def __call__(self, body: dict[str, Any], now: float) -> None:
        try:
            record = json.loads((self.records / f"{body['metadata']['uid']}.json").read_text())
            pid = int(record["pid"])
            self.starts.append(
                {
                    "wall_s": now - started_at(pid),
                    "cpu_s": cpu_seconds(pid),
                    "pss_mib": pss_kib(pid) / 1024,
                }
            )
        except (OSError, ValueError, KeyError):
            pass  # no record or no process: this one is not measured (the count says so)


# -- the operator as its own process ----------------------------------------------------------


class BenchOperator(OperatorProcess):
    """The operator on one namespace, with the example's plugins; ``BENCH_PYSPY=<folder>``
    runs it under py-spy (a profile per start)."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        engine: str,
        base: Path,
        extra_env: dict[str, str] | None = None,  # e.g. the pod engine's image
    ) -> None:
        self.namespace, self.engine, self.base = namespace, engine, base
        self.workdir = base / "work"
        self.metrics_port = free_port()
        self.profile = os.environ.get("BENCH_PYSPY")  # a folder: py-spy's collapsed stacks
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "JUTURNA_OPERATOR_ENGINE": engine,
            "JUTURNA_OPERATOR_WORKDIR": str(self.workdir),
            "JUTURNA_OPERATOR_PLUGIN_PATH": str(REPO / "examples" / "plugins"),
            "JUTURNA_OPERATOR_METRICS_PORT": str(self.metrics_port),
            **(extra_env or {}),
        }
        super().__init__(
            base / "operator.log",
            env,
            ["-n", namespace],
            tied=False,
            # py-spy writes its profile on SIGINT, then ends the operator.
            stop_signal=signal.SIGINT if self.profile else signal.SIGTERM,
            grace_s=30,  # shutting down 1000 in-process pipelines is slow
        )

    def command(self) -> list[str]:
        if not self.profile:
            return super().command()
        out_file = Path(self.profile) / f"{self.namespace}-{time.time():.0f}.txt"
        py_spy = Path(sys.executable).parent / "py-spy"
        return [
            str(py_spy),
            "record",
            "--gil",
            "-r",
            "100",
            "-f",
            "raw",
            "-o",
            str(out_file),
            "--",
            *super().command(),
        ]

    def running(self) -> int:
        """Pipelines this operator process has seen Running (its own metrics)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            return 0
        for line in text.splitlines():
            if line.startswith("juturna_pipelines{") and 'phase="Running"' in line:
                return int(float(line.rpartition(" ")[2]))
        return 0


class FloorProcess(OperatorProcess):
    """The floor (``bench/floor.py``) on one namespace, started and stopped as the operator
    is; it logs kopf's start line once its watch is open."""

    def __init__(self, kubeconfig: Path, namespace: str, base: Path) -> None:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        super().__init__(base / "floor.log", env, ["-n", namespace], tied=False)

    def command(self) -> list[str]:
        return [sys.executable, str(REPO / "bench" / "floor.py"), *self.where]


# -- one scenario -----------------------------------------------------------------------------


def manifest(i: int) -> dict[str, Any]:
    # BENCH_STATE=Standby measures warm standby instead.
    return pipeline_manifest(f"p{i:04d}", os.environ.get("BENCH_STATE", "Running"))


def run_scenario(kubeconfig: Path, scenario: Scenario) -> dict[str, Any]:
    api = config.new_client_from_config(str(kubeconfig))
    api.configuration.connection_pool_maxsize = CREATE_THREADS * 2
    objects, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    n = scenario.n
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    base = Path(tempfile.mkdtemp(prefix=f"bench-{scenario.engine}-"))
    op: OperatorProcess
    starts: WorkerStarts | None = None
    if scenario.engine == FLOOR:
        op = FloorProcess(kubeconfig, ns, base)
    else:
        engine, env = ROW_ENGINES.get(scenario.engine, (scenario.engine, {}))
        op = BenchOperator(kubeconfig, ns, engine, base, env)
        if scenario.engine == "process":
            starts = WorkerStarts(op.workdir)
    seen = PipelineWatch(objects, ns, starts)
    result: dict[str, Any] = {"engine": scenario.engine, "n": n}
    names = [manifest(i)["metadata"]["name"] for i in range(n)]
    try:
        op.start()
        assert op.proc is not None
        time.sleep(1)
        result["base_rss_mib"] = rss_kib(op.proc.pid) / 1024
        cpu_before = cpu_seconds(op.proc.pid)
        requests_before = apiserver_requests(kubeconfig)

        created_at: dict[str, float] = {}

        def create(i: int) -> None:
            body = manifest(i)
            created_at[body["metadata"]["name"]] = time.monotonic()
            objects.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

        first = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(CREATE_THREADS) as pool:
            list(pool.map(create, range(n)))
        all_ready = seen.wait(lambda: len(seen.ready_at) >= n, scenario.limit_s)
        result["ready"] = len(seen.ready_at)
        # Pipelines not Ready by the limit count as the limit: percentiles stay honest.
        latencies = [seen.ready_at.get(x, first + scenario.limit_s) - created_at[x] for x in names]
        result["latencies_s"] = latencies
        result["all_ready_s"] = max(seen.ready_at.values()) - first if all_ready else None
        time.sleep(2)  # let trailing writes land before counting
        requests_after = apiserver_requests(kubeconfig)
        delta = requests_after - requests_before
        writes = Counter(
            {k: v for k, v in delta.items() if k[0] in WRITE_VERBS and k[1] in (PLURAL, "events")}
        )
        writes[("POST", PLURAL, "")] -= n  # the harness's own creates
        result["writes_per_pipeline"] = sum(writes.values()) / n
        result["writes_by_kind"] = {
            "/".join(filter(None, k)): v / n for k, v in writes.items() if v
        }
        result["requests_per_pipeline"] = sum(delta.values()) / n
        result["modified_events_per_pipeline"] = statistics.mean(seen.modified[x] for x in names)
        result["cpu_s_per_pipeline"] = (cpu_seconds(op.proc.pid) - cpu_before) / n
        # All Running, nothing changing: what watching them costs (and, in-process, what
        # the pipelines' own threads cost: they run in the operator's process).
        idle_before = cpu_seconds(op.proc.pid)
        time.sleep(STEADY_S)
        result["steady_cpu_pct"] = (cpu_seconds(op.proc.pid) - idle_before) / STEADY_S * 100
        result["rss_mib"] = rss_kib(op.proc.pid) / 1024
        result["rss_per_pipeline_mib"] = (result["rss_mib"] - result["base_rss_mib"]) / n
        if starts is not None:
            result["worker_starts"] = starts.starts
        if isinstance(op, BenchOperator):
            workers = worker_pids(op.workdir)  # the process engine's, or the shards
            if workers:
                rss = [rss_kib(p) / 1024 for p in workers]
                result["workers"] = len(workers)
                result["worker_rss_mib"] = statistics.median(rss)
                result["workers_rss_total_mib"] = sum(rss)

        if scenario.recovery and all_ready:
            assert isinstance(op, BenchOperator), "the floor has no recovery row"
            ids_before = dict(seen.pipeline_id)
            op.kill()
            restarted = time.monotonic()
            op.start()
            deadline = restarted + scenario.limit_s
            while op.running() < n and time.monotonic() < deadline:
                time.sleep(0.05)
            result["recovered"] = op.running()
            result["recovery_s"] = time.monotonic() - restarted if op.running() >= n else None
            time.sleep(1)
            result["recovered_redeployed"] = sum(
                seen.pipeline_id.get(x) != ids_before.get(x) for x in names
            )

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(CREATE_THREADS) as pool:
            list(
                pool.map(
                    lambda name: objects.delete_namespaced_custom_object(
                        GROUP, VERSION, ns, PLURAL, name
                    ),
                    names,
                )
            )
        all_gone = seen.wait(lambda: len(seen.deleted_at) >= n, scenario.limit_s)
        result["deleted"] = len(seen.deleted_at)
        result["delete_all_s"] = max(seen.deleted_at.values()) - started if all_gone else None
    finally:
        seen.close()
        op.stop()
        core.delete_namespace(ns)
        api.close()
        shutil.rmtree(base, ignore_errors=True)
    return result


def baseline(kind: str, n: int, floor: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as folder:
        out = subprocess.run(
            [
                sys.executable,
                str(REPO / "bench" / "baselines.py"),
                kind,
                str(n),
                "--workdir",
                f"{folder}/work",
                *([f"--floor={floor}"] if floor else []),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=3600,
        ).stdout
    return json.loads(out)


# -- the whole run ----------------------------------------------------------------------------


@contextmanager
def cluster(use_kubeconfig: bool) -> Iterator[Path]:
    if use_kubeconfig:
        yield Path(os.environ["KUBECONFIG"])
        return
    plane = ControlPlane(ensure_binaries(), die_with_parent=True).start()
    try:
        subprocess.run(
            [
                kubectl_binary(),
                f"--kubeconfig={plane.kubeconfig}",
                "apply",
                "--server-side",
                "-f",
                str(REPO / "crds"),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                kubectl_binary(),
                f"--kubeconfig={plane.kubeconfig}",
                "wait",
                "--for=condition=Established",
                f"crd/{PLURAL}.{GROUP}",
                "--timeout=60s",
            ],
            check=True,
            capture_output=True,
        )
        yield plane.kubeconfig
    finally:
        plane.stop()


def run(
    mode: str, repetitions: int, use_kubeconfig: bool, out: Path, resume: bool = False
) -> dict[str, Any]:
    """Every scenario, then the baselines; what is measured so far is saved after each
    step to <out>/benchmarks.partial.json, so that a run stopped midway keeps it, and
    ``resume`` continues it (the steps already measured are not run again)."""
    partial = out / "benchmarks.partial.json"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = (
        json.loads(partial.read_text())
        if resume
        else {"mode": mode, "repetitions": repetitions, "tick_rate": TICK_RATE}
    )

    def save() -> None:
        partial.write_text(json.dumps(results, indent=1))

    done = {(s["scenario"]["engine"], s["scenario"]["n"]): s for s in results.get("scenarios", [])}
    results["scenarios"] = []
    sizes = sorted({s.n for s in MODES[mode] if s.engine == "inprocess"})
    with cluster(use_kubeconfig) as kubeconfig:
        for group in with_floors(MODES[mode]):
            # A floor row and its operator row take turns, repetition by repetition, so
            # that a slow spell of the shared machine weighs on both alike.
            entries = [
                done.get((s.engine, s.n)) or {"scenario": s.__dict__, "runs": []} for s in group
            ]
            results["scenarios"] += entries
            wanted = [s.repetitions or repetitions for s in group]
            for repetition in range(max(wanted)):
                for scenario, entry, count in zip(group, entries, wanted, strict=True):
                    if len(entry["runs"]) <= repetition < count:
                        entry["runs"].append(run_scenario(kubeconfig, scenario))
                        save()
            for scenario in group:
                print(f"  {scenario}: done", file=sys.stderr)
    # The deletion floor is measured once per N and method, each in a fresh process (at
    # N = 1000 it takes minutes: docs/juturna.md, pitfall 10); the other repetitions
    # measure deploys only.
    floors = [*FLOORS, *[None] * max(0, repetitions - len(FLOORS))]
    measured = {b["n"]: b for b in results.get("baselines", [])}
    results["baselines"] = []
    for n in sizes:
        base: dict[str, Any] = measured.get(n) or {"n": n, "direct": [], "serve": []}
        results["baselines"].append(base)
        for floor in floors[len(base["direct"]) :]:
            base["direct"].append(baseline("direct", n, floor))
            save()
        while len(base["serve"]) < repetitions:
            base["serve"].append(baseline("serve", n))
            save()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--repetitions", type=int, default=None, help="default: 3 (smoke: 1)")
    parser.add_argument("--out", type=Path, help="default: docs/ (full), .state/bench/ (others)")
    parser.add_argument(
        "--only",
        help="scenarios instead of the mode's, e.g. inprocess:100,process:50:recovery "
        "(each in-process size brings its floor row; floor:100 alone runs only the floor)",
    )
    parser.add_argument("--use-kubeconfig", action="store_true", help="use $KUBECONFIG's cluster")
    parser.add_argument(
        "--resume", action="store_true", help="continue <out>/benchmarks.partial.json"
    )
    args = parser.parse_args()
    reps = args.repetitions or (1 if args.mode == "smoke" else 3)
    out = args.out or (REPO / "docs" if args.mode == "full" else REPO / ".state" / "bench")
    if args.only:
        MODES[args.mode] = [
            Scenario(p[0], int(p[1]), recovery="recovery" in p[2:])
            for p in (item.split(":") for item in args.only.split(","))
        ]
    results = run(args.mode, reps, args.use_kubeconfig, out, args.resume)
    write_report(results, out)
    (out / "benchmarks.partial.json").unlink()
    print((out / "benchmarks.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
