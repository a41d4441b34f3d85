"""One registry of engines: what the settings accept, the CLI offers, the chart's schema
allows and docs/engines.md documents all come from (or are checked against) it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from juturna_operator.registry import ENGINES
from juturna_operator.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[2]


def test_the_chart_schema_allows_exactly_the_registered_engines() -> None:
    schema = json.loads((REPO / "charts/juturna-operator/values.schema.json").read_text())
    assert sorted(schema["properties"]["engine"]["enum"]) == sorted(ENGINES)


def test_the_engines_page_documents_every_registered_engine() -> None:
    page = (REPO / "docs" / "engines.md").read_text()
    table = page[page.index("| engine | where a pipeline runs |") :].split("\n\n")[0]
    assert sorted(re.findall(r"^\| `(\w+)`", table, re.M)) == sorted(ENGINES)


def test_settings_refuse_an_engine_not_registered() -> None:
    with pytest.raises(SettingsError) as err:
        Settings(engine="docker").check()
    assert str(err.value) == (
        f"JUTURNA_OPERATOR_ENGINE: must be one of {', '.join(ENGINES)}, got 'docker'"
    )


def test_every_registered_engine_is_importable() -> None:
    import importlib

    for name, entry in ENGINES.items():
        assert hasattr(importlib.import_module(entry.module), entry.cls), name
