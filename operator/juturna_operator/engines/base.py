"""The PipelineManager port: one small interface that every engine implements.

The reconciler never calls Juturna directly; it calls an ``Engine``. Each method is
async so that no blocking Juturna call ever runs on the event loop, and each failure
comes back as a classified ``PipelineFailure``.

Juturna 2.1.1's pitfalls ("Pitfall N" below) are described in docs/juturna.md.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

from juturna.names import ComponentStatus

from juturna_operator.api import MAX_NAME, SAFE_NAME
from juturna_operator.domain import (
    Address,
    InstanceState,
    NodeCrash,
    PipelineKey,
    Slot,
)
from juturna_operator.listening import Listener
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import CodePolicy

if TYPE_CHECKING:
    from juturna_operator.engines.client import JuturnaClient

T = TypeVar("T")

# How long a warmup may take on every engine: model loads take minutes.
WARMUP_TIMEOUT_S = 600.0


# Juturna's node status -> ours. ComponentStatus is a StrEnum, so the same table serves
# enum values (in process) and their strings (over HTTP).
NODE_STATUS: dict[str, str] = {
    ComponentStatus.NEW: "Created",
    ComponentStatus.CONFIGURED: "Configured",
    ComponentStatus.RUNNING: "Running",
    ComponentStatus.STOPPED: "Stopped",
}


def node_status(value: Any) -> str:
    return NODE_STATUS.get(value, str(value))


def node_statuses(status: dict[str, Any]) -> dict[str, str]:
    """``{node: our status}`` from a Juturna status dict (``pipeline_status`` or HTTP)."""
    return {
        name: node_status(node.get("status")) for name, node in (status.get("nodes") or {}).items()
    }


def apply_health(info: InstanceInfo, health: dict[str, Any], shared: bool = False) -> None:
    """Fill ``info`` from our worker's ``/operator/health`` answer: its pipeline's node
    statuses, and the node threads that died (Juturna's status misses those).

    The worker names the pipeline of each thread that died, where one started it. ``shared``:
    the worker runs other pipelines too (many pipelines per process), so a crash of no
    pipeline's is none of this one's; a worker of one pipeline gives it to that one."""
    for entry in health.get("pipelines", []):
        status = entry.get(info.pipeline_id)
        if status:
            info.nodes = node_statuses(status)
    mine = (info.pipeline_id,) if shared else (None, info.pipeline_id)
    info.crashes = [
        NodeCrash(c["node"], c["thread"], c["error"])
        for c in health["crashes"]
        if c.get("pipeline") in mine
    ]
    for crash in info.crashes:
        info.nodes[crash.node] = "Failed"


# A node name becomes a folder name inside the pipeline's folder (Pitfall 7): what the CRD
# admits, api.SAFE_NAME (fullmatch instead of its anchors: Python's "$" allows a final "\n").
NODE_FOLDER_NAME = re.compile(SAFE_NAME.removeprefix("^").removesuffix("$"))


def confined(key: PipelineKey, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` if none of its names can make Juturna write outside the work folder.

    Every engine calls this before it hands a config to Juturna. The API server and the graph
    validation refuse such names first; this check keeps the engine layer safe on its own,
    for any caller, so a bug upstream cannot become a write to an arbitrary path."""
    pipeline = config.get("pipeline") if isinstance(config, dict) else None
    if not isinstance(pipeline, dict):
        raise PipelineFailure(FailureReason.InvalidSpec, Step.create, "the config has no pipeline")
    if pipeline.get("name") != key.juturna_name:
        raise PipelineFailure(
            FailureReason.InvalidSpec,
            Step.create,
            f"pipeline name {pipeline.get('name')!r} is not {key.juturna_name!r}, the folder "
            "name the operator chose for this resource",
        )
    for node in pipeline.get("nodes") or []:
        name = node.get("name") if isinstance(node, dict) else None
        if (
            not isinstance(name, str)
            or len(name) > MAX_NAME
            or not NODE_FOLDER_NAME.fullmatch(name)
        ):
            raise PipelineFailure(
                FailureReason.InvalidSpec,
                Step.create,
                f"node name {name!r} is not a safe folder name (1 to {MAX_NAME} ASCII "
                "letters, digits, '_' or '-')",
            )
    return config


@dataclass
class InstanceInfo:
    """An engine's view of one instance."""

    key: PipelineKey
    pipeline_id: str
    revision: str  # the spec revision it was built from
    state: InstanceState
    nodes: dict[str, str] = field(default_factory=dict)  # name -> Created|Configured|Running|...
    crashes: list[NodeCrash] = field(default_factory=list)
    failure: PipelineFailure | None = None  # the runtime could not be asked (e.g. unreachable)
    pod: tuple[str, str | None] | None = None  # engine pod: (pod name, node name)
    # Engine pod: the Pipeline's Service; None: where the configuration binds (local).
    addresses: tuple[Address, ...] | None = None


@dataclass(frozen=True)
class PluginCheck:
    """The graph checks that read plugin files (``graph.check_plugins``), for an engine whose
    pipelines load other plugins than the operator's to run where they are (engine pod)."""

    spec: dict[str, Any]  # the Pipeline's spec, as the API holds it
    policy: CodePolicy  # what may run where it runs
    warn: Callable[[str], None]  # for each warning (an unknown configuration key)


@dataclass(frozen=True)
class Plan:
    """What a create needs besides Juturna's config, each part for the engines it concerns."""

    runtime: str | None = None  # spec.runtime: the service engine's
    template: dict[str, Any] | None = None  # spec.template: the pod engine's
    listeners: tuple[Listener, ...] = ()  # what it listens on: the pod engine's Service
    # How far the create takes the instance in one engine call (Running: create, warm up and
    # start; where the runtime is a Juturna service, with its one deploy call). The per-step
    # calls stay for what is left (Ready → Running) and for recovery.
    until: InstanceState = InstanceState.Created
    plugins: PluginCheck | None = None  # engine pod: checked in the pod, before warmup


DEFAULT_PLAN = Plan()


class Engine(Protocol):
    """Create, warm up, start, stop and delete pipeline instances; report their status."""

    async def create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan = DEFAULT_PLAN
    ) -> str:
        """Register a new instance from Juturna's config dict; return its pipeline id.

        ``plan`` says where (``spec.runtime``, ``spec.template``) and how far; the instance's
        state (``status``) says how far it went."""

    async def warmup(self, key: PipelineKey) -> None: ...

    async def start(self, key: PipelineKey) -> None: ...

    async def stop(self, key: PipelineKey) -> None:
        """Stop within the engine's stop timeout, else raise ``StopTimeout``."""

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        """Remove the instance and its folder; stop it first if it runs. Idempotent.

        ``release=False``: the same resource is about to be deployed again (a new revision,
        or Running after a stop); an engine may keep what it can reuse for that (the pod
        engine keeps a healthy pod). Deletion, ``Stopped`` and failures release.
        ``keep_output``: the resource stays; the engines with a local work folder keep the
        pipeline's folder for its next instance (``carry_output``). Only deletion wipes it."""

    async def status(self, key: PipelineKey) -> InstanceInfo | None: ...

    def step_under_way(self, key: PipelineKey) -> Step | None:
        """Within a create that takes several Juturna steps in one call: the one under way."""

    def pod_under_way(self, key: PipelineKey) -> str | None:
        """Within a create, on an engine of a pod per instance: that pod's name, once chosen
        (a warm swap's status names the pod being prepared while it warms up)."""

    async def sweep(self, keep: dict[str, str | None]) -> list[str]:
        """Remove instances no resource references (``keep``: Juturna name -> pipeline id)."""

    async def close(self) -> None:
        """Release everything the engine holds (operator shutdown)."""

    # -- a warm swap's two slots (``PipelineKey.slot``) --
    #
    # Every method above takes either slot's key: ``key.candidate`` is a second instance of
    # the same Pipeline, made, warmed up and started beside the active one without touching
    # the Pipeline's address (its Service). The engine knows nothing of swaps: the lifecycle
    # decides them, and ``promote`` is the one primitive it adds.

    @property
    def two_slots(self) -> bool:
        """Whether this engine ever holds a candidate (then an operator's restart may find
        one an earlier process left); no plan needed."""

    def warm_swap(self, plan: Plan) -> str | None:
        """None if a candidate instance with this ``plan`` can run beside the active one;
        else why not, in a user's words (the reconciler then replaces it in place)."""

    async def promote(self, key: PipelineKey) -> None:
        """The candidate (started) takes the Pipeline's address and the active slot; the
        instance that was active moves to the candidate slot, still running, and receives no
        new traffic (the reconciler removes it after the drain). Safe to repeat, and safe
        across an operator restart: adoption finds each instance in the slot it had."""


