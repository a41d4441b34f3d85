"""Failures that name their cause: validation, warmup, runtime crashes, hung stops."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from processes import processes_mentioning

from support import (
    Operator,
    Pipelines,
    chain,
    condition,
    faulty,
    instance_folders,
    manifest,
    nodes,
    only_on,
)

pytestmark = pytest.mark.cluster


FAST_RETRIES = {"maxRestarts": 2, "backoffSeconds": 0.2}


def test_a_cycle_is_invalid_graph(pipelines: Pipelines) -> None:
    links = [*chain("src", "amp", "out"), {"from": "out", "to": "amp"}]
    pipelines.apply(manifest("cyc", links=links))
    body = pipelines.wait_failure("cyc", "InvalidGraph")
    status = body["status"]
    assert status["failure"] == {
        "reason": "InvalidGraph",
        "code": 422,
        "step": "validate",
        "message": "links form a cycle: amp -> out -> amp; Juturna would never run these nodes",
    }
    assert status["phase"] == "Failed"
    assert condition(body, "Ready")["reason"] == "InvalidGraph"
    assert condition(body, "Created")["reason"] == "InvalidGraph"


def test_a_builtin_that_runs_commands_is_refused_beside_the_operator(
    pipelines: Pipelines, operator: Operator, tmp_path: Path
) -> None:
    """docs/juturna.md, pitfall 11: Juturna's videostream_ffmpeg sink writes its configuration into
    a shell script. Beside the operator no built-in runs unless the administrator lists it,
    and the check comes before anything deploys: the injected command never runs."""
    marker = tmp_path / "injected"
    spec_nodes = nodes(
        ("src", "source", "ticker", {}),
        ("out", "sink", "videostream_ffmpeg", {"dst_host": f"127.0.0.1 ; touch {marker} ; #"}),
    )
    pipelines.apply(manifest("ffmpeg", nodes=spec_nodes, links=chain("src", "out")))
    body = pipelines.wait_failure("ffmpeg", "BuiltinNotAllowed")
    assert body["status"]["failure"] == {
        "reason": "BuiltinNotAllowed",
        "code": 403,
        "step": "validate",
        "message": 'node "out": Juturna\'s built-in sink/videostream_ffmpeg is not allowed on '
        f"engine '{operator.engine}' (built-ins can run commands and reach any address from "
        "their configuration); the administrator allows built-ins with "
        "JUTURNA_OPERATOR_ALLOWED_BUILTINS (allowed now: none)",
    }
    assert ("Warning", "BuiltinNotAllowed") in [e[:2] for e in pipelines.events("ffmpeg")]
    assert not instance_folders(operator.workdir, body), "something was deployed"
    time.sleep(1)
    assert not marker.exists(), "the command in the configuration ran"


def test_in_process_a_value_may_not_read_the_operators_environment(
    pipelines: Pipelines, operator: Operator
) -> None:
    """docs/juturna.md, pitfall 12: "$JT_ENV_<NAME>" reads the environment of the process running
    the node; in-process that is the operator's own (settings, tokens)."""
    only_on(operator, "inprocess", "the in-process engine's own rule (workers are scrubbed)")
    spec_nodes = nodes(
        ("src", "source", "ticker", {}),
        ("amp", "proc", "scale", {"label": "$JT_ENV_JUTURNA_OPERATOR_WORKDIR"}),
        ("out", "sink", "jsonl", {}),
    )
    pipelines.apply(manifest("envref", nodes=spec_nodes, links=chain("src", "amp", "out")))
    body = pipelines.wait_failure("envref", "EnvironmentNotAllowed")
    assert body["status"]["failure"] == {
        "reason": "EnvironmentNotAllowed",
        "code": 403,
        "step": "validate",
        "message": 'node "amp": configuration key "label" reads an environment variable '
        "(\"$JT_ENV_JUTURNA_OPERATOR_WORKDIR\"); engine 'inprocess' runs nodes inside the "
        "operator, whose environment this would expose; allowed only with "
        "JUTURNA_OPERATOR_ALLOW_ENV_REFERENCES=true",
    }
    assert not instance_folders(operator.workdir, body), "something was deployed"


def test_an_unknown_mark_is_plugin_not_found(pipelines: Pipelines) -> None:
    spec_nodes = nodes(("src", "source", "tickr", {}), ("out", "sink", "jsonl", {}))
    pipelines.apply(manifest("mark", nodes=spec_nodes, links=chain("src", "out")))
    failure = pipelines.wait_failure("mark", "PluginNotFound")["status"]["failure"]
    assert failure["code"] == 422
    assert failure["message"].startswith(
        'node "src": no plugin "tickr" of type source in plugins ["tones"] (known: '
    )
    assert "ticker" in failure["message"]


