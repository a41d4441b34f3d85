"""Logs: text by default, JSON with one setting; every line about a pipeline names it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from kubernetes import client

from juturna_operator.engines.pod import MANAGED_BY
from support import (
    Kubectl,
    Operator,
    Pipelines,
    assert_sole_operator,
    faulty,
    manifest,
    wait_until,
)

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


# kopf's own line for each watch event it handled (after the "[namespace/name] " prefix
# that names the object), and the line it would write for a change or deletion handled: the
# operator has no such handler (its finalizer is its own), so kopf writes none.
KOPF_SUCCESS = re.compile(
    r"(?:^|\] )(?:Handler '(\w+)' succeeded\.|\w+ is processed: \d+ succeeded; 0 failed\.)$"
)


def records(op: Operator) -> list[dict]:
    return [json.loads(line) for line in op.log_text().splitlines() if line.strip()]


@pytest.mark.usefixtures("crd")
def test_kopfs_per_event_success_lines_are_debug_not_info(
    kubeconfig: Path,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
) -> None:
    """The pod engine watches every pod with its label, other tenants' included: each watch
    event runs a handler. With ``-v`` (DEBUG) the log shows kopf's success line for each, at
    debug; nothing at info or above says a handler succeeded, so the default (INFO) log
    holds the transitions and problems. No node: the pod stays Pending, the Pipeline fails
    validation before any pod of its own is made."""
    assert_sole_operator(kubeconfig)
    op = Operator(kubeconfig, tmp_path / "work", tmp_path / "operator.log", tmp_path, "pod")
    op.env["JUTURNA_OPERATOR_RUNTIME_IMAGE"] = "localhost/juturna-operator:unused"
    op.env["JUTURNA_OPERATOR_LOG_FORMAT"] = "json"
    op.where.append("-v")
    pipelines = Pipelines(objects, namespace, kubectl)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "other-tenants", "labels": dict(MANAGED_BY)},
        "spec": {"containers": [{"name": "c", "image": "localhost/nothing:unused"}]},
    }
    op.start()
    try:
        # The namespace's default ServiceAccount may not exist yet: the pod waits for it.
        wait_until(
            lambda: (
                kubectl(
                    "-n", namespace, "apply", "-f", "-", input=json.dumps(pod), check=False
                ).returncode
                == 0
            ),
            timeout=30,
            what="the labelled pod created",
        )
        kubectl("-n", namespace, "label", "pod", "other-tenants", "touched=yes")
        bad = manifest("cyclic")
        bad["spec"]["links"].append({"from": "out", "to": "amp"})
        pipelines.apply(bad)
        pipelines.wait_phase("cyclic", "Failed")
        pipelines.delete("cyclic")
        pipelines.wait_gone("cyclic")

        def handled() -> set[str]:
            return {
                m.group(1) or "deletion"
                for r in records(op)
                if r.get("severity") == "debug" and (m := KOPF_SUCCESS.search(r["message"]))
            }

        wait_until(
            lambda: {"pod_event", "enqueue"} <= handled(),
            timeout=30,
            what="kopf's success lines for the pod and the Pipeline, at debug",
            last=lambda: sorted(handled()),
        )
    finally:
        op.stop()
    loud = [r for r in records(op) if r.get("severity") != "debug"]
    said = [r["message"] for r in loud if KOPF_SUCCESS.search(r["message"])]
    assert not said, f"kopf's success lines above debug: {said}"
    # What the INFO log is for is still there: the problem, and the pipeline's name on it.
    problems = [r for r in loud if r["severity"] == "warn" and "InvalidGraph" in r["message"]]
    assert problems, "the InvalidGraph warning is not in the log"
    assert problems[0]["object"]["name"] == "cyclic"