# A warm swap's instance that served until a promote replaced it: it drains in the candidate
# slot and is never promoted again (an engine records it beside the Slot's values).
RETIRED = "retired"


@dataclass(frozen=True)
class Placed[I]:
    """Which of a Pipeline's instances holds which slot after an operator restart
    (``place_slots``)."""

    active: I | None = None
    candidate: I | None = None
    retired: bool = False  # the candidate slot's instance served before: never promoted again
    strays: tuple[I, ...] = ()  # instances beyond the two slots: removed

    def of(self, slot: Slot) -> I | None:
        return self.active if slot is Slot.active else self.candidate

    def mark(self, slot: Slot) -> str:
        """What the slot's instance is marked with once adopted."""
        return RETIRED if slot is Slot.candidate and self.retired else slot.value


def place_slots[I](
    instances: Sequence[I],
    mark: Callable[[I], str],
    since: Callable[[I], int],
    made: Callable[[I], Any],
    active: I | None = None,
) -> Placed[I]:
    """Which instance holds which slot, from what each recorded: its ``mark`` (a Slot's
    value, or ``RETIRED``), ``since`` when a mark ``active`` was written (0: since ever) and
    ``made`` (an order: later is newer). ``active``: the one the engine knows serves (the pod
    engine's Service selects it), else the one marked active last.

    A promote marks the candidate active (since now), then the old one retired; so an engine
    stopped in between finds two marked active, the later of which serves: never two actives.
    The candidate slot holds the newest of the others (a candidate, not a retired one,
    first); any more are strays."""
    marked = [i for i in instances if mark(i) == Slot.active]
    if active is None and marked:
        active = max(marked, key=lambda i: (since(i), made(i)))

    def retired(i: I) -> bool:
        # Marked active but not the active one: replaced by it (retired), or the candidate of
        # a promote that did not take (marked before the active one).
        if mark(i) == Slot.active and active is not None:
            return since(i) <= since(active)
        return mark(i) == RETIRED

    others = sorted(
        (i for i in instances if i is not active),
        key=lambda i: (not retired(i), made(i)),
        reverse=True,
    )
    candidate = others[0] if others else None
    return Placed(
        active, candidate, candidate is not None and retired(candidate), tuple(others[1:])
    )


