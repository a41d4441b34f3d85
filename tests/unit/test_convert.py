"""Juturna JSON <-> Pipeline manifest: exact round trips and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_the_cli_converts_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(DATA / "tones.json")]) == 0
    manifest_text = capsys.readouterr().out
    assert yaml.safe_load(manifest_text)["metadata"]["name"] == "tones-demo"
    (tmp_path / "p.yaml").write_text(manifest_text)
    assert main(["convert", str(tmp_path / "p.yaml")]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((DATA / "tones.json").read_text())
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["convert", str(tmp_path / "bad.json")]) == 1
    assert capsys.readouterr().err.endswith("bad.json: expected an object at the top\n")
