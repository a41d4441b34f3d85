"""Fault injection on the pod engine, on the real node: each fault injected, then the
invariants checked (``settle``):

* nothing lost: every Pipeline reaches its desired state, and every deleted one is gone (no
  stuck finalizer);
* nothing leaked: no pod, Secret, Service or NetworkPolicy of the operator's without its
  Pipeline; a Stopped Pipeline keeps none of them but its Service (its address stays);
* no Running or Ready Pipeline without its pod: exactly one, Ready, the one its status
  names, with its Secret and NetworkPolicy; its worker runs exactly the instance the status
  names, in the desired state; a listening Pipeline's Service selects that pod while it runs
  and no pod otherwise.

The faults: the operator SIGKILLed under churn, a pipeline pod evicted through the Eviction
API, the API server stopped and started, the kubelet and containerd killed and started
again. ``make test`` injects each a few times; ``RELIABILITY=full`` at the counts of
docs/reliability.md, with every injection written to ``RELIABILITY_RESULTS``.
"""

from __future__ import annotations

import base64
import json
import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from controlplane import ControlPlane
from kubernetes import client
from node import Node

from juturna_operator.engines.pod import INSTANCE_LABEL, NO_POD, PORT
from support import (
    CHURN_SEED,
    FULL,
    KILLS,
    MANAGED,
    OUTAGES,
    STATES,
    Churn,
    Kubectl,
    Operator,
    Pipelines,
    change_after_fault,
    count,
    create_all,
    kills_under_churn,
    listening,
    outage,
    pod_output_lines,
    pod_ready,
    slow_manifest,
    wait_settled,
    wait_until,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.reliability,
    pytest.mark.own_operator,
    pytest.mark.timeout(3600 if FULL else 600),
]

ENGINE = "pod"
EVICTIONS = count("FAULT_EVICTIONS", 2, 5)
# Each node component: how many times it is killed, whether its pods must run on.
NODE_FAULTS = {
    "kubelet": (count("FAULT_KUBELET_RESTARTS", 1, 5), True),
    "containerd": (count("FAULT_CONTAINERD_RESTARTS", 1, 3), False),
}
# Pipelines under churn, each a pod of its own: 50 in the full run, as on the other engines.
CHURN_SIZE = count("FAULT_POD_CHURN", 10, 50)
CONVERGE_S = 300.0
# Every pod asks for 10m CPU (the default is 100m): 50 of them then fit the requests of the
# 2-core node; what they use is what they use.
SMALL_PODS = pytest.mark.operator_env(
    JUTURNA_OPERATOR_POD_DEFAULT_RESOURCES=json.dumps(
        {"requests": {"cpu": "10m", "memory": "128Mi"}}
    )
)
# None of these faults is the pipeline's doing: with no restart to spend, one spent fails it.
NO_RESTARTS = {"maxRestarts": 0, "backoffSeconds": 0.5}
SERVING = {"Running": "pipeline_running", "Standby": "pipeline_ready"}  # Juturna's word for each
# -- what the invariants read ------------------------------------------------------------------


def owned_objects(api_client: client.ApiClient, namespace: str) -> dict[str, list[dict[str, Any]]]:
    """The operator's pods, Secrets, Services and NetworkPolicies in ``namespace``, by kind
    (its label: the owner is checked by the caller)."""
    core, networking = client.CoreV1Api(api_client), client.NetworkingV1Api(api_client)
    listings = {
        "pod": core.list_namespaced_pod,
        "Secret": core.list_namespaced_secret,
        "Service": core.list_namespaced_service,
        "NetworkPolicy": networking.list_namespaced_network_policy,
    }
    # As JSON, not the client's models: read twice a second, and 50 pods are slow to convert.
    return {
        kind: json.loads(listing(namespace, label_selector=MANAGED, _preload_content=False).data)[
            "items"
        ]
        for kind, listing in listings.items()
    }


def controller_uid(obj: dict[str, Any]) -> str | None:
    refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")]
    return str(refs[0]["uid"]) if refs else None


