"""The pod engine on the real node: each Pipeline runs in a Pod of its own, in its namespace,
with no API rights, under the restricted Pod Security Standard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Coroutine, Iterator
from datetime import datetime
from typing import Any

import pytest
from kubernetes import client
from node import NODE_IP
from processes import reset_peak_rss, rss_kib

from juturna_operator.api import PipelineSpec
from juturna_operator.domain import InstanceState, PipelineKey
from juturna_operator.engines.base import InstanceInfo, Plan
from juturna_operator.engines.pod import PodEngine
from juturna_operator.listening import listeners
from juturna_operator.settings import Settings
from support import (
    REPO,
    Kubectl,
    Operator,
    Pipelines,
    answered_size,
    assert_nothing_made,
    assert_pod_output_grows,
    assert_sole_operator,
    faulty,
    is_ready,
    listening,
    managed,
    manifest,
    pod_body,
    pod_output_lines,
    pod_ready,
    sample,
    scrape,
    wait_default_account,
    wait_pod,
    wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.own_operator]


def wait_nothing_left(kubectl: Kubectl, namespace: str, what: str, timeout: float) -> None:
    """No pod, Secret or NetworkPolicy of the operator's in ``namespace`` (``what``: after
    what)."""
    wait_until(
        lambda: (
            not any(
                managed(kubectl, kind, namespace) for kind in ("pods", "secrets", "networkpolicies")
            )
        ),
        timeout,
        what,
    )


def assert_failure(body: dict[str, Any], reason: str, code: int, step: str, message: str) -> None:
    """``status.failure`` is this, its message naming the Pipeline's pod as ``{pod}``: the
    pod's name ends in its instance's random id (``<name>-<uid8>-<instance>``)."""
    meta, failure = body["metadata"], dict(body["status"]["failure"])
    pod = re.escape(f"{meta['name']}-{meta['uid'][:8]}-") + "[0-9a-f]{8}"
    said = failure.pop("message")
    assert failure == {"reason": reason, "code": code, "step": step}
    assert re.fullmatch(pod.join(map(re.escape, message.split("{pod}"))), said), said


@pytest.mark.timeout(300)
def test_a_pipeline_runs_in_a_pod_of_its_own_with_no_api_rights(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    pipelines = Pipelines(objects, namespace, kubectl)
    # Recreate: a change of configuration alone redeploys in the same pod (a warm swap, the
    # default, makes a pod per revision: test_pod_warm_swap.py).
    pipelines.apply(manifest("tones", update={"strategy": "Recreate"}))
    body = pipelines.wait_ready("tones", timeout=120)
    assert body["status"]["phase"] == "Running"
    uid, pipeline_id = body["metadata"]["uid"], body["status"]["pipelineId"]

    (pod,) = managed(kubectl, "pods", namespace)
    name = pod["metadata"]["name"]
    assert pod["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "juturna.io/v1alpha1",
            "kind": "Pipeline",
            "name": "tones",
            "uid": uid,
            "controller": True,
        }
    ]
    assert pod["metadata"]["labels"]["juturna.io/pipeline"] == "tones"
    node = pod["spec"]["nodeName"]
    assert body["status"]["pod"] == {"name": name, "node": node}
    started = [m for kind, reason, m in pipelines.events("tones") if reason == "Started"]
    assert started == [
        f"pipeline instance {pipeline_id} created; in pod {name} on node {node}; all nodes "
        "warmed up; pipeline started"
    ]
    wide = kubectl("get", "pipelines", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-2:] == ["NODE", "MESSAGE"], wide  # MESSAGE: -o wide's last
    column = wide[0].index(" NODE ") + 1  # kubectl aligns each column under its header
    assert wide[1][column:].split()[0] == node, wide
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert not any("kube-api-access" in v["name"] for v in spec["volumes"])
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert_pod_output_grows(kubectl, name, namespace, pipeline_id)

    # The token: in a Secret its pod controls (it goes with the pod), nowhere a user reads.
    (secret,) = managed(kubectl, "secrets", namespace)
    assert secret["metadata"]["name"] == name
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("Pod", pod["metadata"]["uid"])
    token = kubectl("get", "secret", name, "-n", namespace, "-o", "jsonpath={.data.token}").stdout
    events = json.dumps(pipelines.events("tones"))
    assert token not in json.dumps(pipelines.get("tones")) + events + pod_operator.log_text()

    # Ready keeps the pod, warm; back to Running, and a change of configuration alone,
    # redeploy inside that same pod; Stopped removes the pod and its Secret.
    def same_pod() -> list[str]:
        return [p["metadata"]["uid"] for p in managed(kubectl, "pods", namespace)]

    pipelines.patch_spec("tones", {"state": "Standby"})
    body = pipelines.wait_phase("tones", "Standby", timeout=60)
    assert same_pod() == [pod["metadata"]["uid"]]
    pipelines.patch_spec("tones", {"state": "Running"})
    body = pipelines.wait_phase("tones", "Running", timeout=60)
    assert body["status"]["pipelineId"] != pipeline_id
    assert same_pod() == [pod["metadata"]["uid"]]
    assert_pod_output_grows(kubectl, name, namespace, body["status"]["pipelineId"])
    nodes = [dict(n) for n in pipelines.get("tones")["spec"]["nodes"]]
    nodes[1]["configuration"] = {**nodes[1]["configuration"], "label": "changed"}
    pipelines.patch_spec("tones", {"nodes": nodes})
    before = body["status"]["pipelineId"]
    body = pipelines.wait(
        "tones",
        lambda b: is_ready(b) and b["status"].get("pipelineId") != before,
        60,
        "Running the new configuration",
    )
    assert same_pod() == [pod["metadata"]["uid"]]
    assert_pod_output_grows(kubectl, name, namespace, body["status"]["pipelineId"])
    # A change of template replaces the pod.
    before = body["status"]["pipelineId"]
    pipelines.patch_spec("tones", {"template": {"labels": {"team": "a"}}})
    body = pipelines.wait(
        "tones",
        lambda b: is_ready(b) and b["status"].get("pipelineId") != before,
        90,
        "Running in a pod of the new template",
    )
    (replaced,) = [
        p for p in managed(kubectl, "pods", namespace) if "deletionTimestamp" not in p["metadata"]
    ]
    assert replaced["metadata"]["uid"] != pod["metadata"]["uid"]
    assert replaced["metadata"]["labels"]["team"] == "a"
    pipelines.patch_spec("tones", {"state": "Stopped"})
    pipelines.wait_phase("tones", "Stopped", timeout=60)
    wait_nothing_left(kubectl, namespace, "no pod and no Secret for a Stopped Pipeline", 60)
    pipelines.patch_spec("tones", {"state": "Running"})
    body = pipelines.wait_ready("tones", timeout=120)
    (pod,) = managed(kubectl, "pods", namespace)
    assert_pod_output_grows(
        kubectl, pod["metadata"]["name"], namespace, body["status"]["pipelineId"]
    )
    pipelines.delete("tones")
    pipelines.wait_gone("tones", timeout=60)
    wait_nothing_left(kubectl, namespace, "no pod and no Secret after the Pipeline is deleted", 60)
    assert "Traceback" not in pod_operator.log_text()


@pytest.mark.timeout(300)
@pytest.mark.operator_env(JUTURNA_OPERATOR_POD_USER="20001:20002")
def test_the_administrators_pod_user_runs_the_pipeline(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """``pipelinePod.user``: the pod runs as that user and group, not the image's own
    (10001); its token's files are the group's (fsGroup, mode 0440) and its folders are
    writable, so the pipeline runs and its output grows."""
    pipelines = Pipelines(objects, namespace, kubectl)
    body, pod = running_example(pipelines, kubectl, namespace)
    security = pod["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (
        20001,
        20002,
        20002,
    )
    name = pod["metadata"]["name"]
    ids = kubectl("exec", "-n", namespace, name, "--", "id", "-u").stdout.strip()
    assert ids == "20001"
    assert_pod_output_grows(kubectl, name, namespace, body["status"]["pipelineId"])


def running_example(pipelines: Pipelines, kubectl: Kubectl, namespace: str, **spec: Any) -> tuple:
    """The example Pipeline Running in its pod: (status body, pod body)."""
    pipelines.apply(manifest("tones", **spec))
    body = pipelines.wait_ready("tones", timeout=120)
    (pod,) = managed(kubectl, "pods", namespace)
    return body, pod


@pytest.mark.timeout(300)
def test_a_pod_deleted_from_outside_is_replaced_without_spending_restarts(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    pipelines = Pipelines(objects, namespace, kubectl)
    policy = {"maxRestarts": 0, "backoffSeconds": 0.5}
    body, pod = running_example(pipelines, kubectl, namespace, restartPolicy=policy)
    kubectl("delete", "pod", pod["metadata"]["name"], "-n", namespace, "--wait=false")
    failed = pipelines.wait_failure(
        "tones", "RuntimeUnavailable", 30, "RuntimeUnavailable while the pod is gone"
    )
    assert failed["status"]["failure"]["message"] == (
        f"pod {pod['metadata']['name']} is gone (deleted); a new one replaces it"
    )
    old = body["status"]["pipelineId"]
    body = pipelines.wait(
        "tones",
        lambda b: b["status"].get("phase") == "Running" and b["status"].get("pipelineId") != old,
        90,
        "Running again in a new pod, with maxRestarts 0",
    )
    (new,) = [
        p for p in managed(kubectl, "pods", namespace) if "deletionTimestamp" not in p["metadata"]
    ]
    assert new["metadata"]["uid"] != pod["metadata"]["uid"]
    assert_pod_output_grows(
        kubectl, new["metadata"]["name"], namespace, body["status"]["pipelineId"]
    )
    assert body["status"].get("restarts", 0) == 0


@pytest.mark.timeout(300)
def test_a_service_account_that_does_not_exist_yet_is_waited_for(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """The ServiceAccount admission refuses a pod whose account does not exist yet: a new
    namespace's `default` for a moment (test_pod_faults.py found it, with Pipelines created
    right after their namespace), a named one until a GitOps sync brings it. Before, that
    403 was InvalidSpec: Failed for good, the account's arrival changed nothing."""
    pipelines = Pipelines(objects, namespace, kubectl)
    policy = {"maxRestarts": 0, "backoffSeconds": 0.5}
    template = {"serviceAccountName": "later"}
    pipelines.apply(manifest("tones", template=template, restartPolicy=policy))
    body = pipelines.wait_failure("tones", "RuntimeUnavailable", 60)
    assert_failure(
        body,
        "RuntimeUnavailable",
        503,
        "create",
        'the API server refuses the pipeline\'s pod for now: pods "{pod}" is forbidden: error '
        f"looking up service account {namespace}/later: serviceaccount "
        '"later" not found; tried again until the account exists',
    )
    assert body["status"]["phase"] == "Pending"
    kubectl("create", "serviceaccount", "later", "-n", namespace)
    body = pipelines.wait_ready("tones", timeout=120)
    assert body["status"]["phase"] == "Running"
    assert body["status"].get("restarts", 0) == 0


