"""Builds the Pipeline CRD manifest from the pydantic models in ``api``.

pydantic emits JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema. The
conversion inlines ``$ref``s, drops titles and ``null`` branches, marks free-form objects
with ``x-kubernetes-preserve-unknown-fields``, and keeps descriptions, enums, bounds,
defaults and the CEL ``x-kubernetes-validations`` declared on the models.

``crds/`` holds the output; ``make crds`` rewrites it, and a test fails on drift.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s

from juturna_operator import api

CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
CRD_FILE_NAME = f"{CRD_NAME}.yaml"

_DROP = {"title", "$defs"}

# Kubernetes' own schemas of the types api.py names (api.KUBERNETES_TYPE), as the pinned
# control plane serves them; `make kubernetes-schemas` writes the file, a test holds it to the
# plane's, and `make crds` reads it (no cluster needed).
KUBERNETES_FILE = Path(__file__).with_name("kubernetes.json")
KUBERNETES_SOURCE = "/openapi/v3/api/v1"
_REF = "#/components/schemas/"
# An object's metadata inside a Pod field (an ephemeral volume's claim template): kept whole,
# as the Pod's own validation reads it, not typed (its schema alone is bigger than ours).
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
# Kubernetes' keys a CRD schema may not hold (strategic merge patch hints), and defaults:
# a CRD's would be written into stored Pipelines; the API server defaults the Pod itself.
_KUBERNETES_DROP = {
    "default",
    "x-kubernetes-patch-merge-key",
    "x-kubernetes-patch-strategy",
    "x-kubernetes-unions",
}
# A quantity as a string (the same pattern controller-gen gives CRDs), or an integer.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?"
    r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def kubernetes_types() -> list[str]:
    """The Kubernetes types api.py names for its fields, in the order they appear."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            marker = node.get(api.KUBERNETES_TYPE)
            if isinstance(marker, dict) and marker["type"] not in found:
                found.append(marker["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(api.PipelineSpec.model_json_schema(by_alias=True, mode="validation"))
    return found


def kubernetes_closure(document: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    """The schemas of ``roots`` and of every type they refer to, from an API server's OpenAPI
    v3 document (``KUBERNETES_SOURCE``), as it serves them; ObjectMeta is not followed."""
    schemas = document["components"]["schemas"]
    found: dict[str, Any] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in found or name == OBJECT_META:
            continue
        found[name] = schemas[name]
        text = json.dumps(schemas[name])
        pending += [part.split('"', 1)[0] for part in text.split(_REF)[1:]]
    return dict(sorted(found.items()))


def kubernetes_file_text(document: dict[str, Any], version: str) -> str:
    """``KUBERNETES_FILE``'s text, from the plane's OpenAPI document and version."""
    content = {
        "kubernetesVersion": version,
        "source": KUBERNETES_SOURCE,
        "schemas": kubernetes_closure(document, kubernetes_types()),
    }
    return json.dumps(content, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def served_kubernetes_file_text(client: k8s.ApiClient, timeout_s: float = 60.0) -> str:
    """``KUBERNETES_FILE``'s text from what the API server behind ``client`` serves (its
    OpenAPI document and version). Blocking."""
    served = {}
    for path in (KUBERNETES_SOURCE, "/version"):
        status, body = api_get(client, path, timeout_s)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:300]!r}")
        served[path] = json.loads(body)
    return kubernetes_file_text(served[KUBERNETES_SOURCE], served["/version"]["gitVersion"])


@functools.cache
def _kubernetes_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = json.loads(KUBERNETES_FILE.read_text())["schemas"]
    return schemas


def kubernetes_schema(name: str) -> dict[str, Any]:
    """Kubernetes' type ``name`` as a structural CRD schema: references inlined, quantities
    int-or-string, no defaults or patch hints."""
    return _structural({"$ref": _REF + name}, _kubernetes_schemas())


def _structural(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    own = {k: v for k, v in schema.items() if k not in _KUBERNETES_DROP}
    refs = [own.pop("$ref")] if "$ref" in own else []
    if "allOf" in own:  # a reference with a description of its own: [{$ref}]
        refs += [part["$ref"] for part in own.pop("allOf")]
    if refs:
        (ref,) = refs
        name = ref.removeprefix(_REF)
        if name == OBJECT_META:
            target: dict[str, Any] = {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "Standard object metadata (labels, annotations, ...).",
            }
        else:
            target = _structural(schemas[name], schemas)
        return target | own  # the field's own description wins over its type's
    if "oneOf" in own:  # Quantity: a string or a number
        own.pop("oneOf")
        own.pop("description", None)  # its grammar; the field that holds one says more
        return {"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN} | own
    if "properties" in own:
        own["properties"] = {k: _structural(v, schemas) for k, v in own["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(own.get(key), dict):
            own[key] = _structural(own[key], schemas)
    return own


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline ``$ref``s and turn pydantic's JSON Schema into a structural one."""
    schema = copy.deepcopy(schema)
    inner = _referred(schema, defs)
    if inner is not None:
        # A model, or an optional value: its schema, resolved once, under the field's keys.
        return _finish(_resolve(inner, defs) | schema)
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
    return _finish(schema)


def _referred(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any] | None:
    """The schema ``schema`` stands for (taken out of it): a ``$ref``'s target, or the one
    branch of an optional's ``anyOf`` that is not null; None for a schema of its own."""
    if "$ref" in schema:
        target: dict[str, Any] = defs[schema.pop("$ref").rsplit("/", 1)[-1]]
        return target
    if "anyOf" in schema:
        branches = [b for b in schema.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot make a structural schema of anyOf {branches}")
        return dict(branches[0])
    return None


def _finish(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop what a CRD does not take, and type a field api.py marks as Kubernetes' own."""
    for key in _DROP:
        schema.pop(key, None)
    if schema.get("default", "") is None:
        del schema["default"]
    marker = schema.pop(api.KUBERNETES_TYPE, None)
    if marker is None:
        return schema
    typed = kubernetes_schema(marker["type"])
    if marker["of"] == "items":
        schema["items"] = typed
    elif marker["of"] == "values":
        schema.pop("x-kubernetes-preserve-unknown-fields", None)
        schema["additionalProperties"] = typed
    else:
        schema = typed | {k: v for k, v in schema.items() if k == "description"}
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


def api_get(client: k8s.ApiClient, path: str, timeout_s: float) -> tuple[int, bytes]:
    """GET ``path`` of the API server: its status and body (status 0: no answer, the body
    says why). Blocking."""
    method, url, headers, *_ = client.param_serialize("GET", path, auth_settings=["BearerToken"])
    try:
        answer = client.call_api(method, url, headers, _request_timeout=timeout_s)
        answer.read()  # type: ignore[no-untyped-call]
    except Exception as err:  # the API server unreachable (urllib3, socket, TLS errors)
        return 0, str(getattr(err, "reason", None) or err).encode()  # urllib3's: the cause
    return answer.status, answer.data or b""


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


def main(folders: list[str] | None = None, mkdir: bool = False) -> int:
    """Write the CRD into each folder given (none: print it). A folder that does not exist
    is refused (a typo would otherwise leave the CRD somewhere unseen), unless ``mkdir``."""
    targets = folders if folders is not None else sys.argv[1:]
    text = render()
    if not targets:
        sys.stdout.write(text)
    for folder in targets:  # all refused before any is written
        problem = None
        if Path(folder).exists() and not Path(folder).is_dir():
            problem = f"{folder} is not a directory"
        elif not Path(folder).exists() and not mkdir:
            problem = f"no directory {folder} (create it, or pass --mkdir)"
        if problem:
            print(f"juturna-operator crd: {problem}", file=sys.stderr)
            return 2
    for folder in targets:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / CRD_FILE_NAME).write_text(text)
        except OSError as err:
            print(f"juturna-operator crd: cannot write into {folder}: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
