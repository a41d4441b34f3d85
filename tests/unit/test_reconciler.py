"""The reconcile loop in milliseconds: a fake engine, a recording status writer and Event
poster, and a clock the test moves (as kopf tests its own core in ``tests/handling/``).

The engine here is pure bookkeeping, so these tests are about the loop's decisions and
writes; the engines themselves are tested on real Juturna in tests/integration."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fake_engine import EXAMPLES, NODES, UID, FakeEngine, Harness
from juturna_operator.domain import InstanceState, PipelineKey
from juturna_operator.engines.base import InstanceInfo
from juturna_operator.lifecycle import BACKOFF_CAP_S
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.reconciler import SETTLED_RESYNC_S, fingerprint
from juturna_operator.settings import ServiceAccount, Settings


def test_a_deploy_is_one_write_and_one_event() -> None:
    h = Harness()
    h.reconcile()
    assert [w["phase"] for w in h.writes] == ["Running"]
    assert [(k, r) for k, r, _ in h.events] == [("Normal", "Started")]
    assert h.events[0][2] == (
        "pipeline instance id-1 created; all nodes warmed up; pipeline started"
    )


class SlowPodEngine(FakeEngine):
    """A create that starts a pod for ``pod_s``, then warms up for ``warmup_s`` within the
    same call (Juturna's one deploy), telling its step as the pod engine does."""

    def __init__(self, pod_s: float, warmup_s: float) -> None:
        super().__init__()
        self.pod_s, self.warmup_s = pod_s, warmup_s
        self.step: Step | None = None

    def step_under_way(self, key: PipelineKey) -> Step | None:
        return self.step

    async def create(self, key: PipelineKey, config: dict[str, Any], *args: Any) -> str:
        self.step = Step.create
        await asyncio.sleep(self.pod_s)
        self.step = Step.warmup
        await asyncio.sleep(self.warmup_s)
        self.step = None
        return await super().create(key, config, *args)


@pytest.mark.parametrize(
    ("warmup_s", "phases"),
    [(0.02, ["Creating", "Running"]), (0.5, ["Creating", "WarmingUp", "Running"])],
    ids=["short-warmup", "long-warmup"],
)
def test_a_step_shows_in_status_only_if_it_outlives_the_threshold(
    warmup_s: float, phases: list[str]
) -> None:
    """Issue 28, item 3: a pod that starts long gets one progress write (Creating); the
    warmup after it gets its own only if it too outlives the threshold (the pod engine wrote
    WarmingUp for a warmup of a moment: a third status write for a loaded node's Pipelines)."""
    h = Harness(SlowPodEngine(pod_s=0.5, warmup_s=warmup_s))
    h.reconciler.settings.progress_threshold_s = 0.1
    h.reconcile()
    assert [w["phase"] for w in h.writes] == phases


def test_the_old_word_ready_is_a_warm_standby_told_once_per_generation() -> None:
    """A Pipeline stored with ``state: Ready`` (the old word for Standby) stays warm, never
    started, and one Warning per generation asks for the new word."""
    h = Harness()
    h.spec["state"] = "Ready"
    h.reconcile()
    assert [w["phase"] for w in h.writes] == ["Standby"]
    assert [i.state for i in h.engine.instances.values()] == [InstanceState.Ready]
    warning = (
        "Warning",
        "DeprecatedField",
        'spec.state "Ready" is deprecated: write "Standby" (the same warm standby: created and '
        "warmed up, not started); it is read as Standby until then",
    )
    assert h.events[0] == warning
    h.now += 3
    h.reconcile()
    assert h.events.count(warning) == 1  # not again for the same generation
    h.generation += 1  # another change that still says Ready: told again
    h.reconcile()
    assert h.events.count(warning) == 2
    assert [i.state for i in h.engine.instances.values()] == [InstanceState.Ready]


def test_nothing_is_written_or_posted_when_nothing_changed() -> None:
    h = Harness()
    h.reconcile()
    writes, events = len(h.writes), len(h.events)
    for _ in range(5):
        h.now += 3
        h.reconcile()
    assert (len(h.writes), len(h.events)) == (writes, events)


def test_a_crash_counts_one_restart_and_tells_it_once() -> None:
    h = Harness()
    h.reconcile()
    h.engine.crash(next(iter(h.engine.instances)))
    h.reconcile()  # seen: NodeFailed, backoff starts
    assert h.writes[-1]["failure"]["reason"] == "NodeFailed"
    for _ in range(3):  # passes during the backoff change nothing
        h.now += 1
        h.reconcile()
    h.now += 5
    h.reconcile()  # the backoff is over: one restart
    restarting = [e for e in h.events if e[1] == "Restarting"]
    assert restarting == [("Normal", "Restarting", "restart 1 of 3 after NodeFailed")]
    assert h.writes[-1]["restarts"] == 1
    assert h.writes[-1]["phase"] == "Running"
    assert h.writes[-1]["failure"] is None


def test_the_backoff_doubles_up_to_its_cap() -> None:
    engine = FakeEngine()
    engine.fail_start = FailureReason.StartFailed
    h = Harness(engine)
    h.spec["restartPolicy"] = {"maxRestarts": 20, "backoffSeconds": 40}
    waits = []
    for _ in range(6):
        next_look = h.reconcile()
        retry_at = h.reconciler._memory[UID].retry.retry_at
        assert retry_at is not None
        waits.append(retry_at - h.now)
        assert next_look == min(h.reconciler.settings.health_interval_s, retry_at - h.now)
        h.now = retry_at  # the next pass retries
    assert waits == [40, 80, 160, BACKOFF_CAP_S, BACKOFF_CAP_S, BACKOFF_CAP_S]
    assert h.writes[-1]["restarts"] == 5
    assert h.writes[-1]["failure"]["reason"] == "StartFailed"


def test_a_failed_status_write_is_made_again_by_the_next_pass() -> None:
    h = Harness()
    h.reconcile()
    h.engine.crash(next(iter(h.engine.instances)))
    h.refuse_writes = 1  # the write that says NodeFailed gets a 500
    with pytest.raises(RuntimeError):
        h.reconcile()
    assert [w["phase"] for w in h.writes] == ["Running"]
    h.now += 1
    h.reconcile()  # the object still says Running: the failure is written now
    assert h.writes[-1]["failure"]["reason"] == "NodeFailed"
    assert h.status["conditions"][-1]["status"] == "False"


def test_an_operator_restart_recovers_from_status_alone() -> None:
    h = Harness()
    h.spec["restartPolicy"] = {"maxRestarts": 5, "backoffSeconds": 1}
    h.reconcile()
    h.engine.crash(next(iter(h.engine.instances)))
    h.reconcile()
    h.now += 2
    h.reconcile()  # restart 1
    written = dict(h.status)
    # A new operator process: a new reconciler and an engine that holds nothing.
    again = Harness(status=written)
    again.spec = h.spec
    again.now = h.now
    again.reconcile()
    assert again.writes[-1]["restarts"] == 1, "restarts are restored from status"
    assert again.writes[-1]["phase"] == "Running"
    recovered = [m for _, r, m in again.events if r == "Recovered"]
    assert recovered, again.events
    assert written["pipelineId"] in recovered[0]


def test_the_health_loop_queues_only_pipelines_whose_instance_changed() -> None:
    """A Pipeline at its desired state asks for no look before the resync: the health loop
    asks the engine about it, and queues it only once its instance changed."""
    h = Harness()
    assert h.reconcile() == SETTLED_RESYNC_S
    assert asyncio.run(h.reconciler.changed_instances()) == []
    h.engine.crash(next(iter(h.engine.instances)))
    assert asyncio.run(h.reconciler.changed_instances()) == [UID]
    # The pass that follows records the failure: its backoff, not the resync, is next.
    assert h.reconcile() < SETTLED_RESYNC_S
    assert h.writes[-1]["failure"]["reason"] == "NodeFailed"


def test_an_instance_gone_from_the_engine_is_a_change() -> None:
    h = Harness()
    h.reconcile()
    h.engine.instances.clear()  # the runtime lost it
    assert asyncio.run(h.reconciler.changed_instances()) == [UID]
    h.reconcile()
    assert h.writes[-1]["phase"] == "Running"  # deployed again
    assert asyncio.run(h.reconciler.changed_instances()) == []


def test_a_pipeline_that_failed_for_good_waits_for_the_resync() -> None:
    engine = FakeEngine()
    engine.fail_start = FailureReason.StartFailed
    h = Harness(engine)
    h.spec["restartPolicy"] = {"maxRestarts": 0}
    h.reconcile()
    assert h.writes[-1]["phase"] == "Failed"
    assert h.reconcile() == SETTLED_RESYNC_S


def test_the_fingerprint_sees_what_a_pass_would_show() -> None:
    key = PipelineKey("ns", "p", UID)
    info = InstanceInfo(key, "id-1", "r1", InstanceState.Running, nodes={"src": "Running"})
    same = InstanceInfo(key, "id-1", "r1", InstanceState.Running, nodes={"src": "Running"})
    assert fingerprint(info) == fingerprint(same)
    same.nodes["src"] = "Failed"
    assert fingerprint(info) != fingerprint(same)
    info.failure = PipelineFailure(FailureReason.RuntimeUnavailable, Step.run, "refused")
    assert fingerprint(info) != fingerprint(same)
    assert fingerprint(None) is None


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]},
            'spec.template.volumes[0].hostPath: host paths are not allowed (volume "host" would '
            "reach the node's own files); allowed types: configMap, csi, downwardAPI, emptyDir, "
            "ephemeral, image, persistentVolumeClaim, projected, secret; the administrator "
            "allows more with JUTURNA_OPERATOR_ALLOWED_VOLUME_TYPES (chart: allowedVolumeTypes)",
        ),
        (
            {"serviceAccountName": "jo"},
            'spec.template.serviceAccountName: "jo" is the ServiceAccount the operator itself '
            "runs as, in this namespace; a pipeline's pod never gets the operator's rights: "
            "name another account",
        ),
    ],
    ids=["host-path", "the-operators-account"],
)
def test_a_template_the_policy_refuses_fails_validation_before_any_create(
    template: dict[str, Any], message: str
) -> None:
    """Engine pod: the template is checked where the spec is validated, in the Pipeline's
    namespace (here the operator's own), before the engine makes anything."""
    h = Harness()
    h.reconciler.settings = Settings(
        engine="pod",
        runtime_image="localhost/jo:1",
        plugin_roots=[EXAMPLES],
        service_account=ServiceAccount("ns", "jo"),
        metrics_port=0,
        progress_threshold_s=60,
    )
    h.spec["template"] = template
    h.reconcile()
    assert h.engine.created == 0
    assert h.writes[-1]["phase"] == "Failed"
    assert h.writes[-1]["failure"] == {
        "reason": "InvalidSpec",
        "code": 422,
        "step": "validate",
        "message": message,
    }
    assert ("Warning", "InvalidSpec", message) in h.events


def test_a_crashed_instance_of_an_older_revision_is_replaced_by_the_new_one() -> None:
    """The spec changes while the instance's node has died: the crashed instance goes before
    the backoff, then the new revision deploys. Before, it stayed (only an instance of the
    spec's own revision was cleared): each backoff saw the same crash again, spent a restart,
    and the Pipeline ended Failed with the new spec never deployed."""
    h = Harness()
    h.reconcile()
    h.engine.crash(next(iter(h.engine.instances)))
    h.spec = dict(h.spec, nodes=[dict(NODES[0], configuration={"rate": 5.0}), NODES[1]])
    h.generation += 1
    for _ in range(6):
        h.reconcile()
        h.now += 30
    (info,) = h.engine.instances.values()
    assert info.revision == h.reconciler._memory[UID].spec.revision
    assert info.state is InstanceState.Running
    assert h.status["phase"] == "Running"
    assert h.status["restarts"] == 1
