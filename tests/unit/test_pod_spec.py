"""The pod engine's pure parts: the Pod it builds, and how it reads a pod's troubles."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import threading
import time
from typing import Any

import pytest
from kubernetes import client as k8s

from juturna_operator.domain import InstanceState, PipelineKey, Slot
from juturna_operator.engines.base import Plan
from juturna_operator.engines.client import JuturnaClient
from juturna_operator.engines.pod import (
    PodEngine,
    _api_failure,
    _Runtime,
    ended_by_kubelet,
    health_mark,
    listeners_in,
    network_policy,
    new_instance,
    owned_by,
    owner_of,
    pipeline_object_name,
    place,
    pod_name,
    pod_problem,
    pod_refused,
    removed_from_outside,
    runtime_pod,
    service_body,
    service_name,
    template_hash,
    token_of,
    token_secret,
    worker_running,
)
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import Settings
from support import CannedAnswer

KEY = PipelineKey("team-a", "tones", "40ffacf7-0000-4000-8000-000000000000")
SETTINGS = Settings(engine="pod", runtime_image="localhost/jo:1", stop_timeout_s=10)


def test_the_pod_is_owned_restricted_and_has_no_api_token() -> None:
    pod = runtime_pod(KEY, "rev1", SETTINGS, instance="a1b2c3d4", active_since=17)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == pod_name(KEY, "a1b2c3d4") == "tones-40ffacf7-a1b2c3d4"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "juturna.io/v1alpha1",
            "kind": "Pipeline",
            "name": "tones",
            "uid": KEY.uid,
            "controller": True,
        }
    ]
    assert meta["labels"] == {
        "app.kubernetes.io/managed-by": "juturna-operator",
        "juturna.io/pipeline-uid": KEY.uid,
        "juturna.io/pipeline": "tones",
        "juturna.io/instance": "a1b2c3d4",  # what the Service selects
        "juturna.io/slot": "active",  # where an adopting operator puts it
    }
    assert meta["annotations"]["juturna.io/active-since"] == "17"
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    # The image's own numeric user: no fixed one, which OpenShift's restricted SCC refuses.
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "imagePullSecrets" not in spec
    (container,) = spec["containers"]
    assert container["image"] == "localhost/jo:1"
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert "env" not in container  # none of the operator's environment reaches the pod
    # No fsGroup: the token's files stay root's, so the pod's user reads them as anyone.
    assert {
        "name": "token",
        "secret": {"secretName": "tones-40ffacf7-a1b2c3d4", "defaultMode": 0o444},
    } in spec["volumes"]


def test_the_pods_user_is_the_administrators_where_one_is_set() -> None:
    user = Settings(engine="pod", runtime_image="localhost/jo:1", pod_user=(10001, 10001))
    spec = runtime_pod(KEY, "r", user)["spec"]
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    token = next(v for v in spec["volumes"] if v["name"] == "token")
    assert token["secret"]["defaultMode"] == 0o440  # the pod's group (fsGroup) reads it
    alone = Settings(engine="pod", runtime_image="localhost/jo:1", pod_user=(1000680000, None))
    assert runtime_pod(KEY, "r", alone)["spec"]["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000680000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # Another user makes another pod (a redeploy does not reuse the old one).
    assert template_hash(None, user) != template_hash(None, alone) != template_hash(None, SETTINGS)


def test_image_pull_secrets_are_the_administrators_then_the_templates() -> None:
    shared = Settings(
        engine="pod", runtime_image="localhost/jo:1", pod_image_pull_secrets=("corp", "mirror")
    )
    assert runtime_pod(KEY, "r", shared)["spec"]["imagePullSecrets"] == [
        {"name": "corp"},
        {"name": "mirror"},
    ]
    template = {"imagePullSecrets": [{"name": "team"}, {"name": "corp"}]}
    assert runtime_pod(KEY, "r", shared, template)["spec"]["imagePullSecrets"] == [
        {"name": "corp"},
        {"name": "mirror"},
        {"name": "team"},  # once each
    ]
    assert runtime_pod(KEY, "r", SETTINGS, template)["spec"]["imagePullSecrets"] == [
        {"name": "team"},
        {"name": "corp"},
    ]
    assert template_hash(None, shared) != template_hash(None, SETTINGS)


def test_a_long_name_goes_by_its_uid_label_alone() -> None:
    key = PipelineKey("team-a", "x" * 100, KEY.uid)
    labels = runtime_pod(key, "r", SETTINGS)["metadata"]["labels"]
    assert "juturna.io/pipeline" not in labels
    assert labels["juturna.io/pipeline-uid"] == KEY.uid
    del labels["juturna.io/instance"], labels["juturna.io/slot"]  # the pod's own
    assert token_secret(key, "t", "x", "u")["metadata"]["labels"] == labels


def ended(code: int) -> dict[str, Any]:
    return {"name": "juturna", "state": {"terminated": {"exitCode": code, "reason": "Completed"}}}


def pod(status: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": "tones-40ffacf7", **meta}, "status": status}


@pytest.mark.parametrize(
    ("status", "reason", "message"),
    [
        (
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/1 nodes are available: 1 Insufficient example.com/gpu.",
                    }
                ],
            },
            FailureReason.Unschedulable,
            "pod tones-40ffacf7: 0/1 nodes are available: 1 Insufficient example.com/gpu.",
        ),
        (
            {
                "containerStatuses": [
                    {
                        "image": "localhost/jo:2",
                        "state": {
                            "waiting": {
                                "reason": "ErrImageNeverPull",
                                "message": 'Container image "localhost/jo:2" is not present',
                            }
                        },
                    }
                ]
            },
            FailureReason.ImagePullFailed,
            'ErrImageNeverPull: Container image "localhost/jo:2" is not present',
        ),
        (
            {
                "phase": "Failed",
                "containerStatuses": [
                    {"state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
                ],
            },
            FailureReason.NodeFailed,
            "container juturna OOMKilled (exit code 137): it used more memory than its limit",
        ),
        (
            {
                "containerStatuses": [
                    {
                        "state": {
                            "terminated": {
                                "reason": "Error",
                                "exitCode": 2,
                                "message": "worker: error: --token-file is empty",
                            }
                        }
                    }
                ]
            },
            FailureReason.NodeFailed,
            "container juturna Error (exit code 2): worker: error: --token-file is empty",
        ),
    ],
    ids=["unschedulable", "image-not-on-node", "oom-killed", "exit-code"],
)
def test_a_pods_trouble_is_named_in_the_clusters_own_words(
    status: dict[str, Any], reason: FailureReason, message: str
) -> None:
    problem = pod_problem(pod(status))
    assert problem is not None
    assert (problem.reason, problem.message) == (reason, message)


def test_a_healthy_pending_pod_has_no_problem() -> None:
    assert pod_problem(pod({"phase": "Pending", "conditions": []})) is None


def test_deleted_and_evicted_pods_are_the_clusters_doing() -> None:
    assert removed_from_outside(None) == ""
    assert removed_from_outside(pod({}, deletionTimestamp="2026-11-30T00:00:00Z")) == "deleted"
    evicted = pod({"phase": "Failed", "reason": "Evicted", "message": "low on memory"})
    assert removed_from_outside(evicted) == "evicted: low on memory"
    assert removed_from_outside(pod({"phase": "Running"})) == ""


def test_a_pod_deleted_by_an_eviction_or_a_preemption_says_so() -> None:
    """Kubernetes marks who is taking a pod away (the DisruptionTarget condition): a drain
    (the Eviction API) is not a person's delete, and the Pipeline's message tells them apart."""
    drained = {
        "phase": "Running",
        "conditions": [
            {"type": "Ready", "status": "True"},
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting",
            },
        ],
    }
    deleting = "2026-12-07T00:00:00Z"
    assert removed_from_outside(pod(drained, deletionTimestamp=deleting)) == (
        "EvictionByEvictionAPI: Eviction API: evicting"
    )
    preempted = {
        "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
        ]
    }
    assert removed_from_outside(pod(preempted, deletionTimestamp=deleting)) == (
        "PreemptionByScheduler"
    )
    # Not yet deleted (the condition comes first), or no longer targeted: nothing, or a delete.
    assert removed_from_outside(pod(drained)) == ""
    drained["conditions"][1]["status"] = "False"
    assert removed_from_outside(pod(drained, deletionTimestamp=deleting)) == "deleted"


def test_unschedulable_waits_without_spending_restarts() -> None:
    assert FailureReason.Unschedulable.retryable
    assert not FailureReason.Unschedulable.counts_as_restart
    assert FailureReason.ImagePullFailed.counts_as_restart


def refusal(status: int, message: str) -> k8s.ApiException:
    err = k8s.ApiException(status=status, reason="Forbidden")
    err.body = json.dumps({"kind": "Status", "code": status, "message": message})
    return err


def test_a_service_account_that_does_not_exist_yet_is_waited_for_not_invalid() -> None:
    """A new namespace's `default` account comes a moment after the namespace: a Pipeline
    created at once was refused by the ServiceAccount admission, and that 403 made it
    InvalidSpec, Failed for good."""
    missing = (
        'pods "a0-d0acb13b" is forbidden: error looking up service account '
        't-81219b2e45/default: serviceaccount "default" not found'
    )
    failure = _api_failure(refusal(403, missing), Step.create)
    assert failure.reason is FailureReason.RuntimeUnavailable
    assert failure.reason.retryable
    assert not failure.reason.counts_as_restart
    assert failure.message == (
        f"the API server refuses the pipeline's pod for now: {missing}; tried again until "
        "the account exists"
    )
    # Any other refusal of the Pod as built is the spec's to change.
    policy = 'pods "x" is forbidden: violates PodSecurity "restricted:latest": hostPath'
    assert _api_failure(refusal(403, policy), Step.create).reason is FailureReason.InvalidSpec


TEMPLATE: dict[str, Any] = {
    "resources": {"requests": {"memory": "256Mi"}, "limits": {"example.com/gpu": 1}},
    "nodeSelector": {"disk": "ssd"},
    "tolerations": [{"key": "gpu", "operator": "Exists"}],
    "affinity": {},
    "priorityClassName": None,
    "runtimeClassName": "nvidia",
    "serviceAccountName": None,
    "env": [{"name": "MODEL", "value": "/models/x"}],
    "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
    "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
    "labels": {"team": "a", "juturna.io/pipeline-uid": "spoofed"},
    "annotations": {"note": "x"},
    "image": None,
}


def test_the_template_adds_to_the_pod_and_never_replaces_what_the_operator_needs() -> None:
    pod = runtime_pod(KEY, "rev1", SETTINGS, TEMPLATE)
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["resources"] == {
        "requests": {"memory": "256Mi"},
        "limits": {"example.com/gpu": "1"},  # a quantity is a string in a Pod
    }
    assert container["env"] == TEMPLATE["env"]
    assert container["volumeMounts"][-1] == TEMPLATE["volumeMounts"][0]
    assert spec["volumes"][-1] == TEMPLATE["volumes"][0]
    assert [v["name"] for v in spec["volumes"]][:3] == ["work", "tmp", "token"]
    assert spec["nodeSelector"] == {"disk": "ssd"}
    assert spec["tolerations"] == TEMPLATE["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    assert "affinity" not in spec  # empty: left out
    assert "priorityClassName" not in spec
    assert spec["automountServiceAccountToken"] is False
    assert pod["metadata"]["labels"]["team"] == "a"
    assert pod["metadata"]["labels"]["juturna.io/pipeline-uid"] == KEY.uid  # ours win
    assert pod["metadata"]["annotations"]["note"] == "x"
    assert container["image"] == "localhost/jo:1"


def test_a_pod_is_bounded_where_its_template_says_nothing() -> None:
    """Item 16: size-limited folders and default requests (never BestEffort); the
    administrator's settings decide, and a template's resources replace them whole."""
    pod = runtime_pod(KEY, "r", SETTINGS)
    (container,) = pod["spec"]["containers"]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["work"] == {"name": "work", "emptyDir": {"sizeLimit": "1Gi"}}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}
    limits = {"limits": {"example.com/gpu": 1}}
    (given,) = runtime_pod(KEY, "r", SETTINGS, {"resources": limits})["spec"]["containers"]
    assert given["resources"] == {"limits": {"example.com/gpu": "1"}}
    unbounded = Settings(
        engine="pod",
        runtime_image="localhost/jo:1",
        pod_work_size_limit=None,
        pod_tmp_size_limit="8Mi",
        pod_default_resources={},
    )
    pod = runtime_pod(KEY, "r", unbounded)
    (container,) = pod["spec"]["containers"]
    assert "resources" not in container
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["work"] == {"name": "work", "emptyDir": {}}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "8Mi"}}
    # Other defaults make another pod (a redeploy does not reuse the old one).
    assert template_hash(None, unbounded) != template_hash(None, SETTINGS)


def test_an_eviction_past_its_own_limit_is_the_pipelines_failure() -> None:
    """The kubelet's own words (pkg/kubelet/eviction/helpers.go); node pressure stays the
    cluster's doing."""
    for message in (
        'Usage of EmptyDir volume "work" exceeds the limit "1Gi". ',
        'Container juturna exceeded its local ephemeral storage limit "1Gi". ',
        "Pod ephemeral local storage usage exceeds the total limit of containers 1Gi. ",
    ):
        evicted = pod({"phase": "Failed", "reason": "Evicted", "message": message})
        assert removed_from_outside(evicted) == ""
        problem = pod_problem(evicted)
        assert problem is not None
        assert (problem.reason, problem.step.value) == (FailureReason.NodeFailed, "run")
        assert problem.message == (
            "pod tones-40ffacf7 was evicted for going past a limit of its own: " + message.strip()
        )
    # The status lost it (a worker that exits 0 on SIGTERM: phase Succeeded, no reason); the
    # kubelet's Event has it.
    quiet = pod({"phase": "Succeeded", "containerStatuses": [ended(0)]})
    assert ended_by_kubelet(quiet)
    assert not ended_by_kubelet(pod({"phase": "Failed", "containerStatuses": [ended(1)]}))
    words = 'Usage of EmptyDir volume "work" exceeds the limit "16Mi".'
    problem = pod_problem(quiet, words)
    assert problem is not None
    assert problem.message == (
        f"pod tones-40ffacf7 was evicted for going past a limit of its own: {words}"
    )
    assert removed_from_outside(quiet, "The node was low on resource: memory.") == (
        "evicted: The node was low on resource: memory."
    )
    pressure = pod(
        {
            "phase": "Failed",
            "reason": "Evicted",
            "message": "The node was low on resource: ephemeral-storage. ",
        }
    )
    assert removed_from_outside(pressure) == (
        "evicted: The node was low on resource: ephemeral-storage."
    )


