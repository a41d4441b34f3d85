"""The Pipeline lifecycle through the real operator, control plane and Juturna."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from juturna_operator.convert import to_manifest
from juturna_operator.patching import FINALIZER
from support import (
    REPO,
    WARM_SWAP_ENGINES,
    Operator,
    Pipelines,
    condition,
    health,
    instance_folders,
    is_ready,
    manifest,
    output_lines,
    output_of,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.cluster


def grows(operator: Operator, pipelines: Pipelines, name: str, wait: float = 1.5) -> bool:
    body = pipelines.get(name)
    before = output_lines(operator.workdir, body)
    time.sleep(wait)
    return output_lines(operator.workdir, pipelines.get(name)) > before


def test_happy_path(pipelines: Pipelines, operator: Operator) -> None:
    pipelines.apply(manifest("tones"))
    body = pipelines.wait_ready("tones")
    status = body["status"]
    assert status["phase"] == "Running"
    assert status["observedGeneration"] == body["metadata"]["generation"]
    assert status["nodesReady"] == "3/3"
    assert {n["name"]: n["status"] for n in status["nodes"]} == {
        "src": "Running",
        "amp": "Running",
        "out": "Running",
    }
    assert "failure" not in status or status["failure"] is None
    for ctype in ("Created", "WarmedUp", "Running", "Ready"):
        assert condition(body, ctype)["status"] == "True", ctype
    assert grows(operator, pipelines, "tones")
    line = output_of(operator.workdir, pipelines.get("tones"))[-1]
    assert line["value"] == line["count"] * 10
    assert line["label"] == "demo"
    table = pipelines.kubectl("-n", pipelines.namespace, "get", "pipelines").stdout
    header, row = table.split("\n")[:2]
    assert header.split() == [
        "NAME",
        "STATE",
        "PHASE",
        "READY",
        "NODES",
        "RESTARTS",
        "REASON",
        "AGE",
    ]
    assert row.split()[:6] == ["tones", "Running", "Running", "True", "3/3", "0"]
    wide = pipelines.kubectl("-n", pipelines.namespace, "get", "pipelines", "-o", "wide").stdout
    header, row = wide.split("\n")[:2]
    assert header.split()[-3:] == ["ADDRESS", "NODE", "MESSAGE"]
    assert row.endswith("the pipeline is Running"), wide  # the Ready condition's message


def test_state_changes(pipelines: Pipelines, operator: Operator) -> None:
    pipelines.apply(manifest("st"))
    first = pipelines.wait_ready("st")["status"]["pipelineId"]

    # Running -> Standby: stop, stay warm, same instance; output stops.
    pipelines.patch_spec("st", {"state": "Standby"})
    body = pipelines.wait_ready("st")
    assert body["status"]["phase"] == "Standby"
    assert body["status"]["pipelineId"] == first
    assert condition(body, "Running")["status"] == "False"
    assert condition(body, "WarmedUp")["status"] == "True"
    assert not grows(operator, pipelines, "st", wait=1.0)

    # Standby -> Running after a stop: Juturna cannot restart it, so a new instance runs.
    pipelines.patch_spec("st", {"state": "Running"})
    body = pipelines.wait_ready("st")
    assert body["status"]["phase"] == "Running"
    assert body["status"]["pipelineId"] != first
    assert grows(operator, pipelines, "st")

    # Running -> Stopped: no instance; the resource stays (and, beside the operator, its
    # output: test_output_stays_with_the_resource_until_it_is_deleted).
    pipelines.patch_spec("st", {"state": "Stopped"})
    body = pipelines.wait_ready("st")
    assert body["status"]["phase"] == "Stopped"
    assert body["status"].get("pipelineId") is None
    assert body["status"]["nodesReady"] == "0/3"
    assert len(instance_folders(operator.workdir, body)) == (operator.engine != "service")

    # Stopped -> Running.
    pipelines.patch_spec("st", {"state": "Running"})
    pipelines.wait_ready("st")
    assert grows(operator, pipelines, "st")


def test_standby_from_the_start_is_a_warm_standby(pipelines: Pipelines, operator: Operator) -> None:
    pipelines.apply(manifest("standby", state="Standby"))
    body = pipelines.wait_ready("standby")
    assert body["status"]["phase"] == "Standby"
    assert output_lines(operator.workdir, body) == 0
    pipelines.patch_spec("standby", {"state": "Running"})
    body = pipelines.wait_ready("standby")
    assert body["status"]["phase"] == "Running"
    assert grows(operator, pipelines, "standby")


def test_the_old_word_ready_stays_a_warm_standby_and_a_warning_asks_for_standby(
    pipelines: Pipelines, operator: Operator
) -> None:
    """A Pipeline stored before the warm standby was called Standby says ``state: Ready``. It
    must keep its meaning (warm, never started: an unknown state would be read as Running),
    and one Warning Event asks for the new word."""
    pipelines.apply(manifest("oldword", state="Ready"))
    body = pipelines.wait_ready("oldword")
    assert body["spec"]["state"] == "Ready"  # stored as written: nothing rewrites the spec
    assert body["status"]["phase"] == "Standby"
    assert condition(body, "WarmedUp")["status"] == "True"
    assert condition(body, "Running")["status"] == "False"
    assert condition(body, "Ready")["message"] == "the pipeline is Standby"
    assert not grows(operator, pipelines, "oldword", wait=1.0)
    assert output_lines(operator.workdir, pipelines.get("oldword")) == 0

    def warnings() -> list[str]:
        return [m for kind, r, m in pipelines.events("oldword") if r == "DeprecatedField"]

    wait_until(warnings, 10, "a DeprecatedField Warning", warnings)
    assert warnings() == [
        'spec.state "Ready" is deprecated: write "Standby" (the same warm standby: created and '
        "warmed up, not started); it is read as Standby until then"
    ]
    assert pipelines.get("oldword")["status"]["phase"] == "Standby"  # still warm, not started


def test_spec_change_redeploys_and_an_invalid_change_keeps_the_old_instance(
    pipelines: Pipelines, operator: Operator
) -> None:
    pipelines.apply(manifest("chg"))
    pipelines.wait_ready("chg")
    body = manifest("chg")
    body["spec"]["nodes"][1]["configuration"]["factor"] = 7
    pipelines.apply(body)
    body = pipelines.wait_ready("chg")
    assert body["status"]["observedGeneration"] == 2

    def seven(b: dict) -> bool:
        out = output_of(operator.workdir, b)
        return bool(out) and out[-1]["value"] == out[-1]["count"] * 7

    pipelines.wait("chg", seven, what="output scaled by the new factor")
    running = body["status"]["pipelineId"]
    recreate = [(k, m) for k, r, m in pipelines.events("chg") if r == "Recreate"]
    if operator.engine in WARM_SWAP_ENGINES:
        # It listens on no port: the change landed as a warm swap (test_local_warm_swap.py).
        assert recreate == []
    else:
        # The change landed the Recreate way, and one Normal Event says why (the spec did not
        # ask for Recreate).
        assert recreate == [
            (
                "Normal",
                "the update replaces the instance in place: engine "
                f"{operator.engine} runs one instance of a Pipeline at a time",
            )
        ], recreate

    # An invalid change (a cycle): the old instance keeps running, the failure is reported.
    bad = manifest("chg")
    bad["spec"]["nodes"][1]["configuration"]["factor"] = 7
    bad["spec"]["links"].append({"from": "out", "to": "amp"})
    pipelines.apply(bad)
    body = pipelines.wait(
        "chg",
        lambda b: b["status"].get("observedGeneration") == 3 and b["status"].get("failure"),
        what="the failure of generation 3",
    )
    failure = body["status"]["failure"]
    assert failure["reason"] == "InvalidGraph"
    assert failure["code"] == 422
    assert failure["step"] == "validate"
    assert failure["message"] == (
        "links form a cycle: amp -> out -> amp; Juturna would never run these nodes"
    )
    assert body["status"]["pipelineId"] == running
    assert body["status"]["phase"] == "Running"
    assert condition(body, "Ready")["status"] == "False"
    assert condition(body, "Ready")["reason"] == "InvalidGraph"
    assert grows(operator, pipelines, "chg")


def test_output_stays_with_the_resource_until_it_is_deleted(
    pipelines: Pipelines, operator: Operator
) -> None:
    """Every redeploy of one resource (a spec change, Running after a stop, Running after
    Stopped) hands the pipeline's folder to the next instance; only deletion wipes it."""
    only_on_local_folders(operator)
    workdir = operator.workdir
    pipelines.apply(manifest("keep"))
    pipelines.wait("keep", lambda b: len(output_of(workdir, b)) >= 2, what="some output")
    kept = output_of(workdir, pipelines.get("keep"))
    seen = {pipelines.get("keep")["status"]["pipelineId"]}

    def carried_on(b: dict) -> bool:
        out = output_of(workdir, b)
        return (
            b["status"].get("pipelineId") not in seen
            and is_ready(b)
            and out[: len(kept)] == kept
            # The new instance wrote (its ticker counts from 0 again): lines after ``kept``
            # may still be the old instance's, written before it was stopped.
            and any(line["count"] == 0 for line in out[len(kept) :])
        )

    def redeployed(what: str) -> None:
        nonlocal kept
        body = pipelines.wait("keep", carried_on, what=what)
        seen.add(body["status"]["pipelineId"])
        kept = output_of(workdir, body)
        assert len(instance_folders(workdir, body)) == 1

    changed = manifest("keep")
    changed["spec"]["nodes"][1]["configuration"]["factor"] = 7
    pipelines.apply(changed)
    redeployed("the new spec's instance, writing after the old output")
    # The new factor's lines come (after a warm swap the old instance may still append its
    # own for its drain, so the last line need not be the new one's).
    pipelines.wait(
        "keep",
        lambda b: any(
            line["count"] and line["value"] == 7 * line["count"] for line in output_of(workdir, b)
        ),
        what="the new spec's output",
    )

    pipelines.patch_spec("keep", {"state": "Standby"})
    pipelines.wait_phase("keep", "Standby")
    pipelines.patch_spec("keep", {"state": "Running"})
    redeployed("Running again after a stop, writing after the old output")

    pipelines.patch_spec("keep", {"state": "Stopped"})
    stopped = pipelines.wait_phase("keep", "Stopped")
    assert len(instance_folders(workdir, stopped)) == 1, "the output went with the instance"
    pipelines.patch_spec("keep", {"state": "Running"})
    redeployed("Running after Stopped, writing after the old output")

    pipelines.delete("keep")
    pipelines.wait_gone("keep", timeout=15)
    assert instance_folders(workdir, stopped) == []


