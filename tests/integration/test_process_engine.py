"""Containment that only a worker process per pipeline gives."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from processes import pid_alive, processes_mentioning

from juturna_operator.api import GROUP, PLURAL, VERSION, PipelineSpec
from juturna_operator.domain import InstanceState, PipelineKey
from juturna_operator.engines.base import InstanceInfo
from juturna_operator.engines.process import HEALTH_MISSES, ProcessEngine
from juturna_operator.engines.workers import INHERITED_VARIABLES
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import Settings
from juturna_operator.worker import WORKER_MARKER
from juturna_operator.zygote import FAULT_VARIABLE, ZYGOTE_MARKER, start_time
from support import (
    PLUGIN_ROOTS,
    Kubectl,
    Operator,
    Pipelines,
    assert_sole_operator,
    chain,
    failure_reason,
    faulty,
    instance_folders,
    manifest,
    nodes,
    only_on,
    output_of,
    wait_until,
)

pytestmark = pytest.mark.cluster


@pytest.fixture
def process_operator(operator: Operator) -> Operator:
    return only_on(operator, "process", "worker processes exist only with the process engine")


def worker_of(operator: Operator, uid: str) -> int:
    pids = processes_mentioning(f"--owner {uid}")
    assert len(pids) == 1, pids
    return pids[0]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def zygote_of(worker: int) -> int:
    """The zygote that forked ``worker`` (its parent, while the zygote lives)."""
    zygote = parent_of(worker)
    line = Path(f"/proc/{zygote}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert ZYGOTE_MARKER in line, f"worker {worker}'s parent {zygote} is no zygote: {line}"
    return zygote


def test_a_killed_zygote_is_replaced_and_its_workers_run_on(
    pipelines: Pipelines, process_operator: Operator
) -> None:
    """The zygote dies (SIGKILL): the workers it forked run on, the engine says so in its log
    and starts another, the next Pipeline deploys from that one, and the death of a worker
    whose zygote is gone is still seen (by its PID and start time), and it is restarted."""
    pipelines.apply(manifest("z1", restartPolicy={"maxRestarts": 3, "backoffSeconds": 0.2}))
    first = pipelines.wait_ready("z1")
    pid = worker_of(process_operator, first["metadata"]["uid"])
    zygote = zygote_of(pid)
    assert parent_of(zygote) == process_operator.pid
    os.kill(zygote, signal.SIGKILL)
    wait_until(
        lambda: "starting a new zygote" in process_operator.log_text(),
        10,
        "the engine's word on the zygote's death",
    )
    assert f"the zygote {zygote} is gone (killed by SIGKILL)" in process_operator.log_text()

    pipelines.apply(manifest("z2"))
    second = pipelines.wait_ready("z2")
    new_zygote = zygote_of(worker_of(process_operator, second["metadata"]["uid"]))
    assert new_zygote != zygote
    body = pipelines.get("z1")
    assert body["status"]["phase"] == "Running"
    assert body["status"].get("restarts", 0) == 0
    assert worker_of(process_operator, first["metadata"]["uid"]) == pid

    os.kill(pid, signal.SIGKILL)
    pipelines.wait(
        "z1",
        lambda b: b["status"].get("restarts") == 1 and b["status"].get("phase") == "Running",
        timeout=20,
        what="the orphaned worker's death seen and the pipeline restarted",
    )
    events = [m for _, r, m in pipelines.events("z1") if r == "NodeFailed"]
    assert any(f"worker process {pid} is gone" in m for m in events), events


@pytest.mark.own_operator
@pytest.mark.reliability
@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize(
    ("fault", "why"),
    [
        ("answer-delay:12", "gave no answer within 10 s"),
        ("die-after-fork", "is gone (killed by SIGKILL)"),
    ],
    ids=["answer-late", "dies-after-fork"],
)
def test_a_worker_whose_zygote_answer_was_lost_is_ended(
    kubeconfig: Path,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
    fault: str,
    why: str,
) -> None:
    """Issue 24, item 12: the zygote forks a Pipeline's worker and its answer is lost: it
    comes 12 s late (the engine waits 10 s), or the zygote dies right after fork(). The
    engine asks a new zygote, and ends the first worker (its command line carries the
    request's spawn id) first: one worker serves the Pipeline, the one its record names, and
    none outlives the Pipeline, nor the operator, nor do its zygotes."""
    assert_sole_operator(kubeconfig)
    pipelines = Pipelines(objects, namespace, kubectl)
    op = Operator(kubeconfig, tmp_path / "work", tmp_path / "operator.log", tmp_path, "process")
    op.env[FAULT_VARIABLE] = fault
    op.start()
    try:
        pipelines.apply(manifest("lost"))
        uid = pipelines.wait_ready("lost", timeout=60)["metadata"]["uid"]
        record = json.loads((op.workdir / ".workers" / f"{uid}.json").read_text())
        assert processes_mentioning(f"--owner {uid}") == [record["pid"]]
        log = op.log_text()
        first_zygote = int(re.findall(r"started the workers' zygote, pid (\d+)", log)[0])
        assert f"the zygote {first_zygote} {why}" in log
        ended = [int(p) for p in re.findall(r"ending worker (\d+): the zygote's answer", log)]
        assert len(ended) == 1, log[-3000:]
        assert ended[0] != record["pid"]
        assert not pid_alive(ended[0])
        pipelines.delete("lost")
        pipelines.wait_gone("lost")
        assert processes_mentioning(f"--owner {uid}") == []
    finally:
        if pipelines.exists("lost"):  # failed above: leave no Pipeline to the next operator
            pipelines.delete("lost")
            pipelines.wait_gone("lost")
        op.stop()
        left = processes_mentioning(f"--folder {op.workdir} ")
        for pid in left:  # ended by PID before the test fails
            os.kill(pid, signal.SIGKILL)
    assert not left, f"workers outlived the Pipeline and the operator: {left}"
    zygotes = [int(p) for p in re.findall(r"started the workers' zygote, pid (\d+)", op.log_text())]
    assert len(zygotes) == 2, zygotes
    assert not [z for z in zygotes if pid_alive(z)]


@pytest.mark.reliability(repeat=True)
def test_a_worker_killed_from_outside_is_detected_and_restarted(
    pipelines: Pipelines, process_operator: Operator, fault_log: Any
) -> None:
    pipelines.apply(manifest("k9", restartPolicy={"maxRestarts": 3, "backoffSeconds": 0.2}))
    body = pipelines.wait_ready("k9")
    pid = worker_of(process_operator, body["metadata"]["uid"])
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    seen = pipelines.wait(
        "k9",
        lambda b: failure_reason(b) == "NodeFailed" or b["status"].get("restarts", 0) >= 1,
        timeout=10,
        what="the dead worker noticed",
    )
    assert time.monotonic() - killed < 5
    body = pipelines.wait(
        "k9",
        lambda b: (
            b["status"].get("restarts") == 1
            and b["status"].get("pipelineId") != body["status"]["pipelineId"]
            and b["status"].get("phase") == "Running"
        ),
        timeout=15,
        what="restarted",
    )
    events = [m for _, r, m in pipelines.events("k9") if r == "NodeFailed"]
    assert any(f"worker process {pid} was killed by SIGKILL" in m for m in events), events
    assert worker_of(process_operator, body["metadata"]["uid"]) != pid
    assert seen
    fault_log.record(
        "a worker killed from outside (SIGKILL)",
        "process",
        "NodeFailed names the signal; a new worker, Running",
        time.monotonic() - killed,
    )


@pytest.mark.parametrize("how", ["deleted", "killed"])
def test_a_program_a_node_started_ends_with_its_worker(
    pipelines: Pipelines, process_operator: Operator, how: str
) -> None:
    """Round 3, item 10: the programs nodes start (ffmpeg; here a plugin's ``sleep`` that it
    never ends) share the worker's process group; ending the worker, by a deletion or by a
    restart after a kill, ends them too, instead of leaving them re-parented to PID 1."""
    pipelines.apply(
        faulty(
            "spawns",
            ("src", "source", "ticker", {"rate": 4}),
            ("spawner", "proc", "spawner", {"seconds": 600}),
            ("out", "sink", "jsonl", {"file": "output.jsonl"}),
            restartPolicy={"maxRestarts": 3, "backoffSeconds": 0.2},
        )
    )
    body = pipelines.wait_ready("spawns")
    (folder,) = instance_folders(process_operator.workdir, body)
    wait_until(lambda: (folder / "spawner" / "child.pid").exists(), 10, "the node's program")
    program = int((folder / "spawner" / "child.pid").read_text())
    assert pid_alive(program)
    worker = worker_of(process_operator, body["metadata"]["uid"])
    if how == "deleted":
        pipelines.delete("spawns")
        pipelines.wait_gone("spawns", timeout=30)
    else:
        os.kill(worker, signal.SIGKILL)  # the worker dies; the engine ends what is left
        pipelines.wait(
            "spawns",
            lambda b: b["status"].get("restarts") == 1 and b["status"].get("phase") == "Running",
            timeout=20,
            what="restarted",
        )
    wait_until(lambda: not pid_alive(program), 10, f"the node's program {program} ended")
    assert not pid_alive(worker)


def test_a_pipeline_deleted_without_its_finalizer_takes_its_worker_with_it(
    pipelines: Pipelines, process_operator: Operator, kubectl: Kubectl
) -> None:
    """Round 3, item 13: the finalizer removed by hand (or a delete before it was added), the
    object goes at once and the operator sees only DELETED; its worker ran on until the
    operator restarted. The operator is paused while it happens, so that it cannot put its
    finalizer back in between."""
    pipelines.apply(manifest("vanish"))
    body = pipelines.wait_ready("vanish")
    worker = worker_of(process_operator, body["metadata"]["uid"])
    assert process_operator.proc is not None
    os.kill(process_operator.proc.pid, signal.SIGSTOP)
    try:
        patch = '{"metadata":{"finalizers":null}}'
        ns = pipelines.namespace
        kubectl("patch", "pipeline", "vanish", "-n", ns, "--type=merge", "-p", patch)
        kubectl("delete", "pipeline", "vanish", "-n", ns, "--wait=true")
    finally:
        os.kill(process_operator.proc.pid, signal.SIGCONT)
    wait_until(lambda: not pid_alive(worker), 20, f"worker {worker} ended")
    assert not processes_mentioning(f"--owner {body['metadata']['uid']}")
    wait_until(
        lambda: "deleted without its finalizer" in process_operator.log_text(),
        5,
        "the operator's word on it",
    )


SHIFT_CONFIG = "[arguments]\n"
SHIFT_CODE = """
from juturna.components import Message, Node
from juturna.payloads import ObjectPayload


class Shift(Node):
    def update(self, message):
        count = message.payload["count"]
        self.transmit(Message[ObjectPayload](
            creator=self.name, version=message.version,
            payload=ObjectPayload(count=count, value=count + OFFSET, label="shift"),
        ))
"""


def test_a_plugin_changed_on_disk_is_picked_up_by_a_redeploy(
    pipelines: Pipelines, process_operator: Operator
) -> None:
    node = process_operator.extra_root / "live" / "nodes" / "proc" / "_shift"
    node.mkdir(parents=True, exist_ok=True)
    (node / "config.toml").write_text(SHIFT_CONFIG)
    (node / "shift.py").write_text(textwrap.dedent(SHIFT_CODE).replace("OFFSET", "1000"))
    body = manifest("live", plugins=["tones", "live"])
    body["spec"]["nodes"][1] = {"name": "amp", "type": "proc", "mark": "shift"}
    pipelines.apply(body)
    pipelines.wait(
        "live", lambda b: bool(output_of(process_operator.workdir, b)), what="first output"
    )
    line = output_of(process_operator.workdir, pipelines.get("live"))[-1]
    assert line["value"] == line["count"] + 1000

    # A different size: Python trusts a cached .pyc whose source has the same size and the
    # same mtime second, and a fast deploy can edit the file within that second.
    (node / "shift.py").write_text(textwrap.dedent(SHIFT_CODE).replace("OFFSET", "20000"))
    body["spec"]["version"] = "1.1"  # any change to the pipeline redeploys it
    pipelines.apply(body)
    pipelines.wait_ready("live")

    def new_code(b: dict) -> bool:
        out = output_of(process_operator.workdir, b)
        return bool(out) and out[-1]["value"] == out[-1]["count"] + 20000

    pipelines.wait("live", new_code, what="output of the changed plugin code")


def test_a_worker_whose_resource_vanished_while_the_operator_was_down_is_ended(
    pipelines: Pipelines, process_operator: Operator
) -> None:
    pipelines.apply(manifest("gone"))
    uid = pipelines.wait_ready("gone")["metadata"]["uid"]
    pid = worker_of(process_operator, uid)
    process_operator.kill()
    # With no operator, someone force-removes the finalizer: the resource vanishes.
    pipelines.objects.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        pipelines.namespace,
        PLURAL,
        "gone",
        {"metadata": {"finalizers": None}},
    )
    pipelines.delete("gone")
    pipelines.wait_gone("gone")
    assert processes_mentioning(f"--owner {uid}") == [pid]  # still running, unowned
    process_operator.start()
    deadline = time.monotonic() + 20  # adopted, then ended by the sweep (every 2 s here)
    while processes_mentioning(f"--owner {uid}"):
        assert time.monotonic() < deadline, "the unowned worker is still running"
        time.sleep(0.2)
    assert "whose resource is gone" in process_operator.log_text()


@pytest.mark.parametrize(
    ("done_by_the_worker", "state", "phase"),
    [("stop", "Stopped", "Stopped"), ("start", "Running", "Running")],
)
def test_a_step_the_worker_did_before_the_operator_died_is_not_refused_for_ever(
    pipelines: Pipelines,
    process_operator: Operator,
    done_by_the_worker: str,
    state: str,
    phase: str,
) -> None:
    """An operator killed between a worker's step and saving the worker's new state leaves the
    record one step behind (the fault suite hit it: a stop refused as NotRunning for ever).
    The test does the step on the worker itself while no operator runs, then asks for it."""
    start_state = "Running" if done_by_the_worker == "stop" else "Standby"
    pipelines.apply(manifest("lag", state=start_state))
    uid = pipelines.wait_ready("lag")["metadata"]["uid"]
    pid = worker_of(process_operator, uid)
    process_operator.kill()
    state_dir = process_operator.workdir / ".workers"
    port = json.loads((state_dir / f"{uid}.json").read_text())["port"]
    pipeline_id = json.loads((state_dir / "pipelines" / f"{uid}.json").read_text())["pipeline_id"]
    url = f"http://127.0.0.1:{port}/pipelines/{pipeline_id}/{done_by_the_worker}"
    token = (process_operator.workdir / ".workers" / f"{uid}.token").read_text()
    request = urllib.request.Request(
        url, method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    urllib.request.urlopen(request, timeout=10).close()
    pipelines.patch_spec("lag", {"state": state})
    process_operator.start()
    body = pipelines.wait_ready("lag", timeout=30)
    assert body["status"]["phase"] == phase
    if state == "Running":
        assert worker_of(process_operator, uid) == pid  # the same, adopted worker
    assert body["status"].get("failure") is None


def test_the_worker_answers_only_its_operator(
    pipelines: Pipelines, process_operator: Operator
) -> None:
    """Any local process can reach a worker's loopback port: without the worker's own token
    it gets 401 and changes nothing; the token is in a file only the operator's user reads,
    and never in status, Events or the log."""
    pipelines.apply(manifest("guarded"))
    body = pipelines.wait_ready("guarded")
    uid, pipeline_id = body["metadata"]["uid"], body["status"]["pipelineId"]
    state = process_operator.workdir / ".workers"
    port = json.loads((state / f"{uid}.json").read_text())["port"]
    token_file = state / f"{uid}.token"
    token = token_file.read_text()
    assert token_file.stat().st_mode & 0o077 == 0
    base = f"http://127.0.0.1:{port}"

    def call(path: str, method: str, token: str | None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        request = urllib.request.Request(base + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    refusal = '{"message":"this worker answers only its operator (bearer token)"}'
    for path, method in (
        (f"/pipelines/{pipeline_id}/stop", "POST"),
        ("/operator/shutdown", "POST"),
        ("/operator/validate", "POST"),
        ("/pipelines", "GET"),
        ("/operator/health", "GET"),
    ):
        assert call(path, method, None) == (401, refusal)
        assert call(path, method, "x" + token) == (401, refusal)
    assert call("/operator/ready", "GET", None) == (200, '{"ready":true}')
    assert call("/pipelines", "GET", token)[0] == 200
    # Nothing changed: still running, the same worker, Ready.
    body = pipelines.get("guarded")
    assert body["status"]["phase"] == "Running"
    assert worker_of(process_operator, uid) > 0
    events = json.dumps(pipelines.events("guarded"))
    assert token not in json.dumps(body) + events + process_operator.log_text()


def test_a_record_whose_worker_is_gone_is_cleaned_up(tmp_path: Path) -> None:
    """What a process killed while it ended a worker leaves: the record (here in the format
    of the process engine before it served many pipelines per process), the worker's files
    and the instance folder, the worker gone. The next process reports the worker's death
    for the pipeline and removes them all at its sweep (its resource is gone)."""
    workdir = tmp_path / "work"
    state = workdir / ".workers"
    state.mkdir(parents=True)
    uid = "0123abcd-0000-4000-8000-000000000000"
    gone = subprocess.Popen(["true"])
    gone.wait()
    record = {"namespace": "ns", "name": "p", "uid": uid, "revision": "r", "pid": gone.pid}
    (state / f"{uid}.json").write_text(json.dumps(record | {"port": 1, "pipeline_id": "x"}))
    for suffix in (".port", ".log"):
        (state / f"{uid}{suffix}").write_text("")
    folder = workdir / "ns__p__0123abcd_x"
    (folder / "out").mkdir(parents=True)
    other = workdir / "ns__q__99999999_y"  # another resource's: left alone
    other.mkdir()

    async def restarted() -> InstanceInfo | None:
        engine = ProcessEngine(Settings(workdir=workdir))
        try:
            info = await engine.status(PipelineKey("ns", "p", uid))
            assert await engine.sweep({}) == ["x"]
            return info
        finally:
            await engine.close()

    info = asyncio.run(restarted())
    assert info is not None
    assert [c.describe() for c in info.crashes] == [f"worker process {gone.pid} is gone"]
    assert not folder.exists()
    left = [p.name for p in state.iterdir() if not p.name.startswith("zygote")]
    assert left == ["pipelines"]
    assert list((state / "pipelines").iterdir()) == []
    assert other.exists()


def test_a_recycled_pid_is_not_adopted(settings: Settings) -> None:
    """A record's worker died while no operator ran and its PID now names another process,
    whose command line even looks like the worker's: its start time differs from the one the
    record saw, so the next operator neither adopts nor signals it: the pipeline reports its
    worker gone. The same record (in the format of the process engine before it served many
    pipelines per process) with the process's true start time is adopted."""
    k = direct_key()
    impostor = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", WORKER_MARKER, "--owner", k.uid]
    )
    state = settings.workdir / ".workers"
    state.mkdir()
    record_file = state / f"{k.uid}.json"

    async def adopted(started: int) -> InstanceInfo | None:
        record = {
            "namespace": k.namespace,
            "name": k.name,
            "uid": k.uid,
            "revision": "r1",
            "pid": impostor.pid,
            "port": 1,  # nothing answers: the health check below counts one miss
            "pipeline_id": "x",
            "state": "Running",
            "start_time": started,
        }
        record_file.write_text(json.dumps(record))
        (state / f"{k.uid}.token").write_text("t")
        engine = ProcessEngine(settings)
        try:
            return await engine.status(k)
        finally:
            await engine.close()
            for leftover in (state / "pipelines").glob("*.json"):
                leftover.unlink()  # the next round starts from the old format again

    try:
        real = start_time(impostor.pid)
        assert real is not None
        recycled = asyncio.run(adopted(real + 1))
        assert recycled is not None
        assert [c.describe() for c in recycled.crashes] == [
            f"worker process {impostor.pid} is gone"
        ]
        assert impostor.poll() is None, "the process behind a recycled PID was signalled"
        info = asyncio.run(adopted(real))
        assert info is not None
        assert info.pipeline_id == "x"
        assert info.crashes == []  # one unanswered health check: not yet stuck
        assert record_file.exists()
    finally:
        impostor.kill()
        impostor.wait()


