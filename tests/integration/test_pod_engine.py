"""The pod engine on the real node: each Pipeline runs in a Pod of its own, in its namespace,
with no API rights, under the restricted Pod Security Standard."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from support import Kubectl, Operator, Pipelines, assert_sole_operator, manifest, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.own_operator]
MANAGED = "app.kubernetes.io/managed-by=juturna-operator"


@pytest.fixture
def pod_operator(
    request: pytest.FixtureRequest, node_image: str, crd: None, kubeconfig: Path, tmp_path: Path
) -> Iterator[Operator]:
    """The operator as a local process with the pod engine; its pods run the test image (or
    the image a test names with ``@pytest.mark.parametrize("pod_operator", [image], ...)``)."""
    assert_sole_operator(kubeconfig)
    op = Operator(kubeconfig, tmp_path / "work", tmp_path / "operator.log", tmp_path, "pod")
    op.env["JUTURNA_OPERATOR_RUNTIME_IMAGE"] = getattr(request, "param", node_image)
    op.env["JUTURNA_OPERATOR_RUNTIME_PULL_POLICY"] = "Never"
    op.start()
    try:
        yield op
    finally:
        op.stop()


def managed(kubectl: Kubectl, kind: str, namespace: str) -> list[dict[str, Any]]:
    listed = kubectl("get", kind, "-n", namespace, "-l", MANAGED, "-o", "json").stdout
    return list(json.loads(listed)["items"])


def output_lines(kubectl: Kubectl, pod: str, namespace: str, pipeline_id: str) -> int:
    out = f"/var/lib/juturna/*_{pipeline_id}/out/output.jsonl"
    script = f"cat {out} | wc -l"
    return int(kubectl("exec", "-n", namespace, pod, "--", "sh", "-c", script).stdout)


def assert_output_grows(kubectl: Kubectl, pod: str, namespace: str, pipeline_id: str) -> None:
    first = output_lines(kubectl, pod, namespace, pipeline_id)
    wait_until(
        lambda: output_lines(kubectl, pod, namespace, pipeline_id) > first,
        20,
        f"the output growing inside pod {pod}",
    )


@pytest.mark.timeout(300)
def test_a_pipeline_runs_in_a_pod_of_its_own_with_no_api_rights(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(manifest("tones"))
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
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert not any("kube-api-access" in v["name"] for v in spec["volumes"])
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert_output_grows(kubectl, name, namespace, pipeline_id)

    # The token: in a Secret owned by the Pipeline, nowhere a user reads.
    (secret,) = managed(kubectl, "secrets", namespace)
    assert secret["metadata"]["name"] == name
    assert secret["metadata"]["ownerReferences"][0]["uid"] == uid
    token = kubectl("get", "secret", name, "-n", namespace, "-o", "jsonpath={.data.token}").stdout
    events = json.dumps(pipelines.events("tones"))
    assert token not in json.dumps(pipelines.get("tones")) + events + pod_operator.log_text()

    # Ready keeps the pod, warm; Stopped removes the pod and its Secret.
    pipelines.patch_spec("tones", {"state": "Ready"})
    body = pipelines.wait_phase("tones", "Ready", timeout=60)
    assert [p["metadata"]["uid"] for p in managed(kubectl, "pods", namespace)] == [
        pod["metadata"]["uid"]
    ]
    pipelines.patch_spec("tones", {"state": "Stopped"})
    pipelines.wait_phase("tones", "Stopped", timeout=60)
    wait_until(
        lambda: (
            not managed(kubectl, "pods", namespace) and not managed(kubectl, "secrets", namespace)
        ),
        60,
        "no pod and no Secret for a Stopped Pipeline",
    )
    pipelines.patch_spec("tones", {"state": "Running"})
    body = pipelines.wait_ready("tones", timeout=120)
    (pod,) = managed(kubectl, "pods", namespace)
    assert_output_grows(kubectl, pod["metadata"]["name"], namespace, body["status"]["pipelineId"])
    pipelines.delete("tones")
    pipelines.wait_gone("tones", timeout=60)
    wait_until(
        lambda: (
            not managed(kubectl, "pods", namespace) and not managed(kubectl, "secrets", namespace)
        ),
        60,
        "no pod and no Secret after the Pipeline is deleted",
    )
    assert "Traceback" not in pod_operator.log_text()


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
    failed = pipelines.wait(
        "tones",
        lambda b: (b["status"].get("failure") or {}).get("reason") == "RuntimeUnavailable",
        30,
        "RuntimeUnavailable while the pod is gone",
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
    assert_output_grows(kubectl, new["metadata"]["name"], namespace, body["status"]["pipelineId"])
    assert body["status"].get("restarts", 0) == 0


@pytest.mark.timeout(300)
def test_an_operator_restart_adopts_the_pod_and_the_output_never_stops(
    pod_operator: Operator, kubectl: Kubectl, objects: client.CustomObjectsApi, namespace: str
) -> None:
    pipelines = Pipelines(objects, namespace, kubectl)
    body, pod = running_example(pipelines, kubectl, namespace)
    name, pipeline_id = pod["metadata"]["name"], body["status"]["pipelineId"]
    pod_operator.kill()
    before = output_lines(kubectl, name, namespace, pipeline_id)
    pod_operator.start()
    wait_until(lambda: "adopted pod " + name in pod_operator.log_text(), 30, "the pod adopted")
    assert_output_grows(kubectl, name, namespace, pipeline_id)
    assert output_lines(kubectl, name, namespace, pipeline_id) > before
    body = pipelines.wait_ready("tones", timeout=30)
    assert body["status"]["pipelineId"] == pipeline_id  # not deployed again
    assert [p["metadata"]["uid"] for p in managed(kubectl, "pods", namespace)] == [
        pod["metadata"]["uid"]
    ]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pod_operator", ["localhost/juturna-operator:missing"], indirect=True)
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
    wait_until(
        lambda: (
            not managed(kubectl, "pods", namespace) and not managed(kubectl, "secrets", namespace)
        ),
        30,
        "no pod and no Secret after the failed create",
    )
