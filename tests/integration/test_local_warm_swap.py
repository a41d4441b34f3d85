"""Warm swaps on the engines beside the operator (issue 26, item 7): a change to a running
Pipeline that listens on no port warms the new revision up in a second instance while the old
one serves, then switches; one that listens on this machine's ports is replaced in place,
with a Normal Event saying why.

The pipeline: a ticker, a proc whose warmup takes ``WARMUP_S`` (a model load), a proc that
stamps each message with a label (the revision's mark), and the example sink, which appends
JSON lines to ``out/output.jsonl`` in the Pipeline's folder. The folder belongs to the
resource: the new instance takes it over at its create, and the old one keeps appending to
the file it has open, so the test reads one growing file, polled while the swap goes on.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from processes import processes_mentioning

from support import (
    DENSE_PROCESS,
    OPERATOR_ENGINES,
    WARM_SWAP_ENGINES,
    Operator,
    Pipelines,
    condition,
    faulty,
    wait_until,
)

pytestmark = pytest.mark.cluster

WARMUP_S = 4.0
RATE = 10  # messages per second


def stamped(name: str, label: str, **spec: Any) -> dict[str, Any]:
    """ticker → slow (its warmup) → scale (stamps ``label``) → jsonl (the Pipeline's folder)."""
    return faulty(
        name,
        ("src", "source", "ticker", {"rate": RATE}),
        ("slow", "proc", "slow", {"seconds": WARMUP_S}),
        ("stamp", "proc", "scale", {"factor": 1, "label": label}),
        ("out", "sink", "jsonl", {"file": "output.jsonl"}),
        **spec,
    )


def swapping(operator: Operator) -> Operator:
    if operator.engine not in WARM_SWAP_ENGINES:
        pytest.skip(f"engine {operator.engine} updates by Recreate")
    return operator


def written(workdir: Path, uid: str) -> list[dict[str, Any]]:
    """Every line the sink wrote for the resource ``uid``, in every folder of it (one, but
    polled while an instance takes it over)."""
    out = []
    for file in sorted(workdir.glob(f"*__{uid[:8]}_*/out/output.jsonl")):
        for line in file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being written
                continue
    return out


def change_label(pipelines: Pipelines, name: str, label: str) -> float:
    """A configuration change (a new revision); returns when it was made."""
    spec = pipelines.get(name)["spec"]
    for node in spec["nodes"]:
        if node["name"] == "stamp":
            node["configuration"]["label"] = label
    made = time.monotonic()
    pipelines.patch_spec(name, {"nodes": spec["nodes"]})
    return made


@dataclass
class Seen:
    """What a poll of the output and the status saw during an update."""

    longest_gap: float = 0.0  # the longest time the output did not grow
    steps: list[str] = field(default_factory=list)  # the Updating condition's reasons, in order
    label_at: float | None = None  # when the new revision's label first showed
    body: dict[str, Any] = field(default_factory=dict)


def watch(
    pipelines: Pipelines,
    workdir: Path,
    name: str,
    label: str,
    timeout: float,
    at_step: tuple[str, Any] | None = None,
) -> Seen:
    """Poll the output and the status until the update is done (the latest generation
    Ready, no update under way, ``label`` in the output for a second). ``at_step``: (a
    step, a call) made once when the Updating condition first shows that step."""
    seen, deadline = Seen(), time.monotonic() + timeout
    uid = pipelines.get(name)["metadata"]["uid"]
    lines, grew = len(written(workdir, uid)), time.monotonic()
    while time.monotonic() < deadline:
        now_lines = written(workdir, uid)
        now = time.monotonic()
        seen.longest_gap = max(seen.longest_gap, now - grew)
        if len(now_lines) > lines:
            lines, grew = len(now_lines), now
        if seen.label_at is None and any(line.get("label") == label for line in now_lines):
            seen.label_at = now
        body = seen.body = pipelines.get(name)
        status = body.get("status") or {}
        updating = condition(body, "Updating")
        if updating.get("status") == "True" and updating.get("reason") not in seen.steps[-1:]:
            seen.steps.append(updating["reason"])
            if at_step is not None and at_step[0] == updating["reason"]:
                at_step[1]()
        done = (
            status.get("observedGeneration") == body["metadata"]["generation"]
            and condition(body, "Ready").get("status") == "True"
            and not status.get("update")
        )
        if done and seen.label_at is not None and now - seen.label_at > 1.0:
            return seen
        time.sleep(0.1)
    pytest.fail(f"{name}: no finished update in {timeout} s; saw {seen}")


def instances_of(operator: Operator, uid: str) -> list[int]:
    """The worker processes of the resource ``uid`` (engine process)."""
    return processes_mentioning(f"--owner {uid}")


def assert_swapped(
    pipelines: Pipelines,
    operator: Operator,
    name: str,
    old_id: str,
    seen: Seen,
    events: tuple[str, ...] = ("WarmingUpNew", "Draining", "Updated"),
) -> None:
    """The update ran as a warm swap and ended with one instance, the new one, serving; each
    of ``events`` was posted."""
    body = seen.body
    # The old instance served through the new one's warmup: no silence as long as one (a
    # Recreate stops it for 4.2-4.4 s here; a swap through an operator SIGKILL, 2.1 s once).
    assert seen.longest_gap < WARMUP_S * 0.75, f"the output stopped for {seen.longest_gap:.2f} s"
    assert seen.steps[:1] == ["WarmingUpNew"], seen.steps
    assert "Draining" in seen.steps, seen.steps
    assert body["status"]["pipelineId"] != old_id
    assert body["status"]["phase"] == "Running"
    reasons = [r for _, r, _ in pipelines.events(name)]
    for step in events:
        assert step in reasons, reasons
    assert "Recreate" not in reasons, reasons
    uid = body["metadata"]["uid"]
    # One instance left (the old one's worker ends after the drain), and one folder.
    if operator.engine == "process":
        wait_until(lambda: len(instances_of(operator, uid)) == 1, 15, "one worker left")
        records = operator.workdir / ".workers" / "pipelines"
        wait_until(lambda: len(list(records.glob(f"{uid}*.json"))) == 1, 15, "one record left")
    folders = [p for p in operator.workdir.glob(f"*__{uid[:8]}_*") if p.is_dir()]
    assert [p.name.rsplit("_", 1)[1] for p in folders] == [body["status"]["pipelineId"]]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("operator", [*OPERATOR_ENGINES, DENSE_PROCESS], indirect=True)
def test_a_change_warms_a_second_instance_beside_the_first_then_switches(
    pipelines: Pipelines, operator: Operator
) -> None:
    """The output never stops for as long as a warmup; the new label shows; the status
    says each step; one instance is left, in the Pipeline's one folder."""
    swapping(operator)
    body = stamped("swap", "A", update={"drainSeconds": 1})
    pipelines.apply(body)
    old_id = pipelines.wait_ready("swap", timeout=WARMUP_S + 30)["status"]["pipelineId"]
    uid = pipelines.get("swap")["metadata"]["uid"]
    wait_until(lambda: len(written(operator.workdir, uid)) >= RATE, 15, "output from A")

    change_label(pipelines, "swap", "B")
    seen = watch(pipelines, operator.workdir, "swap", "B", WARMUP_S + 60)
    assert_swapped(pipelines, operator, "swap", old_id, seen)
    labels = [line.get("label") for line in written(operator.workdir, uid)]
    assert (labels[0], labels[-1]) == ("A", "B"), (labels[:3], labels[-3:])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("step", ["WarmingUpNew", "Draining"])
@pytest.mark.parametrize("operator", [*OPERATOR_ENGINES, DENSE_PROCESS], indirect=True)
def test_an_operator_killed_during_a_warm_swap_adopts_both_instances_and_completes_it(
    step: str, pipelines: Pipelines, operator: Operator
) -> None:
    """SIGKILL while the new instance warms up (the candidate), or while the old one drains
    (retired, in the candidate slot): the next operator adopts each worker in its slot
    (never two active), and the swap completes, the output going on meanwhile."""
    swapping(operator)
    if operator.engine != "process":
        pytest.skip(f"engine {operator.engine}'s instances die with the operator")
    name = f"kill-{step.lower()}"
    pipelines.apply(stamped(name, "A", update={"drainSeconds": 4}))
    old_id = pipelines.wait_ready(name, timeout=WARMUP_S + 30)["status"]["pipelineId"]
    uid = pipelines.get(name)["metadata"]["uid"]
    wait_until(lambda: len(written(operator.workdir, uid)) >= RATE, 15, "output from A")

    def kill_and_restart() -> None:
        operator.kill()
        operator.start()

    change_label(pipelines, name, "B")
    logged = len(operator.log_text())
    seen = watch(pipelines, operator.workdir, name, "B", WARMUP_S + 90, (step, kill_and_restart))
    assert step in seen.steps, seen.steps
    # The process that went through the drain posts Updated; one that adopted a draining
    # instance knows no update under way, and removes it without one.
    assert_swapped(pipelines, operator, name, old_id, seen, ("WarmingUpNew", "Draining"))
    adopted = re.findall(r"adopted (?:worker|pipeline) \S+ \((\w+)\)", operator.log_text()[logged:])
    assert sorted(adopted) == ["active", "candidate"], adopted


def test_a_listening_pipeline_is_replaced_in_place_with_an_event_saying_why(
    pipelines: Pipelines, operator: Operator
) -> None:
    """Two instances would bind the same port of this machine (a plugin node declares the
    port it listens on): the change lands the Recreate way, and a Normal Event says so,
    naming the port."""
    swapping(operator)
    body = stamped("lis", "A")
    body["spec"]["nodes"][0]["ports"] = [{"name": "http", "port": 9123, "protocol": "TCP"}]
    pipelines.apply(body)
    old_id = pipelines.wait_ready("lis", timeout=WARMUP_S + 30)["status"]["pipelineId"]
    change_label(pipelines, "lis", "B")
    body = pipelines.wait(
        "lis",
        lambda b: (
            b["status"].get("observedGeneration") == 2
            and b["status"].get("pipelineId") not in (None, old_id)
            and condition(b, "Ready").get("status") == "True"
        ),
        WARMUP_S + 30,
        "the new revision Ready",
    )
    recreate = [(k, m) for k, r, m in pipelines.events("lis") if r == "Recreate"]
    assert recreate == [
        (
            "Normal",
            f"the update replaces the instance in place: engine {operator.engine} runs a "
            "Pipeline that listens (TCP 9123) on this machine's "
            "ports: two instances would collide",
        )
    ], recreate
    assert "WarmingUpNew" not in [r for _, r, _ in pipelines.events("lis")]