def test_a_named_service_account_decides_for_itself_whether_its_token_is_mounted() -> None:
    """Forcing automount on would override an account that opted out of it; the API server's
    ServiceAccount admission reads the account's own setting when the pod leaves it unset
    (tests/integration/test_template_policy.py proves that with the real admission)."""
    pod = runtime_pod(KEY, "r", SETTINGS, {**TEMPLATE, "serviceAccountName": "reader"})
    assert pod["spec"]["serviceAccountName"] == "reader"
    assert "automountServiceAccountToken" not in pod["spec"]


def test_a_template_change_means_another_pod() -> None:
    same = template_hash(TEMPLATE, SETTINGS)
    assert same == template_hash(dict(TEMPLATE), SETTINGS)
    assert same != template_hash({**TEMPLATE, "nodeSelector": {}}, SETTINGS)
    other_image = Settings(engine="pod", runtime_image="localhost/jo:2")
    assert same != template_hash(TEMPLATE, other_image)
    annotations = runtime_pod(KEY, "r", SETTINGS, TEMPLATE)["metadata"]["annotations"]
    assert annotations["juturna.io/template"] == same


def test_an_image_override_needs_the_administrators_leave() -> None:
    import asyncio

    from kubernetes import client

    from juturna_operator.engines.base import Plan
    from juturna_operator.engines.pod import PodEngine
    from juturna_operator.reasons import PipelineFailure

    engine = PodEngine(SETTINGS, client.ApiClient())  # refused before any request
    config = {"version": "1", "plugins": [], "pipeline": {"name": KEY.juturna_name, "nodes": []}}
    plan = Plan(template={"image": "localhost/mine:1"})
    with pytest.raises(PipelineFailure) as refused:
        asyncio.run(engine.create(KEY, config, "r", plan))
    assert refused.value.reason is FailureReason.ImageNotAllowed
    assert refused.value.reason.code == 403
    assert refused.value.message == (
        "spec.template.image is set, but the administrator does not allow image overrides "
        "(JUTURNA_OPERATOR_ALLOW_IMAGE_OVERRIDE)"
    )


