"""The pod engine: each Pipeline runs in a Pod of its own, in its namespace, placed by
Kubernetes.

The pod runs our worker module (Juturna's own HTTP service plus health and shutdown, behind a
bearer token) from the runtime image; this engine drives it over HTTP at the pod's IP, as the
process engine drives a local worker. What Kubernetes gives on top:

* **tenancy**: the pod runs under the ``restricted`` Pod Security Standard, with none of the
  operator's environment, and ``spec.template`` gives it no more than a Pod author has under
  that profile (``podpolicy``, checked before anything is created, in any namespace). It
  gets a ServiceAccount token only if the template names an account, and then only if that
  account lets its pods have one (its own ``automountServiceAccountToken``); without one,
  Kubernetes mounts none (``automountServiceAccountToken: false``) and projected tokens are
  refused. So a Pipeline author who makes a built-in node run a command
  (``docs/juturna.md``, pitfalls 11-12) gets no more than a Pod author has;
* **placement and shared fate**: the scheduler places each pod; an operator restart leaves
  the pods running, and the next operator adopts them (by owner, slot and token);
* **two instances per Pipeline**: a pod per instance, named ``<name>-<uid8>-<instance>``,
  in one of two slots (``PipelineKey.slot``): the active one, and a candidate made beside it
  (a warm swap's next revision, and after the switch the old one while it drains). A
  candidate never touches the Pipeline's address; ``promote`` moves it, and each pod's
  slot mark (``SLOT_LABEL``) lets an adopting operator put it back where it was
  (``place``);
* **whose pod is whose**: a pod or Secret counts as a Pipeline's only if it is in the
  Pipeline's namespace and the Pipeline is its controller owner (``owned_by``). Labels,
  names and uids prove nothing: anyone may put them on their own pods, in any namespace,
  and the operator would send such a pod the Pipeline's token and configuration. An object
  of the name the Pipeline's must have (its Service, its NetworkPolicy) that the Pipeline
  does not own is ``NameConflict``: never adopted, never deleted;
* **cleanup without us**: the pod and its token Secret are owned by the Pipeline, so the
  garbage collector removes them even when no operator runs;
* **a stable address**: a Pipeline that listens (``listening``) gets a Service of its own
  (owned by it, named after it), whose selector names one pod by its instance label, and
  only once that pod's pipeline is Running. Moving the address to another pod is one patch
  of the selector; the Service, its ClusterIP and its DNS name outlive every pod. So does
  the NetworkPolicy: one per Pipeline, for all its pods.

Each pod's token lives in a Secret of the same name (owned by the Pipeline, mounted into
the pod). It is never put in status, Events or logs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from kubernetes import client as k8s

from juturna_operator import api
from juturna_operator.domain import (
    WHOLE_RUNTIME,
    WORKER_PORT,
    Address,
    InstanceState,
    NodeCrash,
    PipelineKey,
    Slot,
)
from juturna_operator.engines.base import (
    RETIRED,
    WARMUP_TIMEOUT_S,
    InstanceInfo,
    LockedEngine,
    Placed,
    Plan,
    apply_health,
    held,
    place_slots,
    promotable,
    swap_slots,
    vacant,
)
from juturna_operator.engines.client import JUTURNA_STATE, AnswerTooLarge, JuturnaClient
from juturna_operator.listening import Listener, bound_in_pod
from juturna_operator.reasons import FailureReason, PipelineFailure, Step, api_server_message
from juturna_operator.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

PORT = WORKER_PORT
CONTAINER = "juturna"
WORKDIR = "/var/lib/juturna"
TOKEN_DIR = "/var/run/secrets/juturna"
MANAGED_BY = {"app.kubernetes.io/managed-by": "juturna-operator"}
UID_LABEL = "juturna.io/pipeline-uid"
TEMPLATE_ANNOTATION = "juturna.io/template"
NAME_LABEL = "juturna.io/pipeline"
INSTANCE_LABEL = "juturna.io/instance"  # one value per pod: what the Service selects
NO_POD = "none"  # an instance label no pod has: the Service points at nothing
LISTENERS_ANNOTATION = "juturna.io/listeners"  # a Service's and a pod's, for an adopting operator
# Which of a Pipeline's two instances a pod is (``place`` reads it back after a restart): the
# Slot's values, or RETIRED: an instance that served until a promote replaced it (it drains in
# the candidate slot and is never promoted again). A pod without the label is an older
# operator's, of one pod per Pipeline: the active one.
SLOT_LABEL = "juturna.io/slot"
# When a pod took the active slot (ns since the epoch): of two pods marked active, the later.
ACTIVE_SINCE = "juturna.io/active-since"
MAX_SERVICE_NAME = 63
POD_READY_TIMEOUT_S = 300.0  # an image pull can take minutes
POLL_S = 0.25  # without a watch (before its first event)
FALLBACK_POLL_S = 5.0  # with the watch: only in case an event is missed
VALIDATE_TIMEOUT_S = 30.0  # the worker reads config.toml files: well under a second
ENDED_WAIT_S = 3.0  # how long a silent worker's pod may take to show its container ended
DELETE_GRACE_S = 5
IDLE_S = 30.0  # a pod kept for a redeploy that did not come is removed after this
GONE_MARGIN_S = 10.0  # past a leaving pod's grace period: how long its replacement waits
GONE_POLL_S = 1.0  # meanwhile, a look without a watch event (one may come just before)
# A running pipeline's worker is asked for its health when the watch shows its pod changed
# (the readiness probe fails on a crash), and at least this often: in case an event is missed.
HEALTH_RESYNC_S = 60.0
# The ServiceAccount admission's words for a pod whose account does not exist (yet): a new
# namespace's `default` comes a moment after the namespace (seconds, with the controller
# manager busy or reconnecting), a named one may come later (a GitOps sync). Not the spec's
# fault: Kubernetes' own controllers retry such a create, and so does the operator.
MISSING_ACCOUNT = "error looking up service account"
# The kubelet's words for an image it cannot get.
IMAGE_PROBLEMS = ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName")


def pipeline_object_name(key: PipelineKey) -> str:
    """The name of the Pipeline's NetworkPolicy (one per Pipeline, for all its pods); the uid
    part keeps a re-created resource's apart. An older operator named its one pod and that
    pod's Secret so too."""
    return f"{key.name[:240]}-{key.uid[:8]}"


def pod_name(key: PipelineKey, instance: str) -> str:
    """One pod (and its token Secret) per instance of the Pipeline: the instance part keeps a
    warm swap's two pods apart, and a replacement never waits for a leaving pod's name. At
    most 253 characters (a DNS-1123 subdomain, whose parts cannot begin with ``-``)."""
    return f"{key.name[:235].rstrip('.')}-{key.uid[:8]}-{instance}"


def new_instance() -> str:
    """A new instance's id: its pod's name suffix and instance label (what the Service
    selects), random like a ReplicaSet's pods' suffixes."""
    return secrets.token_hex(4)


def labels_of(key: PipelineKey) -> dict[str, str]:
    labels = dict(MANAGED_BY) | {UID_LABEL: key.uid}
    if len(key.name) <= 63:  # a label value's limit; longer names go by the uid label alone
        labels[NAME_LABEL] = key.name
    return labels


def owner_of(key: PipelineKey) -> dict[str, Any]:
    return {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.KIND,
        "name": key.name,
        "uid": key.uid,
        "controller": True,
    }


def owned_by(obj: dict[str, Any], key: PipelineKey) -> bool:
    """Whether a pod or Secret is this Pipeline's: in its namespace, with the Pipeline as its
    controller owner. The API server keeps an object's namespace and only an owner's rights
    set ``blockOwnerDeletion``, but any tenant may write these labels, this name (in its own
    namespace) or even an owner reference to a uid it has seen: the namespace is the proof."""
    meta = obj.get("metadata") or {}
    if meta.get("namespace") != key.namespace:
        return False
    return any(
        ref.get("controller") is True
        and ref.get("uid") == key.uid
        and ref.get("kind") == api.KIND
        and str(ref.get("apiVersion", "")).split("/")[0] == api.GROUP
        for ref in meta.get("ownerReferences") or []
    )


def token_of(secret: dict[str, Any], key: PipelineKey, pod: str, pod_uid: str = "") -> bool:
    """Whether a Secret is the token of the Pipeline's pod ``pod`` (and uid ``pod_uid``, where
    known): in the Pipeline's namespace, controlled by that pod, so the garbage collector
    removes it with the pod, and the operator never needs to list Secrets; or by the Pipeline
    itself (an older operator's)."""
    meta = secret.get("metadata") or {}
    if meta.get("namespace") != key.namespace:
        return False
    return owned_by(secret, key) or any(
        ref.get("controller") is True
        and ref.get("kind") == "Pod"
        and ref.get("apiVersion") == "v1"
        and ref.get("name") == pod
        and (not pod_uid or ref.get("uid") == pod_uid)
        for ref in meta.get("ownerReferences") or []
    )


