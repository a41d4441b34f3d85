"""The chart's README is generated from values.yaml (hack/chart_readme.py): every value is
described, and the committed README is what the generator writes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import chart_readme
import pytest
import yaml

from support import CHART

GENERATOR = Path(chart_readme.__file__)


def check(chart: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), "--check", "--chart", str(chart)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_committed_readme_is_the_generated_one() -> None:
    proc = check(CHART)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_a_changed_description_makes_the_check_fail(tmp_path: Path) -> None:
    chart = tmp_path / "juturna-operator"
    shutil.copytree(CHART, chart)
    values = chart / "values.yaml"
    values.write_text(values.read_text().replace("# -- Create a ServiceMonitor.", "# -- Make one."))
    proc = check(chart)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"error: {chart / 'README.md'} is out of date with values.yaml: run `make chart-readme`\n"
    )


def test_every_value_is_in_the_table() -> None:
    """Each key of values.yaml is a row, or lies inside a row's object (described whole)."""
    readme = (CHART / "README.md").read_text()
    keys = [row.key for row in chart_readme.rows((CHART / "values.yaml").read_text())]
    for key in keys:
        assert f"| `{key}` |" in readme

    def leaves(node: object, path: str) -> list[str]:
        if isinstance(node, dict) and node and path not in keys:
            return [leaf for k, v in node.items() for leaf in leaves(v, f"{path}.{k}".lstrip("."))]
        return [path]

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for leaf in leaves(values, ""):
        assert any(leaf == k or leaf.startswith(k + ".") for k in keys), leaf


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\n", "values.yaml line 1: a has no `# --` description"),
        (
            "# -- An object.\nmetrics: {}\nother:\n  port: 1\n",
            "values.yaml line 4: other.port has no `# --` description",
        ),
        (
            "# -- Described whole.\nresources:\n  # -- A part too.\n  limits: {}\n",
            "values.yaml line 4: resources.limits has a description inside a value described "
            "whole (resources): describe one or the other",
        ),
    ],
)
def test_an_undescribed_value_is_refused_naming_it(text: str, message: str) -> None:
    with pytest.raises(chart_readme.ValuesError) as err:
        chart_readme.rows(text)
    assert str(err.value) == message


def test_types_and_defaults_come_from_the_values() -> None:
    rows = chart_readme.rows(
        "# -- A port.\nport: 9090\n# -- (list) Or null.\nallowed: null\n"
        "image:\n  # -- Its tag.\n  # Empty: the appVersion.\n  tag: ''\n"
    )
    assert [(r.key, r.type, r.default, r.description) for r in rows] == [
        ("port", "int", "9090", "A port."),
        ("allowed", "list", "null", "Or null."),
        ("image.tag", "string", '""', "Its tag. Empty: the appVersion."),
    ]
