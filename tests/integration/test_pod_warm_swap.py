"""Warm swaps on the real node: a change to a running Pipeline warms the new revision up in a
pod of its own while the old pod serves, then switches (issue 26).

The pipeline: a ticker, a proc whose warmup takes ``WARMUP_S`` (a model load), a proc that
stamps each message with a label (the revision's mark), and a sink that posts every message to
a receiver pod outside the pipeline pods. What the receiver got, with the time each message
came, is read after the pods are gone: a draining old pod cannot hide a silent new one.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest
from kubernetes import client

from support import (
    TONE_HZ,
    Kubectl,
    Operator,
    Pipelines,
    condition,
    endpoint,
    faulty,
    frequencies,
    live_audio,
    managed,
    received,
    receiver,
    send_tone,
    wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.own_operator]

WARMUP_S = 6.0
# What a change touches, and the suffix of the benchmark's property for it.
CHANGES = {"configuration": "", "template": "_template"}
RATE = 10  # messages per second


def stamped(name: str, receiver_url: str, label: str, **spec: Any) -> dict[str, Any]:
    """ticker → slow (its warmup) → scale (stamps ``label``) → notifier_http (the receiver)."""
    return faulty(
        name,
        ("src", "source", "ticker", {"rate": RATE}),
        ("slow", "proc", "slow", {"seconds": WARMUP_S}),
        ("stamp", "proc", "scale", {"label": label}),
        ("out", "sink", "notifier_http", {"endpoint": receiver_url}),
        **spec,
    )


def labels(kubectl: Kubectl, namespace: str) -> list[tuple[float, str]]:
    """(arrival time, label) of every message the receiver got, in arrival order."""
    out = []
    for row in received(kubectl, namespace):
        payload = (row["body"] or {}).get("payload") or {}
        if "label" in payload:
            out.append((float(row["at"]), str(payload["label"])))
    return out


def longest_gap(rows: list[tuple[float, str]], since: float) -> float:
    """The longest silence in what arrived after ``since`` (and since the last before it)."""
    times = [at for at, _ in rows]
    before = [t for t in times if t <= since]
    after = [t for t in times if t > since]
    chain = before[-1:] + after
    return max((b - a for a, b in itertools.pairwise(chain)), default=float("inf"))


def pods_of(kubectl: Kubectl, namespace: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in managed(kubectl, "pods", namespace))


@pytest.fixture
def receiver_url(pod_operator: Operator, node_image: str, kubectl: Kubectl, namespace: str) -> str:
    return receiver(kubectl, namespace, node_image)


def change_label(pipelines: Pipelines, name: str, label: str, template: bool = False) -> float:
    """A configuration change (a new revision); with ``template``, a change of the pod's
    template too (a pod label), which Recreate cannot land in the same pod. Returns when it
    was made."""
    spec = pipelines.get(name)["spec"]
    for node in spec["nodes"]:
        if node["name"] == "stamp":
            node["configuration"]["label"] = label
    change: dict[str, Any] = {"nodes": spec["nodes"]}
    if template:
        change["template"] = {**(spec.get("template") or {}), "labels": {"mark": label.lower()}}
    made = time.time()
    pipelines.patch_spec(name, change)
    return made


def running(
    pipelines: Pipelines, kubectl: Kubectl, namespace: str, manifest: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """``manifest`` applied and Ready in its one pod: (its body, its pod's name)."""
    pipelines.apply(manifest)
    body = pipelines.wait_ready(manifest["metadata"]["name"], timeout=180)
    (pod,) = pods_of(kubectl, namespace)
    return body, pod


def until_two_pods(kubectl: Kubectl, namespace: str) -> None:
    wait_until(lambda: len(pods_of(kubectl, namespace)) == 2, 60, "the new pod beside the old")


def until_only_one_pod(kubectl: Kubectl, namespace: str, not_this: str | None = None) -> str:
    """Until one pod is left (the old ones gone, not only going), other than ``not_this``."""
    wait_until(
        lambda: len(pods := pods_of(kubectl, namespace)) == 1 and pods[0] != not_this,
        60,
        "one pod left" + (f", not {not_this}" if not_this else ""),
    )
    (pod,) = pods_of(kubectl, namespace)
    return pod


def wait_updated(pipelines: Pipelines, name: str, timeout: float) -> dict[str, Any]:
    """Until the Pipeline describes its latest generation, Ready, with no update under way."""

    def done(body: dict[str, Any]) -> bool:
        status = body.get("status") or {}
        return (
            status.get("observedGeneration") == body["metadata"]["generation"]
            and condition(body, "Ready").get("status") == "True"
            and not status.get("update")
        )

    return pipelines.wait(name, done, timeout, "updated, Ready, no update under way")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("what", CHANGES)
def test_a_change_warms_the_new_pod_beside_the_old_then_switches(
    what: str,
    receiver_url: str,
    pod_operator: Operator,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
    record_property: Any,
) -> None:
    pipelines = Pipelines(objects, namespace, kubectl)
    body, old_pod = running(pipelines, kubectl, namespace, stamped("swap", receiver_url, "A"))
    old_revision = body["status"]["lastStableRevision"]
    wait_until(lambda: len(labels(kubectl, namespace)) >= RATE, 30, "messages from A")

    changed = change_label(pipelines, "swap", "B", template=what == "template")
    # While the new pod warms up, the old one serves and the status says what goes on.
    during = pipelines.wait(
        "swap",
        lambda b: (
            (b.get("status") or {}).get("update") is not None
            and (b["status"]["update"].get("pod") or {}).get("name") not in (None, old_pod)
        ),
        WARMUP_S + 60,
        "status.update naming the new pod",
    )
    assert during["status"]["phase"] == "Running"
    assert condition(during, "Running")["status"] == "True"
    if during["status"]["update"]["step"] == "WarmingUpNew":
        assert during["status"]["pod"]["name"] == old_pod, "the old pod serves meanwhile"
    body = wait_updated(pipelines, "swap", WARMUP_S + 90)
    new_revision = body["status"]["lastStableRevision"]
    assert new_revision != old_revision
    new_pod = until_only_one_pod(kubectl, namespace, not_this=old_pod)
    assert body["status"]["pod"]["name"] == new_pod
    assert condition(body, "Updating")["status"] == "False"
    wait_until(
        lambda: any(label == "B" for _, label in labels(kubectl, namespace)),
        30,
        "messages from B",
    )
    time.sleep(2)
    rows = labels(kubectl, namespace)
    gap = longest_gap(rows, changed)
    record_property(f"warm_swap{CHANGES[what]}_longest_gap_s", round(gap, 3))
    # The old pod served through the new one's warmup: no silence as long as a warmup.
    assert gap < WARMUP_S, f"the output stopped for {gap:.2f} s"
    a_after_change = [at for at, label in rows if label == "A" and at > changed + WARMUP_S / 2]
    assert a_after_change, "the old revision served while the new one warmed up"
    reasons = [r for _, r, _ in pipelines.events("swap")]
    for step in ("WarmingUpNew", "Draining", "Updated"):
        assert step in reasons, reasons


@pytest.mark.timeout(300)
@pytest.mark.parametrize("what", CHANGES)
def test_recreate_stops_the_stream_for_a_whole_warmup(
    what: str,
    receiver_url: str,
    pod_operator: Operator,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
    record_property: Any,
) -> None:
    """The same change with ``strategy: Recreate``: the measure above can fail."""
    pipelines = Pipelines(objects, namespace, kubectl)
    recreate = stamped("again", receiver_url, "A", update={"strategy": "Recreate"})
    running(pipelines, kubectl, namespace, recreate)
    wait_until(lambda: len(labels(kubectl, namespace)) >= RATE, 30, "messages from A")
    changed = change_label(pipelines, "again", "B", template=what == "template")
    wait_updated(pipelines, "again", WARMUP_S + 90)
    wait_until(
        lambda: any(label == "B" for _, label in labels(kubectl, namespace)),
        30,
        "messages from B",
    )
    gap = longest_gap(labels(kubectl, namespace), changed)
    record_property(f"recreate{CHANGES[what]}_longest_gap_s", round(gap, 3))
    assert gap >= WARMUP_S, f"the output stopped for only {gap:.2f} s"


@pytest.mark.timeout(300)
def test_a_new_revision_that_fails_is_removed_and_the_old_one_serves_on(
    receiver_url: str,
    pod_operator: Operator,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """A change to a node whose plugin the pod's image does not have (a 4xx, checked in the
    new pod): the update fails, the old pod serves on, and the status says so."""
    pipelines = Pipelines(objects, namespace, kubectl)
    body, old_pod = running(pipelines, kubectl, namespace, stamped("keep", receiver_url, "A"))
    old_revision = body["status"]["lastStableRevision"]
    spec = body["spec"]
    spec["nodes"][2]["mark"] = "no_such_plugin"
    changed = time.time()
    pipelines.patch_spec("keep", {"nodes": spec["nodes"]})
    body = pipelines.wait(
        "keep",
        lambda b: condition(b, "Updating").get("reason") == "UpdateFailed",
        WARMUP_S + 90,
        "the update failed",
    )
    status = body["status"]
    assert status["phase"] == "Running"
    assert condition(body, "Running")["status"] == "True"
    assert (condition(body, "Ready")["status"], condition(body, "Ready")["reason"]) == (
        "False",
        "UpdateFailed",
    )
    assert status["failure"]["reason"] == "PluginNotFound"
    assert "no_such_plugin" in status["failure"]["message"]
    assert status["lastStableRevision"] == old_revision
    assert status["restarts"] == 0
    assert until_only_one_pod(kubectl, namespace) == old_pod
    assert status["pod"]["name"] == old_pod
    time.sleep(2)
    assert [at for at, label in labels(kubectl, namespace) if label == "A" and at > changed + 2]
    assert ("Warning", "UpdateFailed") in [(k, r) for k, r, _ in pipelines.events("keep")]

    # The old pod dies after the abort: what ran comes back in a new pod, not what failed.
    kubectl("delete", "pod", old_pod, "-n", namespace, "--wait=false")
    restored_pod = until_only_one_pod(kubectl, namespace, not_this=old_pod)
    body = pipelines.wait(
        "keep",
        lambda b: (
            (b["status"].get("pod") or {}).get("name") == restored_pod
            and b["status"]["phase"] == "Running"
        ),
        WARMUP_S + 90,
        "the revision that ran, Running again in a new pod",
    )
    assert body["status"]["lastStableRevision"] == old_revision
    assert condition(body, "Ready")["reason"] == "UpdateFailed"
    died = time.time()
    wait_until(
        lambda: any(label == "A" and at > died for at, label in labels(kubectl, namespace)),
        30,
        "messages of the revision that ran, again",
    )
    assert "RestoredStable" in [r for _, r, _ in pipelines.events("keep")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fallback", ["Recreate", "None"])
def test_no_room_for_two_pods_falls_back_or_aborts(
    fallback: str,
    receiver_url: str,
    pod_operator: Operator,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """Each revision asks for more than half the node's CPU: the new pod cannot be scheduled
    beside the old one. Until the deadline the old one serves; then ``fallback`` decides."""
    allocatable = node_cpu_millis(kubectl)
    template = {"resources": {"requests": {"cpu": f"{allocatable // 2 + 100}m"}}}
    update = {"timeoutSeconds": 15, "fallback": fallback}
    pipelines = Pipelines(objects, namespace, kubectl)
    big = stamped("big", receiver_url, "A", template=template, update=update)
    body, old_pod = running(pipelines, kubectl, namespace, big)
    old_revision = body["status"]["lastStableRevision"]
    change_label(pipelines, "big", "B")
    waiting = pipelines.wait(
        "big",
        lambda b: "Unschedulable" in condition(b, "Updating").get("message", ""),
        60,
        "the Updating condition naming the scheduler's refusal",
    )
    assert waiting["status"]["phase"] == "Running"
    assert waiting["status"].get("failure") is None
    if fallback == "Recreate":
        body = wait_updated(pipelines, "big", WARMUP_S + 120)
        assert body["status"]["lastStableRevision"] != old_revision
        # The Recreate way: a configuration change redeploys in the pod that served.
        assert until_only_one_pod(kubectl, namespace) == old_pod
        assert body["status"]["phase"] == "Running"
        assert ("Warning", "UpdateFallback") in [(k, r) for k, r, _ in pipelines.events("big")]
    else:
        body = pipelines.wait(
            "big",
            lambda b: condition(b, "Updating").get("reason") == "UpdateFailed",
            60,
            "the update abandoned",
        )
        assert body["status"]["failure"]["reason"] == "Unschedulable"
        assert body["status"]["phase"] == "Running"
        assert until_only_one_pod(kubectl, namespace) == old_pod


def node_cpu_millis(kubectl: Kubectl) -> int:
    (node,) = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
    cpu = str(node["status"]["allocatable"]["cpu"])
    return int(cpu[:-1]) if cpu.endswith("m") else int(float(cpu) * 1000)


@pytest.mark.timeout(400)
def test_an_operator_restarted_during_a_swap_completes_it(
    receiver_url: str,
    pod_operator: Operator,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """SIGKILL while the new pod warms up: the next process adopts both pods, in their slots,
    and completes the swap; then once more while the old one drains."""
    pipelines = Pipelines(objects, namespace, kubectl)
    slow_drain = stamped("restart", receiver_url, "A", update={"drainSeconds": 20})
    _, old_pod = running(pipelines, kubectl, namespace, slow_drain)
    change_label(pipelines, "restart", "B")
    until_two_pods(kubectl, namespace)
    pod_operator.kill()
    pod_operator.start()
    pipelines.wait(
        "restart",
        lambda b: ((b.get("status") or {}).get("update") or {}).get("step") == "Draining",
        WARMUP_S + 90,
        "draining",
    )
    pod_operator.kill()
    pod_operator.start()
    body = wait_updated(pipelines, "restart", 120)
    pod = until_only_one_pod(kubectl, namespace, not_this=old_pod)
    assert body["status"]["pod"]["name"] == pod
    wait_until(lambda: labels(kubectl, namespace)[-1][1] == "B", 30, "the last messages from B")


@pytest.mark.timeout(300)
def test_a_deletion_during_a_swap_removes_both_pods(
    receiver_url: str,
    pod_operator: Operator,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
) -> None:
    pipelines = Pipelines(objects, namespace, kubectl)
    running(pipelines, kubectl, namespace, stamped("gone", receiver_url, "A"))
    change_label(pipelines, "gone", "B")
    until_two_pods(kubectl, namespace)
    kubectl("delete", "pipeline", "gone", "-n", namespace, "--wait=false")
    pipelines.wait_gone("gone", 120)
    wait_until(lambda: pods_of(kubectl, namespace) == [], 60, "no pod left")
    assert managed(kubectl, "secrets", namespace) == []


@pytest.mark.timeout(300)
def test_a_second_change_during_a_swap_wins(
    receiver_url: str,
    pod_operator: Operator,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
) -> None:
    pipelines = Pipelines(objects, namespace, kubectl)
    _, old_pod = running(pipelines, kubectl, namespace, stamped("twice", receiver_url, "A"))
    change_label(pipelines, "twice", "B")
    until_two_pods(kubectl, namespace)
    change_label(pipelines, "twice", "C")
    wait_updated(pipelines, "twice", 2 * WARMUP_S + 120)
    until_only_one_pod(kubectl, namespace, not_this=old_pod)
    wait_until(lambda: labels(kubectl, namespace)[-1][1] == "C", 30, "the last messages from C")


@pytest.mark.timeout(420)
def test_a_live_rtp_stream_through_the_address_survives_a_warm_swap(
    receiver_url: str,
    pod_operator: Operator,
    node_image: str,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
    record_property: Any,
) -> None:
    """ffmpeg sends a tone over RTP to the Pipeline's Service by its DNS name, and never
    changes anything; a configuration change swaps the pod behind the address (kube-proxy
    moves the UDP flow to the new endpoint). The results go on: the new pod's come."""
    pipelines = Pipelines(objects, namespace, kubectl)
    manifest = live_audio(receiver_url)
    for node in manifest["spec"]["nodes"]:
        if node["name"] == "mic":
            node["configuration"]["block_size"] = 0.25  # four results a second
    body, old_pod = running(pipelines, kubectl, namespace, manifest)
    rtp = endpoint(body, "rtp")
    host = f"live-audio.{namespace}.svc"
    send_tone(kubectl, namespace, node_image, host, rtp["port"], seconds=300)
    wait_until(lambda: len(frequencies(kubectl, namespace)) >= 8, 60, "results before")
    spec = pipelines.get("live-audio")["spec"]
    for node in spec["nodes"]:
        if node["name"] == "pitch":
            node["configuration"]["min_level"] = 0.002
    changed = time.time()
    pipelines.patch_spec("live-audio", {"nodes": spec["nodes"]})
    wait_updated(pipelines, "live-audio", 180)
    until_only_one_pod(kubectl, namespace, not_this=old_pod)
    gone_at = time.time()
    wait_until(
        lambda: len([r for r in frequencies(kubectl, namespace) if r[0] > gone_at]) >= 8,
        60,
        "results from the new pod, the old one gone",
    )
    results = frequencies(kubectl, namespace)
    assert all(abs(f - TONE_HZ) <= TONE_HZ * 0.05 for _, f, _ in results), results
    rows = [(at, "") for at, _, _ in results]
    gap = longest_gap(rows, changed)
    record_property("rtp_swap_longest_gap_s", round(gap, 3))
    # Results lost: the sender's tone gives one result per block (four a second) wherever
    # the stream lands; fewer than that from the change to the last result is what was lost.
    times = [at for at, _ in rows if at > changed]
    expected = round((times[-1] - changed) * 4)
    record_property("rtp_swap_results_lost", max(0, expected - len(times)))
    # A swap that dropped the stream would stop the results for good (the UDP flow stuck on
    # the old pod's conntrack entry) or for a whole new pod's start.
    assert gap < 10, f"the results stopped for {gap:.2f} s"


@pytest.mark.timeout(300)
def test_the_old_pod_killed_during_a_swap_leaves_the_new_one_serving(
    receiver_url: str,
    pod_operator: Operator,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """While the new pod warms up, the old one is deleted from outside: the new revision
    takes over once warm, and one pod is left, serving."""
    pipelines = Pipelines(objects, namespace, kubectl)
    _, old_pod = running(pipelines, kubectl, namespace, stamped("lost", receiver_url, "A"))
    change_label(pipelines, "lost", "B")
    until_two_pods(kubectl, namespace)
    kubectl("delete", "pod", old_pod, "-n", namespace, "--wait=false")
    body = wait_updated(pipelines, "lost", WARMUP_S + 120)
    pod = until_only_one_pod(kubectl, namespace, not_this=old_pod)
    assert body["status"]["pod"]["name"] == pod
    assert body["status"]["phase"] == "Running"
    wait_until(lambda: labels(kubectl, namespace)[-1][1] == "B", 30, "the last messages from B")