def name_conflict(kind: str, key: PipelineKey, step: Step, name: str) -> PipelineFailure:
    """A pod, Secret, Service or NetworkPolicy of the name this Pipeline's must have, owned by
    another."""
    return PipelineFailure(
        FailureReason.NameConflict,
        step,
        f"{kind} {name} in namespace {key.namespace} is not owned by Pipeline "
        f"{key.name}; the operator neither uses nor deletes it: remove it, or rename the "
        "Pipeline",
    )


def service_name(key: PipelineKey) -> str:
    """The Pipeline's Service: its own name where that is a Service name (a DNS-1035 label:
    at most 63 characters, a letter first, no dots); otherwise a name made from it with a uid
    suffix, so that two Pipelines never map to one."""
    if len(key.name) <= MAX_SERVICE_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", key.name):
        return key.name
    base = re.sub(r"[^a-z0-9-]+", "-", key.name).strip("-")
    if not base[:1].isalpha():
        base = "p-" + base
    return f"{base[: MAX_SERVICE_NAME - 9].rstrip('-')}-{key.uid[:8]}"


def described(listeners: tuple[Listener, ...]) -> str:
    """``listeners`` as an annotation keeps them (``LISTENERS_ANNOTATION``)."""
    return json.dumps([[ln.node, ln.name, ln.port, ln.protocol] for ln in listeners])


def listeners_in(meta: dict[str, Any]) -> tuple[Listener, ...] | None:
    """The listeners an object's ``LISTENERS_ANNOTATION`` keeps; None without a readable one."""
    try:
        kept = json.loads((meta.get("annotations") or {})[LISTENERS_ANNOTATION])
        return tuple(Listener(str(n), str(m), int(p), str(q)) for n, m, p, q in kept)
    except (KeyError, ValueError, TypeError):
        return None


def service_body(
    key: PipelineKey, listeners: tuple[Listener, ...], instance: str
) -> dict[str, Any]:
    """The Pipeline's Service (one for both slots): one port per listener, pointing at the pod
    labelled ``instance`` (``NO_POD``: at none)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(key),
            "namespace": key.namespace,
            "labels": labels_of(key),
            "annotations": {LISTENERS_ANNOTATION: described(listeners)},
            "ownerReferences": [owner_of(key)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {UID_LABEL: key.uid, INSTANCE_LABEL: instance},
            "ports": [
                {
                    "name": ln.service_port_name,
                    "port": ln.port,
                    "targetPort": ln.port,
                    "protocol": ln.protocol,
                }
                for ln in listeners
            ],
        },
    }


def ports_of(listeners: tuple[Listener, ...]) -> set[tuple[str, int]]:
    """The input ports ``listeners`` take, as a NetworkPolicy names them."""
    return {(ln.protocol, ln.port) for ln in listeners}


def network_policy(
    key: PipelineKey, listeners: tuple[Listener, ...], worker_peers: list[dict[str, Any]]
) -> dict[str, Any]:
    """What may reach the Pipeline's pods (both slots': it selects them by the uid label): its
    worker port only from ``worker_peers`` (the operator, the kubelet's probes), its declared
    input ports from anyone; nothing else. Egress is left open: sinks send where their
    configuration says."""
    ingress: list[dict[str, Any]] = [
        {"from": worker_peers, "ports": [{"protocol": "TCP", "port": PORT}]}
    ]
    ports = dict.fromkeys((ln.protocol, ln.port) for ln in listeners)  # once each, in order
    if ports:
        ingress.append({"ports": [{"protocol": q, "port": p} for q, p in ports]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": pipeline_object_name(key),
            "namespace": key.namespace,
            "labels": labels_of(key),
            "ownerReferences": [owner_of(key)],
        },
        "spec": {
            "podSelector": {"matchLabels": {UID_LABEL: key.uid}},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def token_secret(key: PipelineKey, token: str, name: str, pod_uid: str) -> dict[str, Any]:
    """The token of the pod ``name`` (uid ``pod_uid``), in a Secret of the same name that the
    pod controls: the garbage collector removes it with the pod, whoever deletes the pod."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": key.namespace,
            "labels": labels_of(key),
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": name,
                    "uid": pod_uid,
                    "controller": True,
                }
            ],
        },
        "type": "Opaque",
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


def template_hash(template: dict[str, Any] | None, settings: Settings) -> str:
    """What a pod was made from: a pod is reused for a redeploy only if this is unchanged."""
    made_from = {
        "template": template or {},
        "image": settings.runtime_image,
        "defaults": [
            settings.pod_work_size_limit,
            settings.pod_tmp_size_limit,
            settings.pod_default_resources,
            settings.pod_user,
            settings.pod_image_pull_secrets,
        ],
    }
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]


def runtime_pod(
    key: PipelineKey,
    revision: str,
    settings: Settings,
    template: dict[str, Any] | None = None,
    instance: str = NO_POD,
    listeners: tuple[Listener, ...] = (),
    active_since: int = 0,
) -> dict[str, Any]:
    """The Pod for one instance of a Pipeline (``key.slot``'s; ``active_since``: now, for the
    active slot): restricted, the worker on ``PORT``, with what ``spec.template`` adds
    (``podpolicy`` checked it). The runtime image says where its plugins are
    (``JUTURNA_OPERATOR_PLUGIN_PATH`` in it)."""
    t = template or {}
    name = pod_name(key, instance)
    slot = {ACTIVE_SINCE: str(active_since)} if key.slot is Slot.active else {}
    # Quantities as strings (YAML's `nvidia.com/gpu: 1` is a number; a Pod wants "1").
    resources = {
        kind: {name: str(q) for name, q in amounts.items()}
        for kind, amounts in (t.get("resources") or {}).items()
        if amounts
    } or settings.pod_default_resources  # never BestEffort: first evicted, unbounded
    placement = {
        k: t[k]
        for k in (
            "nodeSelector",
            "tolerations",
            "affinity",
            "priorityClassName",
            "runtimeClassName",
            "serviceAccountName",
        )
        if t.get(k)
    }
    security = pod_security(settings)
    # The token's files are root's: readable by the pod's group where the operator sets it
    # (fsGroup), else by all (the pod runs one user; its group is the image's or the SCC's).
    mode = 0o440 if "fsGroup" in security else 0o444
    pull_secrets = [
        *settings.pod_image_pull_secrets,
        *(ref["name"] for ref in t.get("imagePullSecrets") or []),
    ]
    restricted = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": key.namespace,
            "labels": (t.get("labels") or {})
            | labels_of(key)
            | {INSTANCE_LABEL: instance, SLOT_LABEL: key.slot.value},
            "annotations": (t.get("annotations") or {})
            | {
                "juturna.io/revision": revision,
                TEMPLATE_ANNOTATION: template_hash(t, settings),
                LISTENERS_ANNOTATION: described(listeners),
            }
            | slot,
            "ownerReferences": [owner_of(key)],
        },
        "spec": placement
        | {
            # The operator owns restarts (the Pipeline's restartPolicy): a failed pod is
            # reported, then replaced.
            "restartPolicy": "Never",
            # No API token of the namespace's default account. A ServiceAccount the template
            # names decides for itself (its own automountServiceAccountToken): forcing it
            # on would override an account that opted out.
            **({} if t.get("serviceAccountName") else {"automountServiceAccountToken": False}),
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": int(settings.stop_timeout_s) + DELETE_GRACE_S,
            "securityContext": security,
            **(
                {"imagePullSecrets": [{"name": n} for n in dict.fromkeys(pull_secrets)]}
                if pull_secrets
                else {}
            ),
            "containers": [
                {
                    "name": CONTAINER,
                    "image": t.get("image") or settings.runtime_image,
                    "imagePullPolicy": settings.runtime_pull_policy,
                    # -P: the working folder (/) is not on the import path, so a volume
                    # mounted at /juturna (say) cannot stand in for a module; -s: no user
                    # site-packages under a HOME the template may set.
                    "command": ["python", "-P", "-s", "-m", "juturna_operator.worker"],
                    "args": [
                        *("--folder", WORKDIR),
                        *("--port-file", "/tmp/juturna-port"),
                        *("--host", "0.0.0.0", "--port", str(PORT)),
                        *("--owner", key.uid),
                        *("--token-file", f"{TOKEN_DIR}/token"),
                    ],
                    "ports": [{"name": "juturna", "containerPort": PORT}],
                    **({"resources": resources} if resources else {}),
                    **({"env": t["env"]} if t.get("env") else {}),
                    # It fails once a pipeline's thread dies (worker.py): the pod's Ready
                    # condition brings the crash to the operator's watch. Two failures in a
                    # row: a crash is seen in ~2 s, and one slow answer on a busy node does
                    # not take the pod out of its Service.
                    "readinessProbe": {
                        "httpGet": {"path": "/operator/ready", "port": PORT},
                        "periodSeconds": 1,
                        "timeoutSeconds": 2,
                        "failureThreshold": 2,
                    },
                    "securityContext": restricted,
                    "volumeMounts": [
                        {"name": "work", "mountPath": WORKDIR},
                        {"name": "tmp", "mountPath": "/tmp"},
                        {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
                        *(t.get("volumeMounts") or []),
                    ],
                }
            ],
            "volumes": [
                scratch_volume("work", settings.pod_work_size_limit),
                scratch_volume("tmp", settings.pod_tmp_size_limit),
                {"name": "token", "secret": {"secretName": name, "defaultMode": mode}},
                *(t.get("volumes") or []),
            ],
        },
    }


