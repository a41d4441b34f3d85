"""Write the chart's README from its values.yaml: each value's `# --` comment (helm-docs'
convention) becomes a row of the parameter table, with the value's type and default.

    python hack/chart_readme.py           # writes charts/juturna-operator/README.md
    python hack/chart_readme.py --check   # exit 1 if the README differs from what it would write

The comment rules, helm-docs' own:
- `# -- text` directly above a key describes it; the `#` lines that follow, up to the key,
  continue the text. `# -- (type) text` names the type where the default does not show it
  (a `null` default, say).
- A key is documented by its own comment or by an ancestor's (an object described whole).
  A key that is neither is an error, naming it: every value a user can set is described.
- Other comments (section headings) are not part of the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "juturna-operator"
TEMPLATE = Path(__file__).with_name("chart-readme.md.in")

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")
DOC = re.compile(r"^\s*# -- ?(?:\((?P<type>[a-z]+)\) )?(?P<text>.*)$")
MORE = re.compile(r"^\s*#(?: (?P<text>.*))?$")


class ValuesError(ValueError):
    """values.yaml breaks a comment rule; the message names the key."""


@dataclass(frozen=True)
class Row:
    """One documented value: its dotted key, type, default (as JSON) and description."""

    key: str
    type: str
    default: str
    description: str


def _lookup(values: dict[str, Any], path: list[str]) -> Any:
    node: Any = values
    for part in path:
        node = node[part]
    return node


# Helm's names for YAML's types; bool first: in Python a bool is an int.
TYPES: tuple[tuple[type, str], ...] = (
    (bool, "bool"),
    (int, "int"),
    (float, "float"),
    (str, "string"),
    (list, "list"),
    (dict, "object"),
)


def _type(value: Any) -> str:
    return next((name for kind, name in TYPES if isinstance(value, kind)), "null")


def rows(text: str) -> list[Row]:
    """The documented values of a values.yaml, in file order. ValuesError names a key that is
    neither documented nor inside a documented object."""
    values = yaml.safe_load(text) or {}
    found: list[Row] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    documented: set[tuple[str, ...]] = set()
    doc: list[str] | None = None
    doc_type = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if (match := DOC.match(line)) is not None:
            doc, doc_type = [match["text"]], match["type"] or ""
            continue
        if doc is not None and (more := MORE.match(line)) is not None:
            doc.append(more["text"] or "")
            continue
        key = KEY.match(line)
        if key is None:
            doc = None  # a blank line, a list item or a plain comment ends a description
            continue
        indent = len(key["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key["key"]]
        stack.append((indent, key["key"]))
        if any(tuple(path[:i]) in documented for i in range(1, len(path))):
            if doc is not None:
                raise ValuesError(
                    f"values.yaml line {number}: {'.'.join(path)} has a description inside "
                    f"a value described whole ({'.'.join(path[:-1])}): describe one or the other"
                )
            continue
        value = _lookup(values, path)
        if doc is None:
            if isinstance(value, dict) and value:
                continue  # its keys are documented one by one (checked as they come)
            raise ValuesError(
                f"values.yaml line {number}: {'.'.join(path)} has no `# --` description"
            )
        documented.add(tuple(path))
        description = " ".join(part.strip() for part in doc if part.strip())
        found.append(
            Row(
                key=".".join(path),
                type=doc_type or _type(value),
                default=json.dumps(value, separators=(",", ":")),
                description=description,
            )
        )
        doc = None
    return found


def table(found: list[Row]) -> str:
    """The parameter table, in Markdown."""
    lines = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for row in found:
        cells = [f"`{row.key}`", row.type, f"`{row.default}`", row.description]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def render(chart: Path = CHART) -> str:
    """The README: the template with the chart's metadata and the values' table."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    text = TEMPLATE.read_text()
    fields = {
        "name": meta["name"],
        "description": meta["description"],
        "version": meta["version"],
        "appVersion": meta["appVersion"],
        "kubeVersion": meta["kubeVersion"],
        "values": table(rows((chart / "values.yaml").read_text())),
    }
    for name, value in fields.items():
        text = text.replace("{{ " + name + " }}", str(value))
    if "{{" in text:
        raise ValuesError(
            f"{TEMPLATE.name}: unknown placeholder near {text[text.index('{{') :][:40]!r}"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    """Write the README, or with --check say whether it is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is stale")
    parser.add_argument("--chart", type=Path, default=CHART, help="the chart's folder")
    args = parser.parse_args(argv)
    target = args.chart / "README.md"
    try:
        text = render(args.chart)
    except ValuesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        if not target.exists() or target.read_text() != text:
            print(
                f"error: {target} is out of date with values.yaml: run `make chart-readme`",
                file=sys.stderr,
            )
            return 1
        return 0
    target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
