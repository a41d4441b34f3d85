"""Paths: no node or pipeline name makes Juturna write outside the work folder.

The API server refuses such names at admission (test_admission, the fuzzer). Here the same
names go straight to each engine's ``create``, bypassing admission and graph validation:
Juturna makes folders of both names without checking them (Pitfall 7), so the engine layer
must refuse them on its own.

"Pitfall N": docs/juturna.md.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from juturna.components._pipeline_manager import PipelineManager

from juturna_operator.api import PipelineSpec
from juturna_operator.domain import PipelineKey
from juturna_operator.engines.base import Engine
from juturna_operator.engines.inprocess import InProcessEngine
from juturna_operator.engines.process import ProcessEngine
from juturna_operator.engines.service import ServiceEngine
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import Runtime, Settings
from support import PLUGIN_ROOTS, UNSAFE_NAMES

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module", params=["inprocess", "process", "service"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    kind = request.param
    if kind == "inprocess":
        # Juturna's base folder is set once per process (Pitfall 6): reuse it if set.
        workdir = Path(PipelineManager._base_folder or tmp_path_factory.mktemp("paths"))
    else:
        workdir = tmp_path_factory.mktemp(f"paths-{kind}") / "work"
        workdir.mkdir()
    settings = Settings(
        plugin_roots=PLUGIN_ROOTS,
        workdir=workdir,
        stop_timeout_s=3,
        runtimes={"local": Runtime("local", "http://127.0.0.1:9")},  # nobody is asked
        default_runtime="local",
    )
    eng: Engine = {"inprocess": InProcessEngine, "process": ProcessEngine}.get(kind, ServiceEngine)(
        settings
    )
    yield eng, workdir
    asyncio.run(eng.close())


def example(key: PipelineKey) -> dict[str, Any]:
    spec = PipelineSpec.model_validate(
        {
            "plugins": ["tones"],
            "nodes": [
                {"name": "src", "type": "source", "mark": "ticker"},
                {"name": "out", "type": "sink", "mark": "jsonl"},
            ],
            "links": [{"from": "src", "to": "out"}],
        }
    )
    return spec.to_juturna_config(key.juturna_name)


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def refused(engine: tuple[Engine, Path], change: Callable[[dict[str, Any]], None]) -> str:
    """Hand an engine the example with ``change`` made to its config: it must refuse it as
    InvalidSpec, write nothing (in the workdir or beside it) and keep no instance. The
    message, for the test to check."""
    eng, workdir = engine
    key = PipelineKey("paths", "p", str(uuid.uuid4()))
    config = example(key)
    change(config)
    outside_before, inside_before = listing(workdir.parent), listing(workdir)
    with pytest.raises(PipelineFailure) as err:
        asyncio.run(eng.create(key, config, "r1"))
    assert err.value.reason is FailureReason.InvalidSpec
    assert err.value.step is Step.create
    assert listing(workdir.parent) == outside_before, "something was written beside the workdir"
    assert listing(workdir) == inside_before
    assert asyncio.run(eng.status(key)) is None, "a refused create left an instance"
    return err.value.message.replace(key.juturna_name, "<juturna name>")


@pytest.mark.parametrize("bad", UNSAFE_NAMES)
def test_a_node_name_that_is_not_a_folder_name_is_refused_by_the_engine(
    engine: tuple[Engine, Path], bad: str
) -> None:
    def rename(config: dict[str, Any]) -> None:
        config["pipeline"]["nodes"][1]["name"] = config["pipeline"]["links"][0]["to"] = bad

    assert refused(engine, rename) == (
        f"node name {bad!r} is not a safe folder name (1 to 63 ASCII letters, digits, '_' or '-')"
    )


@pytest.mark.parametrize("bad", ["../escaped", "/tmp/escaped", "", "..", "paths__other__0000"])
def test_a_pipeline_name_other_than_the_operators_is_refused_by_the_engine(
    engine: tuple[Engine, Path], bad: str
) -> None:
    def rename(config: dict[str, Any]) -> None:
        config["pipeline"]["name"] = bad

    assert refused(engine, rename) == (
        f"pipeline name {bad!r} is not '<juturna name>', the folder name the operator chose "
        "for this resource"
    )


def test_a_config_without_a_pipeline_is_refused_by_the_engine(
    engine: tuple[Engine, Path],
) -> None:
    assert refused(engine, lambda config: config.pop("pipeline")) == "the config has no pipeline"