def pod_security(settings: Settings) -> dict[str, Any]:
    """The pod's securityContext: never root, the runtime's default seccomp profile, and the
    user the administrator set (``JUTURNA_OPERATOR_POD_USER``), else the image's own numeric
    user: a fixed one is refused by OpenShift's restricted SCC, which assigns its own."""
    security: dict[str, Any] = {"runAsNonRoot": True}
    if settings.pod_user is not None:
        uid, gid = settings.pod_user
        security["runAsUser"] = uid
        if gid is not None:
            security |= {"runAsGroup": gid, "fsGroup": gid}
    return security | {"seccompProfile": {"type": "RuntimeDefault"}}


def scratch_volume(name: str, size_limit: str | None) -> dict[str, Any]:
    """A writable folder of the pod; past ``size_limit`` the kubelet evicts the pod."""
    return {"name": name, "emptyDir": {"sizeLimit": size_limit} if size_limit else {}}


# The kubelet's words when it evicts a pod for going past a limit of its own (an emptyDir's
# sizeLimit, a container's or the pod's ephemeral-storage limit): the pipeline's doing.
OWN_LIMIT_EVICTIONS = (
    "exceeds the limit",
    "exceeded its local ephemeral storage limit",
    "exceeds the total limit",
)


def eviction_in_status(pod: dict[str, Any]) -> str:
    """The kubelet's message if the pod's status says it was evicted, else ''."""
    status = pod.get("status") or {}
    if status.get("reason") != "Evicted":
        return ""
    return (status.get("message") or "").strip() or "by the kubelet"


def ended_by_kubelet(pod: dict[str, Any]) -> bool:
    """The worker's container exited 0: the worker never does on its own, only when the
    kubelet stops it (tini passes its SIGTERM on), so the kubelet may have evicted it."""
    return any(
        ((c.get("state") or {}).get("terminated") or {}).get("exitCode") == 0
        for c in (pod.get("status") or {}).get("containerStatuses") or []
    )


def over_own_limit(evicted: str) -> bool:
    return any(words in evicted for words in OWN_LIMIT_EVICTIONS)


def pod_problem(pod: dict[str, Any], evicted: str = "") -> PipelineFailure | None:
    """What keeps a pod from serving, in the scheduler's or the kubelet's own words
    (``evicted``: the kubelet's eviction message, where it is not in the status)."""
    status = pod.get("status") or {}
    evicted = evicted or eviction_in_status(pod)
    if over_own_limit(evicted):
        # Before the containers' states: the kubelet killed them, the limit is the cause.
        return PipelineFailure(
            FailureReason.NodeFailed,
            Step.run,
            f"pod {pod['metadata']['name']} was evicted for going past a limit of its own: "
            f"{evicted}",
        )
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
            return PipelineFailure(
                FailureReason.Unschedulable,
                Step.create,
                f"pod {pod['metadata']['name']}: {cond.get('message') or 'no node fits'}",
            )
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in IMAGE_PROBLEMS:
            return PipelineFailure(
                FailureReason.ImagePullFailed,
                Step.create,
                f"{waiting['reason']}: {waiting.get('message') or container.get('image')}",
            )
        terminated = state.get("terminated")
        if terminated:
            return PipelineFailure(
                FailureReason.NodeFailed, Step.run, describe_termination(terminated)
            )
    if status.get("phase") == "Failed":
        return PipelineFailure(
            FailureReason.NodeFailed,
            Step.run,
            f"pod {pod['metadata']['name']} failed: {status.get('reason') or ''} "
            f"{status.get('message') or ''}".strip(),
        )
    return None


def describe_termination(terminated: dict[str, Any]) -> str:
    reason = terminated.get("reason") or "Terminated"
    code = terminated.get("exitCode")
    text = f"container {CONTAINER} {reason} (exit code {code})"
    if reason == "OOMKilled":
        text += ": it used more memory than its limit"
    message = (terminated.get("message") or "").strip()
    return f"{text}: {message[-500:]}" if message else text