def test_only_the_pipelines_namespace_and_controller_owner_make_a_pod_its_own() -> None:
    """Labels, the name and even an owner reference to the uid can be written by any tenant
    in its own namespace: the namespace is what proves a pod is the Pipeline's."""
    pod = runtime_pod(KEY, "rev1", SETTINGS)
    assert owned_by(pod, KEY)
    elsewhere = {**pod, "metadata": {**pod["metadata"], "namespace": "team-b"}}
    assert not owned_by(elsewhere, KEY)  # an impostor that copies everything but the namespace
    ref = pod["metadata"]["ownerReferences"][0]
    for forged in (
        [],
        [{**ref, "controller": False}],
        [{**ref, "uid": "0" * 36}],
        [{**ref, "kind": "Deployment"}],
        [{**ref, "apiVersion": "apps/v1"}],
    ):
        assert not owned_by(
            {**pod, "metadata": {**pod["metadata"], "ownerReferences": forged}}, KEY
        )


def test_the_watch_files_each_pod_of_a_known_pipeline_by_its_name() -> None:
    """Two pods of one Pipeline (a warm swap's) are told apart: each its own body, and a
    change of one wakes only that one's waiters. Ownership stays the proof."""
    engine = PodEngine(SETTINGS, api_client=None)  # type: ignore[arg-type]
    active = runtime_pod(KEY, "rev1", SETTINGS, instance="aaaaaaaa")
    candidate = runtime_pod(KEY.candidate, "rev2", SETTINGS, instance="bbbbbbbb")
    a, b = active["metadata"]["name"], candidate["metadata"]["name"]
    assert engine.observe("ADDED", active) is None  # no Pipeline of that uid is known yet
    engine._known[KEY.uid] = KEY
    impostor = {**active, "metadata": {**active["metadata"], "namespace": "team-b"}}
    assert engine.observe("DELETED", impostor) is None
    assert KEY.uid not in engine._seen
    unowned = {**candidate, "metadata": {**candidate["metadata"], "ownerReferences": []}}
    assert engine.observe("ADDED", unowned) is None
    assert KEY.uid not in engine._seen

    async def one_pod_wakes_its_own_waiters() -> None:
        waiter = asyncio.create_task(engine._changed(KEY, b, 5.0))
        await asyncio.sleep(0)
        assert engine.observe("MODIFIED", active) == KEY.uid
        await asyncio.sleep(0.05)
        assert not waiter.done()
        assert engine.observe("MODIFIED", candidate) == KEY.uid
        await asyncio.wait_for(waiter, 1.0)

    asyncio.run(one_pod_wakes_its_own_waiters())
    assert engine._seen[KEY.uid] == {a: active, b: candidate}
    # Deleted: the pod a slot holds reads as gone; one no slot holds is forgotten.
    engine._runtimes[KEY] = _Runtime(a, "rev1", JuturnaClient("http://127.0.0.1:9"))
    assert engine.observe("DELETED", active) == engine.observe("DELETED", candidate) == KEY.uid
    assert engine._seen[KEY.uid] == {a: None}