def listening_here(plan: Plan) -> str | None:
    """Why two instances of a Pipeline on this machine would collide (its listeners bind this
    machine's ports), or None: then an engine beside the operator warm-swaps it."""
    if not plan.listeners:
        return None
    ports = ", ".join(f"{listener.protocol} {listener.port}" for listener in plan.listeners)
    return (
        f"runs a Pipeline that listens ({ports}) on this machine's ports: two instances "
        "would collide"
    )


def promotable[T](
    instances: dict[PipelineKey, T],
    key: PipelineKey,
    retired: Callable[[T], bool],
    state: Callable[[T], str],
    where: Callable[[T], str],
    takes: str = "serves the Pipeline",
) -> T | None:
    """The candidate a promote of ``key`` makes active; None if it was promoted already (the
    candidate slot holds the retired instance, or nothing, beside an active one). Else
    ``InvalidPipelineId`` (no candidate) or ``NotRunning`` (one not started, ``where``:
    the instance in a user's words; ``takes``: what a promote gives it)."""
    candidate = instances.get(key.candidate)
    if candidate is None or retired(candidate):
        if key.active in instances:
            return None
        raise PipelineFailure(
            FailureReason.InvalidPipelineId, Step.start, f"{key} has no candidate to promote"
        )
    if (now := state(candidate)) != InstanceState.Running:
        raise PipelineFailure(
            FailureReason.NotRunning,
            Step.start,
            f"the candidate instance of {key} ({where(candidate)}) is {now}, not Running: only "
            f"a started instance {takes}",
        )
    return candidate