@pytest.mark.reliability
def test_a_plugin_outside_the_roots_is_not_allowed(pipelines: Pipelines) -> None:
    pipelines.apply(manifest("root", plugins=["tones", "nowhere"]))
    failure = pipelines.wait_failure("root", "PluginNotFound")["status"]["failure"]
    assert 'plugin folder "nowhere" not found under any plugin root' in failure["message"]


@pytest.mark.reliability
def test_a_plugin_that_escapes_by_symlink_is_refused(pipelines: Pipelines) -> None:
    # The operator fixture's third plugin root holds "escape", a symlink out of the root.
    pipelines.apply(manifest("esc", plugins=["escape"]))
    failure = pipelines.wait_failure("esc", "PluginPathNotAllowed")["status"]["failure"]
    assert failure["code"] == 403
    assert 'plugin folder "escape" resolves to ' in failure["message"]
    assert "outside the plugin root" in failure["message"]


def test_a_constructor_that_raises_is_warmup_failed_and_retried(
    pipelines: Pipelines, operator: Operator
) -> None:
    pipelines.apply(
        faulty(
            "warm",
            ("src", "source", "ticker", {"rate": 5}),
            ("boom", "proc", "boom", {"model": "weights.bin"}),
            ("out", "sink", "jsonl", {}),
            restartPolicy=FAST_RETRIES,
        )
    )
    body = pipelines.wait_phase("warm", "Failed", timeout=30)
    status = body["status"]
    assert status["restarts"] == 2
    assert status["failure"]["reason"] == "WarmupFailed"
    assert status["failure"]["code"] == 500
    assert status["failure"]["step"] == "warmup"
    # A plain `juturna serve` keeps only the exception type; our engines name the node too.
    assert status["failure"]["message"] == (
        "Unexpected FileNotFoundError exception, see logs"
        if operator.engine == "service"
        else 'node "boom": FileNotFoundError: model file weights.bin not found'
    )
    assert status.get("pipelineId") is None  # no half-built instance is kept
    assert condition(body, "WarmedUp")["reason"] == "WarmupFailed"
    warnings = [r for kind, r, _ in pipelines.events("warm") if kind == "Warning"]
    assert "WarmupFailed" in warnings
    restarting = [m for _, r, m in pipelines.events("warm") if r == "Restarting"]
    assert restarting, "each restart is an Event"


@pytest.mark.not_on_plain_service
@pytest.mark.reliability(repeat=True)
def test_a_node_crash_is_node_failed_then_restarts_then_failed(
    pipelines: Pipelines, operator: Operator, fault_log: Any
) -> None:
    applied = time.monotonic()
    pipelines.apply(
        faulty(
            "crash",
            ("src", "source", "ticker", {"rate": 50}),
            ("crash", "proc", "crasher", {"after": 5}),
            ("out", "sink", "jsonl", {}),
            restartPolicy=FAST_RETRIES,
        )
    )
    body = pipelines.wait_phase("crash", "Failed", timeout=45)
    status = body["status"]
    assert status["restarts"] == 2
    assert status["failure"]["reason"] == "NodeFailed"
    assert status["failure"]["step"] == "run"
    assert status["failure"]["message"].startswith(
        'node "crash" crashed: RuntimeError: kaboom in crash'
    )
    assert condition(body, "Running")["reason"] == "NodeFailed"
    # No instance: none in status, no worker; beside the operator the output stays with the
    # resource until it is deleted (docs/pipeline-api.md: Output).
    assert status.get("pipelineId") is None
    assert processes_mentioning(f"--owner {body['metadata']['uid']}") == []
    assert len(instance_folders(operator.workdir, body)) == (operator.engine != "service")
    fault_log.record(
        "a node crash (3 crashes: 2 restarts, then Failed)",
        operator.engine,
        "NodeFailed, restarted twice, then Failed; no instance left",
        time.monotonic() - applied,
    )


def hanging(name: str) -> dict[str, Any]:
    return faulty(name, ("src", "source", "ticker", {"rate": 2000}), ("out", "sink", "hang", {}))


