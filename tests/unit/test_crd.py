"""CRD generation: the committed file matches the models, and the schema is complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from juturna_operator import crd

REPO = Path(__file__).resolve().parents[2]


def test_committed_crd_matches_the_models() -> None:
    committed = (REPO / "crds" / crd.CRD_FILE_NAME).read_text()
    assert committed == crd.render(), (
        "crds/ is out of date with operator/juturna_operator/api.py: run `make crds` and commit"
    )


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    for key, mark in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(schema.get(key), dict):
            out += _walk(schema[key], f"{path}{mark}")
    return out


def test_every_field_has_a_description_and_the_schema_is_structural() -> None:
    schema = crd.openapi_schema()
    for path, sub in _walk(schema):
        if path == ".metadata":  # the API server forbids anything but its type
            continue
        # kubectl explain shows fields' descriptions; Kubernetes' own lists of strings and
        # maps of quantities describe their entries in the field that holds them.
        if not path.endswith(("[]", "{}")) or sub.get("type") == "object":
            assert sub.get("description"), f"{path or '<root>'} has no description"
        assert (
            "type" in sub
            or sub.get("x-kubernetes-preserve-unknown-fields")
            or sub.get("x-kubernetes-int-or-string")
        ), path
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title"} & set(sub), path
        # Only Kubernetes' own extensions: a marker of api.py's must not reach the CRD.
        assert not [k for k in sub if k.startswith("x-") and not k.startswith("x-kubernetes-")]


def test_the_pod_fields_are_kubernetes_own_types_without_defaults_or_patch_hints() -> None:
    """spec.template's Pod fields are typed as the pinned Kubernetes types them (kubectl
    explain goes on into them), but a default would be written into every stored Pipeline,
    and patch hints are not CRD schema fields."""
    template = crd.openapi_schema()["properties"]["spec"]["properties"]["template"]
    fields = template["properties"]
    assert (
        "requiredDuringSchedulingIgnoredDuringExecution"
        in (fields["affinity"]["properties"]["nodeAffinity"]["properties"])
    )
    assert fields["tolerations"]["items"]["properties"]["effect"]["enum"] == [
        "NoExecute",
        "NoSchedule",
        "PreferNoSchedule",
    ]
    assert fields["env"]["items"]["required"] == ["name"]
    assert "persistentVolumeClaim" in fields["volumes"]["items"]["properties"]
    assert fields["volumeMounts"]["items"]["required"] == ["name", "mountPath"]
    quantity = fields["resources"]["properties"]["limits"]["additionalProperties"]
    assert quantity["x-kubernetes-int-or-string"] is True
    # The template's own descriptions stay where it has them.
    assert fields["affinity"]["description"] == "Pod affinity rules, as in a Pod spec."
    for path, sub in _walk(template, ".spec.template"):
        assert not {"default", "x-kubernetes-patch-merge-key", "x-kubernetes-patch-strategy"} & (
            set(sub)
        ), path


def test_names_subresource_and_printer_columns() -> None:
    manifest = yaml.safe_load(crd.render())
    spec = manifest["spec"]
    assert spec["names"]["shortNames"] == ["jtp"]
    assert spec["names"]["categories"] == ["juturna"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [(c["name"], c.get("priority", 0)) for c in version["additionalPrinterColumns"]]
    # ADDRESS, NODE and MESSAGE only with `kubectl get -o wide` (priority 1).
    always = ["State", "Phase", "Ready", "Nodes", "Restarts", "Reason", "Age"]
    assert columns == [*((c, 0) for c in always), ("Address", 1), ("Node", 1), ("Message", 1)]


def test_conditions_and_nodes_are_maps_and_times_are_times() -> None:
    status = crd.openapi_schema()["properties"]["status"]["properties"]
    for field, key in (("conditions", "type"), ("nodes", "name")):
        assert status[field]["x-kubernetes-list-type"] == "map", field
        assert status[field]["x-kubernetes-list-map-keys"] == [key], field
        assert key in status[field]["items"]["required"], field  # a map's key must be
    times = [p for p, sub in _walk(crd.openapi_schema()) if p.endswith(("Time", "Timestamp"))]
    assert times == [".status.conditions[].lastTransitionTime"]
    for path, sub in _walk(crd.openapi_schema()):
        if path in times:
            assert sub["format"] == "date-time", path


def test_cel_rules_are_declared() -> None:
    text = json.dumps(crd.crd_manifest())
    for fragment in (
        "node names must be unique",
        "names no node (got",
        "to itself is not allowed",
        "is not a safe folder name",
        "must be relative to a plugin root",
    ):
        assert fragment in text, fragment


def test_state_enum_and_default() -> None:
    state = crd.openapi_schema()["properties"]["spec"]["properties"]["state"]
    assert state["enum"] == ["Running", "Standby", "Stopped", "Ready"]  # Ready: deprecated
    assert state["default"] == "Running"


def test_only_fields_marked_lifecycle_only_keep_the_revision() -> None:
    """state, restartPolicy and update change how the pipeline runs, not what it is; every other
    field (a new one too, unless marked) gives a new revision, so a change redeploys."""
    from juturna_operator.api import LIFECYCLE_ONLY, PipelineSpec

    marked = {n for n, f in PipelineSpec.model_fields.items() if LIFECYCLE_ONLY in f.metadata}
    assert marked == {"state", "restartPolicy", "update"}
    base = PipelineSpec.model_validate(
        {"nodes": [{"name": "a", "type": "source", "mark": "ticker"}], "links": []}
    )
    same = base.model_copy(
        update={
            "state": "Standby",
            "restartPolicy": {"maxRestarts": 9},
            "update": {"strategy": "Recreate", "drainSeconds": 0},
        }
    )
    assert same.revision() == base.revision()
    assert base.model_copy(update={"version": "9"}).revision() != base.revision()


def test_the_old_word_ready_parses_as_standby() -> None:
    """v1alpha1 still takes ``state: Ready`` (stored Pipelines say it): it means Standby."""
    from juturna_operator.api import DesiredState, PipelineSpec, desired_state

    nodes = [{"name": "a", "type": "source", "mark": "ticker"}]
    spec = PipelineSpec.model_validate({"state": "Ready", "nodes": nodes})
    assert spec.state == DesiredState.Standby
    assert desired_state("Ready") is DesiredState.Standby
    assert desired_state("Standby") is DesiredState.Standby
    assert desired_state("Paused") is None


OLD_CRD = REPO / "tests" / "data" / "crd-before-standby.yaml"


def _status_of(manifest: dict[str, Any]) -> dict[str, Any]:
    schema = manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return dict(schema["properties"]["status"])


def test_the_start_check_names_what_an_older_crd_does_not_know() -> None:
    ours = crd.openapi_schema()["properties"]["status"]
    assert crd.unknown_to(_status_of(crd.crd_manifest()), ours, "status") == []
    old = _status_of(yaml.safe_load(OLD_CRD.read_text()))
    before_updates = [
        "status.phase refuses Standby",
        "status.conditions[].type refuses Updating",
        "status.lastStableRevision is unknown",
        "status.update is unknown",
    ]
    assert crd.unknown_to(old, ours, "status") == before_updates
    del old["properties"]["endpoints"]  # a CRD from before endpoints: they would be pruned
    assert sorted(crd.unknown_to(old, ours, "status")) == sorted(
        [*before_updates, "status.endpoints is unknown"]
    )
    old["properties"]["conditions"]["items"]["properties"]["type"]["enum"] = ["Ready"]
    assert (
        "status.conditions[].type refuses Created, WarmedUp, Running, Updating"
        in crd.unknown_to(old, ours, "status")
    )
    # A field the installed CRD keeps whatever it holds is known.
    assert crd.unknown_to({"x-kubernetes-preserve-unknown-fields": True}, ours, "status") == []


def test_a_field_added_later_changes_no_stored_pipelines_revision() -> None:
    """template.imagePullSecrets came after Pipelines were stored: at its default it is not
    part of the revision, so an operator upgrade redeploys none of them (the revisions below
    are those the previous operator computed)."""
    from juturna_operator.api import PipelineSpec

    nodes = [{"name": "a", "type": "source", "mark": "ticker"}]
    template = {
        "resources": {"limits": {"nvidia.com/gpu": 1}},
        "tolerations": [{"operator": "Exists"}],
    }
    stored = PipelineSpec.model_validate({"nodes": nodes, "template": template})
    assert stored.revision() == "83396032c5939379"
    assert PipelineSpec.model_validate({"nodes": nodes}).revision() == "5f38909b806a1810"
    pulling = {**template, "imagePullSecrets": [{"name": "regcred"}]}
    assert PipelineSpec.model_validate({"nodes": nodes, "template": pulling}).revision() != (
        stored.revision()
    )


def test_the_crd_fits_a_client_side_apply() -> None:
    """kubectl's client-side apply, and Argo CD's default sync, store the whole object as JSON
    in an annotation; the API server takes at most 256 KiB of annotations (the control-plane
    test applies it). Typed Pod fields made the CRD grow: this holds it."""
    size = len(json.dumps(crd.crd_manifest(), separators=(",", ":")))
    assert size < 200 * 1024, f"the CRD is {size} bytes as JSON; keep it well under 256 KiB"