def swap_slots[T](instances: dict[PipelineKey, T], key: PipelineKey) -> T | None:
    """A promote's move in an engine's table: the candidate slot's instance to the active
    slot, and the active one, returned (None if none), to the candidate slot."""
    candidate = instances.pop(key.candidate)
    previous = instances.pop(key.active, None)
    instances[key.active] = candidate
    if previous is not None:
        instances[key.candidate] = previous
    return previous


def held[T](instances: dict[PipelineKey, T], key: PipelineKey, step: Step) -> T:
    """The instance an engine holds for ``key``, or ``InvalidPipelineId``."""
    instance = instances.get(key)
    if instance is None:
        raise PipelineFailure(
            FailureReason.InvalidPipelineId, step, f"no pipeline instance for {key}"
        )
    return instance


def vacant(instances: dict[PipelineKey, Any], key: PipelineKey) -> None:
    """Refuse a second instance for one resource (``CreateFailed``)."""
    if key in instances:
        raise PipelineFailure(
            FailureReason.CreateFailed, Step.create, f"{key} already has an instance"
        )


class KeyLock(asyncio.Lock):
    """One instance's lock, saying which operation holds it (``holder``: "create",
    "warmup", ...), and ``abandoned`` when a delete gave up waiting for that operation."""

    abandoned = False
    holder = ""
    # The Juturna step a long operation is in, where one call does several (a deploy).
    step: Step | None = None
    # The pod the operation runs the instance in, once chosen (engines of a pod per instance).
    pod: str | None = None


@dataclass(frozen=True)
class Bound:
    """How long an operation waits for its instance's lock (``Exclusive.exclusive``).

    After ``limit_s`` the operation gives up, unless the lock's holder is one of
    ``patient_with``: operations that end within ``limit_s`` by themselves (a stop abandons
    what hangs), so it waits ``limit_s`` once more rather than give up just as they do.
    ``give_up(key, lock, waited_s)`` raises the failure the user sees; it may mark ``lock``
    abandoned and let go of the key, so that later operations need not wait behind a hung one.
    """

    limit_s: float
    give_up: Callable[[PipelineKey, KeyLock, float], NoReturn]
    patient_with: frozenset[str] = frozenset()


