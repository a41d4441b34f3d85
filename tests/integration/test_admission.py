"""The API server itself refuses bad manifests, with messages a person understands."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from juturna_operator import admission
from juturna_operator.api import PipelineSpec
from juturna_operator.convert import ConvertError, to_juturna
from support import Kubectl, manifest

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("crd")]

Mutation = Callable[[dict[str, Any]], None]
CONDITION = {
    "type": "Ready",
    "status": "True",
    "reason": "DesiredStateReached",
    "lastTransitionTime": "2026-12-07T10:00:00Z",
    "observedGeneration": 1,
}


def with_ports(*ports: dict[str, Any]) -> Mutation:
    return lambda s: s["nodes"][0].update(ports=list(ports))


CASES: list[tuple[str, Mutation, str]] = [
    (
        "a declared port on the pipeline pod's own",
        with_ports({"name": "http", "port": 8080}),
        'spec.nodes[0].ports[0]: Invalid value: port "http": TCP 8080 is the pipeline pod\'s '
        "own (the operator talks to the pipeline there); choose another",
    ),
    (
        "two declared ports of one name",
        with_ports({"name": "a", "port": 7000}, {"name": "a", "port": 7001}),
        'spec.nodes[0].ports: Invalid value: port names must be unique within a node: "a" '
        "appears more than once",
    ),
    (
        "two declared ports on one port and protocol",
        with_ports({"name": "a", "port": 7000}, {"name": "b", "port": 7000, "protocol": "TCP"}),
        'spec.nodes[0].ports: Invalid value: ports "a" and "b" both listen on TCP 7000',
    ),
    (
        "any port without the key to write it to",
        with_ports({"name": "a", "port": 0, "protocol": "UDP"}),
        'spec.nodes[0].ports[0]: Invalid value: port "a": port 0 (any) needs configKey',
    ),
    (
        "duplicate node names",
        lambda s: s["nodes"].append(dict(s["nodes"][0])),
        'spec: Invalid value: node names must be unique: "src" appears more than once',
    ),
    (
        "a link to no node",
        lambda s: s["links"].append({"from": "src", "to": "sinkk"}),
        "spec: Invalid value: link 2: 'to' names no node (got \"sinkk\")",
    ),
    (
        "a link from no node",
        lambda s: s["links"].append({"from": "srcc", "to": "out"}),
        "spec: Invalid value: link 2: 'from' names no node (got \"srcc\")",
    ),
    (
        "a self-link",
        lambda s: s["links"].append({"from": "amp", "to": "amp"}),
        'spec.links[2]: Invalid value: link from "amp" to itself is not allowed',
    ),
    (
        "a node name with a slash",
        lambda s: s["nodes"][2].update(name="a/b"),
        'spec.nodes[2]: Invalid value: node name "a/b" is not a safe folder name: use only '
        'letters, digits, "_" and "-"',
    ),
    (
        "a node name with a space",
        lambda s: s["nodes"][1].update(name="a b"),
        'spec.nodes[1]: Invalid value: node name "a b" is not a safe folder name',
    ),
    (
        "a node name ..",
        lambda s: s["nodes"][2].update(name=".."),
        'node name ".." is not a safe folder name',
    ),
    (
        "a mark that is not an identifier",
        lambda s: s["nodes"][0].update(mark="tick-er"),
        'spec.nodes[0]: Invalid value: node "src": mark "tick-er" must be a Python identifier',
    ),
    (
        "an absolute plugin folder",
        lambda s: s.update(plugins=["/opt/plugins"]),
        'spec.plugins[0]: Invalid value: "/opt/plugins": plugin folder "/opt/plugins" must be '
        'relative to a plugin root: no leading "/" and no ".."',
    ),
    (
        "a plugin folder with ..",
        lambda s: s.update(plugins=["tones/../../etc"]),
        'plugin folder "tones/../../etc" must be relative to a plugin root',
    ),
    (
        "a bad state",
        lambda s: s.update(state="Runing"),
        'spec.state: Unsupported value: "Runing": supported values: "Running", "Standby", '
        '"Stopped", "Ready"',
    ),
    (
        "a bad node type",
        lambda s: s["nodes"][0].update(type="src"),
        'spec.nodes[0].type: Unsupported value: "src": supported values: "source", "proc", "sink"',
    ),
    (
        "no nodes",
        lambda s: s.update(nodes=[], links=[]),
        "spec.nodes: Invalid value: 0: spec.nodes in body should have at least 1 items",
    ),
    (
        "an image pull secret without its name",
        lambda s: s.update(template={"imagePullSecrets": [{}]}),
        "spec.template.imagePullSecrets[0].name: Required value",
    ),
    (
        "a negative restart budget",
        lambda s: s.update(restartPolicy={"maxRestarts": -1}),
        "spec.restartPolicy.maxRestarts: Invalid value: -1: spec.restartPolicy.maxRestarts in "
        "body should be greater than or equal to 0",
    ),
]

# spec.template's Pod fields are Kubernetes' own types (the CRD carries the pinned version's
# schemas): a mistake fails at apply. ``convert`` does not repeat Kubernetes' Pod schemas: it
# leaves these to the API server (docs/pipeline-api.md says so).
POD_FIELD_CASES: list[tuple[str, Mutation, str]] = [
    (
        "a toleration's misspelt field",
        lambda s: s.update(template={"tolerations": [{"operater": "Exists"}]}),
        'strict decoding error: unknown field "spec.template.tolerations[0].operater"',
    ),
    (
        "a toleration operator Kubernetes does not have",
        lambda s: s.update(template={"tolerations": [{"operator": "Sometimes"}]}),
        'spec.template.tolerations[0].operator: Unsupported value: "Sometimes": supported '
        'values: "Equal", "Exists", "Gt", "Lt"',
    ),
    (
        "a node affinity that is no object",
        lambda s: s.update(template={"affinity": {"nodeAffinity": "ssd"}}),
        'spec.template.affinity.nodeAffinity: Invalid value: "string": '
        "spec.template.affinity.nodeAffinity in body must be of type object",
    ),
    (
        "an environment variable without its name",
        lambda s: s.update(template={"env": [{"value": "x"}]}),
        "spec.template.env[0].name: Required value",
    ),
    (
        "a claim without its name",
        lambda s: s.update(template={"volumes": [{"name": "m", "persistentVolumeClaim": {}}]}),
        "spec.template.volumes[0].persistentVolumeClaim.claimName: Required value",
    ),
    (
        "a mount without its path",
        lambda s: s.update(template={"volumeMounts": [{"name": "m"}]}),
        "spec.template.volumeMounts[0].mountPath: Required value",
    ),
    (
        "a quantity that is no quantity",
        lambda s: s.update(template={"resources": {"limits": {"cpu": "lots"}}}),
        'spec.template.resources.limits.cpu: Invalid value: "lots": '
        "spec.template.resources.limits.cpu in body should match",
    ),
]


@pytest.mark.reliability
@pytest.mark.parametrize(("what", "mutate", "message"), CASES, ids=[c[0] for c in CASES])
def test_rejected_at_admission(
    kubectl: Kubectl, namespace: str, what: str, mutate: Mutation, message: str
) -> None:
    body, refusal = refused_at_admission(kubectl, namespace, what, mutate, message)
    assert_convert_refuses_it_too(body, refusal)


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("what", "mutate", "message"), POD_FIELD_CASES, ids=[c[0] for c in POD_FIELD_CASES]
)
def test_pod_fields_of_kubernetes_types_are_checked_at_admission(
    kubectl: Kubectl, namespace: str, what: str, mutate: Mutation, message: str
) -> None:
    refused_at_admission(kubectl, namespace, what, mutate, message)


def refused_at_admission(
    kubectl: Kubectl, namespace: str, what: str, mutate: Mutation, message: str
) -> tuple[dict[str, Any], str]:
    """Applies (server-side dry run) the example changed by ``mutate``; the API server must
    refuse it with ``message`` among its words. Returns the manifest and the refusal."""
    body = manifest("bad")
    mutate(body["spec"])
    proc = kubectl(
        "-n", namespace, "apply", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False
    )
    assert proc.returncode != 0, f"{what} was accepted"
    assert message in proc.stderr, proc.stderr
    return body, proc.stderr


def assert_convert_refuses_it_too(body: dict[str, Any], refusal: str) -> None:
    """``convert`` refuses what the API server refused: with the CEL rule's words at the
    same field where the rule is CEL (``admission``); the schema's types, enums and bounds
    are pydantic's, in its own words."""
    try:
        spec = PipelineSpec.model_validate(body["spec"])
    except ValidationError:
        spec = None  # the schema refuses it: no CEL rule to compare
    if spec is not None:
        with pytest.raises(admission.Refused) as err:
            admission.check(spec)
        field, words = str(err.value).split(": ", 1)
        assert f"{field}: Invalid value: " in refusal, refusal
        assert words in refusal, refusal
    with pytest.raises(ConvertError):
        to_juturna(body)


