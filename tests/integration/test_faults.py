"""Fault injection against the real control plane: each fault injected repeatedly, and the
invariants checked after each injection.

* no lost pipelines: every resource reaches its desired state;
* no leaked instances: no folder, worker or remote instance without a resource;
* no stuck deletions: every deleted resource is gone (its finalizer removed).

``make test`` runs the short form; ``make reliability`` sets ``RELIABILITY=full`` for the
full counts (20 kills, 5 API server outages of 10-30 s, 3 etcd restarts, 200 spec edits,
a 30 s warmup) and writes every injection to ``RELIABILITY_RESULTS`` for docs/reliability.md.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from controlplane import ControlPlane
from kubernetes import client
from processes import processes_mentioning, reset_peak_rss, rss_kib

from support import (
    CHURN_SEED,
    DENSE_PROCESS,
    FULL,
    KILLS,
    OPERATOR_ENGINES,
    OUTAGES,
    STATES,
    Churn,
    JuturnaServe,
    Kubectl,
    Operator,
    Pipelines,
    answered_size,
    chain,
    change_after_fault,
    condition,
    count,
    create_all,
    faulty,
    is_ready,
    kills_under_churn,
    manifest,
    only_on,
    outage,
    output_lines,
    output_of,
    pipelines_per_process,
    slow_manifest,
    wait_settled,
)

# The full counts take long: 20 kills with 50 worker processes, five outages of up to 30 s.
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.reliability,
    pytest.mark.timeout(3600 if FULL else 600),
]

ETCD_RESTARTS = count("FAULT_ETCD_RESTARTS", 1, 3)
EDITS = count("FAULT_SPEC_EDITS", 30, 200)
WARMUP_S = count("FAULT_WARMUP_S", 10, 30)  # the slow node's warmup
# 50 pipelines on every engine in the full run; the short form keeps 50 in-process and 10
# on the engines where each pipeline is a process or a remote call.
CHURN = {
    "inprocess": 50,
    "process": 50 if FULL else 10,
    "service": 50 if FULL else 10,
}
CONVERGE_S = {"inprocess": 120.0, "process": 240.0, "service": 120.0}
ENGINE_AGNOSTIC = (
    "the API server connection is the same code for every engine (kopf and the status "
    "writer); run once, on the in-process engine"
)


# -- what the invariants read ------------------------------------------------------------------


def instances(operator: Operator, namespace: str) -> dict[str, list[tuple[str, str]]]:
    """This namespace's engine instances, by the resource uid prefix they carry: ``(kind,
    id)`` pairs, ``("instance", pipeline id)`` or ``("worker", pid)``. Instance folders are
    named ``<namespace>__<name>__<uid8>_<pipeline id>``.

    In-process and process: the instance folders, and the process engine's workers. Service:
    what `juturna serve` lists, not its folders: a runtime that was stopped leaves its old
    instances' folders behind, beyond the operator's reach (it no longer knows them)."""
    folders = {f.name.rsplit("_", 1)[1]: f.name for f in operator.workdir.glob(f"{namespace}__*")}
    if operator.engine == "service":
        assert operator.serve is not None
        with urllib.request.urlopen(f"{operator.serve.url}/pipelines", timeout=10) as resp:
            remote = {pid for entry in json.load(resp)["pipelines"] for pid in entry}
        folders = {pid: name for pid, name in folders.items() if pid in remote}
    found: dict[str, list[tuple[str, str]]] = {}
    for pipeline_id, name in folders.items():
        uid8 = name.split("__")[2].split("_")[0]
        found.setdefault(uid8, []).append(("instance", pipeline_id))
    if operator.engine == "process":
        for pid in processes_mentioning(f"--folder {operator.workdir} "):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            owner = args[args.index(b"--owner") + 1].decode() if b"--owner" in args else "?"
            found.setdefault(owner[:8], []).append(("worker", str(pid)))
    return found


def leaked(pipelines: Pipelines, operator: Operator, desired: dict[str, str]) -> list[str]:
    """Instances without a resource or not the one its status names, and resources at
    Running or Ready without exactly one instance (the one in ``status.pipelineId``). A
    resource with no instance (Stopped, Failed) may keep one folder: its output, which
    the engines beside the operator keep until the resource is deleted
    (docs/pipeline-api.md: Output)."""
    bodies = {b["metadata"]["uid"][:8]: b for b in pipelines.bodies().values()}
    problems = []
    for uid8, held in instances(operator, pipelines.namespace).items():
        body = bodies.pop(uid8, None)
        if body is None:
            problems += [f"{kind} {what} has no resource" for kind, what in held]
            continue
        name, current_id = body["metadata"]["name"], body["status"].get("pipelineId")
        ids = [what for kind, what in held if kind == "instance"]
        workers = [what for kind, what in held if kind == "worker"]
        stale = [i for i in ids if i != current_id] if current_id else ids[1:]
        if stale or len(workers) > 1:
            problems.append(f"{name}: {held}, but its status names instance {current_id}")
        elif desired.get(name) in ("Running", "Standby") and not ids:
            problems.append(f"{name} ({desired[name]}): no instance")
    problems += [
        f"{b['metadata']['name']} ({desired.get(b['metadata']['name'])}): no instance"
        for b in bodies.values()
        if desired.get(b["metadata"]["name"]) in ("Running", "Standby")
    ]
    return problems


def settle(
    pipelines: Pipelines, operator: Operator, desired: dict[str, str], timeout: float
) -> float:
    """Wait until every resource is at its desired state with exactly its instance, and no
    instance is left without a resource; return how long that took."""
    return wait_settled(pipelines, desired, timeout, lambda: leaked(pipelines, operator, desired))


# -- 1. the operator killed with SIGKILL at random points, under churn -------------------------


def test_sigkill_at_random_points_under_churn(
    pipelines: Pipelines, operator: Operator, fault_log: Any
) -> None:
    rng = random.Random(CHURN_SEED)
    size = CHURN[operator.engine]
    desired = {f"p{i:03d}": rng.choice(STATES) for i in range(size)}
    create_all(pipelines, [slow_manifest(n, s) for n, s in desired.items()])
    settle(pipelines, operator, desired, CONVERGE_S[operator.engine])
    churn = Churn(pipelines, rng, desired)
    converge = CONVERGE_S[operator.engine]
    for restarted in kills_under_churn(operator, churn, KILLS):
        settle(pipelines, operator, desired, converge)
        fault_log.record(
            "operator SIGKILL under churn",
            operator.engine,
            "all at their desired state; no leak; no stuck finalizer",
            time.monotonic() - restarted,
            pipelines=len(desired),
        )


# -- 2. kube-apiserver stopped for 10-30 s ------------------------------------------------------


def test_apiserver_stopped_and_started(
    pipelines: Pipelines, operator: Operator, control_plane: ControlPlane, fault_log: Any
) -> None:
    only_on(operator, "inprocess", ENGINE_AGNOSTIC)
    rng = random.Random(5)
    desired = {f"a{i}": "Running" for i in range(5)}
    create_all(pipelines, [slow_manifest(n) for n in desired])
    settle(pipelines, operator, desired, 60)
    for round_ in range(OUTAGES):
        down_s = rng.uniform(10, 30) if FULL else 10.0
        lines = output_lines(operator.workdir, pipelines.get("a0"))
        cores = outage(control_plane, "kube-apiserver", down_s, operator)
        # Pipelines ran on while the API server was away (a0 is never changed).
        assert output_lines(operator.workdir, pipelines.get("a0")) > lines
        # Changes made after the outage are seen: the watch reconnected by itself.
        change_after_fault(pipelines, desired, round_)
        recovery = settle(pipelines, operator, desired, 120)  # from the API server's return
        # A spinning reconnect would take a core; kopf backs off and the pipelines run on.
        assert cores < 0.5, f"the operator used {cores:.2f} cores while the API server was down"
        fault_log.record(
            "kube-apiserver stopped",
            operator.engine,
            "reconnected by itself; all at their desired state; no leak",
            recovery,
            down_s=round(down_s, 1),
            cores_while_down=round(cores, 3),
        )


# -- 3. etcd restarted under load ----------------------------------------------------------------


def test_etcd_restarted_under_load(
    pipelines: Pipelines, operator: Operator, control_plane: ControlPlane, fault_log: Any
) -> None:
    only_on(operator, "inprocess", ENGINE_AGNOSTIC)
    rng = random.Random(11)
    desired: dict[str, str] = {}
    for round_ in range(ETCD_RESTARTS):
        batch = {f"e{round_}-{i}": rng.choice(STATES) for i in range(10)}
        desired |= batch
        create_all(pipelines, [slow_manifest(n, s) for n, s in batch.items()])
        # Under load: the operator is creating these when etcd goes away.
        down_s = rng.uniform(3, 10)
        cores = outage(control_plane, "etcd", down_s, operator)
        recovery = settle(pipelines, operator, desired, 120)
        fault_log.record(
            "etcd restarted",
            operator.engine,
            "all at their desired state; no leak; no stuck finalizer",
            recovery,
            down_s=round(down_s, 1),
            cores_while_down=round(cores, 3),
        )


# -- 4. conflicts: status writes race a user's spec edits ------------------------------------------


def test_spec_edits_racing_status_writes(
    pipelines: Pipelines, operator: Operator, kubectl: Kubectl, fault_log: Any
) -> None:
    only_on(operator, "inprocess", ENGINE_AGNOSTIC)
    rng = random.Random(3)
    pipelines.apply(slow_manifest("race", rate=20))
    pipelines.wait_ready("race")
    offset = len(operator.log_text())
    nodes = slow_manifest("race", rate=20)["spec"]["nodes"]
    for i in range(EDITS):
        last = i == EDITS - 1  # ends Running, with the last label: checked below
        nodes[1]["configuration"] = {"factor": 10, "label": f"edit-{i}"}
        spec: dict[str, Any] = {"state": "Running" if last else rng.choice(STATES)}
        if last or rng.random() < 0.5:
            spec["nodes"] = nodes
        # kubectl, so the user's edits carry their own field manager.
        kubectl(
            "-n", pipelines.namespace, "patch", "pipeline", "race", "--type=merge",
            "-p", json.dumps({"spec": spec}),
        )  # fmt: skip
        time.sleep(rng.uniform(0, 0.15))
    edited = time.monotonic()
    body = pipelines.wait(
        "race",
        lambda b: is_ready(b) and b["status"]["phase"] == "Running",
        60,
        "Ready for the last edit",
    )
    settled = time.monotonic() - edited
    # The operator never wrote the spec: it is the user's last edit, and no field manager
    # but kubectl's owns a field of it.
    assert body["spec"]["state"] == "Running"
    assert body["spec"]["nodes"][1]["configuration"] == {"factor": 10, "label": f"edit-{EDITS - 1}"}
    spec_owners = {
        entry["manager"]
        for entry in body["metadata"]["managedFields"]
        if "f:spec" in json.dumps(entry.get("fieldsV1", {}))
    }
    assert spec_owners
    assert all(m.startswith("kubectl") for m in spec_owners), spec_owners
    # The status describes the final generation, and so does the running instance.
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"]
    deadline = time.monotonic() + 10
    while not output_of(operator.workdir, body) or (
        output_of(operator.workdir, body)[-1].get("label") != f"edit-{EDITS - 1}"
    ):
        assert time.monotonic() < deadline, output_of(operator.workdir, body)[-3:]
        time.sleep(0.2)
    log = operator.log_text()[offset:]
    assert "Traceback" not in log, log[-3000:]
    fault_log.record(
        "status writes racing spec edits",
        operator.engine,
        f"spec never overwritten; final status for generation {body['metadata']['generation']}; "
        # "409" alone also matches pipeline ids (hex): count the API server's word for it.
        f"{log.count('Conflict')} conflicts logged",
        settled,
        edits=EDITS,
    )


# -- 5. runtime: a remote runtime going away and coming back ---------------------------------------


def test_the_remote_runtime_goes_away_and_comes_back(
    pipelines: Pipelines, operator: Operator, fault_log: Any
) -> None:
    service = only_on(operator, "service", "only the service engine has a remote runtime")
    assert service.serve is not None
    policy = {"maxRestarts": 2, "backoffSeconds": 0.2}
    desired = {f"r{i}": "Running" for i in range(3)}
    for name in desired:
        pipelines.apply(manifest(name, restartPolicy=policy))
    before = {n: pipelines.wait_ready(n)["status"]["pipelineId"] for n in desired}
    serve = service.serve
    serve.stop()
    try:
        pipelines.wait_failure(
            "r0", "RuntimeUnavailable", 30, "RuntimeUnavailable while the runtime is away"
        )
    finally:
        service.serve = JuturnaServe(serve.folder, serve.log, port=serve.port).start()
    recovery = settle(pipelines, operator, desired, 60)
    for name in desired:
        body = pipelines.get(name)
        assert body["status"]["pipelineId"] != before[name], "the instance died with its runtime"
        assert condition(body, "Ready")["status"] == "True"
    fault_log.record(
        "remote runtime (juturna serve) stopped and started",
        operator.engine,
        "RuntimeUnavailable while away; redeployed when back",
        recovery,
    )


# -- 6. a slow warmup (30 s in the full run) does not delay other pipelines ------------------


def test_a_slow_warmup_does_not_delay_other_pipelines(
    pipelines: Pipelines, operator: Operator, fault_log: Any
) -> None:
    pipelines.apply(
        faulty(
            "slow30",
            ("src", "source", "ticker", {}),
            ("mid", "proc", "slow", {"seconds": WARMUP_S}),
            ("out", "sink", "jsonl", {}),
        )
    )
    pipelines.wait_phase("slow30", "WarmingUp", timeout=30)
    started = time.monotonic()
    pipelines.apply(manifest("quick1"))
    pipelines.apply(manifest("quick2"))
    pipelines.wait_ready("quick1", timeout=25)
    pipelines.wait_ready("quick2", timeout=25)
    pipelines.delete("quick1")
    pipelines.wait_gone("quick1", timeout=25)
    others_s = time.monotonic() - started
    slow = pipelines.get("slow30")
    assert slow["status"]["phase"] == "WarmingUp", (
        "the other pipelines' create and delete waited for the slow warmup: "
        f"{slow['status']['phase']} after {others_s:.1f} s"
    )
    pipelines.wait_ready("slow30", timeout=60)
    fault_log.record(
        f"a node whose warmup takes {WARMUP_S} s",
        operator.engine,
        "two others created and one deleted while it warmed up",
        others_s,
    )


# -- bad input: very large manifests ---------------------------------------------------------------


def test_a_spec_near_the_size_limit_is_handled(
    pipelines: Pipelines, operator: Operator, fault_log: Any
) -> None:
    body = slow_manifest("big")
    body["spec"]["nodes"][2]["configuration"]["padding"] = "x" * 1_400_000
    assert len(json.dumps(body)) > 1_400_000
    offset = len(operator.log_text())
    create_all(pipelines, [body])  # not `kubectl apply`: its annotation would double the size
    ready = pipelines.wait_ready("big", timeout=60)
    assert ready["status"]["phase"] == "Running"
    warnings = [m for kind, _, m in pipelines.events("big") if kind == "Warning"]
    assert any('unknown configuration key "padding"' in m for m in warnings), warnings
    pipelines.delete("big")
    pipelines.wait_gone("big")
    log = operator.log_text()[offset:]
    assert "Traceback" not in log, log[-3000:]
    fault_log.record("a 1.4 MB spec", operator.engine, "Ready (a warning names the unknown key)")


def test_a_spec_over_the_size_limit_is_refused_with_the_reason(pipelines: Pipelines) -> None:
    body = slow_manifest("huge")
    body["spec"]["nodes"][2]["configuration"]["padding"] = "x" * 3_200_000
    with pytest.raises(client.ApiException) as err:
        create_all(pipelines, [body])
    assert err.value.status == 413
    assert "Request entity too large: limit is 3145728" in (err.value.body or "")
    assert not pipelines.exists("huge")


def line_graph(size: int) -> dict[str, Any]:
    """``nodes`` and ``links`` of a chain of ``size`` nodes: ticker, scales, jsonl."""
    spec_nodes = [{"name": "src", "type": "source", "mark": "ticker", "configuration": {"rate": 2}}]
    spec_nodes += [{"name": f"n{i}", "type": "proc", "mark": "scale"} for i in range(size - 2)]
    spec_nodes += [{"name": "out", "type": "sink", "mark": "jsonl"}]
    return {"nodes": spec_nodes, "links": chain(*(n["name"] for n in spec_nodes))}


def test_a_thousand_nodes_are_refused_at_admission(pipelines: Pipelines) -> None:
    proc = pipelines.kubectl(
        "-n", pipelines.namespace, "create", "-f", "-",
        input=json.dumps(manifest("wide", **line_graph(1000))), check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "spec.nodes: Too many: 1000: must have at most 128 items" in proc.stderr
    assert not pipelines.exists("wide")


def test_the_largest_admitted_graph_runs(pipelines: Pipelines, operator: Operator) -> None:
    only_on(operator, "inprocess", "how many nodes a graph may have does not depend on the engine")
    create_all(pipelines, [manifest("max", **line_graph(128))])
    body = pipelines.wait_ready("max", timeout=60)
    assert body["status"]["nodesReady"] == "128/128"


# -- bad answers: a runtime answers more than the operator reads ---------------------------------


@pytest.mark.parametrize("operator", [*OPERATOR_ENGINES, DENSE_PROCESS], indirect=True)
def test_a_60_mb_health_answer_fails_its_pipelines_not_the_operator(
    pipelines: Pipelines,
    operator: Operator,
    objects: client.CustomObjectsApi,
    core: client.CoreV1Api,
    fault_log: Any,
) -> None:
    """A node dies with a 60 MB message, which its worker's health route repeats: a real
    worker's answer of 60 MB (it once took the operator from 82 to 430 MiB). The operator
    reads none of it: its peak resident memory grows by far less than the answer. The
    Pipeline fails with AnswerTooLarge naming the answer's size and the cap, then Failed
    (maxRestarts 0). With many pipelines per process, the Pipeline that shared its worker
    fails with it and runs again on a new one (its restart: ``dense`` below); one pipeline to
    a process, it never notices. A Pipeline of another namespace runs on, and a new one
    becomes Ready."""
    if operator.engine != "process":
        pytest.skip("here only process workers report node crashes in a health answer")
    assert operator.proc is not None
    elsewhere = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=elsewhere)))
    others = Pipelines(objects, elsewhere, pipelines.kubectl)
    try:
        others.apply(manifest("bystander"))
        pipelines.apply(manifest("mate", restartPolicy={"maxRestarts": 1, "backoffSeconds": 0.2}))
        others.wait_ready("bystander")
        pipelines.wait_ready("mate")
        offset = len(operator.log_text())
        reset_peak_rss(operator.proc.pid)
        base_kib = rss_kib(operator.proc.pid)
        applied = time.monotonic()
        pipelines.apply(
            faulty(
                "loud",
                ("src", "source", "ticker", {"rate": 20}),
                ("loud", "proc", "crasher", {"after": 0, "words": 60_000_000}),
                ("out", "sink", "jsonl", {}),
                restartPolicy={"maxRestarts": 0, "backoffSeconds": 0.2},
            )
        )
        body = pipelines.wait_phase("loud", "Failed", timeout=60)
        failed_s = time.monotonic() - applied
        growth_mib = (rss_kib(operator.proc.pid, "VmHWM") - base_kib) / 1024
        failure = body["status"]["failure"]
        assert (failure["reason"], failure["code"], failure["step"]) == (
            "AnswerTooLarge",
            502,
            "run",
        )
        shard = pipelines_per_process(operator) > 1
        shared = r"worker process \d+, running 2 pipeline\(s\): " if shard else ""
        url = rf"{shared}http://127\.0\.0\.1:\d+/operator/health"
        assert answered_size(failure["message"], url) > 60_000_000
        assert growth_mib < 30, f"the operator's peak memory grew by {growth_mib:.0f} MiB"
        events = pipelines.events("loud")
        assert ("Warning", "AnswerTooLarge", failure["message"]) in events, events
        mate_events = [(kind, reason) for kind, reason, _ in pipelines.events("mate")]
        if shard:
            assert ("Warning", "AnswerTooLarge") in mate_events, mate_events
            mate = pipelines.wait(
                "mate",
                lambda b: is_ready(b) and b["status"].get("restarts") == 1,
                60,
                "Ready again on a new shard",
            )
        else:
            mate = pipelines.get("mate")
            assert ("Warning", "AnswerTooLarge") not in mate_events, mate_events
            assert is_ready(mate)
            assert not mate["status"].get("restarts")
        bystander = others.get("bystander")
        assert is_ready(bystander)
        assert not bystander["status"].get("restarts")
        pipelines.apply(manifest("after"))
        pipelines.wait_ready("after")
        log = operator.log_text()[offset:]
        assert "Traceback" not in log, log[-3000:]
        fault_log.record(
            "a 60 MB health answer",
            operator.engine,
            "AnswerTooLarge, then Failed; the others run on",
            failed_s,
            operator_peak_growth_mib=growth_mib,
        )
    finally:
        for name in others.names():
            others.delete(name)
            others.wait_gone(name)
        core.delete_namespace(elsewhere)


# -- security: the runtime token appears nowhere ---------------------------------------------------


class EchoingRuntime(BaseHTTPRequestHandler):
    """A hostile or careless runtime: every answer is a 500 that echoes the request headers."""

    seen: list[str] = []  # noqa: RUF012 - the test reads what arrived

    def _answer(self) -> None:
        EchoingRuntime.seen.append(self.headers.get("Authorization", ""))
        body = json.dumps({"message": f"cannot serve {self.path}; headers: {dict(self.headers)}"})
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


def test_the_runtime_token_appears_in_no_status_event_or_log(
    pipelines: Pipelines, operator: Operator, core: client.CoreV1Api
) -> None:
    service = only_on(operator, "service", "only the service engine sends a runtime token")
    token = service.runtime_token
    # The token as a Secret in the cluster, as the chart mounts it (the file is the mount).
    core.create_namespaced_secret(
        pipelines.namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="runtime"), string_data={"token": token}),
    )
    server = ThreadingHTTPServer(("127.0.0.1", service.later_port), EchoingRuntime)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        policy = {"maxRestarts": 1, "backoffSeconds": 0.2}
        pipelines.apply(manifest("ok", restartPolicy=policy))
        pipelines.apply(manifest("echo", runtime="later", restartPolicy=policy))
        pipelines.apply(
            faulty(
                "boom",
                ("src", "source", "ticker", {}),
                ("b", "proc", "boom", {}),
                restartPolicy=policy,
            )
        )
        pipelines.wait_ready("ok")
        failed = pipelines.wait_phase("echo", "Failed", timeout=30)
        pipelines.wait_phase("boom", "Failed", timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    # The test has teeth: the token was sent, and the runtime threw it back.
    assert f"Bearer {token}" in EchoingRuntime.seen
    assert "<token>" in failed["status"]["failure"]["message"]
    statuses = json.dumps([pipelines.get(n)["status"] for n in ("ok", "echo", "boom")])
    events = pipelines.kubectl("-n", pipelines.namespace, "get", "events", "-o", "json").stdout
    assert "Bearer" in events or "<token>" in events  # the echo reached the Events
    for where, text in (("status", statuses), ("events", events), ("log", operator.log_text())):
        assert token not in text, f"the runtime token is in the {where}"