# -- the engine driven directly: real workers, real Juturna, no control plane ---------------


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings for engines driven directly, in a workdir of this test's own. Teardown
    proves no worker of it is left (and ends, by PID, any that is, before failing)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    yield Settings(plugin_roots=PLUGIN_ROOTS, workdir=workdir, stop_timeout_s=3)
    left = processes_mentioning(f"--folder {workdir} ")
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"worker processes left behind: {left}"


def direct_key() -> PipelineKey:
    return PipelineKey("ns", "p", str(uuid.uuid4()))


def direct_config(key: PipelineKey, *specs: tuple[str, str, str, dict[str, Any]]) -> dict:
    """Juturna's config for a chain of ``specs``, with the example and the faulty plugins."""
    spec = PipelineSpec.model_validate(
        {
            "plugins": ["tones", "faulty"],
            "nodes": nodes(*specs),
            "links": chain(*(name for name, *_ in specs)),
        }
    )
    return spec.to_juturna_config(key.juturna_name)


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.decode().partition("=")[::2] for entry in raw.split(b"\0") if entry)


def descriptors_of(pid: int) -> dict[int, str]:
    """What each open descriptor of ``pid`` names (a path, ``socket:[inode]``, ...)."""
    fds = Path(f"/proc/{pid}/fd")
    return {int(fd.name): os.readlink(fd) for fd in fds.iterdir()}