@pytest.mark.reliability
def test_a_name_the_api_server_refuses_convert_refuses(kubectl: Kubectl, namespace: str) -> None:
    body = manifest("Bad_Name")
    proc = kubectl(
        "-n", namespace, "apply", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False
    )
    assert 'metadata.name: Invalid value: "Bad_Name"' in proc.stderr, proc.stderr
    with pytest.raises(ConvertError) as err:
        to_juturna(body)
    assert str(err.value).startswith('metadata.name: "Bad_Name" is not a Kubernetes object name')


def test_the_example_is_accepted_and_defaulted(kubectl: Kubectl, namespace: str) -> None:
    proc = kubectl(
        "-n",
        namespace,
        "apply",
        "--dry-run=server",
        "-o",
        "json",
        "-f",
        "-",
        input=json.dumps(manifest("good")),
    )
    spec = json.loads(proc.stdout)["spec"]
    assert spec["restartPolicy"] == {"maxRestarts": 3, "backoffSeconds": 5}
    assert spec["version"] == "1.0"
    assert to_juturna(manifest("good"))["pipeline"]["name"] == "good"  # convert admits it too


STATUS_CASES = [
    (
        "two conditions of one type",
        {"conditions": [CONDITION, CONDITION]},
        'status.conditions[1]: Duplicate value: {"type":"Ready"}',
    ),
    (
        "two nodes of one name",
        {"nodes": [{"name": "src", "status": "Running"}] * 2},
        'status.nodes[1]: Duplicate value: {"name":"src"}',
    ),
    (
        "a transition time that is no time",
        {"conditions": [{**CONDITION, "lastTransitionTime": "yesterday"}]},
        'status.conditions[0].lastTransitionTime: Invalid value: "yesterday": '
        'conditions[0].lastTransitionTime in body must be of type date-time: "yesterday"',
    ),
]


