"""Operator restart and GitOps: nothing lost, nothing drifting."""

from __future__ import annotations

import json
import time

import pytest
from processes import processes_mentioning

from support import (
    DENSE_PROCESS,
    OPERATOR_ENGINES,
    Operator,
    Pipelines,
    manifest,
    output_lines,
    pipelines_per_process,
)

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("operator", [*OPERATOR_ENGINES, DENSE_PROCESS], indirect=True)
def test_pipelines_come_back_after_the_operator_is_killed(
    pipelines: Pipelines, operator: Operator
) -> None:
    pipelines.apply(manifest("r1"))
    pipelines.apply(manifest("r2", state="Standby"))
    before = {n: pipelines.wait_ready(n)["status"]["pipelineId"] for n in ("r1", "r2")}
    workers_before = sorted(processes_mentioning(f"--folder {operator.workdir} "))
    operator.kill()
    operator.start()
    if operator.engine == "process":
        # Workers outlive the operator and are adopted: same instances, same processes (a
        # worker each; one for the namespace with many pipelines per process).
        time.sleep(2)
        for name in ("r1", "r2"):
            body = pipelines.wait_ready(name)
            assert body["status"]["pipelineId"] == before[name]
        assert sorted(processes_mentioning(f"--folder {operator.workdir} ")) == workers_before
        assert len(workers_before) == (1 if pipelines_per_process(operator) > 1 else 2)
    else:
        # In-process instances died with the process, and a service's instances are no
        # longer known: each is deployed again.
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
            assert body["status"]["phase"] == ("Running" if name == "r1" else "Standby")
            recovered = [m for _, r, m in pipelines.events(name) if r == "Recovered"]
            assert recovered, f"{name}: no Recovered event"
            assert before[name] in recovered[0]
        # What the killed process held is gone: in-process instances died with it and their
        # folders were swept at start; on a service, the orphan sweep deletes them.
        deadline = time.monotonic() + 15
        while [p for p in operator.workdir.iterdir() if before["r1"] in p.name]:
            assert time.monotonic() < deadline, "the old instance's folder was not removed"
            time.sleep(0.2)
    first = output_lines(operator.workdir, pipelines.get("r1"))
    time.sleep(1.5)
    assert output_lines(operator.workdir, pipelines.get("r1")) > first


def test_a_stopped_operator_ends_its_passes_cleanly_and_the_next_adopts_every_pipeline(
    pipelines: Pipelines, operator: Operator
) -> None:
    """SIGTERM with Pipelines Running and their next looks queued: kopf's cleanup stops the
    reconcile queue's workers and closes the engine, and the process exits by itself, within
    the grace, without an error; the next operator queues every Pipeline it lists, and each
    is Ready again."""
    names = [f"s{i}" for i in range(4)]
    for name in names:
        pipelines.apply(manifest(name))
    for name in names:
        pipelines.wait_ready(name)
    log_start = len(operator.log_text())
    assert operator.proc is not None
    operator.stop()
    assert operator.proc.returncode == 0, f"ended by {operator.proc.returncode}, not by itself"
    log = operator.log_text()[log_start:]
    assert "engine closed" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    operator.start()
    for name in names:
        body = pipelines.wait_ready(name, timeout=30)
        assert body["status"]["phase"] == "Running"
    for name in names:
        pipelines.delete(name)
    for name in names:
        pipelines.wait_gone(name)


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
