"""The rules the API server enforces when a Pipeline is applied, in Python.

The CRD's schema carries them as CEL (``x-kubernetes-validations`` in ``api``), and the
API server checks a Pipeline's name; pydantic checks the rest of the schema (types, enums,
bounds, patterns). These checks run where no API server does:

* ``graph.validate``, before anything deploys: a cluster may serve an older CRD;
* ``juturna-operator convert``: a manifest it writes or reads is one the API server admits.

Each message is the CEL rule's own, after the field path the API server names, so a
person reads the same words from ``kubectl apply`` and from ``convert``; the admission
tests run every case through both (tests/integration/test_admission.py). No Juturna
import here: ``convert`` stays quick to start.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from juturna_operator.api import IDENTIFIER, SAFE_NAME, PipelineSpec
from juturna_operator.domain import MAX_OBJECT_NAME, OBJECT_NAME, WORKER_PORT

_SAFE_NAME, _IDENTIFIER = re.compile(SAFE_NAME), re.compile(IDENTIFIER)


class Refused(ValueError):
    """A rule the API server enforces is broken; the message says which, where."""


class PluginFolderRefused(Refused):
    """A plugin folder points outside the plugin roots (the operator's PluginPathNotAllowed)."""


def check_name(name: str) -> None:
    """``metadata.name``: the API server admits only a DNS-1123 subdomain."""
    if len(name) > MAX_OBJECT_NAME or not OBJECT_NAME.fullmatch(name):
        raise Refused(
            f'metadata.name: "{name}" is not a Kubernetes object name: lowercase letters, '
            f"digits, '-' and '.', starting and ending with a letter or digit, at most "
            f"{MAX_OBJECT_NAME} characters"
        )


def plugin_folder_problem(entry: str) -> str | None:
    """Why ``entry`` may not name a plugin folder (absolute, or with ``..``), or None."""
    if entry.startswith("/") or ".." in PurePosixPath(entry).parts:
        return (
            f'plugin folder "{entry}" must be relative to a plugin root: no leading "/" and no ".."'
        )
    return None


def _first_repeated(values: list[str]) -> str | None:
    """The first value, in order, that appears more than once (as the CEL messages pick)."""
    return next((v for v in values if values.count(v) > 1), None)


def check(spec: PipelineSpec) -> None:
    """Raise ``Refused`` naming the first rule ``spec`` breaks."""
    for i, entry in enumerate(spec.plugins):
        problem = plugin_folder_problem(entry)
        if problem:
            raise PluginFolderRefused(f"spec.plugins[{i}]: {problem}")
    for i, node in enumerate(spec.nodes):
        at = f"spec.nodes[{i}]"
        if not _SAFE_NAME.fullmatch(node.name):
            raise Refused(
                f'{at}: node name "{node.name}" is not a safe folder name: use only letters, '
                'digits, "_" and "-"'
            )
        if not _IDENTIFIER.fullmatch(node.mark):
            raise Refused(
                f'{at}: node "{node.name}": mark "{node.mark}" must be a Python identifier '
                '(letters, digits and "_", not starting with a digit)'
            )
        ports = node.ports or []
        for j, port in enumerate(ports):
            if port.port == WORKER_PORT and port.protocol == "TCP":
                raise Refused(
                    f'{at}.ports[{j}]: port "{port.name}": TCP {WORKER_PORT} is the pipeline '
                    "pod's own (the operator talks to the pipeline there); choose another"
                )
            if port.port == 0 and port.configKey is None:
                raise Refused(
                    f'{at}.ports[{j}]: port "{port.name}": port 0 (any) needs configKey, the '
                    "configuration key the operator writes the port it assigns to"
                )
        repeated = _first_repeated([p.name for p in ports])
        if repeated is not None:
            raise Refused(
                f'{at}.ports: port names must be unique within a node: "{repeated}" appears '
                "more than once"
            )
        fixed = [f"{p.protocol} {p.port}" for p in ports if p.port != 0]
        clashing = [p for p in ports if p.port != 0 and fixed.count(f"{p.protocol} {p.port}") > 1]
        if clashing:
            first, second = clashing[:2]
            raise Refused(
                f'{at}.ports: ports "{first.name}" and "{second.name}" both listen on '
                f"{first.protocol} {first.port}"
            )
    names = [n.name for n in spec.nodes]
    repeated = _first_repeated(names)
    if repeated is not None:
        raise Refused(f'spec: node names must be unique: "{repeated}" appears more than once')
    for end in ("from", "to"):
        for i, link in enumerate(spec.links):
            value = link.from_ if end == "from" else link.to
            if value not in names:
                raise Refused(f"spec: link {i}: '{end}' names no node (got \"{value}\")")
    for i, link in enumerate(spec.links):
        if link.from_ == link.to:
            raise Refused(f'spec.links[{i}]: link from "{link.from_}" to itself is not allowed')