@pytest.mark.not_on_plain_service
@pytest.mark.reliability(repeat=True)
def test_delete_of_a_pipeline_whose_stop_hangs(
    pipelines: Pipelines, operator: Operator, fault_log: Any
) -> None:
    pipelines.apply(hanging("hang"))
    body = pipelines.wait_ready("hang")
    time.sleep(3)  # 2000 msg/s fill both 999-message queues: stop will block forever
    pipelines.apply(manifest("bystander"))
    pipelines.wait_ready("bystander")
    started = time.monotonic()
    pipelines.delete("hang")
    pipelines.wait_gone("hang", timeout=20)  # the stop timeout is 3 s
    elapsed = time.monotonic() - started
    assert elapsed < 20
    assert instance_folders(operator.workdir, body) == []
    assert "StopTimeout" in operator.log_text()
    # The operator kept serving the other pipeline.
    pipelines.patch_spec("bystander", {"state": "Standby"})
    assert pipelines.wait_ready("bystander")["status"]["phase"] == "Standby"
    fault_log.record(
        "a hung stop, on delete",
        operator.engine,
        "StopTimeout after 3 s; instance abandoned, resource gone, others served",
        elapsed,
    )


@pytest.mark.not_on_plain_service
@pytest.mark.reliability(repeat=True)
def test_a_hung_stop_on_a_state_change_is_stop_timeout(
    pipelines: Pipelines, operator: Operator, fault_log: Any
) -> None:
    pipelines.apply(hanging("hang2"))
    pipelines.wait_ready("hang2")
    time.sleep(3)
    pipelines.patch_spec("hang2", {"state": "Stopped"})
    asked = time.monotonic()
    body = pipelines.wait_failure("hang2", "StopTimeout")
    failure = body["status"]["failure"]
    assert failure["code"] == 504
    assert failure["step"] == "stop"
    assert failure["message"].startswith("stop did not finish within 3 s; ")
    if operator.engine == "process":
        assert failure["message"].endswith("was killed (SIGTERM, then SIGKILL)")
    else:
        assert "blocked node threads: " in failure["message"]
    # Retryable: after the backoff the abandoned instance is gone and Stopped is reached.
    body = pipelines.wait_ready("hang2", timeout=30)
    assert body["status"]["phase"] == "Stopped"
    fault_log.record(
        "a hung stop, on a state change",
        operator.engine,
        "StopTimeout (504), then Stopped after the backoff",
        time.monotonic() - asked,
    )


def test_delete_during_a_failing_warmup(pipelines: Pipelines, operator: Operator) -> None:
    retries = {"maxRestarts": 100, "backoffSeconds": 0.1}
    pipelines.apply(
        faulty(
            "dw",
            ("src", "source", "ticker", {}),
            ("boom", "proc", "boom", {}),
            restartPolicy=retries,
        )
    )
    uid = pipelines.wait_failure("dw", "WarmupFailed")["metadata"]["uid"]
    pipelines.delete("dw")
    pipelines.wait_gone("dw", timeout=15)
    assert list(operator.workdir.glob(f"{pipelines.namespace}__dw__*")) == []
    # A retry's create may be in flight when the deletion comes: it must not leave a worker
    # behind (it did once: the deletion saw no instance yet and let the resource go).
    assert processes_mentioning(uid) == []


def test_unknown_configuration_keys_are_warnings(pipelines: Pipelines) -> None:
    body = manifest("keys")
    body["spec"]["nodes"][0]["configuration"] = {"rat": 5}
    pipelines.apply(body)
    body = pipelines.wait_ready("keys")
    message = 'node "src": unknown configuration key "rat" (known: rate, start)'
    assert condition(body, "Created")["message"] == message
    assert ("Warning", "UnknownConfigurationKey", message) in pipelines.events("keys")


def test_an_unknown_runtime_is_refused(pipelines: Pipelines) -> None:
    pipelines.apply(manifest("rt", runtime="gpu-pool"))
    failure = pipelines.wait_failure("rt", "UnknownRuntime")["status"]["failure"]
    assert failure["code"] == 422
    assert failure["message"].startswith('spec.runtime "gpu-pool" names no configured runtime')


def test_a_slow_warmup_shows_warming_up(pipelines: Pipelines) -> None:
    pipelines.apply(
        faulty(
            "slow",
            ("src", "source", "ticker", {}),
            ("mid", "proc", "slow", {"seconds": 2}),
            ("out", "sink", "jsonl", {}),
        )
    )
    seen = pipelines.wait_phase("slow", "WarmingUp", timeout=10)
    assert condition(seen, "Ready")["status"] == "False"
    assert pipelines.wait_ready("slow")["status"]["phase"] == "Running"
