"""Logs: text by default, JSON with one setting; every line about a pipeline names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes import client

from support import Kubectl, Operator, Pipelines, assert_sole_operator, faulty, manifest

pytestmark = [pytest.mark.cluster, pytest.mark.own_operator]


@pytest.mark.usefixtures("crd")
def test_json_logs_name_the_pipeline_on_every_line_about_it(
    kubeconfig: Path,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
) -> None:
    assert_sole_operator(kubeconfig)
    pipelines = Pipelines(objects, namespace, kubectl)
    op = Operator(kubeconfig, tmp_path / "work", tmp_path / "operator.log", tmp_path, "inprocess")
    op.env["JUTURNA_OPERATOR_LOG_FORMAT"] = "json"
    op.start()
    try:
        pipelines.apply(manifest("calm"))
        pipelines.wait_ready("calm")
        pipelines.apply(
            faulty(
                "crashy",
                ("src", "source", "ticker", {"rate": 50}),
                ("crash", "proc", "crasher", {"after": 5}),
                ("out", "sink", "jsonl", {}),
                restartPolicy={"maxRestarts": 0},
            )
        )
        pipelines.wait_phase("crashy", "Failed")
        for name in ("calm", "crashy"):
            pipelines.delete(name)
            pipelines.wait_gone(name)
    finally:
        op.stop()

    lines = [line for line in op.log_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line is not JSON: {line!r}")
    about: dict[str, list[dict]] = {"calm": [], "crashy": []}
    for record in records:
        text = json.dumps(record)
        for name, found in about.items():
            if f"/{name}" in text or f"__{name}__" in text:
                ref = record.get("object") or {}
                assert (ref.get("namespace"), ref.get("name")) == (pipelines.namespace, name), (
                    f"a line about {name} does not name it: {record}"
                )
                found.append(record)
    # Both pipelines were logged about, including the engine's own line on the crash.
    assert about["calm"], "no line about calm"
    crash_lines = [r["message"] for r in about["crashy"] if "crashed" in r["message"]]
    assert any("node 'crash' crashed: RuntimeError: kaboom" in m for m in crash_lines), crash_lines
    assert all(r.get("object", {}).get("namespace") for r in records if "Handler" in r["message"])
