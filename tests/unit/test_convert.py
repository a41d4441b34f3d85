"""Juturna JSON <-> Pipeline manifest: exact round trips and clear errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from juturna_operator.api import PipelineSpec
from juturna_operator.cli import main
from juturna_operator.convert import ConvertError, to_juturna, to_manifest

DATA = Path(__file__).resolve().parents[1] / "data" / "juturna"
CONFIGS = sorted(DATA.glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_round_trip_is_exact(path: Path) -> None:
    original = json.loads(path.read_text())
    manifest = to_manifest(original)
    PipelineSpec.model_validate(manifest["spec"])
    assert to_juturna(manifest) == original
    # Through YAML text too, as a user would keep it in Git.
    assert to_juturna(yaml.safe_load(yaml.safe_dump(manifest))) == original


def test_names_and_annotations() -> None:
    manifest = to_manifest(json.loads((DATA / "extras.json").read_text()))
    meta = manifest["metadata"]
    assert meta["name"] == "transcription-pipeline"
    assert meta["annotations"]["juturna.io/source-name"] == "Transcription Pipeline"
    extras = json.loads(meta["annotations"]["juturna.io/extras"])
    assert extras == {
        "top": {"owner": "media-team"},
        "pipeline": {"comment": "kept through a round trip"},
        "nodes": {"1_vad": {"repository": "hub"}},
    }
    assert manifest["spec"]["nodes"][1] == {
        "name": "1_vad",
        "type": "proc",
        "mark": "vad_silero",
        "configuration": {"threshold": 0.75},
        "auto_dump": True,
    }


def test_bad_input_is_explained() -> None:
    with pytest.raises(ConvertError, match="needs a 'pipeline' object with 'nodes'"):
        to_manifest({"version": "1"})
    bad = {
        "plugins": [],
        "pipeline": {
            "name": "x",
            "links": [],
            "nodes": [{"name": "a", "type": "src", "mark": "m"}],
        },
    }
    with pytest.raises(
        ConvertError,
        match=r"spec\.nodes\.0\.type: Input should be 'source', "
        "'proc' or 'sink'",
    ):
        to_manifest(bad)
    with pytest.raises(ConvertError, match="not a Pipeline manifest"):
        to_juturna({"kind": "ConfigMap"})


def tones() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads((DATA / "tones.json").read_text()))


Change = Callable[[list[dict[str, Any]], list[dict[str, Any]]], None]  # nodes, links


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda nodes, links: nodes[1].update(name="a b"),
            'spec.nodes[1]: node name "a b" is not a safe folder name: use only letters, '
            'digits, "_" and "-"',
        ),
        (
            lambda nodes, links: links.append({"from": "amp", "to": "nowhere"}),
            "spec: link 2: 'to' names no node (got \"nowhere\")",
        ),
        (
            lambda nodes, links: nodes[0].update(mark="tick-er"),
            'spec.nodes[0]: node "src": mark "tick-er" must be a Python identifier (letters, '
            'digits and "_", not starting with a digit)',
        ),
    ],
    ids=["node-name", "link-to-no-node", "mark"],
)
def test_what_admission_refuses_is_refused_both_ways(change: Change, message: str) -> None:
    """A Juturna config whose manifest the API server would refuse is not converted, and
    neither is such a manifest converted back."""
    config = tones()
    change(config["pipeline"]["nodes"], config["pipeline"]["links"])
    with pytest.raises(ConvertError) as err:
        to_manifest(config)
    assert str(err.value) == message
    manifest = to_manifest(tones())
    change(manifest["spec"]["nodes"], manifest["spec"]["links"])
    with pytest.raises(ConvertError) as err:
        to_juturna(manifest)
    assert str(err.value) == message


NAME_REFUSED = (
    'metadata.name: "Bad_Name" is not a Kubernetes object name: lowercase letters, digits, '
    "'-' and '.', starting and ending with a letter or digit, at most 253 characters"
)


def test_a_name_the_api_server_refuses_is_refused_both_ways() -> None:
    with pytest.raises(ConvertError) as err:
        to_manifest(tones(), name="Bad_Name")
    assert str(err.value) == NAME_REFUSED
    manifest = to_manifest(tones())
    manifest["metadata"]["name"] = "Bad_Name"
    with pytest.raises(ConvertError) as err:
        to_juturna(manifest)
    assert str(err.value) == NAME_REFUSED


@pytest.mark.parametrize(
    ("juturna", "kubernetes"),
    [
        ("Transcription Pipeline", "transcription-pipeline"),
        ("tones_demo", "tones-demo"),
        ("v1..2", "v1.2"),
        ("a.-b_.c", "a.b.c"),
        ("-x-", "x"),
        ("a" * 252 + "_b", "a" * 252),
    ],
)
def test_a_juturna_name_becomes_a_name_the_api_server_admits(juturna: str, kubernetes: str) -> None:
    config = tones()
    config["pipeline"]["name"] = juturna
    manifest = to_manifest(config)
    assert manifest["metadata"]["name"] == kubernetes
    assert to_juturna(manifest)["pipeline"]["name"] == juturna  # kept in an annotation


def test_the_cli_converts_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(DATA / "tones.json")]) == 0
    manifest_text = capsys.readouterr().out
    assert yaml.safe_load(manifest_text)["metadata"]["name"] == "tones-demo"
    (tmp_path / "p.yaml").write_text(manifest_text)
    assert main(["convert", str(tmp_path / "p.yaml")]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((DATA / "tones.json").read_text())
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["convert", str(tmp_path / "bad.json")]) == 2
    assert capsys.readouterr().err.endswith("bad.json: expected an object at the top\n")
