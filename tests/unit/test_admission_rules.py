"""The CRD's admission rules in Python (``admission``): each rule refuses with the CEL rule's
own words after the field path, and an admitted spec passes. That the API server refuses the
same manifests is tests/integration/test_admission.py's part."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from juturna_operator import admission
from juturna_operator.api import PipelineSpec
from support import EXAMPLE


def refusal(mutate: Any) -> admission.Refused:
    body = copy.deepcopy(EXAMPLE["spec"])
    mutate(body)
    with pytest.raises(admission.Refused) as err:
        admission.check(PipelineSpec.model_validate(body))
    return err.value


def ports(*declared: dict[str, Any]) -> Any:
    return lambda s: s["nodes"][0].update(ports=list(declared))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: s["nodes"][2].update(name="a b"),
            'spec.nodes[2]: node name "a b" is not a safe folder name: use only letters, '
            'digits, "_" and "-"',
        ),
        (
            lambda s: s["nodes"][1].update(name="x\n"),
            'spec.nodes[1]: node name "x\n" is not a safe folder name: use only letters, '
            'digits, "_" and "-"',
        ),
        (
            lambda s: s["nodes"][0].update(mark="1ticker"),
            'spec.nodes[0]: node "src": mark "1ticker" must be a Python identifier (letters, '
            'digits and "_", not starting with a digit)',
        ),
        (
            ports({"name": "http", "port": 8080}),
            'spec.nodes[0].ports[0]: port "http": TCP 8080 is the pipeline pod\'s own (the '
            "operator talks to the pipeline there); choose another",
        ),
        (
            ports({"name": "a", "port": 0, "protocol": "UDP"}),
            'spec.nodes[0].ports[0]: port "a": port 0 (any) needs configKey, the configuration '
            "key the operator writes the port it assigns to",
        ),
        (
            ports(
                {"name": "b", "port": 7001},
                {"name": "a", "port": 7000},
                {"name": "b", "port": 7002},
            ),
            'spec.nodes[0].ports: port names must be unique within a node: "b" appears more '
            "than once",
        ),
        (
            ports(
                {"name": "a", "port": 7001},
                {"name": "b", "port": 7000},
                {"name": "c", "port": 7000},
            ),
            'spec.nodes[0].ports: ports "b" and "c" both listen on TCP 7000',
        ),
        (
            lambda s: s["nodes"].extend([dict(s["nodes"][1]), dict(s["nodes"][0])]),
            'spec: node names must be unique: "src" appears more than once',
        ),
        (
            lambda s: s["links"].append({"from": "src", "to": "sinkk"}),
            "spec: link 2: 'to' names no node (got \"sinkk\")",
        ),
        (
            lambda s: s["links"].insert(0, {"from": "srcc", "to": "out"}),
            "spec: link 0: 'from' names no node (got \"srcc\")",
        ),
        (
            lambda s: s["links"].append({"from": "amp", "to": "amp"}),
            'spec.links[2]: link from "amp" to itself is not allowed',
        ),
    ],
    ids=[
        "space-in-node-name",
        "newline-in-node-name",
        "mark-not-identifier",
        "worker-port",
        "any-port-without-key",
        "port-names-repeat",
        "ports-clash",
        "node-names-repeat",
        "link-to-no-node",
        "link-from-no-node",
        "self-link",
    ],
)
def test_each_rule_refuses_in_the_crds_words(mutate: Any, message: str) -> None:
    refused = refusal(mutate)
    assert (type(refused), str(refused)) == (admission.Refused, message)


@pytest.mark.parametrize("entry", ["/opt/plugins", "tones/../../etc", ".."])
def test_a_plugin_folder_outside_the_roots(entry: str) -> None:
    refused = refusal(lambda s: s.update(plugins=["tones", entry]))
    assert isinstance(refused, admission.PluginFolderRefused)
    assert str(refused) == (
        f'spec.plugins[1]: plugin folder "{entry}" must be relative to a plugin root: no '
        'leading "/" and no ".."'
    )


def test_an_admitted_spec_passes() -> None:
    body = copy.deepcopy(EXAMPLE["spec"])
    body["nodes"][0]["ports"] = [
        {"name": "rtp", "port": 0, "configKey": "port"},
        {"name": "rtcp", "port": 0, "configKey": "rtcp_port", "protocol": "UDP"},
        {"name": "tcp", "port": 7000},
        {"name": "udp", "port": 7000, "protocol": "UDP"},
    ]
    admission.check(PipelineSpec.model_validate(body))  # raises on any refusal


@pytest.mark.parametrize(
    ("name", "admitted"),
    [
        ("tones", True),
        ("tones.v2", True),
        ("a" * 253, True),
        ("Bad_Name", False),
        ("a..b", False),
        ("a.-b", False),
        ("-a", False),
        ("a" * 254, False),
        ("", False),
    ],
)
def test_object_names(name: str, admitted: bool) -> None:
    if admitted:
        admission.check_name(name)
        return
    with pytest.raises(admission.Refused) as err:
        admission.check_name(name)
    assert str(err.value) == (
        f'metadata.name: "{name}" is not a Kubernetes object name: lowercase letters, digits, '
        "'-' and '.', starting and ending with a letter or digit, at most 253 characters"
    )
