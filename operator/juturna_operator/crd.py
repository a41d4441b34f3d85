"""Builds the Pipeline CRD manifest from the pydantic models in ``api``.

pydantic emits JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema. The
conversion inlines ``$ref``s, drops titles and ``null`` branches, marks free-form objects
with ``x-kubernetes-preserve-unknown-fields``, and keeps descriptions, enums, bounds,
defaults and the CEL ``x-kubernetes-validations`` declared on the models.

``crds/`` holds the output; ``make crds`` rewrites it, and a test fails on drift.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from juturna_operator import api

CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
CRD_FILE_NAME = f"{CRD_NAME}.yaml"

_DROP = {"title", "$defs"}


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline ``$ref``s and turn pydantic's JSON Schema into a structural one."""
    schema = copy.deepcopy(schema)
    if "$ref" in schema:
        target = defs[schema.pop("$ref").rsplit("/", 1)[-1]]
        merged = _resolve(target, defs)
        merged.update({k: v for k, v in schema.items() if k not in _DROP})
        schema = merged
    if "anyOf" in schema:
        branches = [b for b in schema.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot make a structural schema of anyOf {branches}")
        inner = _resolve(branches[0], defs)
        inner.update({k: v for k, v in schema.items() if k not in _DROP})
        schema = inner
    for key in _DROP:
        schema.pop(key, None)
    if schema.get("default", "") is None:
        del schema["default"]
    if "properties" in schema:
        schema["properties"] = {k: _resolve(v, defs) for k, v in schema["properties"].items()}
        schema.setdefault("type", "object")
        schema.pop("additionalProperties", None)
    elif schema.get("type") == "object":
        # dict[str, Any]: a free-form object.
        schema.pop("additionalProperties", None)
        schema["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in schema:
        schema["items"] = _resolve(schema["items"], defs)
    return schema


def model_schema(model: type[api._Model]) -> dict[str, Any]:
    """The structural OpenAPI schema of one pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _resolve(raw, raw.get("$defs", {}))


def openapi_schema() -> dict[str, Any]:
    """The whole ``openAPIV3Schema`` of a Pipeline."""
    spec = model_schema(api.PipelineSpec)
    spec["description"] = api.PipelineSpec.__doc__ or ""
    spec["properties"]["restartPolicy"]["default"] = {}
    status = model_schema(api.PipelineStatus)
    status["description"] = api.PipelineStatus.__doc__ or ""
    status["properties"]["kopf"] = {
        "type": "object",
        "description": "The operator framework's own bookkeeping (kopf progress storage).",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    return {
        "type": "object",
        "description": "A Juturna pipeline (a DAG of source, proc and sink nodes) run by the "
        "juturna-operator.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version: juturna.io/v1alpha1."},
            "kind": {"type": "string", "description": "Pipeline."},
            "metadata": {"type": "object"},  # the API server allows nothing more here
            "spec": spec,
            "status": status,
        },
    }


READY_CONDITION = '.status.conditions[?(@.type=="Ready")]'
PRINTER_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".spec.state", "description": "Desired state."},
    {
        "name": "Phase",
        "type": "string",
        "jsonPath": ".status.phase",
        "description": "Observed lifecycle phase.",
    },
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": f"{READY_CONDITION}.status",
        "description": "The Ready condition: True when the desired state is reached, healthy.",
    },
    {
        "name": "Nodes",
        "type": "string",
        "jsonPath": ".status.nodesReady",
        "description": "Ready nodes over all nodes.",
    },
    {
        "name": "Restarts",
        "type": "integer",
        "jsonPath": ".status.restarts",
        "description": "Restarts since the last spec change.",
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": ".status.failure.reason",
        "description": "Failure reason, if the last attempt failed.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "Address",
        "type": "string",
        "jsonPath": ".status.address",
        "description": "Where the pipeline takes input: the first endpoint (status.endpoints).",
        "priority": 1,  # kubectl get -o wide
    },
    {
        "name": "Node",
        "type": "string",
        "jsonPath": ".status.pod.node",
        "description": "The node the pipeline's pod runs on (engine pod).",
        "priority": 1,  # kubectl get -o wide
    },
    {
        "name": "Message",
        "type": "string",
        "jsonPath": f"{READY_CONDITION}.message",
        "description": "The Ready condition's message: what the pipeline is, or why not yet.",
        "priority": 1,  # kubectl get -o wide
    },
]


# How the API server names the Pipeline's schema in its OpenAPI v3 document of the group.
OPENAPI_PATH = f"/openapi/v3/apis/{api.GROUP}/{api.VERSION}"
OPENAPI_SCHEMA = f"{'.'.join(reversed(api.GROUP.split('.')))}.{api.VERSION}.{api.KIND}"
# What an administrator runs when the installed CRD is older than the operator (or missing):
# Helm creates CRDs on first install and never upgrades them, and server-side apply refuses
# to take over the fields Helm's create owns unless forced. The chart's crds/ holds the same.
APPLY_COMMAND = f"kubectl apply --server-side --force-conflicts -f crds/{CRD_FILE_NAME}"


def unknown_to(installed: dict[str, Any], ours: dict[str, Any], path: str) -> list[str]:
    """What ``ours`` (a schema this operator writes by) has that ``installed`` (the served
    CRD's) does not know: a field it would prune, an enum value it would refuse."""
    gaps = []
    allowed = installed.get("enum")
    refused = [v for v in ours.get("enum", []) if allowed is not None and v not in allowed]
    if refused:
        gaps.append(f"{path} refuses {', '.join(map(str, refused))}")
    known = installed.get("properties", {})
    for name, sub in ours.get("properties", {}).items():
        if name in known:
            gaps += unknown_to(known[name], sub, f"{path}.{name}")
        elif not installed.get("x-kubernetes-preserve-unknown-fields"):
            gaps.append(f"{path}.{name} is unknown")
    if "items" in ours and "items" in installed:
        gaps += unknown_to(installed["items"], ours["items"], f"{path}[]")
    return gaps


def published_status(document: dict[str, Any]) -> dict[str, Any] | None:
    """The Pipeline's status schema in the API server's OpenAPI v3 document of its group and
    version; None where the document has no Pipeline yet (a CRD just created)."""
    schemas = document.get("components", {}).get("schemas", {})
    pipeline = schemas.get(OPENAPI_SCHEMA)
    return pipeline.get("properties", {}).get("status", {}) if pipeline else None


def status_unknown_to(installed: dict[str, Any]) -> list[str]:
    """What the status this operator writes has that an installed CRD's status schema lacks."""
    return unknown_to(installed, openapi_schema()["properties"]["status"], "status")


def crd_manifest() -> dict[str, Any]:
    """The complete CustomResourceDefinition."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": api.CATEGORIES,
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def render() -> str:
    """The CRD as the YAML text committed under ``crds/``."""
    header = "# Generated by `make crds` from operator/juturna_operator/api.py. Do not edit.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    """Write the CRD into each folder given (default: print it)."""
    targets = argv if argv is not None else sys.argv[1:]
    text = render()
    if not targets:
        sys.stdout.write(text)
    for folder in targets:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / CRD_FILE_NAME).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
