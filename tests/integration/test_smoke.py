"""Smoke tests: the local control plane is a real, working Kubernetes API."""

from __future__ import annotations

import time

import pytest
from kubernetes import client

from support import Kubectl

pytestmark = pytest.mark.cluster

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.juturna.io
spec:
  group: smoke.juturna.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1, maximum: 10}
"""


def widget(name: str, size: object) -> str:
    return f"""
apiVersion: smoke.juturna.io/v1
kind: Widget
metadata: {{name: {name}}}
spec: {{size: {size}}}
"""


def test_version_reports_the_pinned_release(kubectl: Kubectl) -> None:
    out = kubectl("version", "-o", "json").stdout
    assert '"gitVersion": "v1.37.2"' in out, out


def test_configmap_round_trip(core: client.CoreV1Api, namespace: str) -> None:
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm"), data={"k": "v"})
    core.create_namespaced_config_map(namespace, body)
    assert core.read_namespaced_config_map("cm", namespace).data == {"k": "v"}


@pytest.fixture(scope="module")
def widget_crd(kubectl: Kubectl) -> None:
    kubectl("apply", "-f", "-", input=WIDGET_CRD)
    kubectl("wait", "--for=condition=Established", "crd/widgets.smoke.juturna.io", "--timeout=30s")


@pytest.mark.usefixtures("widget_crd")
def test_custom_resource_is_stored(kubectl: Kubectl, namespace: str) -> None:
    kubectl("-n", namespace, "apply", "-f", "-", input=widget("w1", 3))
    size = kubectl("-n", namespace, "get", "widget", "w1", "-o", "jsonpath={.spec.size}").stdout
    assert size == "3"


@pytest.mark.usefixtures("widget_crd")
def test_server_side_dry_run_reports_the_schema_message(kubectl: Kubectl, namespace: str) -> None:
    proc = kubectl(
        "-n", namespace, "apply", "--dry-run=server", "-f", "-", input=widget("w2", 42), check=False
    )
    assert proc.returncode != 0
    assert "spec.size: Invalid value: 42: spec.size in body should be less than or equal to 10" in (
        proc.stderr
    ), proc.stderr
    # The dry run stored nothing.
    assert kubectl("-n", namespace, "get", "widget", "w2", check=False).returncode != 0


def test_namespace_deletion_completes(core: client.CoreV1Api) -> None:
    """Only kube-controller-manager's namespace controller finishes this deletion."""
    name = "smoke-ns-delete"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_config_map(
        name, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm"), data={"a": "b"})
    )
    core.delete_namespace(name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            core.read_namespace(name)
        except client.ApiException as err:
            gone = err.status
            break
        time.sleep(0.25)
    else:
        gone = None
    if gone == 404:
        return
    pytest.fail(
        f"namespace {name} still exists 60 s after deletion (is kube-controller-manager running?)"
    )