class Exclusive:
    """One operation at a time per instance, and never abandoned halfway.

    Each operation runs under its instance's lock inside ``asyncio.shield``: when its caller
    is cancelled (a pass, after a deletion), the operation still finishes and
    records what it did, so the deletion that follows finds (and removes) it.
    """

    def __init__(self) -> None:
        self._locks: dict[PipelineKey, KeyLock] = {}
        self._users: dict[PipelineKey, int] = {}  # holding or waiting for each lock
        self._in_flight: set[asyncio.Future[Any]] = set()

    def _lock(self, key: PipelineKey) -> KeyLock:
        return self._locks.setdefault(key, KeyLock())

    def busy(self, key: PipelineKey) -> bool:
        return self._lock(key).locked()

    def step_under_way(self, key: PipelineKey) -> Step | None:
        """The Juturna step an operation on ``key`` is in now, where it said (a deploy: the
        reconciler shows it as the phase while the call lasts)."""
        lock = self._locks.get(key)
        return lock.step if lock is not None and lock.locked() else None

    def pod_under_way(self, key: PipelineKey) -> str | None:
        lock = self._locks.get(key)
        return lock.pod if lock is not None and lock.locked() else None

    async def both_slots(
        self, key: PipelineKey, operation: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        """``operation`` under both slots' locks: always the active one's first, so that two
        such operations never wait for each other."""

        async def both() -> T:
            return await self.exclusive(key.candidate, operation, *args)

        both.__name__ = operation.__name__
        return await self.exclusive(key.active, both)

    def drop_lock(self, key: PipelineKey, lock: KeyLock | None = None) -> None:
        """Drop the lock of a deleted instance (``lock``: if it is still that one), unless an
        operation still holds or waits for it: a new lock beside a waited-for one would let
        two operations run at once."""
        if not self._users.get(key) and (lock is None or self._locks.get(key) is lock):
            self._locks.pop(key, None)

    async def exclusive(
        self,
        key: PipelineKey,
        operation: Callable[..., Awaitable[T]],
        *args: Any,
        bound: Bound | None = None,
        final: bool = False,
    ) -> T:
        """``operation(*args)`` alone on ``key``, shielded from its caller's cancellation.

        ``bound``: wait for the lock at most that long (else as long as the operation in
        flight takes). ``final``: the instance's last operation (a delete): its lock is
        dropped once it ends, in the shielded task, so a cancelled caller leaves no lock
        behind (unless another operation holds or waits for it)."""
        lock = self._lock(key)

        async def locked() -> T:
            self._users[key] = self._users.get(key, 0) + 1
            try:
                await _acquire(key, lock, bound)
                try:
                    lock.holder, lock.step = operation.__name__.strip("_"), None
                    return await operation(*args)
                finally:
                    lock.release()
            finally:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key]
                if final:
                    self.drop_lock(key, lock)

        task = asyncio.ensure_future(locked())
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(task)

    async def settle(self, timeout_s: float) -> None:
        """Until no operation is in flight, for at most ``timeout_s``: a stopping operator
        lets them end (its event loop would cancel them halfway)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._in_flight:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.wait(set(self._in_flight), timeout=left)


async def _acquire(key: PipelineKey, lock: KeyLock, bound: Bound | None) -> None:
    """Take ``lock``, within ``bound`` if there is one (``Bound`` says how)."""
    if bound is None:
        await lock.acquire()
        return
    try:
        await asyncio.wait_for(lock.acquire(), bound.limit_s)
    except TimeoutError:
        if lock.holder not in bound.patient_with:
            bound.give_up(key, lock, bound.limit_s)
        try:
            await asyncio.wait_for(lock.acquire(), bound.limit_s)
        except TimeoutError:
            bound.give_up(key, lock, 2 * bound.limit_s)


class LockedEngine(Exclusive):
    """The steps every engine takes the same way: each under its instance's lock, shielded
    from cancellation (``Exclusive``), and a create's config confined first. An engine
    implements ``_create``, ``_warmup``, ``_start`` and ``_stop``; deletion differs (how far
    it may wait, what it keeps) and stays each engine's own."""

    async def create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan = DEFAULT_PLAN
    ) -> str:
        return await self.exclusive(key, self._create, key, confined(key, config), revision, plan)

    async def warmup(self, key: PipelineKey) -> None:
        await self.exclusive(key, self._warmup, key)

    async def _deploy(
        self,
        key: PipelineKey,
        client: JuturnaClient,
        config: dict[str, Any],
        until: InstanceState,
        on_worker: bool = False,
    ) -> tuple[str, InstanceState]:
        """``client.deploy`` (``deploy_on_worker`` where the runtime is our worker) within
        ``key``'s create. A deploy that goes on to warm up marks that step as under way for
        the whole call: Juturna's create takes a millisecond, its warmup (building the nodes:
        models load) is where the time goes, so that is the step the reconciler shows while
        the call lasts."""
        if until is not InstanceState.Created:
            self._lock(key).step = Step.warmup
        deploy = client.deploy_on_worker if on_worker else client.deploy
        return await deploy(config, until, WARMUP_TIMEOUT_S)

    async def start(self, key: PipelineKey) -> None:
        await self.exclusive(key, self._start, key)

    two_slots = False

    def warm_swap(self, plan: Plan) -> str | None:
        """Engines replace an instance in place unless they say otherwise (the router names
        the engine before these words)."""
        return "runs one instance of a Pipeline at a time"

    async def promote(self, key: PipelineKey) -> None:
        raise PipelineFailure(
            FailureReason.InvalidPipelineId, Step.start, f"{key} has no warm swap on this engine"
        )

    async def stop(self, key: PipelineKey) -> None:
        await self.exclusive(key, self._stop, key)

    async def _create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan
    ) -> str:
        raise NotImplementedError

    async def _warmup(self, key: PipelineKey) -> None:
        raise NotImplementedError

    async def _start(self, key: PipelineKey) -> None:
        raise NotImplementedError

    async def _stop(self, key: PipelineKey) -> None:
        raise NotImplementedError