def only_on_local_folders(operator: Operator) -> None:
    if operator.engine == "service":
        pytest.skip("a runtime's folders are its own: each instance there has its own folder")


def test_delete_while_running_cleans_up(pipelines: Pipelines, operator: Operator) -> None:
    pipelines.apply(manifest("del"))
    body = pipelines.wait_ready("del")
    assert instance_folders(operator.workdir, body)
    pipelines.delete("del")
    pipelines.wait_gone("del", timeout=15)
    assert instance_folders(operator.workdir, body) == []


# Another writer's finalizer (Argo CD's, a user's): the operator's writes must keep it.
OTHER_FINALIZER = "example.com/keep"


def patch_finalizers(pipelines: Pipelines, name: str, ops: list[dict[str, object]]) -> None:
    pipelines.kubectl(
        "-n", pipelines.namespace, "patch", "pipeline", name, "--type=json", "-p", json.dumps(ops)
    )


def test_the_operators_own_finalizer_leaves_other_finalizers_alone(
    pipelines: Pipelines, operator: Operator
) -> None:
    """Issue 28: the finalizer is the operator's, not kopf's. It goes after another writer's,
    comes back when removed by hand, and after the finalize goes alone: the other keeps the
    Pipeline until its writer lets go. kopf writes nothing (no progress in the status)."""
    body = manifest("fin")
    body["metadata"]["finalizers"] = [OTHER_FINALIZER]
    pipelines.apply(body)
    live = pipelines.wait_ready("fin")
    assert live["metadata"]["finalizers"] == [OTHER_FINALIZER, FINALIZER]
    assert "kopf" not in live["status"], live["status"]
    patch_finalizers(pipelines, "fin", [{"op": "remove", "path": "/metadata/finalizers/1"}])
    pipelines.wait(
        "fin",
        lambda b: b["metadata"].get("finalizers") == [OTHER_FINALIZER, FINALIZER],
        what="the finalizer removed by hand put back",
    )
    pipelines.delete("fin")
    left = pipelines.wait(
        "fin",
        lambda b: b["metadata"].get("finalizers") == [OTHER_FINALIZER],
        what="the operator's finalizer gone, the other one kept",
    )
    assert left["metadata"].get("deletionTimestamp")
    if operator.engine != "service":  # a runtime's folders are its own
        assert instance_folders(operator.workdir, live) == [], "removed before the finalize"
    patch_finalizers(pipelines, "fin", [{"op": "remove", "path": "/metadata/finalizers/0"}])
    pipelines.wait_gone("fin")