def disrupted(pod: dict[str, Any]) -> str:
    """Who is taking the pod away, where Kubernetes says so in its ``DisruptionTarget``
    condition (``reason: message``): an eviction through the Eviction API (``kubectl
    drain``), a preemption, the taint manager for a node gone unreachable, the pod garbage
    collector. Empty if it does not."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            message = str(cond.get("message") or "").strip()
            return f"{cond.get('reason') or 'DisruptionTarget'}: {message}".removesuffix(": ")
    return ""


def removed_from_outside(pod: dict[str, Any] | None, evicted: str = "") -> str:
    """Why a pod that is still listed is on its way out not by the pipeline's doing: being
    deleted (by whom, where Kubernetes says: ``disrupted``; its containers may exit 0
    meanwhile), or evicted by the kubelet for the node's sake (``evicted``: its message,
    where the status lost it). Empty if not."""
    if pod is None:
        return ""
    if pod["metadata"].get("deletionTimestamp"):
        return disrupted(pod) or "deleted"
    evicted = evicted or eviction_in_status(pod)
    if evicted and not over_own_limit(evicted):
        return f"evicted: {evicted}"
    return ""


def gone(name: str, removed: str) -> str:
    """How a pod that went from under the operator is told (``removed``: why, if known)."""
    return f"pod {name} is gone ({removed or 'deleted'})"


def placed(pod: dict[str, Any]) -> bool:
    """Scheduled to a node and not yet running: the kubelet's to start."""
    status = pod.get("status") or {}
    scheduled = any(
        c.get("type") == "PodScheduled" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return scheduled and status.get("phase") == "Pending"


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def worker_running(pod: dict[str, Any]) -> bool:
    """The pod's worker container runs (Ready or not): a pod that an adopting operator can
    ask. Not Ready, it may hold a pipeline whose node crashed (the readiness probe says so),
    which is a crash to report, not a dead pod."""
    status = pod.get("status") or {}
    return (
        status.get("phase") == "Running"
        and bool(status.get("podIP"))
        and not pod["metadata"].get("deletionTimestamp")
        and any(
            c.get("name") == CONTAINER and "running" in (c.get("state") or {})
            for c in status.get("containerStatuses") or []
        )
    )


def slot_mark(pod: dict[str, Any]) -> str:
    """The slot a pod is marked with (``SLOT_LABEL``); an older operator's pod, unmarked, was
    its Pipeline's only one: active."""
    return str(((pod.get("metadata") or {}).get("labels") or {}).get(SLOT_LABEL, Slot.active))


def active_since(pod: dict[str, Any]) -> int:
    """When a pod marked active took the slot (``ACTIVE_SINCE``); 0: since ever."""
    try:
        return int(((pod.get("metadata") or {}).get("annotations") or {})[ACTIVE_SINCE])
    except (KeyError, ValueError, TypeError):
        return 0


def place(pods: list[dict[str, Any]], selected: str) -> Placed[dict[str, Any]]:
    """Which of a Pipeline's pods (its own: ``owned_by``) holds which slot, from what the
    cluster says after an operator restart; ``selected``: the instance the Pipeline's Service
    selects (``NO_POD``: none, or no Service).

    The active pod is the one the Service selects, where it selects one of them: where the
    Pipeline listens, its address is the truth. Else the pod marked active most recently
    (``ACTIVE_SINCE``). A promote marks the candidate active (since now), then moves the
    Service, then marks the old one retired; so an operator killed in between leaves:

    * before the Service moved: two pods marked active, the Service on the old one. The old
      one stays active, the other is a candidate again (promoted again by the next promote);
      with no Service the later mark wins: the promote is complete.
    * after: the Service on the new one, whose mark is the later; the old one is retired.

    Never two actives. The candidate slot holds one of the other pods, the newest (a
    candidate, not a retired one, first); any more are strays."""
    by_instance = {
        ((p.get("metadata") or {}).get("labels") or {}).get(INSTANCE_LABEL): p for p in pods
    }

    def made(p: dict[str, Any]) -> tuple[str, str]:
        meta = p.get("metadata") or {}
        return str(meta.get("creationTimestamp") or ""), str(meta.get("name"))

    active = by_instance.get(selected) if selected != NO_POD else None
    return place_slots(pods, slot_mark, active_since, made, active)


@dataclass
class _Runtime:
    """What the engine holds for one instance of a Pipeline: a pod, its Secret (same name)."""

    pod: str
    revision: str
    client: JuturnaClient
    pipeline_id: str = ""
    state: InstanceState = InstanceState.Created
    gone: bool = False  # the pod is deleted or its container ended: nothing to stop
    healthy: bool = True  # no node thread has died in it
    node: str | None = None  # where the scheduler placed it
    template: str = ""  # template_hash of what it was made from
    idle_since: float = 0.0  # kept for the next deploy of this resource (see delete)
    instance: str = NO_POD  # the pod's instance label: what the Service selects
    listeners: tuple[Listener, ...] = ()  # what its pipeline listens on
    retired: bool = False  # it served until a promote replaced it: never promoted again
    # The worker's last /operator/health answer, and what it was asked at (``health_mark``).
    health: dict[str, Any] | None = None
    health_of: tuple[str, ...] = ()
    health_at: float = 0.0


def health_mark(pod: dict[str, Any], runtime: _Runtime) -> tuple[str, ...]:
    """What a health answer holds for: the pod as the watch saw it (any change: its Ready
    condition, which the readiness probe turns False on a crash, a restart, a new status) and
    the instance the operator made of it. The answer is asked again only when this changes,
    or for the slow resync (``HEALTH_RESYNC_S``)."""
    return (
        str(pod["metadata"].get("resourceVersion", "")),
        runtime.pipeline_id,
        runtime.state.value,
    )


@dataclass(frozen=True)
class _Service:
    """The Pipeline's Service as last written."""

    name: str
    cluster_ip: str | None
    listeners: tuple[Listener, ...]
    instance: str  # the pod it points at (NO_POD: none)


class PodEngine(LockedEngine):
    """Runs each pipeline in a Pod of its own, in the Pipeline's namespace."""

    def __init__(self, settings: Settings, api_client: k8s.ApiClient) -> None:
        super().__init__()
        self._settings = settings
        self._core = k8s.CoreV1Api(api_client)
        self._runtimes: dict[PipelineKey, _Runtime] = {}
        self._idle: dict[PipelineKey, _Runtime] = {}  # healthy pods, their pipeline deleted
        self._looked: set[PipelineKey] = set()  # adoption tried once per key (both slots)
        # The Pipelines this engine has a pod for, or is making or adopting one for (by uid:
        # their active slot's key): the watch files a pod only under one of these, and only
        # if the Pipeline owns it.
        self._known: dict[str, PipelineKey] = {}
        # The watch on our pods (handlers.pod_event) keeps the latest body of each, by the
        # Pipeline's uid and the pod's name (None: deleted), and wakes whoever waits for a
        # change of that pod: no polling.
        self._seen: dict[str, dict[str, dict[str, Any] | None]] = {}
        self._changes: dict[str, dict[str, asyncio.Event]] = {}
        self._services: dict[str, _Service] = {}  # by the Pipeline's uid
        self._services_looked: set[str] = set()  # uids whose Service, if any, is in _services
        core = self._core
        self._networking = networking = k8s.NetworkingV1Api(api_client)
        # Each kind of object the engine makes per Pipeline: (create, read, delete, list).
        self._kinds: dict[str, tuple[Any, Any, Any, Any]] = {
            "pod": (
                core.create_namespaced_pod,
                core.read_namespaced_pod,
                core.delete_namespaced_pod,
                core.list_namespaced_pod,
            ),
            "Secret": (
                core.create_namespaced_secret,
                core.read_namespaced_secret,
                core.delete_namespaced_secret,
                core.list_namespaced_secret,
            ),
            "Service": (
                core.create_namespaced_service,
                core.read_namespaced_service,
                core.delete_namespaced_service,
                core.list_namespaced_service,
            ),
            "NetworkPolicy": (
                networking.create_namespaced_network_policy,
                networking.read_namespaced_network_policy,
                networking.delete_namespaced_network_policy,
                networking.list_namespaced_network_policy,
            ),
        }
        self.watched = False  # set once the watch delivers; until then, reads go to the API
        self.health_asks = 0  # requests for a worker's /operator/health (a metric's count)

    # -- the Kubernetes side (blocking client calls, run in threads) --

    async def _call(self, method: Any, *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(method, *args, **kw)

    def observe(self, event: str, pod: dict[str, Any]) -> str | None:
        """A watch event for a pod with our label: if it is a known Pipeline's own pod,
        remember it by its name and wake its waiters, and return that Pipeline's uid. Any
        other pod, whatever its labels or name, is nobody's (``owned_by``)."""
        self.watched = True
        meta = pod.get("metadata") or {}
        key = self._known.get(str((meta.get("labels") or {}).get(UID_LABEL)))
        if key is None or not owned_by(pod, key):
            return None
        name, seen = str(meta.get("name")), self._seen.setdefault(key.uid, {})
        changes = self._changes.get(key.uid, {})
        if event != "DELETED":
            seen[name] = pod
            waiting = changes.get(name)
        else:
            waiting = changes.pop(name, None)
            if name in self._pods_held(key):
                seen[name] = None  # its instance reads "gone" without asking the API
            else:
                seen.pop(name, None)  # nobody's instance: not kept for the Pipeline's life
        if waiting is not None:
            waiting.set()
        return key.uid

    async def _pod(self, key: PipelineKey, name: str) -> dict[str, Any] | None:
        """The pod as the watch last saw it; from the API when the watch has not yet."""
        seen = self._seen.get(key.uid, {})
        if self.watched and name in seen:
            return seen[name]
        return await self._read_pod(key, name)

    async def _changed(self, key: PipelineKey, name: str, within: float) -> None:
        """Until the watch reports a change of the pod ``name``, or ``within`` seconds (an
        event missed, or none delivered yet)."""
        event = self._changes.setdefault(key.uid, {}).setdefault(name, asyncio.Event())
        event.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await event.wait()

    async def _read(self, read: Any, key: PipelineKey, name: str) -> dict[str, Any] | None:
        """The object ``read`` reads (a pod, a Secret, a Service) of the name ``name`` in the
        Pipeline's namespace, as a dict: None if there is none."""
        try:
            found = await self._call(read, name, key.namespace)
        except k8s.ApiException as err:
            if err.status == 404:
                return None
            raise _api_failure(err, Step.run) from None
        return dict(self._core.api_client.sanitize_for_serialization(found))

    async def _read_pod(self, key: PipelineKey, name: str) -> dict[str, Any] | None:
        """A pod of the Pipeline's from the API: None if there is none, or if the one of that
        name is not the Pipeline's."""
        pod = await self._read(self._core.read_namespaced_pod, key, name)
        return pod if pod is not None and owned_by(pod, key) else None

    async def _owned(self, key: PipelineKey, kind: str) -> list[dict[str, Any]]:
        """The Pipeline's pods or Secrets (``kind``): those of its uid label it owns."""
        listing = self._kinds[kind][3]
        try:
            found = await self._call(
                listing, key.namespace, label_selector=f"{UID_LABEL}={key.uid}"
            )
        except k8s.ApiException as err:
            raise _api_failure(err, Step.run) from None
        items = self._core.api_client.sanitize_for_serialization(found).get("items") or []
        return [obj for obj in items if owned_by(obj, key)]

    async def _remove(self, key: PipelineKey, name: str) -> None:
        """One instance's pod (its grace period) and Secret, if the Pipeline owns them."""
        await self._delete_owned(key, "pod", name, DELETE_GRACE_S)
        await self._delete_owned(key, "Secret", name, DELETE_GRACE_S)

    async def _let_go(self, key: PipelineKey, name: str, listeners: tuple[Listener, ...]) -> None:
        """Remove one instance (``_remove``); the NetworkPolicy goes with the Pipeline's last
        one, else lets in only the input ports of the instance left."""
        await self._remove(key, name)
        other = self._other(key)
        left = self._held(other)
        if left is None and not self._busy(other):
            await self._remove_policy(key)
        elif left is not None and ports_of(listeners) - ports_of(left.listeners):
            await self._guard(other, left.listeners)

    async def _remove_policy(self, key: PipelineKey) -> None:
        if self._settings.worker_peers is not None:
            await self._delete_owned(key, "NetworkPolicy", pipeline_object_name(key))

    async def _guard(self, key: PipelineKey, listeners: tuple[Listener, ...]) -> None:
        """The Pipeline's NetworkPolicy, made or brought up to date before its pod serves
        (where the administrator named the worker's peers): the input ports of ``listeners``
        and of the other slot's instance, if any (a candidate warming up beside the active
        one takes no port from it)."""
        peers = self._settings.worker_peers
        if peers is None:
            return
        other = self._held(self._other(key))
        body = network_policy(key, listeners + (other.listeners if other else ()), peers)
        try:
            await self._create_owned(key, "NetworkPolicy", body)
        except k8s.ApiException as err:
            if err.status != 409:  # 409 here: its own, left by an earlier pod
                raise
            await self._call(
                self._networking.patch_namespaced_network_policy,
                body["metadata"]["name"],
                key.namespace,
                {"spec": body["spec"]},
            )

    # -- the two slots --

    @staticmethod
    def _other(key: PipelineKey) -> PipelineKey:
        """The same Pipeline's other slot."""
        return key.candidate if key.slot is Slot.active else key.active

    def _held(self, key: PipelineKey) -> _Runtime | None:
        """The instance the slot holds: running, or kept for its next deploy."""
        return self._runtimes.get(key) or self._idle.get(key)

    def _busy(self, key: PipelineKey) -> bool:
        """An operation holds or waits for the slot (``busy``, without making it a lock)."""
        lock = self._locks.get(key)
        return lock is not None and lock.locked()

    def _pods_held(self, key: PipelineKey) -> set[str]:
        """The names of the pods the Pipeline's two slots hold."""
        held = (self._held(k) for k in (key.active, key.candidate))
        return {runtime.pod for runtime in held if runtime is not None}

    async def _delete_owned(
        self, key: PipelineKey, kind: str, name: str, grace_s: int | None = None
    ) -> None:
        """Delete the Pipeline's pod, Secret or Service ``name`` if the Pipeline owns it; gone
        already is fine. The uid precondition keeps the delete from reaching an object that
        took the name after the read."""
        read, delete = self._kinds[kind][1:3]
        found = await self._read(read, key, name)
        if found is None:
            return
        if not (owned_by(found, key) or (kind == "Secret" and token_of(found, key, name))):
            log.warning("not deleting %s: the Pipeline does not own it", name, extra=key.log_extra)
            return
        body = k8s.V1DeleteOptions(
            grace_period_seconds=grace_s,
            preconditions=k8s.V1Preconditions(uid=found["metadata"]["uid"]),
        )
        try:
            await self._call(delete, name, key.namespace, body=body)
        except k8s.ApiException as err:
            if err.status not in (404, 409):  # 409: another object holds the name now
                raise _api_failure(err, Step.delete) from None

    async def _wait_serving(self, key: PipelineKey, name: str) -> dict[str, Any]:
        """The pod ``name`` once it is Ready, or the reason it will not be."""
        began = time.monotonic()
        deadline = began + POD_READY_TIMEOUT_S
        pod = await self._read_pod(key, name)  # the first look: the watch may lag the create
        while time.monotonic() < deadline:
            if pod is None:
                raise PipelineFailure(
                    FailureReason.RuntimeUnavailable,
                    Step.create,
                    f"pod {name} was deleted before it was ready",
                )
            problem = pod_problem(pod, await self._evicted(pod))
            if problem is not None:
                problem.step = Step.create
                raise problem
            if is_ready(pod):
                return pod
            if time.monotonic() - began > self._settings.pod_start_timeout_s and placed(pod):
                warning = await self._kubelet_warning(pod)
                if warning:
                    raise PipelineFailure(
                        FailureReason.PodNotStarted,
                        Step.create,
                        f"pod {name} did not start within "
                        f"{self._settings.pod_start_timeout_s:g} s: {warning}",
                    )
            await self._changed(key, name, FALLBACK_POLL_S if self.watched else POLL_S)
            pod = await self._pod(key, name)
        raise PipelineFailure(
            FailureReason.RuntimeUnavailable,
            Step.create,
            f"pod {name} was not ready within {POD_READY_TIMEOUT_S:g} s",
        )

    async def _previous_gone(self, key: PipelineKey) -> None:
        """Wait until the Pipeline's pods on their way out (deleted or evicted from outside,
        or removed for a pod of another template) are gone, but for the other slot's: each
        pod has a name of its own, but a leaving pod holds what it asked for (a GPU, memory)
        through its grace period, and its replacement would be Unschedulable meanwhile where
        the node has room for one. Bounded by the leaving pods' grace periods and a margin."""
        other = self._held(self._other(key))
        if self.watched and {key.active, key.candidate} & self._looked:
            # Adoption listed the Pipeline's pods and kept those leaving (``_adopt``); the
            # watch has filed every change since: no list here.
            pods = [pod for pod in self._seen.get(key.uid, {}).values() if pod is not None]
        else:
            pods = await self._owned(key, "pod")
        leaving = [
            pod
            for pod in pods
            if pod["metadata"].get("deletionTimestamp")
            and (other is None or pod["metadata"]["name"] != other.pod)
        ]
        graces = [(pod.get("spec") or {}).get("terminationGracePeriodSeconds") for pod in leaving]
        longest = max((float(g if g is not None else 30) for g in graces), default=0.0)
        deadline = time.monotonic() + longest + GONE_MARGIN_S
        for pod in leaving:
            name: str = pod["metadata"]["name"]
            found: dict[str, Any] | None = pod
            while found is not None and time.monotonic() < deadline:
                await self._changed(key, name, GONE_POLL_S)
                found = await self._pod(key, name)

    async def _ended(self, key: PipelineKey, name: str) -> PipelineFailure | None:
        """Why the worker of the pod ``name`` stopped answering, if its container ended
        (OOMKilled, an exit) or the pod is going: the kubelet reports it within about a
        second."""
        deadline = time.monotonic() + ENDED_WAIT_S
        while True:
            pod = await self._read_pod(key, name)
            evicted = await self._evicted(pod)
            removed = removed_from_outside(pod, evicted)
            if pod is None or removed:
                return PipelineFailure(
                    FailureReason.RuntimeUnavailable, Step.run, gone(name, removed)
                )
            problem = pod_problem(pod, evicted)
            if problem is not None or time.monotonic() >= deadline:
                return problem
            await self._changed(key, name, POLL_S * 2)

    async def _check_plugins(self, client: JuturnaClient, plan: Plan) -> None:
        """The graph checks that read plugin files, run by the worker against the plugins of
        the pod's own image (which may hold other plugins than the operator's): a missing or
        disallowed plugin fails here, before warmup, as it would in the operator."""
        if plan.plugins is None:
            return
        answer = await client.request(
            "POST",
            "/operator/validate",
            Step.validate,
            VALIDATE_TIMEOUT_S,
            json={"spec": plan.plugins.spec, "policy": plan.plugins.policy.to_json()},
        )
        failure = answer.get("failure")
        if failure:
            raise PipelineFailure(
                FailureReason[failure["reason"]], Step.validate, str(failure["message"])
            )
        for warning in answer.get("warnings") or []:
            plan.plugins.warn(str(warning))

    async def _kubelet_warning(self, pod: dict[str, Any]) -> str:
        """The kubelet's latest Warning about this pod (``reason: message``), or ''."""
        found = await self._events(pod, "type=Warning,source=kubelet")
        if not found:
            return ""
        last = found[-1]  # listed in the order they were made
        return f"{last.reason}: {str(last.message or '').strip()}"

    async def _events(self, pod: dict[str, Any], selector: str) -> list[Any]:
        """The Events about this pod that ``selector`` picks ([] where they cannot be read:
        said in the log)."""
        meta = pod["metadata"]
        try:
            found = await self._call(
                self._core.list_namespaced_event,
                meta["namespace"],
                field_selector=f"involvedObject.uid={meta['uid']},{selector}",
            )
        except k8s.ApiException as err:
            log.warning("cannot read the Events of pod %s: %s", meta["name"], err.reason)
            return []
        return list(found.items)

    async def _evicted(self, pod: dict[str, Any] | None) -> str:
        """The kubelet's eviction message for this pod, or ''. A pod whose worker exited 0
        may have been evicted with its status saying nothing: the kubelet's last status
        (phase Succeeded, no reason) replaces the one with its reason when the container
        ends quickly. Its Warning Event keeps the words; it may lag the status a little."""
        if pod is None:
            return ""
        if eviction_in_status(pod) or not ended_by_kubelet(pod):
            return eviction_in_status(pod)
        deadline = time.monotonic() + ENDED_WAIT_S
        while True:
            found = await self._events(pod, "reason=Evicted")
            if found:
                return str(found[-1].message or "").strip() or "by the kubelet"
            if time.monotonic() >= deadline:
                return ""
            await asyncio.sleep(POLL_S * 2)

    @staticmethod
    def _client(pod: dict[str, Any], token: str) -> JuturnaClient:
        return JuturnaClient(f"http://{pod['status']['podIP']}:{PORT}", token=token)

    # -- the Engine interface --

    async def _create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan
    ) -> str:
        template = plan.template
        vacant(self._runtimes, key)
        config = bound_in_pod(config, list(plan.listeners))
        if (template or {}).get("image") and not self._settings.allow_image_override:
            raise PipelineFailure(
                FailureReason.ImageNotAllowed,
                Step.create,
                "spec.template.image is set, but the administrator does not allow image "
                "overrides (JUTURNA_OPERATOR_ALLOW_IMAGE_OVERRIDE)",
            )
        made_from = template_hash(template, self._settings)
        idle = self._idle.pop(key, None)
        if idle is not None and idle.template == made_from:
            return await self._redeploy(key, idle, config, revision, plan)
        if idle is not None:  # another template: another pod
            self._idle[key] = idle
            await self._end(key)
        instance = new_instance()
        name = self._lock(key).pod = pod_name(key, instance)
        pod_body = runtime_pod(
            key, revision, self._settings, template, instance, plan.listeners, time.time_ns()
        )
        self._known[key.uid] = key.active
        await self._previous_gone(key)
        token = secrets.token_urlsafe(32)
        new_address = key.uid not in self._services
        refused = False
        try:
            # The address first: its DNS name and ClusterIP exist while the pod starts, and
            # once the pipeline runs only the Service's endpoints change (``_serve``: the
            # active slot's only; a candidate leaves the address where it is). A Pipeline
            # that listens on nothing has none: nothing is written here.
            await self._serve(key, plan.listeners, NO_POD)
            await self._guard(key, plan.listeners)
            try:
                # The API server (and its admission, Pod Security included) checks the pod
                # as it creates it: what it refuses is InvalidSpec with its own message, and
                # the address made for it goes below (no dry run beforehand: a round trip).
                made = await self._create_owned(key, "pod", pod_body)
            except (k8s.ApiException, ValueError) as err:
                refused = True
                raise pod_refused(err) from None
            # Then its token: a Secret the pod controls. The kubelet mounts it once it
            # exists (the pod waits for it, in ContainerCreating, for a moment at most).
            await self._create_owned(
                key, "Secret", token_secret(key, token, name, str(made.metadata.uid))
            )
            pod = await self._wait_serving(key, name)
            client = self._client(pod, token)
            await self._check_plugins(client, plan)
            pipeline_id, state = await self._deploy(key, client, config, plan.until)
            serving = instance if state is InstanceState.Running else NO_POD
            await self._serve(key, plan.listeners, serving)
        except k8s.ApiException as err:
            await self._let_go(key, name, plan.listeners)
            raise _api_failure(err, Step.create) from None
        except BaseException:
            # A failed create leaves no half-built instance, and takes nothing of the other
            # slot's; a refused pod leaves nothing at all.
            await self._let_go(key, name, plan.listeners)
            if refused and new_address:
                await self._serve(key, (), NO_POD)
            raise
        node = (pod.get("spec") or {}).get("nodeName")
        self._runtimes[key] = _Runtime(
            name,
            revision,
            client,
            pipeline_id,
            state,
            node=node,
            template=made_from,
            instance=instance,
            listeners=plan.listeners,
        )
        return pipeline_id

    async def _create_owned(self, key: PipelineKey, kind: str, body: dict[str, Any]) -> Any:
        """Create the Pipeline's pod, Secret, Service or NetworkPolicy. Its
        name taken by an object the Pipeline does not own is ``NameConflict``; by its own (on
        its way out, or left by an earlier process), the API's 409, raised."""
        create, read = self._kinds[kind][:2]
        name = body["metadata"]["name"]
        try:
            return await self._call(create, key.namespace, body)
        except k8s.ApiException as err:
            if err.status == 409:
                found = await self._read(read, key, name)
                if found is not None and not (
                    owned_by(found, key) or (kind == "Secret" and token_of(found, key, name))
                ):
                    raise name_conflict(kind, key, Step.create, name) from None
            raise

    async def _redeploy(
        self,
        key: PipelineKey,
        runtime: _Runtime,
        config: dict[str, Any],
        revision: str,
        plan: Plan,
    ) -> str:
        """A new instance in the pod the last one left: no new pod, no image start. The pod
        keeps its name, its Secret and its slot."""
        self._lock(key).pod = runtime.pod
        try:
            await self._guard(key, plan.listeners)  # its input ports may have changed
            await self._check_plugins(runtime.client, plan)  # its plugins may have
            runtime.pipeline_id, state = await self._deploy(key, runtime.client, config, plan.until)
            serving = runtime.instance if state is InstanceState.Running else NO_POD
            await self._serve(key, plan.listeners, serving)
            kept = {
                "juturna.io/revision": revision,
                LISTENERS_ANNOTATION: described(plan.listeners),
            }
            await self._call(
                self._core.patch_namespaced_pod,
                runtime.pod,
                key.namespace,
                {"metadata": {"annotations": kept}},
            )
        except BaseException:
            await runtime.client.close()
            await self._let_go(key, runtime.pod, plan.listeners + runtime.listeners)
            raise
        runtime.revision, runtime.state, runtime.listeners = revision, state, plan.listeners
        self._runtimes[key] = runtime
        return runtime.pipeline_id

    async def _warmup(self, key: PipelineKey) -> None:
        runtime = held(self._runtimes, key, Step.warmup)
        await runtime.client.warmup(runtime.pipeline_id, WARMUP_TIMEOUT_S)
        runtime.state = InstanceState.Ready

    async def _start(self, key: PipelineKey) -> None:
        runtime = held(self._runtimes, key, Step.start)
        await runtime.client.start(runtime.pipeline_id)
        runtime.state = InstanceState.Running
        await self._serve(key, runtime.listeners, runtime.instance)  # a candidate: not yet

    async def _stop(self, key: PipelineKey) -> None:
        runtime = held(self._runtimes, key, Step.stop)
        await self._serve(key, runtime.listeners, NO_POD)  # senders reach no stopped source
        if runtime.state is InstanceState.Running and not runtime.gone:
            timeout = self._settings.stop_timeout_s
            try:
                await runtime.client.stop(runtime.pipeline_id, timeout)
            except PipelineFailure as failure:
                if failure.reason is not FailureReason.RuntimeUnavailable:
                    raise
                if await self._ended(key, runtime.pod) is not None:  # nothing runs there
                    runtime.gone, runtime.state = True, InstanceState.Spent
                    return
                await self._end(key)  # the cure for a hung stop: the pod goes
                raise PipelineFailure(
                    FailureReason.StopTimeout,
                    Step.stop,
                    f"stop did not finish within {timeout:g} s; pod {runtime.pod} was deleted",
                ) from failure
        runtime.state = InstanceState.Spent

    # -- a warm swap's primitive --

    two_slots = True

    def warm_swap(self, plan: Plan) -> str | None:
        """Always: each instance has a pod of its own, and the Service's selector is the one
        thing that says which serves."""
        return None

    async def promote(self, key: PipelineKey) -> None:
        """The candidate (Running) takes the Pipeline's address and the active slot; the
        active instance moves to the candidate slot, still running, retired: it gets no new
        traffic and is never promoted again. With no promotable candidate (promoted already,
        its predecessor retired or removed) and an active instance, nothing to do.

        Crash-safe in this order (``place`` reads it back): the candidate's pod is marked
        active (since now), the Service selects it, the old pod is marked retired."""
        await self.both_slots(key, self._promote, key.active)

    async def _promote(self, key: PipelineKey) -> None:
        candidate = promotable(
            self._runtimes,
            key,
            lambda r: r.retired,
            lambda r: "gone" if r.gone else r.state.value,
            lambda r: f"pod {r.pod}",
            "takes the Pipeline's address",
        )
        if candidate is None:
            return  # promoted already
        await self._mark(key, candidate.pod, Slot.active.value, time.time_ns())
        await self._serve(key, candidate.listeners, candidate.instance)
        previous = swap_slots(self._runtimes, key)
        if previous is None:
            return
        previous.retired = True
        try:  # legibility only: of two pods marked active, the later one's mark wins
            await self._mark(key, previous.pod, RETIRED)
        except (k8s.ApiException, PipelineFailure) as err:
            log.warning("pod %s not marked retired: %s", previous.pod, err, extra=key.log_extra)
        log.info("pod %s serves; pod %s retired", candidate.pod, previous.pod, extra=key.log_extra)

    async def _mark(self, key: PipelineKey, pod: str, slot: str, since: int = 0) -> None:
        """Record a pod's slot on it (``SLOT_LABEL``; ``since``: ``ACTIVE_SINCE``)."""
        meta: dict[str, Any] = {"labels": {SLOT_LABEL: slot}}
        if since:
            meta["annotations"] = {ACTIVE_SINCE: str(since)}
        try:
            await self._call(
                self._core.patch_namespaced_pod, pod, key.namespace, {"metadata": meta}
            )
        except k8s.ApiException as err:
            if err.status != 404:  # gone: nothing to mark
                raise _api_failure(err, Step.start) from None

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        # keep_output: a runtime's or a pod's folder is not the operator's to carry over.
        # Without it the Pipeline itself goes, and its Service with it; else the Service
        # stays, and so does its address (a Stopped Pipeline, a pod replaced). A candidate
        # never touches it (``_serve``).
        if not keep_output:
            await self.exclusive(key, self._serve, key, (), NO_POD)
        if not release:
            await self.exclusive(key, self._park, key)
            return
        await self.exclusive(key, self._end, key)
        self.drop_lock(key)
        if any(self._held(k) or self._busy(k) for k in (key, self._other(key))):
            return  # an instance (the other slot's, or one being made) needs what it has
        self._known.pop(key.uid, None)
        self._seen.pop(key.uid, None)
        self._changes.pop(key.uid, None)
        self._services_looked.discard(key.uid)
        if not keep_output:  # the Pipeline is gone: nothing more to look for
            self._looked.difference_update((key.active, key.candidate))

    async def _park(self, key: PipelineKey) -> None:
        """Delete the pipeline but keep its pod, if healthy, for the deploy that follows."""
        runtime = self._runtimes.get(key)
        if runtime is None or runtime.gone or not runtime.healthy:
            await self._end(key)
            return
        try:
            if runtime.state is InstanceState.Running:
                await runtime.client.stop(runtime.pipeline_id, self._settings.stop_timeout_s)
            await runtime.client.delete(runtime.pipeline_id, self._settings.stop_timeout_s)
        except PipelineFailure as failure:
            log.info("not keeping pod %s: %s", runtime.pod, failure, extra=key.log_extra)
            await self._end(key)
            return
        del self._runtimes[key]
        runtime.pipeline_id, runtime.idle_since = "", time.monotonic()
        self._idle[key] = runtime

    async def _end(self, key: PipelineKey) -> None:
        """Remove the slot's instance: its pod and Secret, never the other slot's."""
        ended: list[_Runtime] = []
        idle = self._idle.pop(key, None)
        if idle is not None:
            await idle.client.close()
            ended.append(idle)
        runtime = self._runtimes.pop(key, None)
        if runtime is not None:
            if runtime.state is InstanceState.Running and not runtime.gone:
                try:  # a bounded stop first: the nodes end their work cleanly
                    await runtime.client.stop(runtime.pipeline_id, self._settings.stop_timeout_s)
                except PipelineFailure as failure:
                    log.info("stop before delete: %s", failure, extra=key.log_extra)
            await runtime.client.close()
            ended.append(runtime)
        names = {r.pod: r.listeners for r in ended}
        if not names and key not in self._looked:
            # Never looked at by this process (status adopts first): what the cluster says.
            await self._adopt_service(key)
            pod = place(await self._owned(key, "pod"), self._selected(key)).of(key.slot)
            if pod is not None:
                names[pod["metadata"]["name"]] = listeners_in(pod["metadata"]) or ()
        for name, listeners in names.items():
            await self._let_go(key, name, listeners)
        other = self._other(key)
        if not names and self._held(other) is None and not self._busy(other):
            # Nothing here or there: the NetworkPolicy a killed process left still goes.
            await self._remove_policy(key)

    async def status(self, key: PipelineKey) -> InstanceInfo | None:
        runtime = self._runtimes.get(key)
        idle = self._idle.get(key)
        if idle is not None and not self.busy(key):
            if time.monotonic() - idle.idle_since > IDLE_S:
                await self.exclusive(key, self._end, key)
            return None
        if runtime is None:
            # One look per slot: a Pipeline without a candidate costs no call for it.
            if key in self._looked or self._busy(key.active) or self._busy(key.candidate):
                return None
            runtime = await self.both_slots(key, self._adopt, key)
            if runtime is None:
                return None
        info = InstanceInfo(key, runtime.pipeline_id, runtime.revision, runtime.state)
        info.pod = (runtime.pod, runtime.node)
        info.addresses = self._addresses(key)
        if self.busy(key):
            return info
        pod = await self._pod(key, runtime.pod)
        if pod is not None:
            runtime.node = (pod.get("spec") or {}).get("nodeName")
            info.pod = (runtime.pod, runtime.node)
        evicted = await self._evicted(pod)
        removed = removed_from_outside(pod, evicted)
        if pod is None or removed:
            # Deleted or evicted from outside: the infrastructure's doing, not the pipeline's.
            runtime.gone = True
            info.failure = PipelineFailure(
                FailureReason.RuntimeUnavailable,
                Step.run,
                f"{gone(runtime.pod, removed)}; a new one replaces it",
            )
            return info
        problem = pod_problem(pod, evicted)
        if problem is not None:
            runtime.gone = True
            info.crashes = [NodeCrash(WHOLE_RUNTIME, runtime.pod, problem.message)]
            return info
        mark = health_mark(pod, runtime)
        if (
            self.watched
            and runtime.health is not None
            and runtime.health_of == mark
            and time.monotonic() - runtime.health_at < HEALTH_RESYNC_S
        ):
            # Nothing changed that the kubelet would show: the last answer holds, no request.
            apply_health(info, runtime.health)
            return info
        try:
            self.health_asks += 1
            health = await runtime.client.request("GET", "/operator/health", Step.run, 2.0)
        except AnswerTooLarge as failure:
            runtime.healthy = False  # the redeploy gets a new pod, not this one's answers
            info.failure = failure
            return info
        except PipelineFailure as failure:
            ended = await self._ended(key, runtime.pod)  # the kubelet's words beat "cannot connect"
            runtime.gone = ended is not None
            if ended is not None and ended.reason is FailureReason.RuntimeUnavailable:
                # The pod went (deleted, evicted) between the look above and the request:
                # the infrastructure's doing, as when the look sees it, not a crash.
                info.failure = PipelineFailure(
                    FailureReason.RuntimeUnavailable,
                    Step.run,
                    f"{ended.message}; a new one replaces it",
                )
                return info
            cause = ended.message if ended is not None else failure.message
            info.crashes = [NodeCrash(WHOLE_RUNTIME, runtime.pod, cause)]
            return info
        apply_health(info, health)
        runtime.healthy = not info.crashes
        runtime.health, runtime.health_of, runtime.health_at = health, mark, time.monotonic()
        return info

    async def _adopt(self, key: PipelineKey) -> _Runtime | None:
        """The pods a previous operator process left for this Pipeline, each in the slot it
        had (``place``), under both slots' locks: their pipelines keep running, and this
        process drives them from now on (no redeploy). Both slots are looked at once: the
        other slot's status then costs nothing. What no slot holds goes: pods beyond the two,
        a pod that cannot be adopted, and the NetworkPolicy of a Pipeline left with no pod (a
        process killed while it removed one, or before it made it). A Secret of no pod goes
        with its pod, by the garbage collector (the pod controls it)."""
        self._known[key.uid] = key.active
        slots = [
            k
            for k in (key.active, key.candidate)
            if k == key or (k not in self._looked and self._held(k) is None)
        ]
        self._looked.update(slots)
        pods, fallback = await asyncio.gather(self._owned(key, "pod"), self._adopt_service(key))
        if self.watched:
            # The pods on their way out, for ``_previous_gone``: the watch files every change
            # from here on (the Pipeline is known), so together they are the whole picture.
            seen = self._seen.setdefault(key.uid, {})
            for pod in pods:
                if pod["metadata"].get("deletionTimestamp"):
                    seen.setdefault(pod["metadata"]["name"], pod)
        placement = place(pods, self._selected(key))
        mine = self._pods_held(key)  # made by this process
        for slot_key in slots:
            pod = placement.of(slot_key.slot)
            if pod is not None and pod["metadata"]["name"] not in mine:
                await self._adopt_pod(slot_key, pod, placement, fallback)
        kept = self._pods_held(key)
        for pod in placement.strays:
            if pod["metadata"]["name"] not in mine:
                log.warning(
                    "removing pod %s: in neither slot", pod["metadata"]["name"], extra=key.log_extra
                )
                await self._remove(key, pod["metadata"]["name"])
        if not kept:
            await self._remove_policy(key)
        return self._runtimes.get(key)

    async def _adopt_pod(
        self,
        key: PipelineKey,
        pod: dict[str, Any],
        placement: Placed[dict[str, Any]],
        fallback: tuple[Listener, ...],
    ) -> None:
        """Adopt one pod into ``key``'s slot; one that cannot be (not serving, no token, no
        answer, no pipeline) goes, with its Secret, and nothing else."""
        meta = pod["metadata"]
        name = meta["name"]
        if not worker_running(pod):
            await self._remove(key, name)  # no worker to ask: the lifecycle deploys anew
            return
        try:
            # Read by name, never listed: the operator has no right to list Secrets.
            secret = await self._read(self._core.read_namespaced_secret, key, name)
            if secret is None or not token_of(secret, key, name, meta.get("uid", "")):
                raise KeyError("no token Secret of the pod")
            token = base64.b64decode(secret["data"]["token"]).decode()
            client = self._client(pod, token)
            self.health_asks += 1
            health = await client.request("GET", "/operator/health", Step.run, 5.0)
        except (KeyError, PipelineFailure) as err:
            log.warning("cannot adopt pod %s: %s", name, err, extra=key.log_extra)
            await self._remove(key, name)
            return
        for entry in health.get("pipelines", []):
            for pipeline_id, status in entry.items():
                state = JUTURNA_STATE.get(status.get("self", ""), InstanceState.Created)
                annotations = meta.get("annotations") or {}
                runtime = _Runtime(name, annotations.get("juturna.io/revision", ""), client)
                runtime.pipeline_id, runtime.state = pipeline_id, state
                runtime.node = (pod.get("spec") or {}).get("nodeName")
                runtime.template = annotations.get(TEMPLATE_ANNOTATION, "")
                runtime.instance = (meta.get("labels") or {}).get(INSTANCE_LABEL, NO_POD)
                # An older operator's pod keeps none: its Service's are its own.
                runtime.listeners = listeners_in(meta) or fallback
                runtime.retired = key.slot is Slot.candidate and placement.retired
                self._runtimes[key] = runtime
                mark = placement.mark(key.slot)
                if SLOT_LABEL in (meta.get("labels") or {}) and slot_mark(pod) != mark:
                    try:  # what a killed promote left, settled (``place`` decides without)
                        await self._mark(key, name, mark)
                    except PipelineFailure as failure:
                        log.warning("pod %s not marked %s: %s", name, mark, failure)
                log.info("adopted pod %s (%s)", name, mark, extra=key.log_extra)
                return
        await client.close()
        await self._remove(key, name)

    # -- the Pipeline's Service --

    async def _serve(
        self, key: PipelineKey, listeners: tuple[Listener, ...], instance: str
    ) -> None:
        """The Pipeline's Service as ``listeners`` say, pointing at ``instance``'s pod: made,
        changed with one merge patch (ports, selector), or removed when nothing listens. A
        Service of its name that the Pipeline does not own is ``NameConflict``. The active
        slot's only: a candidate never moves the Pipeline's address (``promote`` does)."""
        if key.slot is not Slot.active:
            return
        current = self._services.get(key.uid)
        if not listeners:
            # One this process does not know of (made by an earlier process, which this one
            # never adopted: the Pipeline had no pod then, or the adoption failed) is looked
            # for once: a Pipeline that stopped listening keeps no Service.
            if current is not None or key.uid not in self._services_looked:
                self._services.pop(key.uid, None)
                self._services_looked.add(key.uid)
                await self._delete_owned(key, "Service", service_name(key))
            return
        if current is not None and (current.listeners, current.instance) == (listeners, instance):
            return
        body = service_body(key, listeners, instance)
        try:
            if current is None:
                made = await self._create_owned(key, "Service", body)
            else:
                made = await self._patch_service(key, body)
        except k8s.ApiException as err:
            if err.status != 409:
                raise _api_failure(err, Step.create) from None
            made = await self._patch_service(key, body)  # ours, from an earlier process
        cluster_ip = getattr(made.spec, "cluster_ip", None)
        self._services[key.uid] = _Service(service_name(key), cluster_ip, listeners, instance)

    async def _patch_service(self, key: PipelineKey, body: dict[str, Any]) -> Any:
        # A merge patch replaces the ports list whole (a strategic one would merge by port).
        change = {
            "metadata": {"annotations": body["metadata"]["annotations"]},
            "spec": body["spec"],
        }
        return await self._call(
            self._core.patch_namespaced_service,
            service_name(key),
            key.namespace,
            change,
            _content_type="application/merge-patch+json",
        )

    async def _adopt_service(self, key: PipelineKey) -> tuple[Listener, ...]:
        """The Service a previous operator process made for this Pipeline, if any: what it
        listens on (its annotation) and where it points."""
        found = await self._read(self._core.read_namespaced_service, key, service_name(key))
        if found is None or not owned_by(found, key):
            self._services_looked.add(key.uid)  # none: ``_serve`` need not look again
            return ()
        listeners = listeners_in(found["metadata"])
        if listeners is None:
            return ()
        instance = ((found.get("spec") or {}).get("selector") or {}).get(INSTANCE_LABEL, NO_POD)
        self._services[key.uid] = _Service(
            service_name(key), (found.get("spec") or {}).get("clusterIP"), listeners, instance
        )
        return listeners

    def _selected(self, key: PipelineKey) -> str:
        """The instance the Pipeline's Service selects, as last written or adopted."""
        service = self._services.get(key.uid)
        return service.instance if service is not None else NO_POD

    def _addresses(self, key: PipelineKey) -> tuple[Address, ...]:
        """The Pipeline's addresses (its Service's), for the active slot: a candidate has
        none until it is promoted."""
        service = self._services.get(key.uid)
        if service is None or key.slot is not Slot.active:
            return ()
        host = f"{service.name}.{key.namespace}.svc"
        return tuple(
            Address(ln.node, ln.name, ln.protocol, host, ln.port, service.cluster_ip)
            for ln in service.listeners
        )

    async def sweep(self, keep: dict[str, str | None]) -> list[str]:
        """Nothing to do: each pod is owned by its Pipeline, and the garbage collector
        removes the pods and Secrets of deleted Pipelines, operator or not."""
        return []

    async def close(self) -> None:
        """Leave the pods running: the next operator process adopts them."""
        for runtime in self._runtimes.values():
            await runtime.client.close()


def pod_refused(err: k8s.ApiException | ValueError) -> PipelineFailure:
    """Why the pipeline's pod could not be created: the API server's refusal, or the
    client's own check of the Pod before any request."""
    if isinstance(err, k8s.ApiException):
        return _api_failure(err, Step.create)
    lines = str(err).splitlines()
    return PipelineFailure(
        FailureReason.InvalidSpec,
        Step.create,
        f"the pipeline's pod is not a valid Pod: {lines[0]} ({'; '.join(lines[1:3])})",
    )


def _api_failure(err: k8s.ApiException, step: Step) -> PipelineFailure:
    """The API server's refusal in its own words: 4xx means the Pod as built cannot exist
    (``InvalidSpec``, e.g. a Pod Security violation); anything else is transient, and so is
    a ServiceAccount that does not exist yet (``MISSING_ACCOUNT``)."""
    message = api_server_message(err.body) or err.reason
    if err.status == 403 and MISSING_ACCOUNT in str(message):
        return PipelineFailure(
            FailureReason.RuntimeUnavailable,
            step,
            f"the API server refuses the pipeline's pod for now: {message}; tried again "
            "until the account exists",
        )
    if err.status is not None and 400 <= err.status < 500 and err.status not in (404, 409, 429):
        return PipelineFailure(
            FailureReason.InvalidSpec, step, f"the API server refuses the pipeline's pod: {message}"
        )
    return PipelineFailure(FailureReason.RuntimeUnavailable, step, f"API {err.status}: {message}")