class SlotRecord(Protocol):
    """What a record of an engine beside the operator keeps of a warm swap's slots."""

    slot: str  # a Slot's value, or RETIRED
    active_since: int  # ns since the epoch: when a promote made it active (0: ever)
    state: str  # an InstanceState's value
    made: int  # ns since the epoch: when it was created


class LocalSlots(LockedEngine):
    """A warm swap's two instances of a Pipeline on this machine (the engines beside the
    operator): they collide only on a port of the machine, so a Pipeline that listens on one
    is replaced in place. An engine implements ``_promote``."""

    two_slots = True

    def warm_swap(self, plan: Plan) -> str | None:
        return listening_here(plan)

    async def promote(self, key: PipelineKey) -> None:
        """The candidate (Running) becomes the active instance; the active one moves to the
        candidate slot, still running, retired (never promoted again)."""
        await self.both_slots(key, self._promote, key.active)

    async def _promote(self, key: PipelineKey) -> None:
        raise NotImplementedError

    @staticmethod
    def adopted_slots[I](
        found: list[I], record: Callable[[I], SlotRecord]
    ) -> tuple[list[I], tuple[I, ...]]:
        """A Pipeline's instances an operator found at its start, each in the slot its record
        says (``place_slots``: of two marked active, the later), each record's mark settled
        to that slot (the caller saves it); and the strays beyond the two slots."""
        placed = place_slots(
            found,
            lambda i: record(i).slot,
            lambda i: record(i).active_since,
            lambda i: record(i).made,
        )
        kept = []
        for slot in Slot:
            instance = placed.of(slot)
            if instance is not None:
                record(instance).slot = placed.mark(slot)
                kept.append(instance)
        return kept, placed.strays

    @staticmethod
    async def promote_recorded[I](
        key: PipelineKey,
        instances: dict[PipelineKey, I],
        record: Callable[[I], SlotRecord],
        alive: Callable[[I], bool],
        where: Callable[[I], str],
        save: Callable[[I], Awaitable[None]],
    ) -> tuple[I, I | None] | None:
        """A promote where each instance has a record that outlives the operator: crash-safe
        in this order (``place_slots`` reads it back), the candidate's record is marked active
        (since now), then the old one's retired. Returns (the new active instance, the
        retired one or None), or None if it was promoted already."""
        candidate = promotable(
            instances,
            key,
            lambda i: record(i).slot == RETIRED,
            lambda i: record(i).state if alive(i) else "gone",
            where,
        )
        if candidate is None:
            return None
        record(candidate).slot, record(candidate).active_since = Slot.active.value, time.time_ns()
        await save(candidate)
        previous = swap_slots(instances, key)
        if previous is not None:
            record(previous).slot = RETIRED
            await save(previous)
        return candidate, previous