def test_a_pipeline_deleted_before_its_finalizer_was_added_deploys_nothing(
    pipelines: Pipelines, operator: Operator
) -> None:
    """Made and deleted while the operator is paused: it goes at once (no finalizer yet).
    The operator then sees it made and deleted; its first pass must not deploy it (the
    finalizer's add finds it gone), and the deletion is told in the log."""
    assert operator.proc is not None
    os.kill(operator.proc.pid, signal.SIGSTOP)
    try:
        pipelines.apply(manifest("early"))
        uid = pipelines.get("early")["metadata"]["uid"]
        pipelines.delete("early")
        pipelines.wait_gone("early")
    finally:
        os.kill(operator.proc.pid, signal.SIGCONT)
    said = f"{pipelines.namespace}/early] deleted without its finalizer"
    wait_until(lambda: said in operator.log_text(), 10, "the operator's word on it")
    time.sleep(1.0)  # a pass that wrongly deployed it would have made its folder by now
    if operator.engine != "service":  # a runtime's folders are its own
        assert instance_folders(operator.workdir, {"metadata": {"uid": uid}}) == []


def test_events_tell_each_step_one_event_per_pass(pipelines: Pipelines) -> None:
    pipelines.apply(manifest("ev"))
    pipelines.wait_ready("ev")
    pipelines.patch_spec("ev", {"state": "Standby"})
    pipelines.wait_ready("ev")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        normal = {reason: m for kind, reason, m in pipelines.events("ev") if kind == "Normal"}
        if {"Started", "Stopped"} <= set(normal):
            break
        time.sleep(0.2)
    # Creation is one pass: one Event (one API write) names its three steps, in order.
    assert set(normal) == {"Started", "Stopped"}, normal
    assert re.fullmatch(
        r"pipeline instance [0-9a-f-]+ created; all nodes warmed up; pipeline started",
        normal["Started"],
    ), normal["Started"]
    assert normal["Stopped"] == "pipeline stopped"