def running_pod(ready: bool, version: str = "1") -> dict[str, Any]:
    """The engine's pod as the kubelet reports it running: Ready or not."""
    pod = runtime_pod(KEY, "rev1", SETTINGS, instance="aaaaaaaa")
    pod["metadata"]["resourceVersion"] = version
    pod["status"] = {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": str(ready)}],
        "containerStatuses": [{"name": "juturna", "state": {"running": {}}}],
    }
    return pod


def test_the_readiness_probe_carries_a_crash_and_a_not_ready_pod_can_be_adopted() -> None:
    """The kubelet probes the worker's open route, which fails on a crash (worker.py): two
    failures in a row mark the pod NotReady. Such a pod still runs its worker, so adoption
    asks it instead of removing it; a pod with no running worker cannot be asked."""
    probe = runtime_pod(KEY, "rev1", SETTINGS)["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/operator/ready"
    assert (probe["periodSeconds"], probe["failureThreshold"]) == (1, 2)
    assert worker_running(running_pod(ready=True))
    assert worker_running(running_pod(ready=False))
    ended = running_pod(ready=False)
    ended["status"]["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 1}}
    assert not worker_running(ended)
    leaving = running_pod(ready=False)
    leaving["metadata"]["deletionTimestamp"] = "2026-12-08T00:00:00Z"
    assert not worker_running(leaving)
    assert not worker_running({**running_pod(True), "status": {"phase": "Pending"}})


class CrashedWorker(CannedAnswer):
    """A worker on loopback whose pipeline's node crashed: its health answer says so."""

    body = json.dumps(
        {
            "pipelines": [{}],
            "crashes": [
                {"node": "src", "thread": "t", "error": "RuntimeError: kaboom", "pipeline": "pid"}
            ],
        }
    ).encode()


def test_a_running_pods_health_is_asked_only_when_its_pod_changes() -> None:
    """The health answer of a running pipeline's pod holds while the watch shows the pod
    unchanged: the status costs no request. A change (the readiness probe failing on a crash
    sets Ready False: a new resourceVersion) asks again, and the crash is reported."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CrashedWorker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    engine = PodEngine(SETTINGS, api_client=None)  # type: ignore[arg-type]
    engine.watched, engine._known[KEY.uid] = True, KEY
    pod = running_pod(ready=True)
    engine.observe("ADDED", pod)
    worker = JuturnaClient(f"http://127.0.0.1:{server.server_port}")
    runtime = _Runtime(pod["metadata"]["name"], "rev1", worker, "pid", InstanceState.Running)
    runtime.health = {"pipelines": [{"pid": {"src": {"status": "running"}}}], "crashes": []}
    runtime.health_of, runtime.health_at = health_mark(pod, runtime), time.monotonic()
    engine._runtimes[KEY] = runtime
    engine._looked.add(KEY)

    async def statuses() -> tuple[Any, Any]:
        steady = await engine.status(KEY)
        engine.observe("MODIFIED", running_pod(ready=False, version="2"))
        changed = await engine.status(KEY)
        await worker.close()
        return steady, changed

    try:
        steady, changed = asyncio.run(statuses())
    finally:
        server.shutdown()
        server.server_close()
    assert steady is not None
    assert not steady.crashes
    assert engine.health_asks == 1  # the second status only
    assert changed is not None
    assert [c.node for c in changed.crashes] == ["src"]


def test_a_pod_the_client_refuses_before_any_request_is_invalid_spec() -> None:
    """The Kubernetes client checks a Pod's required fields itself; its words, first lines
    only, become the user's InvalidSpec."""
    failure = pod_refused(ValueError("Invalid value for `name`, must not be `None`\nmore\nand"))
    assert (failure.reason, failure.step) == (FailureReason.InvalidSpec, Step.create)
    assert failure.message == (
        "the pipeline's pod is not a valid Pod: Invalid value for `name`, must not be `None` "
        "(more; and)"
    )


def test_each_instance_has_a_pod_and_a_secret_of_its_own() -> None:
    """Unique per instance, within a pod name's limits; the slot and the listeners are kept
    on the pod for an adopting operator; the NetworkPolicy keeps the Pipeline's one name
    (an older operator's pod's name)."""
    from juturna_operator.listening import Listener

    names = {pod_name(KEY, new_instance()) for _ in range(20)}
    assert len(names) == 20
    assert all(n.startswith("tones-40ffacf7-") for n in names)
    listeners = (Listener("web", "http", 20000, "TCP"),)
    pod = runtime_pod(KEY.candidate, "r2", SETTINGS, None, "bbbbbbbb", listeners, 17)
    meta = pod["metadata"]
    assert meta["name"] == "tones-40ffacf7-bbbbbbbb"
    assert meta["labels"]["juturna.io/slot"] == "candidate"
    assert "juturna.io/active-since" not in meta["annotations"]  # a candidate is not active
    assert listeners_in(meta) == listeners
    assert token_secret(KEY, "t", meta["name"], "u")["metadata"]["name"] == meta["name"]
    assert network_policy(KEY, (), [])["metadata"]["name"] == pipeline_object_name(KEY)
    assert pipeline_object_name(KEY) == "tones-40ffacf7"
    subdomain = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
    for name in ("x" * 253, "a" * 234 + ".b" + "c" * 17):
        made = pod_name(PipelineKey("team-a", name, KEY.uid), "bbbbbbbb")
        assert len(made) <= 253
        assert subdomain.fullmatch(made), made


def marked(
    instance: str, slot: str | None = None, since: int | None = None, created: int = 0
) -> dict[str, Any]:
    """A Pipeline's pod as listed: ``slot`` None is an older operator's (unmarked)."""
    labels = {"juturna.io/instance": instance} | ({"juturna.io/slot": slot} if slot else {})
    annotations = {"juturna.io/active-since": str(since)} if since is not None else {}
    meta = {"name": f"tones-40ffacf7-{instance}", "labels": labels, "annotations": annotations}
    return {"metadata": meta | {"creationTimestamp": f"2026-12-07T10:00:{created:02d}Z"}}


A1, B1 = marked("a", "active", 1), marked("b", "active", 2)  # a promote's marks


@pytest.mark.parametrize(
    ("pods", "selected", "active", "candidate", "retired"),
    [
        ([marked("a")], "a", "a", None, False),
        ([marked("a")], "none", "a", None, False),
        ([A1, marked("b", "candidate")], "a", "a", "b", False),
        ([A1, marked("b", "candidate")], "none", "a", "b", False),
        ([A1, B1], "a", "a", "b", False),
        ([A1, B1], "none", "b", "a", True),
        ([A1, B1], "b", "b", "a", True),
        ([marked("a", "retired"), B1], "b", "b", "a", True),
        ([marked("a", "retired"), B1], "none", "b", "a", True),
        ([marked("a"), B1], "a", "a", "b", False),
        ([marked("a"), B1], "b", "b", "a", True),
        ([marked("b", "candidate")], "a", None, "b", False),
        (
            [A1, marked("c", "retired", created=9), marked("b", "candidate", created=5)],
            "a",
            "a",
            "b",
            False,
        ),
    ],
    ids=[
        "an-older-operators-pod",
        "an-older-operators-pod-no-service",
        "a-candidate-warming-up",
        "a-candidate-warming-up-no-service",
        "killed-after-marking-the-candidate",
        "killed-after-marking-the-candidate-no-service",
        "killed-after-moving-the-service",
        "promoted",
        "promoted-no-service",
        "an-older-operators-pod-killed-while-replaced",
        "an-older-operators-pod-replaced",
        "the-active-pod-gone",
        "a-candidate-before-a-retired-one",
    ],
)
def test_adoption_puts_each_pod_in_the_slot_it_had(
    pods: list[dict[str, Any]],
    selected: str,
    active: str | None,
    candidate: str | None,
    retired: bool,
) -> None:
    """Where a promote was killed (marks: the candidate's active, the Service, the old one's
    retired), the Service is the truth where the Pipeline listens, and the later active
    mark where it does not: never two actives, and a promote the Service did not see is
    made again (the candidate is not retired)."""

    def instance(pod: dict[str, Any] | None) -> str | None:
        return None if pod is None else pod["metadata"]["labels"]["juturna.io/instance"]

    placement = place(pods, selected)
    assert (instance(placement.active), instance(placement.candidate)) == (active, candidate)
    assert placement.retired is retired
    assert placement.mark(Slot.candidate) == ("retired" if retired else "candidate")
    placed_ = {instance(placement.active), instance(placement.candidate)}
    assert {instance(p) for p in placement.strays} == {instance(p) for p in pods} - placed_


def test_the_service_is_the_pipelines_and_selects_one_pod_by_its_instance() -> None:
    """One Service for both slots, its listeners kept for an adopting operator; the
    NetworkPolicy lets in both instances' input ports, each once."""
    from juturna_operator.listening import Listener

    old, new = Listener("web", "http", 20000, "TCP"), Listener("rtp", "rtp", 20002, "UDP")
    body = service_body(KEY, (new,), "bbbbbbbb")
    assert body["metadata"]["name"] == service_name(KEY) == service_name(KEY.candidate) == "tones"
    assert body["spec"]["selector"] == {
        "juturna.io/pipeline-uid": KEY.uid,
        "juturna.io/instance": "bbbbbbbb",
    }
    assert listeners_in(body["metadata"]) == (new,)
    assert listeners_in({"annotations": {"juturna.io/listeners": "[1]"}}) is None
    assert listeners_in({}) is None
    ingress = network_policy(KEY, (new, old, new), [])["spec"]["ingress"]
    assert ingress[1] == {
        "ports": [{"protocol": "UDP", "port": 20002}, {"protocol": "TCP", "port": 20000}]
    }


def test_a_promote_needs_a_started_candidate_and_is_safe_to_repeat() -> None:
    """Refused before any request: no candidate, or one not Running (its message names the
    pod and the state). After a promote the candidate slot holds the retired instance: a
    second promote changes nothing."""
    from juturna_operator.domain import InstanceState

    engine = PodEngine(SETTINGS, api_client=None)  # type: ignore[arg-type]
    assert engine.warm_swap(Plan()) is None
    with pytest.raises(PipelineFailure) as refused:
        asyncio.run(engine.promote(KEY))
    assert (refused.value.reason, refused.value.message) == (
        FailureReason.InvalidPipelineId,
        "team-a/tones has no candidate to promote",
    )
    client = JuturnaClient("http://127.0.0.1:9")
    ready = _Runtime("tones-40ffacf7-bbbbbbbb", "r2", client, "p2", InstanceState.Ready)
    engine._runtimes[KEY.candidate] = ready
    with pytest.raises(PipelineFailure) as refused:
        asyncio.run(engine.promote(KEY))
    assert (refused.value.reason, refused.value.message) == (
        FailureReason.NotRunning,
        "the candidate instance of team-a/tones (pod tones-40ffacf7-bbbbbbbb) is Ready, not "
        "Running: only a started instance takes the Pipeline's address",
    )
    new = _Runtime("tones-40ffacf7-bbbbbbbb", "r2", client, "p2", InstanceState.Running)
    old = _Runtime("tones-40ffacf7-aaaaaaaa", "r1", client, "p1", InstanceState.Running)
    old.retired = True
    engine._runtimes.update({KEY: new, KEY.candidate: old})
    asyncio.run(engine.promote(KEY))  # no request: the API client points nowhere
    assert (engine._runtimes[KEY], engine._runtimes[KEY.candidate]) == (new, old)


def test_the_network_policy_lets_in_the_operator_the_probes_and_the_input_ports() -> None:
    """Item 7: the worker port only from the administrator's peers; each declared input port
    (RTP and its RTCP here) from anyone; every pod of the Pipeline, whatever its instance."""
    from juturna_operator.listening import Listener

    peers: list[dict[str, Any]] = [{"podSelector": {"matchLabels": {"app": "op"}}}]
    listeners = (Listener("mic", "rtp", 20000, "UDP"), Listener("mic", "rtcp", 20001, "UDP"))
    policy = network_policy(KEY, listeners, peers)
    assert policy["metadata"]["name"] == "tones-40ffacf7"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == KEY.uid
    assert policy["spec"] == {
        "podSelector": {"matchLabels": {"juturna.io/pipeline-uid": KEY.uid}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": peers, "ports": [{"protocol": "TCP", "port": 8080}]},
            {"ports": [{"protocol": "UDP", "port": 20000}, {"protocol": "UDP", "port": 20001}]},
        ],
    }
    # Nothing listens: the worker's port alone, never a rule open to all.
    assert network_policy(KEY, (), peers)["spec"]["ingress"] == [
        {"from": peers, "ports": [{"protocol": "TCP", "port": 8080}]}
    ]


def test_a_token_secret_is_its_pods_and_is_taken_only_from_that_pod() -> None:
    """The pod controls its token Secret (the garbage collector removes it with the pod, and
    the operator never lists Secrets: it has no right to); a Secret is taken as a pod's token
    only in the Pipeline's namespace, controlled by that pod (or by the Pipeline: an older
    operator's), never by a look-alike."""
    secret = token_secret(KEY, "t", "tones-40ffacf7-a1b2c3d4", "pod-uid")
    assert secret["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "tones-40ffacf7-a1b2c3d4",
            "uid": "pod-uid",
            "controller": True,
        }
    ]
    assert token_of(secret, KEY, "tones-40ffacf7-a1b2c3d4", "pod-uid")
    assert token_of(secret, KEY, "tones-40ffacf7-a1b2c3d4")  # uid unknown: by name
    assert not token_of(secret, KEY, "tones-40ffacf7-a1b2c3d4", "another-pod")
    assert not token_of(secret, KEY, "tones-40ffacf7-ffffffff")
    elsewhere = {**secret, "metadata": {**secret["metadata"], "namespace": "team-b"}}
    assert not token_of(elsewhere, KEY, "tones-40ffacf7-a1b2c3d4", "pod-uid")
    older = {"metadata": {"namespace": KEY.namespace, "ownerReferences": [owner_of(KEY)]}}
    assert token_of(older, KEY, "tones-40ffacf7")
