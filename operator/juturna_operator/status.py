"""The status this operator owns: built from the lifecycle's decisions, written only when it
says something new.

Status writes cost API calls (the benchmark counts them), so a write is skipped when the
object already says the same; and what was written is remembered only once the write
succeeded, so a failed write is made again by the next pass instead of being taken for done.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from juturna_operator import lifecycle
from juturna_operator.api import (
    Condition,
    ConditionType,
    Endpoint,
    Failure,
    NodeStatus,
    PipelineStatus,
    PodPlacement,
    Protocol,
    UpdateStatus,
    UpdateStep,
)
from juturna_operator.domain import Address, InstanceState, PipelineKey
from juturna_operator.engines.base import InstanceInfo
from juturna_operator.lifecycle import Action, Desired, Observed

StatusWriter = Callable[[PipelineKey, dict[str, Any]], Awaitable[None]]


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Facts:
    """Everything a status is built from (equal facts build equal statuses)."""

    desired: Desired
    observed: Observed
    in_progress: Action | None
    warnings: tuple[str, ...]
    restarts: int
    node_total: int  # nodes in the spec: the NODES column's denominator
    info: InstanceInfo | None
    addresses: tuple[Address, ...] = ()  # status.endpoints
    candidate: InstanceInfo | None = None  # a warm swap's other instance

    def key(self) -> tuple[Any, ...]:
        """What decides the status, cheaply comparable (InstanceInfo holds lists)."""
        info = self.info
        return (
            self.desired,
            self.observed,
            self.in_progress,
            self.warnings,
            self.restarts,
            self.node_total,
            self.addresses,
            None
            if info is None
            else (info.pipeline_id, info.state, tuple(info.nodes.items()), len(info.crashes)),
            None if self.candidate is None else self.candidate.pod,
        )


def build_status(facts: Facts, previous_status: dict[str, Any]) -> dict[str, Any]:
    """The whole status this operator owns, as a merge patch (``previous_status``: its
    conditions keep their transition times where their status did not change, and its
    ``lastStableRevision`` stays while nothing runs as asked)."""
    desired, observed, info = facts.desired, facts.observed, facts.info
    previous = [
        Condition.model_validate(c)
        for c in previous_status.get("conditions") or []
        if isinstance(c, dict) and c.get("type") in ConditionType.__members__
    ]
    failure = lifecycle.current_failure(desired, observed) or lifecycle.update_failed(
        desired, observed
    )
    nodes = [NodeStatus(name=n, status=s) for n, s in (info.nodes if info else {}).items()]
    running = info is not None and info.state is InstanceState.Running
    live = {"Running"} if running else {"Configured", "Stopped"}  # warm standby counts
    status = PipelineStatus(
        phase=lifecycle.phase(desired, observed, facts.in_progress),
        observedGeneration=desired.generation,
        conditions=lifecycle.conditions(
            desired,
            observed,
            previous,
            now_rfc3339(),
            "; ".join(facts.warnings),
            facts.in_progress,
        ),
        failure=Failure(
            reason=failure.reason.name,
            code=failure.reason.code,
            step=failure.step,
            message=failure.message,
        )
        if failure
        else None,
        pipelineId=info.pipeline_id if info else None,
        restarts=facts.restarts,
        nodes=nodes,
        nodesReady=f"{sum(n.status in live for n in nodes)}/{facts.node_total}",
        pod=PodPlacement(name=info.pod[0], node=info.pod[1]) if info and info.pod else None,
        endpoints=[
            Endpoint(
                node=a.node,
                name=a.name,
                protocol=Protocol(a.protocol),
                host=a.host,
                port=a.port,
                clusterIP=a.cluster_ip,
                address=f"{a.host}:{a.port}",
            )
            for a in facts.addresses
        ],
        address=_address_column(facts.addresses),
        lastStableRevision=_stable_revision(facts, previous_status.get("lastStableRevision")),
        update=_update(facts),
    )
    # None values stay in: in a merge patch they delete a field that no longer applies.
    return status.model_dump(mode="json")


def _stable_revision(facts: Facts, before: Any) -> str | None:
    """What runs as asked: the active instance's revision while it runs unfailed (an update
    that fails leaves it there); else what was written before."""
    observed = facts.observed
    if (
        observed.instance is InstanceState.Running
        and lifecycle.current_failure(facts.desired, observed) is None
    ):
        return observed.instance_revision
    return before if isinstance(before, str) else None


def _update(facts: Facts) -> UpdateStatus | None:
    step = lifecycle.update_step(facts.desired, facts.observed, facts.in_progress)
    if step is None:
        return None
    observed, candidate = facts.observed, facts.candidate
    draining = step is UpdateStep.Draining
    return UpdateStatus(
        step=step,
        revision=facts.desired.revision,
        previousRevision=observed.candidate_revision if draining else observed.instance_revision,
        pod=PodPlacement(name=candidate.pod[0], node=candidate.pod[1])
        if candidate is not None and candidate.pod
        else None,
    )


def _address_column(addresses: tuple[Address, ...]) -> str | None:
    if not addresses:
        return None
    first = f"{addresses[0].host}:{addresses[0].port}/{addresses[0].protocol}"
    return first + (f" (+{len(addresses) - 1})" if len(addresses) > 1 else "")


@dataclass
class WrittenStatus:
    """The last status written for one resource, and the facts it was built from."""

    status: dict[str, Any] | None = None
    facts: tuple[Any, ...] | None = None

    async def publish(
        self,
        key: PipelineKey,
        facts: Facts,
        current: dict[str, Any],
        write: StatusWriter,
    ) -> dict[str, Any] | None:
        """Write the status ``facts`` build, unless ``current`` (the object's) or the last
        write already says it. Returns the status (None: unchanged facts, nothing built)."""
        fingerprint = facts.key()
        if (
            fingerprint == self.facts
            and self.status is not None
            and same_status(self.status, current)
        ):
            return None  # nothing new, and the object still says it: skip building it again
        status = build_status(facts, self.status or current)
        if status != self.status and not same_status(status, current):
            await write(key, status)  # raises on failure: nothing below is remembered
        self.status, self.facts = status, fingerprint
        return status


def same_status(new: dict[str, Any], current: dict[str, Any]) -> bool:
    """True when ``current`` (from the API) already says what ``new`` says. A top-level None
    deletes a field; nested Nones never reach the object (a merge patch drops them)."""
    return all(
        current.get(k) == _without_none(v) for k, v in new.items() if v is not None or k in current
    )


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value
