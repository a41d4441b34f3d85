"""Operator restart and GitOps: nothing lost, nothing drifting."""

from __future__ import annotations

import json
import time

import pytest

from support import Operator, Pipelines, manifest, output_lines

pytestmark = pytest.mark.cluster


def test_pipelines_come_back_after_the_operator_is_killed(
    pipelines: Pipelines, operator: Operator
) -> None:
    pipelines.apply(manifest("r1"))
    pipelines.apply(manifest("r2", state="Ready"))
    before = {n: pipelines.wait_ready(n)["status"]["pipelineId"] for n in ("r1", "r2")}
    operator.kill()
    operator.start()
    for name in ("r1", "r2"):
        body = pipelines.wait(
            name,
            lambda b, n=name: (
                b["status"].get("pipelineId") not in (None, before[n])
                and any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in b["status"]["conditions"]
                )
            ),
            timeout=30,
            what="a new instance, Ready",
        )
        assert body["status"]["phase"] == ("Running" if name == "r1" else "Ready")
        recovered = [m for _, r, m in pipelines.events(name) if r == "Recovered"]
        assert recovered, f"{name}: no Recovered event"
        assert before[name] in recovered[0]
    first = output_lines(operator.workdir, pipelines.get("r1"))
    time.sleep(1.5)
    assert output_lines(operator.workdir, pipelines.get("r1")) > first
    # Folders of the killed process's instances were swept.
    assert not [p for p in operator.workdir.iterdir() if before["r1"] in p.name]


def test_gitops_no_annotations_and_no_diff(pipelines: Pipelines) -> None:
    body = manifest("git")
    path_input = json.dumps(body)
    pipelines.apply(body)
    live = pipelines.wait_ready("git")
    annotations = live["metadata"].get("annotations") or {}
    kopf_keys = [k for k in annotations if k.startswith("kopf.zalando.org/")]
    assert kopf_keys == []
    assert live["metadata"]["finalizers"] == ["juturna.io/cleanup"]
    diff = pipelines.kubectl(
        "-n", pipelines.namespace, "diff", "-f", "-", input=path_input, check=False
    )
    assert diff.returncode == 0, f"kubectl diff is not empty:\n{diff.stdout}{diff.stderr}"
    assert diff.stdout == ""