def pods_of(api_client: client.ApiClient, namespace: str, uid: str) -> list[dict[str, Any]]:
    """The pods the Pipeline of ``uid`` owns."""
    return [p for p in owned_objects(api_client, namespace)["pod"] if controller_uid(p) == uid]


def describe(pod: dict[str, Any]) -> str:
    meta, status = pod["metadata"], pod.get("status") or {}
    ready = "Ready" if pod_ready(pod) else "not Ready"
    going = ", deleting" if meta.get("deletionTimestamp") else ""
    return f"{meta['name']} ({status.get('phase')}, {ready}{going})"


def held_problems(body: dict[str, Any], want: str | None, held: dict[str, list[Any]]) -> list[str]:
    """What is wrong with the objects one Pipeline owns, for its desired state ``want``."""
    name, status = body["metadata"]["name"], body.get("status") or {}
    names = {kind: [o["metadata"]["name"] for o in objs] for kind, objs in held.items()}
    pods = held.get("pod", [])
    problems = []
    serving = NO_POD  # the pod its Service must select
    if want in SERVING:
        named = (status.get("pod") or {}).get("name")
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp") and pod_ready(p)]
        if len(pods) != 1 or len(live) != 1 or pods[0]["metadata"]["name"] != named:
            problems.append(
                f"{name} ({want}): pods {[describe(p) for p in pods]}; its status names {named}"
            )
        elif want == "Running":
            serving = pods[0]["metadata"]["labels"].get(INSTANCE_LABEL)
        problems += [
            f"{name} ({want}): {kind}s {names.get(kind, [])}, not one"
            for kind in ("Secret", "NetworkPolicy")
            if len(held.get(kind, [])) != 1
        ]
    else:
        kept = [f"{k} {n}" for k in ("pod", "Secret", "NetworkPolicy") for n in names.get(k, [])]
        if kept:
            problems.append(f"{name} ({want}): keeps {kept}")
    listens = any(n["mark"] == "json_http" for n in body["spec"]["nodes"])
    selected = [s["spec"]["selector"].get(INSTANCE_LABEL) for s in held.get("Service", [])]
    if want in SERVING and listens and selected != [serving]:
        problems.append(f"{name} ({want}): its Services select {selected}, not [{serving}]")
    elif want in SERVING and not listens and selected:
        problems.append(f"{name} ({want}) listens on nothing, yet has Services {selected}")
    elif want not in SERVING and selected not in ([], [NO_POD]):
        problems.append(f"{name} ({want}): its Services select {selected}")
    return problems