@pytest.mark.timeout(300)
def test_a_pipeline_that_stops_listening_keeps_no_service_made_by_an_earlier_operator(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """A Service an earlier operator process made, which this one never adopted (the Pipeline
    had no pod to adopt: it was Stopped), goes once the Pipeline no longer listens. Before,
    this process knew nothing of it and left it, pointing at no pod, for the Pipeline's
    life (test_pod_faults.py's churn found one after a failed adoption)."""
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(listening("json-in"))
    pipelines.wait_ready("json-in", timeout=120)
    pipelines.patch_spec("json-in", {"state": "Stopped"})
    pipelines.wait_phase("json-in", "Stopped", timeout=60)
    (kept,) = managed(kubectl, "services", namespace)  # the address stays while Stopped
    assert kept["metadata"]["name"] == "json-in"
    pod_operator.kill()
    pod_operator.start()
    plain = manifest("json-in")["spec"]
    change = {"state": "Running", "nodes": plain["nodes"], "links": plain["links"]}
    pipelines.patch_spec("json-in", change)
    body = pipelines.wait_ready("json-in", timeout=120)
    assert body["status"]["phase"] == "Running"
    assert not body["status"].get("endpoints")
    assert managed(kubectl, "services", namespace) == []


@pytest.mark.timeout(300)
def test_what_an_interrupted_removal_left_goes_when_the_operator_starts(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """An operator killed while it removed a Pipeline's pod, before its Secret and
    NetworkPolicy (test_pod_faults.py's churn hit it in a full run: a Stopped Pipeline kept
    both for its life): the next process removes them. The same state, made here: the pod
    deleted while no operator runs, and the Pipeline set to Stopped."""
    pipelines = Pipelines(objects, namespace, kubectl)
    _, pod = running_example(pipelines, kubectl, namespace)
    pod_operator.kill()
    kubectl("delete", "pod", pod["metadata"]["name"], "-n", namespace, "--wait=true")
    pipelines.patch_spec("tones", {"state": "Stopped"})
    # The Secret goes with its pod, by the garbage collector: no operator needed.
    wait_until(lambda: not managed(kubectl, "secrets", namespace), 30, "the pod's Secret gone")
    assert managed(kubectl, "networkpolicies", namespace)
    pod_operator.start()
    pipelines.wait_phase("tones", "Stopped", timeout=60)
    wait_nothing_left(kubectl, namespace, "no Secret and no NetworkPolicy once Stopped", 30)


@pytest.mark.timeout(300)
def test_an_operator_restart_adopts_the_pod_and_the_output_never_stops(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    pipelines = Pipelines(objects, namespace, kubectl)
    body, pod = running_example(pipelines, kubectl, namespace)
    name, pipeline_id = pod["metadata"]["name"], body["status"]["pipelineId"]
    pod_operator.kill()
    before = pod_output_lines(kubectl, name, namespace, pipeline_id)
    pod_operator.start()
    wait_until(lambda: "adopted pod " + name in pod_operator.log_text(), 30, "the pod adopted")
    assert_pod_output_grows(kubectl, name, namespace, pipeline_id)
    assert pod_output_lines(kubectl, name, namespace, pipeline_id) > before
    body = pipelines.wait_ready("tones", timeout=30)
    assert body["status"]["pipelineId"] == pipeline_id  # not deployed again
    assert [p["metadata"]["uid"] for p in managed(kubectl, "pods", namespace)] == [
        pod["metadata"]["uid"]
    ]


@pytest.mark.timeout(300)
@pytest.mark.operator_env(JUTURNA_OPERATOR_RUNTIME_IMAGE="localhost/juturna-operator:missing")
def test_a_runtime_image_missing_from_the_node_is_image_pull_failed(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(manifest("tones", restartPolicy={"maxRestarts": 0, "backoffSeconds": 1}))
    body = pipelines.wait_phase("tones", "Failed", timeout=90)
    assert body["status"]["failure"] == {
        "reason": "ImagePullFailed",
        "code": 502,
        "step": "create",
        "message": 'ErrImageNeverPull: Container image "localhost/juturna-operator:missing" '
        "is not present with pull policy of Never",
    }
    # No half-built instance: neither pod nor Secret is left.
    wait_nothing_left(kubectl, namespace, "no pod and no Secret after the failed create", 30)


def set_node_gpus(kubectl: Kubectl, node: str, count: int | None) -> None:
    """Advertise ``count`` of the extended resource example.com/gpu on the node (None: no
    longer), as Kubernetes documents for resources no device plugin manages."""
    path = "/status/capacity/example.com~1gpu"
    op = (
        {"op": "remove", "path": path}
        if count is None
        else {"op": "add", "path": path, "value": str(count)}
    )
    kubectl("patch", "node", node, "--subresource=status", "--type=json", "-p", json.dumps([op]))


def gpus(n: int) -> dict[str, Any]:
    return {"resources": {"requests": {"example.com/gpu": n}, "limits": {"example.com/gpu": n}}}


@pytest.mark.timeout(300)
def test_an_unschedulable_pipeline_waits_then_runs_once_a_node_fits(
    pod_operator: Operator,
    node: Any,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
) -> None:
    pipelines = Pipelines(objects, namespace, kubectl)
    policy = {"maxRestarts": 0, "backoffSeconds": 1}
    set_node_gpus(kubectl, node.name, 2)
    try:
        pipelines.apply(manifest("fits", template=gpus(1), restartPolicy=policy))
        body = pipelines.wait_ready("fits", timeout=120)
        assert body["status"]["phase"] == "Running"
        pipelines.apply(manifest("waits", template=gpus(3), restartPolicy=policy))
        body = pipelines.wait_failure("waits", "Unschedulable", 60)
        assert body["status"]["phase"] == "Pending"
        assert body["status"]["failure"]["code"] == 503
        assert "Insufficient example.com/gpu" in body["status"]["failure"]["message"]
        set_node_gpus(kubectl, node.name, 4)
        body = pipelines.wait_ready("waits", timeout=120)
        assert body["status"]["phase"] == "Running"
        assert body["status"].get("restarts", 0) == 0
    finally:
        for name in ("fits", "waits"):
            pipelines.delete(name)
        for name in ("fits", "waits"):
            pipelines.wait_gone(name, timeout=60)
        set_node_gpus(kubectl, node.name, None)


def through_faulty(
    name: str, middle: tuple[str, dict[str, Any]], template: dict[str, Any], max_restarts: int
) -> dict[str, Any]:
    """The example's ticker and sink around one faulty node (its mark names it too)."""
    mark, configuration = middle
    return faulty(
        name,
        ("src", "source", "ticker", {"rate": 4}),
        (mark, "proc", mark, configuration),
        ("out", "sink", "jsonl", {"file": "output.jsonl"}),
        template=template,
        restartPolicy={"maxRestarts": max_restarts, "backoffSeconds": 0.5},
    )


def health_asks(operator: Operator) -> float | None:
    """The health requests the operator sent to pipeline pods so far (its metric)."""
    return sample(scrape(operator), "juturna_operator_health_requests_total")


CRASH_LINE = re.compile(r"^(\S+) .*node crasher crashed: RuntimeError: kaboom in crasher")


def crashed_at(log: str) -> float:
    """When the worker logged its node's crash (the container runtime's timestamp), as a
    Unix time."""
    for line in log.splitlines():
        found = CRASH_LINE.match(line)
        if found:
            stamp = re.sub(r"(\.\d{6})\d*", r"\1", found[1]).replace("Z", "+00:00")
            return datetime.fromisoformat(stamp).timestamp()
    raise AssertionError(f"no crash in the pod's log:\n{log[-2000:]}")


@pytest.mark.timeout(300)
def test_a_node_crash_reaches_the_operator_through_the_pods_readiness_within_5_s(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """Issue 28, item 1: the kubelet watches pipeline health. While the pipeline runs, the
    operator sends its pod no health request (the polling design sent one every 3 s). Then a
    node crashes: the worker's readiness probe fails, the pod watch brings the change, and the
    Pipeline says NodeFailed, naming the node, within 5 s of the crash (the worker's log line,
    stamped by the container runtime)."""
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(through_faulty("brittle", ("crasher", {"after": 160, "words": 0}), {}, 0))
    pipelines.wait_ready("brittle", timeout=120)  # the crash comes 40 s after the start
    (pod,) = managed(kubectl, "pods", namespace)

    def pod_version() -> str:
        (now,) = managed(kubectl, "pods", namespace)
        return str(now["metadata"]["resourceVersion"])

    follow = subprocess.Popen(
        kubectl.command("logs", "-f", "--timestamps", "-n", namespace, pod["metadata"]["name"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 25
        while True:  # a window of more than two health intervals in which the pod is unchanged
            version, asked = pod_version(), health_asks(pod_operator)
            time.sleep(7)
            if pod_version() == version:
                assert health_asks(pod_operator) == asked, "a steady pod's health was asked"
                break
            assert time.monotonic() < deadline, "the pod kept changing"
        deadline = time.monotonic() + 60
        while not pipelines.get("brittle").get("status", {}).get("failure"):
            assert time.monotonic() < deadline, "no failure 60 s after the start"
            time.sleep(0.1)
        seen = time.time()
    finally:
        follow.terminate()
        log, _ = follow.communicate(timeout=30)
    body = pipelines.wait_phase("brittle", "Failed", timeout=30)
    failure = body["status"]["failure"]
    assert (failure["reason"], failure["step"]) == ("NodeFailed", "run"), failure
    assert failure["message"].startswith('node "crasher" crashed: RuntimeError: kaboom'), failure
    took = seen - crashed_at(log)
    assert 0 < took < 5, f"the crash reached the Pipeline's status {took:.1f} s after it"


@pytest.mark.timeout(300)
def test_an_operator_restarted_after_a_crash_adopts_the_not_ready_pod_and_reports_it(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """Issue 28, item 1: a pod whose readiness probe fails (a node crashed while no operator
    ran) is not a dead pod. The restarted operator adopts it, and the Pipeline fails with
    the crash (NodeFailed naming the node), from that pod: no new one is made for it."""
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(through_faulty("brittle", ("crasher", {"after": 24, "words": 0}), {}, 0))
    pipelines.wait_ready("brittle", timeout=120)
    pod_operator.kill()
    (pod,) = managed(kubectl, "pods", namespace)
    name, uids = pod["metadata"]["name"], {pod["metadata"]["uid"]}

    def not_ready() -> bool:
        return not any(pod_ready(p) for p in managed(kubectl, "pods", namespace))

    wait_until(not_ready, 60, "the pod NotReady: its node crashed")
    pod_operator.start()
    wait_until(lambda: f"adopted pod {name}" in pod_operator.log_text(), 30, "the pod adopted")

    def failed(body: dict[str, Any]) -> bool:
        uids.update(p["metadata"]["uid"] for p in managed(kubectl, "pods", namespace))
        return body.get("status", {}).get("phase") == "Failed"

    body = pipelines.wait("brittle", failed, 60, "Failed")
    failure = body["status"]["failure"]
    assert (failure["reason"], failure["step"]) == ("NodeFailed", "run"), failure
    assert failure["message"].startswith('node "crasher" crashed: RuntimeError: kaboom'), failure
    assert uids == {pod["metadata"]["uid"]}, "a new pod was made"


@pytest.mark.timeout(300)
def test_a_failed_deploy_names_its_step_and_leaves_nothing(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """Juturna's one deploy call fails in its warmup (a node whose constructor raises): the
    failure says warmup and names the node; the pod and its Secret are gone."""
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(through_faulty("broken", ("boom", {"model": "weights.bin"}), {}, 0))
    body = pipelines.wait_phase("broken", "Failed", timeout=120)
    assert body["status"]["failure"] == {
        "reason": "WarmupFailed",
        "code": 500,
        "step": "warmup",
        "message": 'node "boom": FileNotFoundError: model file weights.bin not found',
    }
    wait_nothing_left(kubectl, namespace, "no pod and no Secret after the failed deploy", 60)


@pytest.mark.timeout(300)
def test_without_an_operator_the_garbage_collector_removes_pod_and_secret(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """The owner references alone clean up: the operator is gone, the Pipeline's finalizer
    removed by hand (docs/observability.md: troubleshooting), and the pod and Secret go with
    it. Also: the pod's worker answers nobody but the operator (401 from the node itself)."""
    pipelines = Pipelines(objects, namespace, kubectl)
    _, pod = running_example(pipelines, kubectl, namespace)
    url = f"http://{pod['status']['podIP']}:8080/pipelines"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=5)
    assert refused.value.code == 401
    pod_operator.kill()
    kubectl("delete", "pipeline", "tones", "-n", namespace, "--wait=false")
    kubectl(
        "patch",
        "pipeline",
        "tones",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"metadata":{"finalizers":null}}',
    )
    pipelines.wait_gone("tones", timeout=30)
    wait_nothing_left(
        kubectl, namespace, "the garbage collector removing the pod and the Secret", 90
    )


@pytest.mark.timeout(300)
def test_a_health_answer_over_the_cap_fails_the_pipeline_and_its_restart_gets_a_new_pod(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """A node in the pod dies with a 60 MB message, which the pod's worker repeats in its
    health answer (a tenant's pod can answer anything). The operator reads none of it (its
    peak memory grows by far less), and the Pipeline fails with AnswerTooLarge naming the
    size and the cap. The pod is not kept for the restart, whose new pod answers as large:
    Failed after one restart, and nothing left."""
    assert pod_operator.proc is not None
    pipelines = Pipelines(objects, namespace, kubectl)
    reset_peak_rss(pod_operator.proc.pid)
    base_kib = rss_kib(pod_operator.proc.pid)
    loud = ("crasher", {"after": 0, "words": 60_000_000})
    pipelines.apply(through_faulty("loud", loud, {}, 1))
    pods: set[str] = set()

    def failed_for_good(body: dict[str, Any]) -> bool:
        pods.update(p["metadata"]["uid"] for p in managed(kubectl, "pods", namespace))
        return body.get("status", {}).get("phase") == "Failed"

    body = pipelines.wait("loud", failed_for_good, 180, "Failed after one restart")
    growth_mib = (rss_kib(pod_operator.proc.pid, "VmHWM") - base_kib) / 1024
    failure = body["status"]["failure"]
    assert (failure["reason"], failure["code"], failure["step"]) == ("AnswerTooLarge", 502, "run")
    assert answered_size(failure["message"], r"http://[\d.]+:8080/operator/health") > 60e6
    assert body["status"]["restarts"] == 1
    assert len(pods) == 2, f"pods seen: {pods}"  # the restart ran in a new pod
    assert growth_mib < 30, f"the operator's peak memory grew by {growth_mib:.0f} MiB"
    restarting = [m for _, r, m in pipelines.events("loud") if r == "Restarting"]
    assert restarting == ["restart 1 of 1 after AnswerTooLarge"], restarting
    wait_nothing_left(kubectl, namespace, "no pod and no Secret once Failed", 60)


@pytest.mark.timeout(300)
def test_a_node_past_its_memory_limit_is_oom_killed_and_restarted_in_a_new_pod(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """The hog (a faulty plugin, in the pods' test image) keeps 64 MiB per message under a
    256 MiB limit."""
    memory = {"limits": {"memory": "256Mi"}, "requests": {"memory": "256Mi"}}
    template = {"resources": memory}
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(through_faulty("hog", ("hog", {"mib_per_message": 64}), template, 1))
    body = pipelines.wait_phase("hog", "Failed", timeout=180)
    assert body["status"]["failure"] == {
        "reason": "NodeFailed",
        "code": 500,
        "step": "run",
        "message": "container juturna OOMKilled (exit code 137): it used more memory than "
        "its limit",
    }
    assert body["status"]["restarts"] == 1  # one new pod, then the policy was spent
    events = pipelines.events("hog")
    assert any(reason == "Restarting" for _, reason, _ in events), events


@pytest.mark.timeout(300)
@pytest.mark.operator_env(JUTURNA_OPERATOR_POD_WORK_SIZE_LIMIT="16Mi")
def test_a_pod_past_its_folders_size_limit_is_evicted_and_the_pipeline_says_why(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """Item 16: the spill node appends 4 MiB to its pipeline folder per message; past the
    folder's 16Mi limit the kubelet evicts the pod, and the Pipeline fails with the
    kubelet's words (no restart left), not "pod is gone"."""
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(through_faulty("spill", ("spill", {"mib_per_message": 4}), {}, 0))
    body = pipelines.wait_phase("spill", "Failed", timeout=180)
    assert_failure(
        body,
        "NodeFailed",
        500,
        "run",
        "pod {pod} was evicted for going past a limit of its own: Usage "
        'of EmptyDir volume "work" exceeds the limit "16Mi".',
    )
    assert body["status"]["restarts"] == 0
    wait_nothing_left(kubectl, namespace, "no pod and no Secret after the eviction", 60)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("enforced", "step", "message"),
    [
        pytest.param(
            None,
            "validate",
            'spec.template.volumes[0].hostPath: host paths are not allowed (volume "host" '
            "would reach the node's own files); allowed types: configMap, csi, downwardAPI, "
            "emptyDir, ephemeral, image, persistentVolumeClaim, projected, secret; the "
            "administrator allows more with JUTURNA_OPERATOR_ALLOWED_VOLUME_TYPES (chart: "
            "allowedVolumeTypes)",
            id="unlabelled-the-operator-refuses",
        ),
        pytest.param(
            "restricted",
            "create",
            'the API server refuses the pipeline\'s pod: pods "{pod}" is forbidden: '
            'violates PodSecurity "restricted:latest": restricted volume types '
            '(volume "host" uses restricted volume type "hostPath")',
            id="allowed-by-the-administrator-refused-by-pod-security",
            marks=pytest.mark.operator_env(JUTURNA_OPERATOR_ALLOWED_VOLUME_TYPES="hostPath"),
        ),
    ],
)
def test_a_host_path_is_invalid_spec_before_anything_exists(
    pod_operator: Operator,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
    enforced: str | None,
    step: str,
    message: str,
) -> None:
    """Round 3, item 2: in a namespace with no Pod Security label the API server would admit
    the pod, so the operator refuses the template itself. Where the administrator allows
    hostPath volumes, the namespace's Pod Security still does, as the pod is created (no dry
    run first). Either way no pod, Secret or Service is left: the Pipeline listens, so its
    Service was made before the refused pod, and goes with it."""
    if enforced:
        kubectl("label", "namespace", namespace, f"pod-security.kubernetes.io/enforce={enforced}")
    else:
        labels = kubectl("get", "namespace", namespace, "-o", "jsonpath={.metadata.labels}")
        assert "pod-security.kubernetes.io" not in labels.stdout
    template = {
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
        "volumeMounts": [{"name": "host", "mountPath": "/host"}],
    }
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(listening("escape", template=template))
    body = pipelines.wait_phase("escape", "Failed", timeout=60)
    assert_failure(body, "InvalidSpec", 422, step, message)
    assert_nothing_made(kubectl, namespace)
    assert not [e for e in pipelines.events("escape") if e[1] in ("Created", "Started")]


# A pod that answers like a pipeline pod (ready on /operator/ready) and prints every other
# request it gets, with its Authorization header: what an impostor would steal.
RECORDER = """
import http.server
class Recorder(http.server.BaseHTTPRequestHandler):
    def answer(self):
        if self.path != "/operator/ready":
            auth = self.headers.get("Authorization", "")
            print("REQUEST", self.command, self.path, auth, flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    do_GET = do_POST = answer
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Recorder).serve_forever()
"""


def impostor(
    kubectl: Kubectl, namespace: str, victim: dict[str, Any], image: str, name: str
) -> str:
    """Tenant A's pod in its own namespace: a victim's pod name (``name``) and labels (uids
    are not secret), Ready, recording what it is sent. Returns its name once it is Ready."""
    meta = victim["metadata"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "juturna-operator",
                "juturna.io/pipeline-uid": meta["uid"],
                "juturna.io/pipeline": meta["name"],
            },
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "juturna",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", RECORDER],
                    "readinessProbe": {
                        "httpGet": {"path": "/operator/ready", "port": 8080},
                        "periodSeconds": 1,
                    },
                }
            ],
        },
    }
    wait_default_account(kubectl, namespace)
    kubectl("apply", "-f", "-", input=json.dumps(pod))
    wait_pod(kubectl, namespace, name, pod_ready, 60, "Ready")
    return name


def requests_to(kubectl: Kubectl, namespace: str, pod: str) -> list[str]:
    logs = kubectl("logs", pod, "-n", namespace).stdout
    return [line for line in logs.splitlines() if line.startswith("REQUEST")]


def never_within(seconds: float, happened: Any, what: str) -> None:
    """``happened()`` stays false for ``seconds`` (the old code did it within one)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = happened()
        assert not found, f"{what}: {found}"
        time.sleep(0.5)


@pytest.fixture
def tenant_a(core: client.CoreV1Api) -> Iterator[str]:
    """A second tenant's namespace, deleted afterwards."""
    name = f"a-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.mark.timeout(300)
def test_a_pod_in_another_namespace_gets_no_token_and_its_deletion_touches_nothing(
    pod_operator: Operator,
    node_image: str,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
    tenant_a: str,
) -> None:
    """Round 3, item 1. Tenant A copies a victim's pod name and labels into its own namespace.
    While the victim's pod is still being created (a ConfigMap it mounts is missing), A's
    Ready pod must get no deploy, token or configuration; deleting A's pod must delete
    nothing of the victim's; and the same for a victim that is Running."""
    pipelines = Pipelines(objects, namespace, kubectl)
    waiting = {
        "volumes": [{"name": "cfg", "configMap": {"name": "not-yet"}}],
        "volumeMounts": [{"name": "cfg", "mountPath": "/cfg", "readOnly": True}],
    }
    pipelines.apply(manifest("stuck", template=waiting))
    wait_until(lambda: managed(kubectl, "pods", namespace), 60, "the stuck Pipeline's pod")
    (stuck_pod,) = managed(kubectl, "pods", namespace)
    stuck = pipelines.get("stuck")
    token = kubectl(
        "get",
        "secret",
        stuck_pod["metadata"]["name"],
        "-n",
        namespace,
        "-o",
        "jsonpath={.data.token}",
    ).stdout
    fake = impostor(kubectl, tenant_a, stuck, node_image, stuck_pod["metadata"]["name"])
    never_within(5, lambda: requests_to(kubectl, tenant_a, fake), "the impostor was sent requests")
    kubectl("delete", "pod", fake, "-n", tenant_a, "--wait=true")
    never_within(
        5,
        lambda: [
            p["metadata"]["uid"]
            for p in managed(kubectl, "pods", namespace)
            if p["metadata"]["uid"] != stuck_pod["metadata"]["uid"]
            or p["metadata"].get("deletionTimestamp")
        ],
        "the stuck Pipeline's pod was replaced or deleted",
    )
    assert "failure" not in pipelines.get("stuck")["status"]
    # The ConfigMap comes: the victim runs in its own pod, the one it was made with.
    kubectl("create", "configmap", "not-yet", "-n", namespace)
    body = pipelines.wait_ready("stuck", timeout=180)
    (pod,) = managed(kubectl, "pods", namespace)
    assert pod["metadata"]["uid"] == stuck_pod["metadata"]["uid"]

    # Running now: another impostor comes and goes; its pod, instance and status stay.
    fake = impostor(kubectl, tenant_a, body, node_image, pod["metadata"]["name"])
    never_within(3, lambda: requests_to(kubectl, tenant_a, fake), "the impostor was sent requests")
    kubectl("delete", "pod", fake, "-n", tenant_a, "--wait=true")
    never_within(
        6,
        lambda: (lambda b: b["status"].get("failure") or not is_ready(b))(pipelines.get("stuck")),
        "the Running victim was disturbed",
    )
    after = pipelines.get("stuck")
    assert after["status"]["pipelineId"] == body["status"]["pipelineId"]
    (same,) = managed(kubectl, "pods", namespace)
    assert same["metadata"]["uid"] == pod["metadata"]["uid"]
    assert "deletionTimestamp" not in same["metadata"]
    assert "Restarting" not in [reason for _, reason, _ in pipelines.events("stuck")]
    assert token not in pod_operator.log_text()


@pytest.mark.timeout(300)
def test_a_pod_with_the_pipelines_labels_that_it_does_not_own_is_never_used_nor_deleted(
    pod_operator: Operator,
    node_image: str,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """A pod in the Pipeline's namespace with its labels and the name an older operator gave
    the Pipeline's one pod (``<name>-<uid8>``), which the Pipeline does not own. Adoption
    finds the Pipeline's pods by those labels: neither the operator that makes the
    Pipeline's own pod beside it nor the next operator process sends it a request, adopts
    or deletes it. (Before pods were named per instance, it held the only name the
    Pipeline's pod could have: NameConflict until it went.)"""
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(manifest("tones", state="Stopped"))
    body = pipelines.wait_phase("tones", "Stopped", timeout=60)
    older = f"tones-{body['metadata']['uid'][:8]}"
    squatter = impostor(kubectl, namespace, body, node_image, older)
    squatter_uid = pod_body(kubectl, namespace, squatter)["metadata"]["uid"]
    pipelines.patch_spec("tones", {"state": "Running"})
    body = pipelines.wait_ready("tones", timeout=120)
    own = body["status"]["pod"]["name"]
    assert own.startswith(older + "-")
    pod_operator.kill()
    pod_operator.start()
    wait_until(lambda: f"adopted pod {own} " in pod_operator.log_text(), 30, "its pod adopted")
    assert f"adopted pod {squatter} " not in pod_operator.log_text()
    assert pipelines.wait_ready("tones", timeout=30)["status"]["pod"]["name"] == own
    pipelines.delete("tones")
    pipelines.wait_gone("tones", timeout=60)
    left = pod_body(kubectl, namespace, squatter)["metadata"]
    assert (left["uid"], left.get("deletionTimestamp")) == (squatter_uid, None)
    assert not requests_to(kubectl, namespace, squatter)


# A pod the kubelet cannot start: its ConfigMap volume names a ConfigMap that does not exist
# (FailedMount, retried by the kubelet for ever; the pod stays ContainerCreating).
UNMOUNTABLE = {
    "volumes": [{"name": "settings", "configMap": {"name": "no-such-configmap"}}],
    "volumeMounts": [{"name": "settings", "mountPath": "/settings"}],
}


@pytest.mark.timeout(600)
@pytest.mark.operator_env(
    JUTURNA_OPERATOR_RECONCILE_WORKERS="8", JUTURNA_OPERATOR_POD_START_TIMEOUT="240"
)
def test_pipelines_stuck_starting_in_one_namespace_do_not_stall_another(
    pod_operator: Operator,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    core: client.CoreV1Api,
    namespace: str,
) -> None:
    """Fairness: 8 reconcile workers, 10 Pipelines whose pods cannot start in one namespace.
    A Pipeline in another namespace is Ready within the time it takes with nothing stuck,
    plus 5 s: the stuck creates wait aside instead of holding the workers (before the fix,
    all 8 waited up to 300 s each)."""
    other = f"{namespace}-b"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        calm = Pipelines(objects, other, kubectl)
        began = time.monotonic()
        calm.apply(manifest("first"))
        calm.wait_ready("first", timeout=120)
        alone_s = time.monotonic() - began

        stuck = Pipelines(objects, namespace, kubectl)
        for i in range(10):
            stuck.apply(manifest(f"stuck-{i}", template=UNMOUNTABLE))
        wait_until(
            lambda: len(managed(kubectl, "pods", namespace)) == 10,
            120,
            "ten pods made, none able to start",
        )
        began = time.monotonic()
        calm.apply(manifest("second"))
        calm.wait_ready("second", timeout=alone_s + 5)
        took_s = time.monotonic() - began
        assert took_s <= alone_s + 5, (took_s, alone_s)
        assert all(
            stuck.get(f"stuck-{i}")["status"]["phase"] in ("Pending", "Creating") for i in range(10)
        )
    finally:
        core.delete_namespace(other)


@pytest.mark.timeout(300)
@pytest.mark.operator_env(JUTURNA_OPERATOR_POD_START_TIMEOUT="10")
def test_a_pod_that_cannot_start_fails_in_the_kubelets_words(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """Past JUTURNA_OPERATOR_POD_START_TIMEOUT with the kubelet warning about it, a placed pod
    that does not start is PodNotStarted, quoting the kubelet (before: 300 s of waiting, then
    "was not ready within 300 s", naming no cause); nothing is left behind."""
    pipelines = Pipelines(objects, namespace, kubectl)
    policy = {"maxRestarts": 0, "backoffSeconds": 1}
    pipelines.apply(manifest("unmountable", template=UNMOUNTABLE, restartPolicy=policy))
    body = pipelines.wait_phase("unmountable", "Failed", timeout=120)
    assert_failure(
        body,
        "PodNotStarted",
        504,
        "create",
        "pod {pod} did not start within 10 s: FailedMount: "
        'MountVolume.SetUp failed for volume "settings" : configmap "no-such-configmap" '
        "not found",
    )
    wait_nothing_left(kubectl, namespace, "no pod and no Secret after the failed start", 60)


@pytest.mark.timeout(300)
@pytest.mark.operator_env(JUTURNA_OPERATOR_PLUGIN_PATH=str(REPO / "examples" / "plugins"))
def test_plugins_are_those_of_the_pods_image_not_the_operators(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    """Item 15: the operator's own plugin roots hold only the example's, the pods' image holds
    the faulty plugins too. A Pipeline using them runs (before: a false PluginNotFound from
    the operator's roots); one naming a plugin folder the image lacks fails before warmup
    with the message graph validation gives, naming the image's roots, and leaves nothing."""
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(through_faulty("counted", ("counted", {}), {}, 0))
    pipelines.wait_ready("counted", timeout=120)
    missing = manifest("missing", plugins=["tones", "nowhere"])
    pipelines.apply(missing)
    body = pipelines.wait_phase("missing", "Failed", timeout=120)
    assert body["status"]["failure"] == {
        "reason": "PluginNotFound",
        "code": 422,
        "step": "validate",
        "message": 'plugin folder "nowhere" not found under any plugin root (/plugins)',
    }
    wait_until(
        lambda: (
            [p["metadata"]["name"] for p in managed(kubectl, "pods", namespace)]
            == [pipelines.get("counted")["status"]["pod"]["name"]]
        ),
        60,
        "only the running Pipeline's pod left",
    )


# -- a warm swap's two instances, the engine driven directly (no operator runs) --

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for a test's engines: their clients and waits belong to it."""
    made = asyncio.new_event_loop()
    yield made
    made.close()


class Swap:
    """A listening Pipeline (examples/json-events.yaml) that no operator reconciles, and the
    pod engine driven directly on the real node: what the reconciler will do for a warm
    swap, step by step, each step checked against the cluster."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        api_client: client.ApiClient,
        kubectl: Kubectl,
        objects: client.CustomObjectsApi,
        namespace: str,
        image: str,
    ) -> None:
        self.loop, self.api_client, self.kubectl = loop, api_client, kubectl
        self.core, self.namespace = client.CoreV1Api(api_client), namespace
        self.settings = Settings(
            engine="pod",
            runtime_image=image,
            runtime_pull_policy="Never",
            worker_peers=[{"ipBlock": {"cidr": f"{NODE_IP}/32"}}],
            stop_timeout_s=5,
        )
        pipelines = Pipelines(objects, namespace, kubectl)
        pipelines.apply(listening("json-in", state="Stopped"))  # it owns the pods
        body = pipelines.get("json-in")
        self.key = PipelineKey(namespace, "json-in", body["metadata"]["uid"])
        spec = PipelineSpec.model_validate(body["spec"])
        self.config = spec.to_juturna_config(self.key.juturna_name)
        self.listeners = tuple(listeners(spec))
        wait_default_account(kubectl, namespace)
        self.engine = self.new_engine()

    def new_engine(self) -> PodEngine:
        """Another engine: what a new operator process starts with."""
        return PodEngine(self.settings, self.api_client)

    def run[T](self, step: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(step)

    def create(self, key: PipelineKey, revision: str, until: InstanceState) -> str:
        plan = Plan(listeners=self.listeners, until=until)
        return self.run(self.engine.create(key, self.config, revision, plan))

    def status(self, key: PipelineKey, engine: PodEngine | None = None) -> InstanceInfo:
        info = self.run((engine or self.engine).status(key))
        assert info is not None, f"{key}: no instance"
        assert info.failure is None, info.failure
        assert not info.crashes, info.crashes
        return info

    def service(self) -> client.V1Service:
        return self.core.read_namespaced_service("json-in", self.namespace)

    def selected(self) -> str:
        return str(self.service().spec.selector["juturna.io/instance"])

    def pods(self) -> dict[str, dict[str, Any]]:
        """The Pipeline's pods not on their way out, by name."""
        found = managed(self.kubectl, "pods", self.namespace)
        return {
            p["metadata"]["name"]: p for p in found if not p["metadata"].get("deletionTimestamp")
        }

    def secrets(self) -> list[str]:
        return sorted(
            s["metadata"]["name"] for s in managed(self.kubectl, "secrets", self.namespace)
        )

    def slot_of(self, pod: str) -> str:
        return str(self.pods()[pod]["metadata"]["labels"]["juturna.io/slot"])

    def instance_of(self, pod: str) -> str:
        return str(self.pods()[pod]["metadata"]["labels"]["juturna.io/instance"])

    def lines(self, pod: str, pipeline_id: str) -> int:
        return pod_output_lines(self.kubectl, pod, self.namespace, pipeline_id)

    def posted_reaches(self, pod: str, pipeline_id: str) -> None:
        """JSON posted to the Pipeline's address (its ClusterIP, from the node) lands in
        ``pod``'s sink: kube-proxy follows a selector within about a second."""
        (address,) = self.status(self.key).addresses or ()
        url = f"http://{address.cluster_ip}:{address.port}/events"
        before = self.lines(pod, pipeline_id)

        def landed() -> bool:
            request = urllib.request.Request(
                url, data=b'{"seq": 1}', headers={"Content-Type": "application/json"}
            )
            with contextlib.suppress(OSError), NO_PROXY.open(request, timeout=5):
                pass
            return self.lines(pod, pipeline_id) > before

        wait_until(landed, 30, f"a POST to {url} reaching pod {pod}")


@pytest.fixture
def swap(
    plugins_image: str,
    crd: None,
    kubeconfig: Any,
    loop: asyncio.AbstractEventLoop,
    api_client: client.ApiClient,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
) -> Iterator[Swap]:
    assert_sole_operator(kubeconfig)  # nothing else may act on the Pipeline
    made = Swap(loop, api_client, kubectl, objects, namespace, plugins_image)
    yield made
    made.run(made.engine.close())


@pytest.mark.timeout(300)
def test_a_candidate_warms_up_beside_the_serving_pod_then_takes_its_address(
    swap: Swap, kubectl: Kubectl, namespace: str
) -> None:
    """Issue 26's engine part: the candidate gets a pod and a Secret of its own and warms up
    while the active pod keeps the address; promote moves the Service to it, and the old
    pod, still running, answers for the candidate slot; a new operator process adopts each
    pod in its slot; deleting the candidate then removes the old pod and its Secret only."""
    key = swap.key
    old_id = swap.create(key, "r1", InstanceState.Running)
    (old,) = swap.pods()
    assert swap.selected() == swap.instance_of(old)
    new_id = swap.create(key.candidate, "r2", InstanceState.Ready)
    pods = swap.pods()
    (new,) = pods.keys() - {old}
    assert (swap.slot_of(old), swap.slot_of(new)) == ("active", "candidate")
    assert swap.secrets() == sorted([old, new])  # each pod's token in its own Secret
    (policy,) = managed(kubectl, "networkpolicies", namespace)
    assert policy["spec"]["podSelector"] == {"matchLabels": {"juturna.io/pipeline-uid": key.uid}}
    active, candidate = swap.status(key), swap.status(key.candidate)
    assert (active.pod, active.state, active.revision) == (
        (old, NODE_IP),
        InstanceState.Running,
        "r1",
    )
    assert (candidate.pod, candidate.state, candidate.revision) == (
        (new, NODE_IP),
        InstanceState.Ready,
        "r2",
    )
    assert candidate.addresses == ()  # none until it is promoted
    swap.posted_reaches(old, old_id)  # the active one still serves the address

    swap.run(swap.engine.start(key.candidate))
    assert swap.selected() == swap.instance_of(old)  # started, not yet switched
    swap.run(swap.engine.promote(key))
    assert swap.selected() == swap.instance_of(new)
    assert (swap.slot_of(new), swap.slot_of(old)) == ("active", "retired")
    active, retired = swap.status(key), swap.status(key.candidate)
    assert (active.pod, active.pipeline_id, active.revision) == ((new, NODE_IP), new_id, "r2")
    assert (retired.pod, retired.pipeline_id, retired.state) == (
        (old, NODE_IP),
        old_id,
        InstanceState.Running,
    )
    swap.posted_reaches(new, new_id)
    swap.run(swap.engine.promote(key))  # again: nothing changes
    assert swap.selected() == swap.instance_of(new)

    # A new operator process, before the old pod is deleted: each pod in its slot.
    swap.run(swap.engine.close())
    swap.engine = swap.new_engine()
    active, retired = swap.status(key), swap.status(key.candidate)
    assert (active.pod[0], active.pipeline_id, active.state) == (new, new_id, InstanceState.Running)
    assert (retired.pod[0], retired.pipeline_id) == (old, old_id)
    swap.run(swap.engine.promote(key))  # a retired instance is never promoted again
    assert swap.selected() == swap.instance_of(new)

    # The drain is over: the old instance goes, and nothing else.
    swap.run(swap.engine.stop(key.candidate))
    swap.run(swap.engine.delete(key.candidate))
    assert list(swap.pods()) == [new]
    assert swap.secrets() == [new]
    assert swap.selected() == swap.instance_of(new)
    assert len(managed(kubectl, "networkpolicies", namespace)) == 1
    assert swap.status(key).state is InstanceState.Running
    assert swap.run(swap.engine.status(key.candidate)) is None
    swap.posted_reaches(new, new_id)

    # A Pipeline with no candidate: asking for one costs no API call after the first look.
    swap.run(swap.engine.close())
    swap.engine = engine = swap.new_engine()
    swap.status(key)  # adopts: one look at both slots
    calls: list[str] = []
    real_call = engine._call

    async def counted(method: Any, *args: Any, **kw: Any) -> Any:
        calls.append(method.__name__)
        return await real_call(method, *args, **kw)

    engine._call = counted  # type: ignore[method-assign]
    assert swap.run(engine.status(key.candidate)) is None
    assert calls == []
    swap.run(engine.delete(key))
    wait_nothing_left(kubectl, namespace, "nothing of the Pipeline's after its deletion", 60)
    assert managed(kubectl, "services", namespace) == []


@pytest.mark.timeout(300)
def test_a_candidate_never_touches_the_address_and_an_abort_leaves_the_active_serving(
    swap: Swap, kubectl: Kubectl, namespace: str
) -> None:
    """A candidate's create (to Ready or Running), start, stop and delete leave the Service
    as it was (its resourceVersion), and the active pod, its Secret and its pipeline. Then an
    operator killed inside a promote, after it marked the candidate active but before the
    Service moved: the next process keeps the Service's pod active, the other a candidate
    (marked so again), and its promote completes."""
    key = swap.key
    active_id = swap.create(key, "r1", InstanceState.Running)
    (active,) = swap.pods()
    service = swap.service().metadata.resource_version
    for until in (InstanceState.Ready, InstanceState.Running):
        swap.create(key.candidate, "r2", until)
        (candidate,) = swap.pods().keys() - {active}
        if until is InstanceState.Ready:
            swap.run(swap.engine.start(key.candidate))
        swap.run(swap.engine.stop(key.candidate))
        swap.run(swap.engine.delete(key.candidate))  # an abort: release, no output kept
        assert list(swap.pods()) == [active]
        assert swap.secrets() == [active]
        assert swap.service().metadata.resource_version == service
        assert len(managed(kubectl, "networkpolicies", namespace)) == 1
        info = swap.status(key)
        assert (info.pod[0], info.pipeline_id, info.state) == (
            active,
            active_id,
            InstanceState.Running,
        )
    swap.posted_reaches(active, active_id)

    # Killed inside a promote: the candidate marked active, the Service not yet moved.
    candidate_id = swap.create(key.candidate, "r3", InstanceState.Ready)
    (candidate,) = swap.pods().keys() - {active}
    swap.run(swap.engine.start(key.candidate))
    kubectl("label", "pod", candidate, "-n", namespace, "juturna.io/slot=active", "--overwrite")
    since = f"juturna.io/active-since={time.time_ns()}"
    kubectl("annotate", "pod", candidate, "-n", namespace, since, "--overwrite")
    swap.run(swap.engine.close())
    swap.engine = swap.new_engine()
    assert swap.status(key).pod[0] == active
    assert swap.status(key.candidate).pod[0] == candidate
    assert swap.slot_of(candidate) == "candidate"
    assert swap.selected() == swap.instance_of(active)
    swap.run(swap.engine.promote(key))
    assert swap.selected() == swap.instance_of(candidate)
    assert (swap.slot_of(candidate), swap.slot_of(active)) == ("active", "retired")
    swap.posted_reaches(candidate, candidate_id)
