"""The parts of docs/ that are made from the code, and a check that they are current.

    python hack/gen_docs.py           rewrite them (`make docs`)
    python hack/gen_docs.py --check   exit 1, naming each page that is out of date

Each generated part sits in its page between ``<!-- BEGIN GENERATED: <name> -->`` and
``<!-- END GENERATED: <name> -->``; the prose around it is written by hand. The parts:

- ``api`` in docs/pipeline-api.md: the field reference of the Pipeline API, one section per
  type, from the pydantic models in ``juturna_operator.api`` (their JSON Schema: the same
  source the CRD is built from), with the CRD's printer columns;
- ``settings`` in docs/configuration.md: every setting of the operator, from
  ``juturna_operator.settings.SETTINGS``.

Pure Python: no cluster, no network. tests/unit/test_docs.py fails when a page drifts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from juturna_operator import api, crd
from juturna_operator.settings import SETTINGS

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _prose(text: str) -> str:
    """Text on one line, its angle brackets outside code spans escaped (``<plugin>`` would
    read as an HTML tag)."""
    parts = re.split(r"(`+[^`]*`+)", " ".join(text.split()))
    return "".join(
        p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in parts
    )


def _cell(text: str) -> str:
    """Prose made safe for one cell of a Markdown table."""
    return _prose(text).replace("|", "\\|")


def _code(value: str) -> str:
    """Inline code, fenced by more backticks than any run inside it (Markdown's rule)."""
    longest = max((len(run) for run in re.findall(r"`+", value)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


# --- the API reference ---------------------------------------------------------------------


def _anchor(name: str) -> str:
    """The anchor GitHub gives a ``### Name`` heading."""
    return name.lower()


def _ref_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return str(ref).rsplit("/", 1)[-1] if ref else None


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``X | None`` (an ``anyOf`` with ``null``) as ``X``, keeping the outer keys."""
    if "anyOf" not in schema:
        return schema
    branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
    if len(branches) != 1:
        raise ValueError(f"cannot document a union of {branches}")
    merged = {k: v for k, v in schema.items() if k != "anyOf"}
    return {**branches[0], **merged}


def _type(schema: dict[str, Any]) -> str:
    """A property's type as a reader wants it, with links to the types this page lists."""
    schema = _without_null(schema)
    name = _ref_name(schema)
    if name:
        return f"[{name}](#{_anchor(name)})"
    kind = schema.get("type")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object":
        values = schema.get("additionalProperties")
        if isinstance(values, dict) and values.get("type"):
            return f"map of {_type(values)}"
        return "object"
    return str(kind or "any")


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _bounds(low: Any, high: Any, noun: str = "") -> str | None:
    """``1 to 63 characters``, ``at most 8 items``, ``at least 0``; None without bounds."""
    unit = (lambda n: _count(n, noun)) if noun else str
    if low is not None and high is not None:
        return f"{low} to {unit(high)}"
    if high is not None:
        return f"at most {unit(high)}"
    if low is not None:
        return f"at least {unit(low)}"
    return None


def _limits(schema: dict[str, Any]) -> list[str]:
    """The bounds the API server enforces on a property (its items' too, for a list)."""
    schema = _without_null(schema)
    found = [
        _bounds(schema.get("minLength"), schema.get("maxLength"), "character"),
        _bounds(schema.get("minimum"), schema.get("maximum")),
        _bounds(schema.get("minItems"), schema.get("maxItems"), "item"),
    ]
    out = [limit for limit in found if limit]
    if "pattern" in schema:
        out.append(f"matches {_code(schema['pattern'])}")
    items = schema.get("items")
    if schema.get("type") == "array" and isinstance(items, dict) and not _ref_name(items):
        out += [f"each {limit}" for limit in _limits(items)]
    return out


def _default(value: Any) -> str:
    """A default as a user writes it in YAML: a string bare where YAML reads it back as that
    string (``Running``), else as JSON (``"1.0"``, ``3``, ``{}``)."""
    if value is None:
        return ""
    bare = isinstance(value, str) and value and yaml.safe_load(value) == value
    return _code(value if bare else json.dumps(value))


def _rules(schema: dict[str, Any]) -> list[str]:
    """The CEL rules (``x-kubernetes-validations``) declared on a schema."""
    return [str(rule["rule"]) for rule in schema.get("x-kubernetes-validations", [])]


def _field_rows(model: dict[str, Any]) -> list[str]:
    required = set(model.get("required", []))
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, prop in model.get("properties", {}).items():
        kind = _type(prop) + (", **required**" if name in required else "")
        default = _default(prop.get("default"))
        notes = [str(prop.get("description", ""))]
        limits = _limits(prop)
        if limits:
            notes.append(f"*Limits:* {'; '.join(limits)}.")
        item_rules = _rules(_without_null(prop).get("items", {})) + _rules(prop)
        notes += [f"*Rule:* {_code(rule)}" for rule in item_rules]
        rows.append(f"| `{name}` | {kind} | {default} | {_cell(' '.join(notes))} |")
    return rows


def _section(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f"### {name}", ""]
    if schema.get("description"):
        out += [_prose(str(schema["description"])), ""]
    if "enum" in schema:
        out += ["One of: " + ", ".join(_code(str(v)) for v in schema["enum"]) + ".", ""]
        return out
    rules = _rules(schema)
    if rules:
        out += ["Rules the API server checks at apply (CEL):", ""]
        out += [f"- {_code(rule)}" for rule in rules]
        out.append("")
    return [*out, *_field_rows(schema), ""]


def _referenced(schema: dict[str, Any]) -> list[str]:
    """The type names a schema refers to, in the order they first appear."""
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            name = _ref_name(node)
            if name and name not in names:
                names.append(name)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema.get("properties", {}))
    return names


def _types_of(root: type[api._Model]) -> list[tuple[str, dict[str, Any]]]:
    """The root model and every type it reaches, breadth first: the order a reader meets them."""
    raw = root.model_json_schema(by_alias=True, mode="validation")
    defs: dict[str, Any] = raw.get("$defs", {})
    order, queue = [root.__name__], [raw]
    schemas = {root.__name__: raw}
    while queue:
        for name in _referenced(queue.pop(0)):
            if name not in schemas:
                schemas[name] = defs[name]
                order.append(name)
                queue.append(defs[name])
    return [(name, schemas[name]) for name in order]


def _printer_columns() -> list[str]:
    rows = ["| column | from | shown | description |", "|---|---|---|---|"]
    for column in crd.PRINTER_COLUMNS:
        shown = "with `-o wide`" if column.get("priority", 0) else "always"
        description = str(column.get("description", "When the Pipeline was created."))
        rows.append(
            f"| {str(column['name']).upper()} | `{column['jsonPath']}` | {shown} | "
            f"{_cell(description)} |"
        )
    return rows


def api_reference() -> str:
    """The field reference of the Pipeline API, as Markdown."""
    out = [
        "### Pipeline",
        "",
        "| | |",
        "|---|---|",
        f"| API version | `{api.GROUP}/{api.VERSION}` |",
        f"| kind | `{api.KIND}` |",
        f"| plural, singular | `{api.PLURAL}`, `{api.SINGULAR}` |",
        f"| short names | {', '.join(_code(n) for n in api.SHORT_NAMES)} |",
        f"| categories | {', '.join(_code(c) for c in api.CATEGORIES)} |",
        "| scope | Namespaced, with a status subresource |",
        "",
        "| field | type | description |",
        "|---|---|---|",
        f"| `spec` | [{api.PipelineSpec.__name__}](#{_anchor(api.PipelineSpec.__name__)}), "
        "**required** | What you want. |",
        f"| `status` | [{api.PipelineStatus.__name__}](#{_anchor(api.PipelineStatus.__name__)}) "
        "| What the operator observed; it writes it, never `spec`. |",
        "",
        "`kubectl get pipelines` shows:",
        "",
        *_printer_columns(),
        "",
    ]
    seen: set[str] = set()
    for root in (api.PipelineSpec, api.PipelineStatus):
        for name, schema in _types_of(root):
            if name not in seen:
                seen.add(name)
                out += _section(name, schema)
    return "\n".join(out).rstrip("\n") + "\n"


# --- the settings --------------------------------------------------------------------------


def settings_reference() -> str:
    """Every setting of the operator (``settings.SETTINGS``), as a Markdown table."""
    rows = [
        "| environment variable | flag | default | what it does |",
        "|---|---|---|---|",
    ]
    for setting in SETTINGS:
        shown = setting.shown_default
        default = _code(shown) if setting.default and not setting.shown else shown
        choices = f" One of {', '.join(map(_code, setting.choices))}." if setting.choices else ""
        meaning = setting.help[:1].upper() + setting.help[1:] + "." + choices
        rows.append(f"| `{setting.env}` | {_code(setting.flag)} | {default} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


# --- the pages -----------------------------------------------------------------------------

PARTS: dict[str, tuple[Path, Callable[[], str]]] = {
    "api": (DOCS / "pipeline-api.md", api_reference),
    "settings": (DOCS / "configuration.md", settings_reference),
}


def markers(name: str) -> tuple[str, str]:
    """The lines that open and close a generated part."""
    return f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"


def splice(text: str, name: str, body: str) -> str:
    """``text`` with the part ``name`` replaced by ``body``."""
    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"the page has no single {begin} ... {end} pair")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}{end}{tail}"


def expected(name: str) -> tuple[Path, str]:
    """A page and the text it should have, its part ``name`` freshly generated."""
    page, make = PARTS[name]
    return page, splice(page.read_text(), name, make())


def main(argv: list[str] | None = None) -> int:
    """Rewrite the generated parts, or with ``--check`` report the pages out of date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report pages out of date")
    args = parser.parse_args(argv)
    stale = []
    for name in PARTS:
        page, text = expected(name)
        if page.read_text() == text:
            continue
        stale.append(page)
        if not args.check:
            page.write_text(text)
            print(f"wrote {page.relative_to(REPO)}")
    if args.check and stale:
        for page in stale:
            print(f"{page.relative_to(REPO)} is out of date: run `make docs`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