def test_the_argocd_health_check_on_live_objects(pipelines: Pipelines) -> None:
    pipelines.apply(manifest("argo"))
    assert health(pipelines.wait_ready("argo")) == {
        "status": "Healthy",
        "message": "the pipeline is Running",
    }
    pipelines.patch_spec("argo", {"state": "Standby"})
    assert health(pipelines.wait_ready("argo"))["status"] == "Healthy"  # a warm standby
    bad = manifest("argo")
    bad["spec"]["links"].append({"from": "out", "to": "amp"})
    pipelines.apply(bad)
    body = pipelines.wait("argo", lambda b: bool(b["status"].get("failure")), what="failure")
    assert health(body) == {
        "status": "Degraded",
        "message": "InvalidGraph: links form a cycle: amp -> out -> amp; Juturna would never "
        "run these nodes",
    }


def test_metrics_during_a_lifecycle(pipelines: Pipelines, operator: Operator) -> None:
    ns = pipelines.namespace
    pipelines.apply(manifest("m1"))
    pipelines.wait_ready("m1")
    text = scrape(operator)
    assert f'juturna_pipelines{{namespace="{ns}",phase="Running"}} 1.0' in text
    assert f'juturna_pipeline_restarts{{namespace="{ns}",pipeline="m1"}} 0.0' in text
    assert f'juturna_pipeline_time_to_ready_seconds_count{{namespace="{ns}"}} 1.0' in text
    assert 'to_phase="Running"} 1.0' in text
    bad = manifest("m1")
    bad["spec"]["links"].append({"from": "out", "to": "amp"})
    pipelines.apply(bad)
    pipelines.wait("m1", lambda b: bool(b["status"].get("failure")), what="failure")
    deadline = time.monotonic() + 5
    failures = f'juturna_pipeline_failures_total{{namespace="{ns}",reason="InvalidGraph"}} 1.0'
    while failures not in scrape(operator):
        assert time.monotonic() < deadline, scrape(operator)
        time.sleep(0.1)
    pipelines.delete("m1")
    pipelines.wait_gone("m1")
    deadline = time.monotonic() + 5
    while 'pipeline="m1"' in scrape(operator):  # a deleted pipeline's series go with it
        assert time.monotonic() < deadline, "series of a deleted pipeline remain"
        time.sleep(0.1)
    assert f'juturna_pipelines{{namespace="{ns}"' not in scrape(operator)


def test_a_converted_juturna_config_runs(pipelines: Pipelines) -> None:
    config = json.loads((REPO / "tests" / "data" / "juturna" / "tones.json").read_text())
    body = to_manifest(config)
    pipelines.apply(body)
    assert pipelines.wait_ready("tones-demo")["status"]["phase"] == "Running"