def worker_problems(body: dict[str, Any], want: str, held: dict[str, list[Any]]) -> list[str]:
    """What the Pipeline's pod runs, asked of its worker with the Pipeline's token: exactly
    the instance its status names, in the desired state."""
    name, expected = body["metadata"]["name"], body["status"].get("pipelineId")
    token = base64.b64decode(held["Secret"][0]["data"]["token"]).decode()
    ip = held["pod"][0]["status"]["podIP"]
    request = urllib.request.Request(
        f"http://{ip}:{PORT}/operator/health", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            health = json.load(answer)
    except OSError as err:
        return [f"{name}: its worker at {ip} does not answer: {err}"]
    runs = {pid: state.get("self") for entry in health["pipelines"] for pid, state in entry.items()}
    if runs != {expected: SERVING[want]}:
        return [f"{name} ({want}): its pod runs {runs}; its status names {expected}"]
    return []


def pod_leaks(
    pipelines: Pipelines, api_client: client.ApiClient, desired: dict[str, str]
) -> list[str]:
    """Objects without their Pipeline, and Pipelines without (or with more than) their
    objects; then, once those hold, what each serving pod's worker runs."""
    bodies = {b["metadata"]["uid"]: b for b in pipelines.bodies().values()}
    held: dict[str, dict[str, list[Any]]] = {uid: {} for uid in bodies}
    problems = []
    objects = owned_objects(api_client, pipelines.namespace)
    # A token Secret's controller is its pod: it belongs to that pod's Pipeline, and to none
    # once the pod is gone (the garbage collector's to remove).
    pipeline_of_pod = {p["metadata"]["uid"]: controller_uid(p) for p in objects["pod"]}
    for kind, found in objects.items():
        for obj in found:
            uid = controller_uid(obj)
            if kind == "Secret":
                uid = pipeline_of_pod.get(uid or "")
            if uid in held:
                held[uid].setdefault(kind, []).append(obj)
            else:
                problems.append(f"{kind} {obj['metadata']['name']}: no Pipeline owns it")
    wants = {uid: desired.get(b["metadata"]["name"]) for uid, b in bodies.items()}
    for uid, body in bodies.items():
        problems += held_problems(body, wants[uid], held[uid])
    if problems:
        return problems
    return [
        problem
        for uid, body in bodies.items()
        if wants[uid] in SERVING
        for problem in worker_problems(body, str(wants[uid]), held[uid])
    ]


def settle(
    pipelines: Pipelines,
    api_client: client.ApiClient,
    desired: dict[str, str],
    timeout: float = CONVERGE_S,
) -> float:
    """Wait until the invariants hold; return how long that took."""
    return wait_settled(
        pipelines, desired, timeout, lambda: pod_leaks(pipelines, api_client, desired)
    )


def instances(pipelines: Pipelines) -> dict[str, str]:
    """The instance each Pipeline's status names, by name (those that have one)."""
    return {
        name: body["status"]["pipelineId"]
        for name, body in pipelines.bodies().items()
        if (body.get("status") or {}).get("pipelineId")
    }


def redeployed(before: dict[str, str], pipelines: Pipelines, untouched: set[str]) -> list[str]:
    """Which of the ``untouched`` Pipelines run another instance than ``before``."""
    now = instances(pipelines)
    return sorted(n for n in untouched if n in before and now.get(n) != before[n])


def restarts_spent(pipelines: Pipelines) -> int:
    return sum(
        int((b.get("status") or {}).get("restarts") or 0) for b in pipelines.bodies().values()
    )


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def pod_pipelines(
    pod_operator: Operator,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    api_client: client.ApiClient,
    namespace: str,
) -> Iterator[Pipelines]:
    """The test's Pipelines. Afterwards, also after a failure midway, every one is deleted
    through the operator (started again if the test left it killed), and nothing of theirs
    is left on the node for the next test."""
    pipelines = Pipelines(objects, namespace, kubectl)
    yield pipelines
    if not pod_operator.alive():
        pod_operator.start()
    for name in pipelines.names():
        try:
            pipelines.delete(name)
        except client.ApiException as err:
            if err.status != 404:
                raise
    wait_until(
        lambda: not pipelines.names() and not any(owned_objects(api_client, namespace).values()),
        300,
        "the test's Pipelines, and their pods, Secrets, Services and NetworkPolicies, gone",
        lambda: {
            "pipelines": pipelines.names(),
            "objects": {
                kind: [o["metadata"]["name"] for o in objs]
                for kind, objs in owned_objects(api_client, namespace).items()
            },
        },
    )


def base_pipelines(pipelines: Pipelines, **spec: Any) -> dict[str, str]:
    """Created, not yet settled: ``a0``-``a4`` Running (``change_after_fault`` flips one of
    ``a1``-``a4`` each round, never ``a0``), ``l0`` Running and listening, ``s0`` Stopped.
    Returns what is desired of each."""
    desired = {f"a{i}": "Running" for i in range(5)} | {"l0": "Running", "s0": "Stopped"}
    bodies = [slow_manifest(n, s) for n, s in desired.items() if n != "l0"]
    bodies.append(listening("l0"))
    for body in bodies:
        body["spec"].update(spec)
    create_all(pipelines, bodies)
    return desired


# -- 1. the operator killed with SIGKILL at random points, under churn -------------------------


@SMALL_PODS
@pytest.mark.timeout(3600 if FULL else 900)
def test_sigkill_at_random_points_under_churn(
    pod_pipelines: Pipelines,
    pod_operator: Operator,
    api_client: client.ApiClient,
    fault_log: Any,
) -> None:
    rng = random.Random(CHURN_SEED)
    desired = {f"p{i:03d}": rng.choice(STATES) for i in range(CHURN_SIZE)}
    # One in ten listens: its Service must follow its pod through kills and redeploys.
    create_all(
        pod_pipelines,
        [
            listening(n, s) if i % 10 == 0 else slow_manifest(n, s)
            for i, (n, s) in enumerate(desired.items())
        ],
    )
    first_s = settle(pod_pipelines, api_client, desired, 2 * CONVERGE_S)
    churn = Churn(pod_pipelines, rng, desired)
    for restarted in kills_under_churn(pod_operator, churn, KILLS):
        settle(pod_pipelines, api_client, desired)
        fault_log.record(
            "operator SIGKILL under churn",
            ENGINE,
            "all at their desired state; no pod, Secret, Service or NetworkPolicy leaked; "
            "no stuck finalizer",
            time.monotonic() - restarted,
            pipelines=len(desired),
            first_converge_s=round(first_s, 1),
        )


# -- 2. a pipeline pod evicted through the Eviction API ------------------------------------------


@pytest.mark.timeout(1800 if FULL else 600)
def test_a_pod_evicted_through_the_eviction_api_is_replaced_without_spending_restarts(
    pod_pipelines: Pipelines,
    pod_operator: Operator,
    api_client: client.ApiClient,
    core: client.CoreV1Api,
    fault_log: Any,
) -> None:
    namespace = pod_pipelines.namespace
    desired = base_pipelines(pod_pipelines, restartPolicy=NO_RESTARTS)
    settle(pod_pipelines, api_client, desired)
    victims = ["l0", "a0", "a1", "a2", "a3"]
    for round_ in range(EVICTIONS):
        victim = victims[round_ % len(victims)]
        before = instances(pod_pipelines)
        uid = pod_pipelines.get(victim)["metadata"]["uid"]
        (pod,) = pods_of(api_client, namespace, uid)
        name = pod["metadata"]["name"]
        core.create_namespaced_pod_eviction(
            name,
            namespace,
            client.V1Eviction(
                api_version="policy/v1",
                kind="Eviction",
                metadata=client.V1ObjectMeta(name=name, namespace=namespace),
            ),
        )
        recovery = settle(pod_pipelines, api_client, desired)
        (new,) = pods_of(api_client, namespace, uid)
        assert new["metadata"]["uid"] != pod["metadata"]["uid"], "the evicted pod is still there"
        assert instances(pod_pipelines)[victim] != before[victim]
        assert restarts_spent(pod_pipelines) == 0
        others = set(desired) - {victim}
        assert redeployed(before, pod_pipelines, others) == [], "others were disturbed"
        told = [
            message
            for _, reason, message in pod_pipelines.events(victim)
            if reason == "RuntimeUnavailable"
        ]
        # The Pipeline says who took its pod (a drain is not a person's delete), once: its
        # replacement waited for the pod to go, rather than be refused while it went.
        assert told == [
            f"pod {name} is gone (EvictionByEvictionAPI: Eviction API: evicting); "
            "a new one replaces it"
        ]
        fault_log.record(
            "a pipeline pod evicted (Eviction API)",
            ENGINE,
            "replaced by a new pod, no restart spent; the others untouched",
            recovery,
        )


# -- 3. the API server stopped and started ------------------------------------------------------


@pytest.mark.timeout(1800 if FULL else 600)
def test_apiserver_stopped_and_started(
    pod_pipelines: Pipelines,
    pod_operator: Operator,
    api_client: client.ApiClient,
    kubectl: Kubectl,
    control_plane: ControlPlane,
    fault_log: Any,
) -> None:
    namespace = pod_pipelines.namespace
    rng = random.Random(5)
    desired = base_pipelines(pod_pipelines, restartPolicy=NO_RESTARTS)
    settle(pod_pipelines, api_client, desired)
    for round_ in range(OUTAGES):
        down_s = rng.uniform(10, 30) if FULL else 10.0
        a0 = pod_pipelines.get("a0")
        a0_pod, a0_id = a0["status"]["pod"]["name"], a0["status"]["pipelineId"]
        lines = pod_output_lines(kubectl, a0_pod, namespace, a0_id)
        before = instances(pod_pipelines)
        cores = outage(control_plane, "kube-apiserver", down_s, pod_operator)
        # The pipelines ran on while the API server was away (a0 is never changed).
        assert pod_output_lines(kubectl, a0_pod, namespace, a0_id) > lines
        # Changes made after the outage are seen: the watches reconnected by themselves.
        untouched = set(desired)
        untouched -= change_after_fault(pod_pipelines, desired, round_)
        recovery = settle(pod_pipelines, api_client, desired)
        assert redeployed(before, pod_pipelines, untouched) == []
        assert cores < 0.5, f"the operator used {cores:.2f} cores while the API server was down"
        fault_log.record(
            "kube-apiserver stopped",
            ENGINE,
            "reconnected by itself; the pods ran on; all at their desired state; no leak",
            recovery,
            down_s=round(down_s, 1),
            cores_while_down=round(cores, 3),
        )


# -- 4. the kubelet, then containerd, killed and started again ------------------------------------


class Restarted(NamedTuple):
    """One restart of a node component, and how the Pipelines took it."""

    down_s: float  # from the kill until it answered again
    recovery_s: float  # from then until the invariants held, with nothing changed
    redeployed: list[str]  # Pipelines that lost their instance to it
    restarts: int  # restarts it made them spend


def node_restarts(
    pipelines: Pipelines,
    api_client: client.ApiClient,
    desired: dict[str, str],
    restart: Callable[[float], float],
    times: int,
) -> Iterator[Restarted]:
    """Kill a node component ``times`` times while the Pipelines run, and start it again
    after a pause (``restart(seconds)``); after each, wait for the invariants with nothing
    changed (the time to recover), then make changes (a new Pipeline needs the node to start
    a pod) and wait for them too: a late effect of the fault on the others (a container that
    dies a little later) shows by then."""
    rng = random.Random(7)
    for round_ in range(times):
        before, spent = instances(pipelines), restarts_spent(pipelines)
        # Dead for a while, as under a supervisor that restarts it after a pause.
        down_s = restart(rng.uniform(2, 15) if FULL else 5.0)
        recovery_s = settle(pipelines, api_client, desired)
        changed = change_after_fault(pipelines, desired, round_)
        settle(pipelines, api_client, desired)
        lost = redeployed(before, pipelines, set(before) - changed)
        yield Restarted(down_s, recovery_s, lost, restarts_spent(pipelines) - spent)


@pytest.mark.timeout(1800 if FULL else 600)
@pytest.mark.parametrize("component", ["kubelet", "containerd"])
def test_a_node_component_killed_and_started_again_while_pipelines_run(
    component: str,
    pod_pipelines: Pipelines,
    pod_operator: Operator,
    api_client: client.ApiClient,
    node: Node,
    fault_log: Any,
) -> None:
    """The kubelet's pods run on without it: none may lose its instance, no restart to
    spend. Containers may die with containerd: the default restart policy, and each
    Pipeline must be Running again."""
    times, run_on = NODE_FAULTS[component]
    policy = {"restartPolicy": NO_RESTARTS} if run_on else {}
    desired = base_pipelines(pod_pipelines, **policy)
    settle(pod_pipelines, api_client, desired)
    restart = getattr(node, f"restart_{component}")
    for fault in node_restarts(pod_pipelines, api_client, desired, restart, times):
        assert not (run_on and fault.redeployed), f"the {component}'s restart cost: {fault}"
        fault_log.record(
            f"{component} killed and started again",
            ENGINE,
            ("the pods ran on, no restart spent" if run_on else "all Running again")
            + "; all at their desired state; no leak",
            fault.recovery_s,
            down_s=round(fault.down_s, 1),
            redeployed=len(fault.redeployed),
            restarts=fault.restarts,
        )