@pytest.mark.parametrize(
    ("what", "status", "message"), STATUS_CASES, ids=[c[0] for c in STATUS_CASES]
)
def test_the_status_schema_refuses_what_kubernetes_lists_and_times_forbid(
    kubectl: Kubectl, namespace: str, what: str, status: dict[str, Any], message: str
) -> None:
    """Conditions are a map by type and nodes by name (server-side apply and kubectl know
    them apart), and times are RFC 3339: the API server holds a status writer to it."""
    kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(manifest("st")))
    proc = kubectl(
        *("-n", namespace, "patch", "pipeline", "st", "--subresource=status", "--type=merge"),
        *("-p", json.dumps({"status": status})),
        check=False,
    )
    assert proc.returncode != 0, f"{what} was accepted"
    assert message in proc.stderr, proc.stderr
    good = {"conditions": [CONDITION], "nodes": [{"name": "src", "status": "Running"}]}
    kubectl(
        *("-n", namespace, "patch", "pipeline", "st", "--subresource=status", "--type=merge"),
        *("-p", json.dumps({"status": good})),
    )


def test_kubectl_explain_prints_descriptions(kubectl: Kubectl) -> None:
    out = kubectl("explain", "pipeline.spec.nodes").stdout
    assert "Node name, unique in the pipeline" in out
    assert "The node kind: the plugin" in out
    out = kubectl("explain", "pipeline.status.failure").stdout
    assert "HTTP-like: 4xx needs a spec change; 5xx is retried." in out


def test_kubectl_explain_goes_on_into_the_pod_fields(kubectl: Kubectl) -> None:
    """spec.template's Pod fields carry Kubernetes' own schemas, descriptions included."""
    out = kubectl("explain", "pipeline.spec.template.affinity").stdout
    assert "Pod affinity rules, as in a Pod spec." in out  # the template's own words
    assert "podAntiAffinity\t<Object>" in out
    out = kubectl("explain", "pipeline.spec.template.affinity.nodeAffinity").stdout
    assert "requiredDuringSchedulingIgnoredDuringExecution" in out
    out = kubectl("explain", "pipeline.spec.template.volumes.persistentVolumeClaim").stdout
    assert "claimName\t<string> -required-" in out
    out = kubectl("explain", "pipeline.spec.template.tolerations.effect").stdout
    assert "NoExecute" in out
