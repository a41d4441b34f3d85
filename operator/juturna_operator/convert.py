"""Convert between Juturna's own pipeline JSON and a Pipeline manifest, both ways, exactly.

    juturna-operator convert pipeline.json  > pipeline.yaml    # Juturna JSON -> manifest
    juturna-operator convert pipeline.yaml  > pipeline.json    # manifest -> Juturna JSON
    ... | juturna-operator convert -                           # from standard input

Either way the manifest must be one the API server admits (``admission``): a name or a
graph that ``kubectl apply`` would refuse is refused here, naming the problem.

What the spec does not model is kept in annotations, so the reverse gives back the same
JSON: the original pipeline name (a manifest name must be DNS-1123), Juturna's ``id`` and
``folder`` (the manager overwrites both anyway), and any other keys (``juturna.io/extras``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from juturna_operator import admission
from juturna_operator.api import GROUP, KIND, VERSION, NodeSpec, PipelineSpec, first_error
from juturna_operator.domain import MAX_OBJECT_NAME

SPEC_NODE_KEYS = tuple(NodeSpec.model_fields)  # Juturna's node keys that the spec models
PIPELINE_KEYS = ("name", "id", "folder", "nodes", "links", "telemetry")
TOP_KEYS = ("version", "plugins", "pipeline")
A_NAME, A_ID, A_FOLDER, A_EXTRAS = (
    f"{GROUP}/{k}" for k in ("source-name", "source-id", "source-folder", "extras")
)


class ConvertError(ValueError):
    """Input that cannot be converted; the message says what and where."""


def dns_name(name: str) -> str:
    """A Kubernetes object name for a Juturna pipeline name."""
    out = re.sub(r"[^a-z0-9.-]+", "-", name.lower())
    out = re.sub(r"[-.]*\.[-.]*", ".", out).strip("-.")  # labels between dots: "a..b", "a-.b"
    if not out:
        raise ConvertError(f"pipeline name {name!r} leaves nothing for a Kubernetes name")
    return out[:MAX_OBJECT_NAME].rstrip("-.")


def to_manifest(config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """Juturna's config dict -> a Pipeline manifest."""
    pipeline = config.get("pipeline")
    if not isinstance(pipeline, dict) or not isinstance(pipeline.get("nodes"), list):
        raise ConvertError(
            "not a Juturna pipeline config: it needs a 'pipeline' object with 'nodes'"
        )
    if not all(isinstance(node, dict) for node in pipeline["nodes"]):
        raise ConvertError("pipeline.nodes: each node must be an object")
    extras: dict[str, Any] = {}
    top = {k: v for k, v in config.items() if k not in TOP_KEYS}
    if top:
        extras["top"] = top
    pipe = {k: v for k, v in pipeline.items() if k not in PIPELINE_KEYS}
    if pipe:
        extras["pipeline"] = pipe
    nodes, node_extras = [], {}
    for node in pipeline["nodes"]:
        nodes.append({k: node[k] for k in SPEC_NODE_KEYS if k in node})
        rest = {k: v for k, v in node.items() if k not in SPEC_NODE_KEYS}
        if rest:
            node_extras[str(node.get("name"))] = rest
    if node_extras:
        extras["nodes"] = node_extras
    spec: dict[str, Any] = {
        "plugins": list(config.get("plugins", [])),
        "nodes": nodes,
        "links": list(pipeline.get("links", [])),
    }
    if "version" in config:
        spec["version"] = config["version"]
    if "telemetry" in pipeline:
        spec["telemetry"] = pipeline["telemetry"]
    original = str(pipeline.get("name", ""))
    metadata: dict[str, Any] = {"name": name or dns_name(original)}
    annotations = {A_NAME: original} if original and original != metadata["name"] else {}
    for key, annotation in (("id", A_ID), ("folder", A_FOLDER)):
        if key in pipeline:
            annotations[annotation] = json.dumps(pipeline[key])
    if extras:
        annotations[A_EXTRAS] = json.dumps(extras, sort_keys=True)
    if annotations:
        metadata["annotations"] = annotations
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": spec,
    }
    check(manifest)
    return manifest


def check(manifest: dict[str, Any]) -> None:
    """Refuse a manifest that ``kubectl apply`` would refuse, naming the first problem."""
    try:
        admission.check_name(str((manifest.get("metadata") or {}).get("name", "")))
        admission.check(PipelineSpec.model_validate(manifest["spec"]))
    except ValidationError as err:
        raise ConvertError(first_error(err)) from None
    except admission.Refused as refused:
        raise ConvertError(str(refused)) from None


def to_juturna(manifest: dict[str, Any]) -> dict[str, Any]:
    """A Pipeline manifest -> Juturna's config dict (the exact reverse of ``to_manifest``)."""
    if manifest.get("kind") != KIND or "spec" not in manifest:
        raise ConvertError(f"not a {KIND} manifest: kind must be {KIND} and spec present")
    check(manifest)
    meta, spec = manifest.get("metadata", {}), manifest["spec"]
    annotations = meta.get("annotations") or {}
    extras = json.loads(annotations.get(A_EXTRAS, "{}"))
    pipeline: dict[str, Any] = {"name": annotations.get(A_NAME, meta.get("name", ""))}
    for key, annotation in (("id", A_ID), ("folder", A_FOLDER)):
        if annotation in annotations:
            pipeline[key] = json.loads(annotations[annotation])
    node_extras = extras.get("nodes", {})
    pipeline["nodes"] = [{**n, **node_extras.get(str(n.get("name")), {})} for n in spec["nodes"]]
    pipeline["links"] = list(spec.get("links", []))
    if "telemetry" in spec:
        pipeline["telemetry"] = spec["telemetry"]
    pipeline.update(extras.get("pipeline", {}))
    config: dict[str, Any] = {}
    if "version" in spec:
        config["version"] = spec["version"]
    config["plugins"] = list(spec.get("plugins", []))
    config["pipeline"] = pipeline
    config.update(extras.get("top", {}))
    return config


def convert_text(text: str, name: str | None = None) -> str:
    """Convert a document, deciding the direction from what it holds."""
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as err:
        raise ConvertError(f"neither JSON nor YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConvertError("expected an object at the top")
    if data.get("kind") == KIND:
        return json.dumps(to_juturna(data), indent=2) + "\n"
    return yaml.safe_dump(to_manifest(data, name), sort_keys=False)


def main(path: str, name: str | None = None) -> int:
    """Convert the file at ``path`` (``-``: standard input) to standard output. A document
    that cannot be converted, or that the API server would refuse, exits 2."""
    source = "<stdin>" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        sys.stdout.write(convert_text(text, name))
    except ConvertError as err:
        print(f"juturna-operator convert: {source}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"juturna-operator convert: cannot read {source}: {err.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError:
        print(f"juturna-operator convert: {source}: not UTF-8 text", file=sys.stderr)
        return 2
    return 0