def test_a_worker_gets_none_of_the_operators_settings_or_secrets(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``$JT_ENV_<NAME>`` reads the worker's environment (docs/juturna.md, pitfall 12): a node
    asking for an operator setting, a secret or any variable beyond what Python needs gets
    nothing, and the warmup fails naming the variable. Neither the worker nor the zygote it
    was forked from holds any of the operator's variables; the worker holds none of the
    operator's or the zygote's descriptors (the operator's even marked inheritable), only
    /dev/null, its log and its own; and it leads a session of its own."""
    probe_file = settings.workdir.parent / "operator-only"
    probe_fd = os.open(probe_file, os.O_RDWR | os.O_CREAT, 0o600)
    os.set_inheritable(probe_fd, True)  # as a careless library in the operator could leave it
    probe = "JUTURNA_OPERATOR_SECRET_PROBE"
    secret = f"s3cret-{secrets.token_hex(8)}"
    other = f"SOME_PROBE_{secrets.token_hex(4).upper()}"
    monkeypatch.setenv(probe, secret)
    monkeypatch.setenv(other, "other-value")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # as in the operator's pod
    engine = ProcessEngine(settings)
    k = direct_key()
    config = direct_config(
        k,
        ("src", "source", "ticker", {}),
        ("probe", "proc", "envprobe", {"value": f"$JT_ENV_{probe}"}),
        ("out", "sink", "jsonl", {}),
    )

    async def scenario() -> tuple[PipelineFailure, dict[str, str]]:
        try:
            await engine.create(k, config, "r1")
            [pid] = processes_mentioning(f"--owner {k.uid}")
            environ = environment_of(pid)
            zygote = zygote_of(pid)
            assert parent_of(zygote) == os.getpid()
            zygote_environ = environment_of(zygote)
            assert zygote_environ == environ, "the zygote starts with the workers' environment"
            held = descriptors_of(pid)
            log_file = settings.workdir / ".workers" / f"{k.uid}.log"
            assert (held[0], held[1], held[2]) == ("/dev/null", str(log_file), str(log_file))
            assert str(probe_file) not in held.values()
            shared = {
                t for t in descriptors_of(zygote).values() if t.startswith(("socket:", "pipe:"))
            }
            assert not shared & set(held.values()), (held, shared)
            assert os.getsid(pid) == pid
            with pytest.raises(PipelineFailure) as failed:
                await engine.warmup(k)
            # Nowhere the worker could have put it: its log, the pipeline's folder.
            for path in settings.workdir.rglob("*"):
                if path.is_file():
                    assert secret not in path.read_text(errors="replace"), path
            return failed.value, environ
        finally:
            await engine.delete(k)
            await engine.close()
            os.close(probe_fd)

    failure, environ = asyncio.run(scenario())
    assert failure.reason is FailureReason.WarmupFailed
    assert failure.step is Step.warmup
    assert failure.message == (
        f'node "probe": ValueError: env variable "{probe}" is not set in node "probe" for '
        'config key "value" (found in config but not in environment)'
    )
    assert secret not in str(failure)
    leaked = [n for n in environ if n.startswith(("JUTURNA_OPERATOR_", "KUBERNETES_"))]
    assert not leaked, leaked
    assert other not in environ
    assert set(environ) - {"PYTHONPATH"} <= INHERITED_VARIABLES | {
        n for n in environ if n.startswith("LC_")
    }
    assert environ["PYTHONPATH"].split(os.pathsep)[:2] == [str(r) for r in PLUGIN_ROOTS]
    assert environ["PATH"] == os.environ["PATH"]
    assert not list(settings.workdir.glob(f"{k.juturna_name}_*"))


# An operator process of its own, for a restart in the middle of a warmup: it creates the
# instance and warms it up with the process engine, and is killed (SIGKILL) while it waits.
FIRST_OPERATOR = """
import asyncio, json, sys
from pathlib import Path
from juturna_operator.domain import InstanceState, PipelineKey
from juturna_operator.engines.base import Plan
from juturna_operator.engines.process import ProcessEngine
from juturna_operator.settings import Settings

workdir, uid, config, how = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
roots = [Path(r) for r in sys.argv[5:]]
engine = ProcessEngine(Settings(plugin_roots=roots, workdir=Path(workdir)))
key = PipelineKey("ns", "p", uid)

async def main():
    if how == "deploy":  # the worker's one deploy, to Running: no pipeline id saved yet
        await engine.create(key, config, "r1", Plan(until=InstanceState.Running))
    else:
        await engine.create(key, config, "r1")
        await engine.warmup(key)

asyncio.run(main())
"""


def worker_health(workdir: Path, uid: str) -> dict[str, Any]:
    """The worker's ``/operator/health`` answer, asked as its operator would (its token)."""
    state = workdir / ".workers"
    port = json.loads((state / f"{uid}.json").read_text())["port"]
    token = (state / f"{uid}.token").read_text()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/operator/health", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


@pytest.mark.parametrize("how", ["steps", "deploy"])
@pytest.mark.parametrize("fail", ["", "model file corrupt"], ids=["warms-up", "fails"])
def test_an_operator_restart_during_a_warmup_waits_for_it_rather_than_warm_up_twice(
    settings: Settings, fail: str, how: str
) -> None:
    """The worker outlives the operator killed while it warmed up; the next operator adopts
    it and asks for the warmup again (its record still says Created). That must join the
    warmup in flight: one model load, one set of nodes; the pipeline runs, or the warmup's
    own failure is what the user sees. ``deploy``: the operator died inside the worker's one
    deploy, before it knew the pipeline's id; the next one finds it by its name, and its
    start and the deploy's own do not both start it (nor stop it)."""
    k = direct_key()
    config = direct_config(
        k,
        ("src", "source", "ticker", {"rate": 20}),
        ("mid", "proc", "counted", {"seconds": 4, "fail": fail}),
        ("out", "sink", "jsonl", {}),
    )
    roots = [str(r) for r in PLUGIN_ROOTS]
    arguments = [str(settings.workdir), k.uid, json.dumps(config), how, *roots]
    first = subprocess.Popen(
        [sys.executable, "-c", FIRST_OPERATOR, *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(
            lambda: bool(list(settings.workdir.glob(f"{k.juturna_name}_*/mid/warmups.log"))),
            60,
            "the first operator's warmup begun",
            lambda: first.poll(),
        )
    finally:
        first.kill()  # as a crash would: the worker, in a session of its own, lives on
        _, errors = first.communicate(timeout=10)
    assert first.returncode == -signal.SIGKILL, errors.decode()
    [pid] = processes_mentioning(f"--owner {k.uid}")
    [warmups] = settings.workdir.glob(f"{k.juturna_name}_*/mid/warmups.log")
    pipeline_id = warmups.parent.parent.name.rsplit("_", 1)[1]
    assert worker_health(settings.workdir, k.uid)["warming"] == [pipeline_id]

    engine = ProcessEngine(settings)  # the restarted operator: adopts the worker

    async def scenario() -> tuple[InstanceInfo | PipelineFailure | None, list[str]]:
        try:
            adopted = await engine.status(k)
            assert adopted is not None
            assert adopted.state is InstanceState.Created
            assert adopted.pipeline_id == pipeline_id
            # What the lifecycle does next for a Created instance that should run.
            try:
                await engine.warmup(k)
            except PipelineFailure as failure:
                return failure, warmups.read_text().splitlines()
            await engine.start(k)
            deadline = time.monotonic() + 10
            while not (warmups.parent.parent / "out" / "output.jsonl").exists():
                assert time.monotonic() < deadline, "no output"
                await asyncio.sleep(0.1)
            assert processes_mentioning(f"--owner {k.uid}") == [pid]  # the adopted one
            await asyncio.sleep(1)  # the first operator's deploy, if any, has ended by now
            return await engine.status(k), warmups.read_text().splitlines()
        finally:
            await engine.delete(k)
            await engine.close()

    outcome, seen = asyncio.run(scenario())
    # Before the fix: "begin built=2" as well: a second warmup built a second set of nodes.
    assert seen == ["begin built=1", "end built=1"]
    if fail:
        assert isinstance(outcome, PipelineFailure)
        assert outcome.reason is FailureReason.WarmupFailed
        assert outcome.message == f'node "mid": RuntimeError: {fail}'
    else:
        assert isinstance(outcome, InstanceInfo)
        assert outcome.state is InstanceState.Running
        assert outcome.crashes == []
        assert outcome.nodes == {"src": "Running", "mid": "Running", "out": "Running"}
        assert warmups.parent.parent.name == f"{k.juturna_name}_{outcome.pipeline_id}"
    assert processes_mentioning(f"--owner {k.uid}") == []
    assert not warmups.parent.parent.exists()


def running_instance(
    runner: asyncio.Runner, engine: ProcessEngine, k: PipelineKey
) -> tuple[InstanceInfo, int, Path]:
    """Deploy the example chain (a ticker at 20 Hz) and wait for its output: the instance's
    status, its worker's PID and its output file."""

    async def deploy() -> InstanceInfo | None:
        config = direct_config(
            k,
            ("src", "source", "ticker", {"rate": 20}),
            ("amp", "proc", "scale", {}),
            ("out", "sink", "jsonl", {}),
        )
        await engine.create(k, config, "r1")
        await engine.warmup(k)
        await engine.start(k)
        return await engine.status(k)

    info = runner.run(deploy())
    assert info is not None
    assert info.state is InstanceState.Running
    folder = engine._settings.workdir / f"{k.juturna_name}_{info.pipeline_id}"
    output = folder / "out" / "output.jsonl"
    wait_until(output.exists, 10, "the pipeline's first output")
    [pid] = processes_mentioning(f"--owner {k.uid}")
    return info, pid, output


def test_many_workers_forked_at_once_all_run(settings: Settings) -> None:
    """20 pipelines deployed at once: 20 workers forked from the one zygote, each Running
    with its own process, port and record, and nothing of theirs left after the deletions.
    (The benchmark at N = 50 once saw a worker, forked in milliseconds, write its port file
    through the same temporary file as the engine's record: a CreateFailed. This test did not
    reproduce that race on a quiet machine; the files now have distinct names.)"""
    engine = ProcessEngine(settings)
    keys = [direct_key() for _ in range(20)]
    config = [
        ("src", "source", "ticker", {"rate": 20}),
        ("amp", "proc", "scale", {}),
        ("out", "sink", "jsonl", {}),
    ]

    async def deploy(k: PipelineKey) -> InstanceInfo | None:
        await engine.create(k, direct_config(k, *config), "r1")
        await engine.warmup(k)
        await engine.start(k)
        return await engine.status(k)

    async def scenario() -> tuple[list[InstanceInfo | None], list[dict[str, Any]]]:
        try:
            infos = await asyncio.gather(*(deploy(k) for k in keys))
            state = settings.workdir / ".workers"
            return infos, [
                json.loads((state / f"{k.uid}.json").read_text())
                | json.loads((state / "pipelines" / f"{k.uid}.json").read_text())
                for k in keys
            ]
        finally:
            await asyncio.gather(*(engine.delete(k) for k in keys))
            await engine.close()

    infos, records = asyncio.run(scenario())
    for info, record in zip(infos, records, strict=True):
        assert info is not None
        assert info.state is InstanceState.Running
        assert info.crashes == []
        assert (record["pipeline_id"], record["state"]) == (info.pipeline_id, "Running")
    assert len({r["pid"] for r in records}) == len({r["port"] for r in records}) == len(keys)
    for k in keys:
        assert processes_mentioning(f"--owner {k.uid}") == []
    assert list((settings.workdir / ".workers").glob("*-*")) == []  # no worker's file left


def port_of(settings: Settings, k: PipelineKey) -> int:
    return int(json.loads((settings.workdir / ".workers" / f"{k.uid}.json").read_text())["port"])


def lines_of(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_a_worker_stalled_for_seconds_is_not_taken_for_a_dead_one(settings: Settings) -> None:
    """A worker that answers nothing for 3 s (stopped with SIGSTOP: a loaded machine, a
    node holding the GIL) keeps its last known state: no crash, no failure, the same
    instance and process, its output intact. A worker that is really dead (SIGKILL) is
    still reported at once, naming the signal."""
    engine = ProcessEngine(settings)
    k = direct_key()
    runner = asyncio.Runner()  # one loop: the engine's HTTP clients belong to it
    try:
        before, pid, output = running_instance(runner, engine, k)
        os.kill(pid, signal.SIGSTOP)
        stalled = time.monotonic()
        seen = []
        try:
            while time.monotonic() - stalled < 3:
                seen.append(runner.run(engine.status(k)))
        finally:
            os.kill(pid, signal.SIGCONT)
        assert seen
        for info in seen:
            assert info is not None
            assert info.crashes == []
            assert info.failure is None
            assert info.state is InstanceState.Running
            assert info.pipeline_id == before.pipeline_id
            assert info.nodes == before.nodes
        written = lines_of(output)
        wait_until(lambda: lines_of(output) > written, 10, "output after SIGCONT")
        after = runner.run(engine.status(k))
        assert after is not None
        assert after.crashes == []
        assert after.pipeline_id == before.pipeline_id
        assert processes_mentioning(f"--owner {k.uid}") == [pid]
        assert output.exists()

        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        dead = runner.run(engine.status(k))
        assert time.monotonic() - killed < 3
        assert dead is not None
        assert [c.describe() for c in dead.crashes] == [
            f"worker process {pid} was killed by SIGKILL"
        ]
    finally:
        runner.run(engine.delete(k))
        runner.run(engine.close())
        runner.close()
    assert processes_mentioning(f"--owner {k.uid}") == []


def test_a_worker_that_stays_stuck_is_a_failure_naming_it(settings: Settings) -> None:
    """A live worker that leaves 3 health checks in a row unanswered is stuck: a crash that
    says so (the lifecycle then replaces it under the restart policy); the engine ends it."""
    engine = ProcessEngine(settings)
    k = direct_key()
    runner = asyncio.Runner()  # one loop: the engine's HTTP clients belong to it
    try:
        before, pid, _ = running_instance(runner, engine, k)
        os.kill(pid, signal.SIGSTOP)  # left stopped: the delete below must end it
        seen = [runner.run(engine.status(k)) for _ in range(HEALTH_MISSES)]
        for info in seen[:-1]:
            assert info is not None
            assert info.crashes == []
        stuck = seen[-1]
        assert stuck is not None
        assert stuck.pipeline_id == before.pipeline_id
        assert [c.describe() for c in stuck.crashes] == [
            f"worker process {pid} runs but gave no answer to {HEALTH_MISSES} health checks "
            f"in a row (the last: http://127.0.0.1:{port_of(settings, k)}/operator/health "
            "gave no answer within 2 s)"
        ]
    finally:
        runner.run(engine.delete(k))
        runner.run(engine.close())
        runner.close()
    assert processes_mentioning(f"--owner {k.uid}") == []


def test_a_candidate_is_a_second_worker_and_a_promote_survives_a_restart(
    settings: Settings,
) -> None:
    """A warm swap's two instances on the engine alone: the candidate is a worker of its own
    (its own process, token and record), which takes the Pipeline's folder over while the
    active one keeps appending to its open file. A promote needs a started candidate, swaps
    the slots, and changes nothing when repeated. An engine started after a kill between
    the promote's two record writes (both marked active) adopts the later one as active and
    the other, retired, as the candidate: never two actives."""
    k = direct_key()
    state = settings.workdir / ".workers"
    with asyncio.Runner() as runner:
        engine = ProcessEngine(settings)
        old, old_pid, _ = running_instance(runner, engine, k)
        config = direct_config(
            k,
            ("src", "source", "ticker", {"rate": 20}),
            ("amp", "proc", "scale", {"label": "new"}),
            ("out", "sink", "jsonl", {}),
        )
        new_id = runner.run(engine.create(k.candidate, config, "r2"))
        runner.run(engine.warmup(k.candidate))
        workers = processes_mentioning(f"--owner {k.uid}")
        assert len(workers) == 2, workers
        [new_pid] = set(workers) - {old_pid}
        with pytest.raises(PipelineFailure) as refused:
            runner.run(engine.promote(k))
        assert (refused.value.reason, refused.value.message) == (
            FailureReason.NotRunning,
            f"the candidate instance of ns/p (worker process {new_pid}) is Ready, not "
            "Running: only a started instance serves the Pipeline",
        )
        runner.run(engine.start(k.candidate))
        # One folder, the resource's, now named after the new instance: both write to it.
        [folder] = [p for p in settings.workdir.iterdir() if p.name.startswith(k.juturna_name)]
        assert folder.name == f"{k.juturna_name}_{new_id}"
        wait_until(lambda: '"new"' in (folder / "out" / "output.jsonl").read_text(), 10, "new")
        before = lines_of(folder / "out" / "output.jsonl")
        time.sleep(0.5)
        assert lines_of(folder / "out" / "output.jsonl") > before + 10  # both at 20 Hz

        def slots(e: ProcessEngine) -> tuple[str | None, str | None]:
            infos = [runner.run(e.status(key)) for key in (k, k.candidate)]
            return tuple(i.pipeline_id if i else None for i in infos)  # type: ignore[return-value]

        runner.run(engine.promote(k))
        assert slots(engine) == (new_id, old.pipeline_id)
        runner.run(engine.promote(k))  # the candidate slot holds the retired one: nothing
        assert slots(engine) == (new_id, old.pipeline_id)
        runner.run(engine.close())

        # A kill between the promote's writes: the old record still says active (earlier).
        for path in (state / "pipelines").glob(f"{k.uid}*.json"):
            record = json.loads(path.read_text())
            if record["pipeline_id"] == old.pipeline_id:
                assert record["slot"] == "retired"
                path.write_text(json.dumps(record | {"slot": "active"}))
        engine = ProcessEngine(settings)
        assert slots(engine) == (new_id, old.pipeline_id)
        runner.run(engine.promote(k))  # adopted retired: never promoted back
        assert slots(engine) == (new_id, old.pipeline_id)
        # The drain ends: the old worker goes, the folder stays with the new one.
        runner.run(engine.delete(k.candidate, keep_output=True))
        assert processes_mentioning(f"--owner {k.uid}") == [new_pid]
        assert slots(engine) == (new_id, None)
        before = lines_of(folder / "out" / "output.jsonl")
        time.sleep(0.3)
        assert lines_of(folder / "out" / "output.jsonl") > before
        runner.run(engine.promote(k))  # no candidate beside an active one: nothing to do
        with pytest.raises(PipelineFailure) as refused:
            runner.run(engine.promote(direct_key()))
        assert refused.value.reason is FailureReason.InvalidPipelineId
        assert refused.value.message.endswith("has no candidate to promote")
        runner.run(engine.delete(k))
        assert not folder.exists()
        runner.run(engine.close())
