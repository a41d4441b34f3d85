"""The in-process engine: Juturna's ``PipelineManager`` inside the operator's own process.

Dense and fast (create + warmup + start of a light pipeline takes about 2 ms), but every
pipeline shares this process. It handles the Juturna 2.1.1 pitfalls that apply here
(numbered as in docs/juturna.md, and cited below as "Pitfall N"):

1. A crashing node is invisible: a ``threading.excepthook`` maps each dead node thread to
   its pipeline (thread names are not unique across pipelines), and ``status`` also checks
   that every node thread of a running pipeline is alive.
2. Stop can hang forever: it runs on a thread of its own and is abandoned after the stop
   timeout (``StopTimeout``); the stuck threads stay in this process until it restarts.
   The process engine is the real cure. Warmups and starts run plugin code that may hang
   too: each runs on a thread of its own, within a timeout, and hands its pool thread back
   after the stop timeout; a delete waits for a call in flight at most the stop timeout,
   then abandons the instance. A failed start stops the nodes it had started.
3. Start after stop is a no-op: a stopped instance is reported as ``Spent``.
5. The singleton breaks while empty: one reference is held for the engine's life.
6. The base folder is set once per process: a second, different workdir is refused.
7. Names are not sanitised: ``PipelineKey.juturna_name`` is safe by construction.
8. No locking: every call for one instance runs under that instance's lock.

A warm swap's candidate is a second Juturna pipeline of the same resource in the same
manager (Juturna names each instance's folder after its id). Its instances die with the
operator's process, so a promote only moves them between the two slots in memory; a
Pipeline that listens on a port of this machine is not swapped (two instances would bind it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import shutil
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from juturna.cli.commands.models.api import PipelineConfig
from juturna.components import _pipeline as _pipeline_module
from juturna.components import _pipeline_manager as _pipeline_manager_module
from juturna.components._pipeline_manager import PipelineManager
from juturna.names import PipelineStatus

from juturna_operator.domain import (
    InstanceState,
    NodeCrash,
    PipelineKey,
    Slot,
    log_extra_of_juturna_name,
)
from juturna_operator.engines.base import (
    WARMUP_TIMEOUT_S,
    Bound,
    InstanceInfo,
    KeyLock,
    LocalSlots,
    Plan,
    held,
    node_status,
    promotable,
    swap_slots,
    vacant,
)
from juturna_operator.reasons import (
    JUTURNA_DIR,
    FailureReason,
    PipelineFailure,
    Step,
    classify,
    describe_exception,
    failing_node,
)
from juturna_operator.settings import Settings
from juturna_operator.worker import carry_output

log = logging.getLogger(__name__)
T = TypeVar("T")
JUTURNA_MODULES_THAT_COLLECT = (_pipeline_module, _pipeline_manager_module)
# Warmups or starts that may run on past the stop timeout (hung, or a long model load), per
# pool thread (max_concurrency); beyond that, new warmups and starts are refused (503).
HUNG_CALLS_PER_SLOT = 2
# A delete does not give up on these after the stop timeout: each ends within it by itself,
# abandoning what hangs; the delete waits once more rather than give up just as it does.
_ENDS_WITHIN_BOUND = frozenset({"stop", "delete"})
CALL_REASONS = {Step.warmup: FailureReason.WarmupFailed, Step.start: FailureReason.StartFailed}


class CoalescedCollector:
    """Stands in for the ``gc`` module inside Juturna's pipeline modules.

    Juturna runs ``gc.collect()`` twice per ``delete_pipeline`` (Pitfall 10): about 0.1 s each
    with 1000 pipelines alive, holding the GIL, so deleting many is quadratic. Here a request
    only sets a flag, and one full collection runs at most every ``interval`` seconds for all
    the requests in between: garbage is still collected, a moment later. Everything else is
    the real ``gc``.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._wanted = threading.Event()
        self._closed = threading.Event()
        self.collections = 0
        self._thread = threading.Thread(target=self._run, name="gc-coalesced", daemon=True)
        self._thread.start()

    def collect(self, generation: int = 2) -> int:
        self._wanted.set()
        return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)

    def _run(self) -> None:
        while not self._closed.is_set():
            if self._wanted.wait(timeout=self._interval) and not self._closed.is_set():
                self._closed.wait(self._interval)  # let the requests of a burst gather
                self._wanted.clear()
                gc.collect()
                self.collections += 1

    def install(self) -> None:
        for module in JUTURNA_MODULES_THAT_COLLECT:
            module.gc = self

    def uninstall(self) -> None:
        for module in JUTURNA_MODULES_THAT_COLLECT:
            module.gc = gc
        self._closed.set()


@dataclass
class _Instance:
    key: PipelineKey
    pipeline_id: str
    revision: str
    state: InstanceState = InstanceState.Created
    crashes: list[NodeCrash] = field(default_factory=list)
    call: _Call | None = None  # the warmup or start in flight
    retired: bool = False  # it served until a promote replaced it: never promoted again


@dataclass
class _Call:
    """A Juturna call that runs plugin code (warmup, start) on a thread of its own.

    Whichever comes second, the call's end or the instance's abandonment, disposes of the
    pipeline (``handoff``): an abandoned instance's nodes must not start and run for good."""

    step: Step
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[None]
    pipeline: Any  # Juturna's Pipeline: still there when the manager no longer lists it
    thread: threading.Thread | None = None
    handoff: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False
    abandoned: bool = False
    keep_folder: bool = False  # abandoned beside the resource's other instance


class _Overran(Exception):
    """A warmup or start outlived its timeout; ``where`` names the node it was in."""

    def __init__(self, call: _Call, node: str | None) -> None:
        super().__init__(call.step)
        self.call = call
        self.where = f' (node "{node}" still in it)' if node else ""

    def failure(
        self, reason: FailureReason, step: Step, limit: float, folder: str
    ) -> PipelineFailure:
        """What the user reads when the call was given up after ``limit`` seconds
        (``folder``: what became of the instance's folder, ``_folder_fate``)."""
        return PipelineFailure(
            reason,
            step,
            f"{step} did not finish within {limit:g} s{self.where}. The instance was "
            f"abandoned and {folder}; the {step}'s thread stays in the operator "
            "process until it returns (the process engine can kill it instead)",
        )


class _ThreadOwners:
    """Maps node threads to (instance, node); installed once as ``threading.excepthook``."""

    def __init__(self) -> None:
        self._owners: weakref.WeakKeyDictionary[threading.Thread, tuple[_Instance, str]] = (
            weakref.WeakKeyDictionary()
        )
        # Instances inside start_pipeline, with their node names: their threads run before
        # they can be registered, and one may die at once (a source's first sleep).
        self.starting: list[tuple[_Instance, list[str]]] = []
        self._previous = threading.excepthook
        threading.excepthook = self._hook

    def register(self, thread: threading.Thread | None, instance: _Instance, node: str) -> None:
        if thread is not None:
            self._owners[thread] = (instance, node)

    def _hook(self, args: threading.ExceptHookArgs) -> None:
        owner = self._owners.get(args.thread) if args.thread is not None else None
        if owner is None and args.thread is not None:
            owner = self._starting_owner(args.thread.name)
        if owner is None:
            self._previous(args)
            return
        instance, node = owner
        error = (
            f"{args.exc_type.__name__}: {args.exc_value}"
            if args.exc_value
            else (args.exc_type.__name__)
        )
        thread = args.thread.name if args.thread is not None else "?"
        instance.crashes.append(NodeCrash(node=node, thread=thread, error=error))
        log.warning("node %r crashed: %s", node, error, extra=instance.key.log_extra)

    def _starting_owner(self, thread_name: str) -> tuple[_Instance, str] | None:
        """The starting instance a node thread belongs to, by Juturna's thread names
        (``_source_<node>``...; not unique across pipelines: the first match is taken)."""
        for instance, nodes in list(self.starting):
            for node in nodes:
                if thread_name in (f"_source_{node}", f"_worker_{node}", f"_update_{node}"):
                    return instance, node
        return None

    def uninstall(self) -> None:
        if threading.excepthook == self._hook:
            threading.excepthook = self._previous


class InProcessEngine(LocalSlots):
    """Runs every pipeline in this process through one ``PipelineManager``."""

    def __init__(self, settings: Settings, warmup_timeout_s: float = WARMUP_TIMEOUT_S) -> None:
        super().__init__()
        self._settings = settings
        self.warmup_timeout_s = warmup_timeout_s
        self.max_hung_calls = HUNG_CALLS_PER_SLOT * settings.max_concurrency
        self._hung: set[threading.Thread] = set()
        self._hung_lock = threading.Lock()  # relays on pool threads add, the loop counts
        workdir = settings.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        PipelineManager.set_base_folder(str(workdir))
        if Path(PipelineManager._base_folder or "") != workdir:
            raise RuntimeError(
                f"Juturna's base folder is already {PipelineManager._base_folder} in this "
                f"process and cannot change to {workdir} (Juturna sets it once per process)"
            )
        self._manager = PipelineManager()  # the one reference (Pitfall 5)
        # Folders a previous process left (``<ns>__<name>__<uid8>_<id>``: its instances died
        # with it) hold their resources' output: the next instance of each takes its folder
        # over (carry_output), and the sweep removes those whose resource is gone.
        for root in reversed(settings.plugin_roots):
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))  # Juturna imports plugin folders by import path
        self._pool = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="juturna-call"
        )
        self._instances: dict[PipelineKey, _Instance] = {}
        self._owners = _ThreadOwners()
        self._collector = CoalescedCollector()
        self._collector.install()

    # -- helpers --

    def _wipe(self, key: PipelineKey) -> None:
        for folder in self._settings.workdir.glob(f"{key.juturna_name}_*"):
            shutil.rmtree(folder, ignore_errors=True)

    async def _call(self, step: Step, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking Juturna call on the pool; classify what it raises."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except Exception as exc:
            raise _classified(exc, step) from exc

    def _pipeline(self, instance: _Instance) -> Any:
        return self._manager._pipelines.get(instance.pipeline_id)

    def hung_calls(self) -> int:
        """How many warmups or starts still run after the stop timeout, their pool thread
        handed back (hung, or a long model load)."""
        with self._hung_lock:
            self._hung = {t for t in self._hung if t.is_alive()}
            return len(self._hung)

    async def _plugin_call(
        self, step: Step, instance: _Instance, fn: Callable[[str], object], limit_s: float
    ) -> None:
        """Run a Juturna call that runs plugin code (warmup, start), which may hang.

        A pool thread relays it: the call runs on a thread of its own, and the pool thread
        waits for it at most the stop timeout, then goes back to the pool. Quick calls are
        still bounded by the pool; a hung one does not keep a pool thread (eight of them
        used to stall every in-process pipeline). Raises ``_Overran`` after ``limit_s``,
        the classified failure if the call raised, or a failure if the instance was
        abandoned meanwhile."""
        hold = self._settings.stop_timeout_s
        hung = self.hung_calls()
        if hung >= self.max_hung_calls:
            many = hung != 1
            raise PipelineFailure(
                FailureReason.RuntimeUnavailable,
                step,
                f"{hung} warmup{'s' * many} or start{'s' * many} still run{'s' * (not many)} "
                f"in the operator process after {hold:g} s (at most {self.max_hung_calls} "
                "may; a hung one ends only when it returns or the operator restarts); this "
                f"{step} is retried when fewer run",
            )
        loop = asyncio.get_running_loop()
        call = _Call(step, loop, loop.create_future(), self._pipeline(instance))

        def work() -> None:
            error: BaseException | None = None
            try:
                fn(instance.pipeline_id)
            except BaseException as exc:
                error = exc
            with call.handoff:
                call.finished = True
                dispose = call.abandoned
            if dispose:
                self._dispose(call.pipeline, call.keep_folder)  # nobody holds it any more
            else:
                _settle_threadsafe(loop, call.done, error)

        call.thread = threading.Thread(
            target=work, name=f"juturna-{step}-{instance.key}", daemon=True
        )

        def relay() -> None:
            if call.abandoned:  # deleted while it waited for a pool thread: never run it
                return
            assert call.thread is not None
            call.thread.start()
            call.thread.join(hold)
            if call.thread.is_alive():
                with self._hung_lock:
                    self._hung.add(call.thread)
                log.warning(
                    "the %s still runs after %g s; it hands its pool thread back",
                    step,
                    hold,
                    extra=instance.key.log_extra,
                )

        instance.call = call
        self._pool.submit(relay)
        try:
            await asyncio.wait_for(asyncio.shield(call.done), limit_s)
        except TimeoutError:
            raise _Overran(call, _node_in_progress(call.thread)) from None
        except PipelineFailure:
            raise
        except Exception as exc:
            raise _classified(exc, step) from exc
        finally:
            if instance.call is call:
                instance.call = None
        if call.abandoned:  # it ended just as a delete let go of the instance
            raise _abandoned(call)

    def _dispose(self, pipeline: Any, keep_folder: bool = False) -> None:
        """Stop and destroy the pipeline of an abandoned instance once its warmup or start
        has returned (on that call's thread, or one of its own: it may block); its folder
        goes unless ``keep_folder``."""
        try:
            if pipeline._status == PipelineStatus.RUNNING:
                pipeline.stop()
            else:
                _stop_started_nodes(pipeline)
            pipeline.destroy()
        except Exception as exc:
            log.warning("disposing of an abandoned pipeline: %s", describe_exception(exc))
        if pipeline.pipe_path and not keep_folder:
            shutil.rmtree(pipeline.pipe_path, ignore_errors=True)

    # -- the Engine interface --

    async def _create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan
    ) -> str:
        lock = self._locks.get(key)
        vacant(self._instances, key)
        created = await self._call(
            Step.create, self._manager.create_pipeline, PipelineConfig(**config)
        )
        if lock is not None and lock.abandoned:
            # A delete gave up waiting for this create (a full pool): undo it.
            await self._call(Step.delete, self._manager.delete_pipeline, created.pipeline_id, True)
            raise PipelineFailure(
                FailureReason.CreateFailed, Step.create, f"{key} was deleted while its create ran"
            )
        await asyncio.to_thread(
            carry_output, self._settings.workdir, key.juturna_name, created.pipeline_id
        )
        self._instances[key] = _Instance(key, created.pipeline_id, revision)
        return str(created.pipeline_id)

    async def _warmup(self, key: PipelineKey) -> None:
        instance = held(self._instances, key, Step.warmup)
        limit = self.warmup_timeout_s
        try:
            await self._plugin_call(Step.warmup, instance, self._manager.warmup_pipeline, limit)
        except _Overran as overran:
            folder = self._abandon(instance, overran.call)
            raise overran.failure(FailureReason.WarmupFailed, Step.warmup, limit, folder) from None
        instance.state = InstanceState.Ready

    async def _start(self, key: PipelineKey) -> None:
        instance = held(self._instances, key, Step.start)
        starting = (instance, list(self._pipeline(instance)._nodes or {}))
        self._owners.starting.append(starting)
        limit = self._settings.stop_timeout_s  # a start only starts threads, as stop ends them
        try:
            await self._plugin_call(Step.start, instance, self._manager.start_pipeline, limit)
        except _Overran as overran:
            await self._halt_started(instance)  # what started so far; the rest when it returns
            folder = self._abandon(instance, overran.call)
            raise overran.failure(FailureReason.StartFailed, Step.start, limit, folder) from None
        except PipelineFailure as failure:
            if self._instances.get(key) is not instance:  # abandoned: disposed of elsewhere
                raise
            # Juturna starts node by node and rolls nothing back; its delete stops only a
            # pipeline that reached "running". Stop what started, or it runs on for good.
            blocked = await self._halt_started(instance)
            if blocked is not None:
                failure.message += (
                    f"; the nodes it had started did not stop within "
                    f"{self._settings.stop_timeout_s:g} s (blocked node threads: "
                    f"{', '.join(blocked) or 'none'}). The instance was abandoned; its threads "
                    "stay in the operator process (the process engine can kill them instead)"
                )
            raise
        finally:
            self._owners.starting.remove(starting)
        instance.state = InstanceState.Running
        for node_name, node in (self._pipeline(instance)._nodes or {}).items():
            for thread in (node._worker_thread, node._update_thread, node._source_thread):
                self._owners.register(thread, instance, node_name)

    async def _stop(self, key: PipelineKey) -> None:
        await self._stop_locked(held(self._instances, key, Step.stop))

    async def _stop_locked(self, instance: _Instance) -> None:
        if instance.state is not InstanceState.Running:
            return
        timeout = self._settings.stop_timeout_s
        try:
            await _on_own_thread(
                f"juturna-stop-{instance.key}",
                functools.partial(self._manager.stop_pipeline, instance.pipeline_id),
                timeout,
            )
        except TimeoutError:
            blocked = self._live_node_threads(instance)
            self._abandon(instance)
            raise PipelineFailure(
                FailureReason.StopTimeout,
                Step.stop,
                f"stop did not finish within {timeout:g} s; blocked node threads: "
                f"{', '.join(blocked) or 'none'}. The instance was abandoned; its threads stay "
                "blocked in the operator process (the process engine can kill them instead)",
            ) from None
        except Exception as exc:
            raise classify(exc, Step.stop) from exc
        instance.state = InstanceState.Spent

    async def _halt_started(self, instance: _Instance) -> list[str] | None:
        """Stop the nodes a failed start left running, as Juturna's stop would (node by node,
        in configuration order), within the stop timeout. Returns ``None`` when done, else
        the node threads still blocked; the instance is then abandoned."""
        pipeline = self._pipeline(instance)
        if pipeline is None:
            return None
        try:
            await _on_own_thread(
                f"juturna-halt-{instance.key}",
                functools.partial(_stop_started_nodes, pipeline),
                self._settings.stop_timeout_s,
            )
        except TimeoutError:
            blocked = self._live_node_threads(instance)
            self._abandon(instance)
            return blocked
        except Exception as exc:
            log.warning(
                "stopping the nodes of a failed start: %s",
                describe_exception(exc),
                extra=instance.key.log_extra,
            )
        return None

    def _live_node_threads(self, instance: _Instance) -> list[str]:
        pipeline = self._pipeline(instance)
        names = []
        for node in (pipeline._nodes or {}).values() if pipeline else ():
            for thread in (node._worker_thread, node._update_thread, node._source_thread):
                if thread is not None and thread.is_alive():
                    names.append(thread.name)
        return names

    def _keeps_folder(self, instance: _Instance) -> bool:
        """Whether abandoning ``instance`` keeps its folder: the resource's other instance (a
        warm swap's) writes on in it."""
        key = instance.key
        return (key.candidate if key.slot is Slot.active else key.active) in self._instances

    def _folder_fate(self, instance: _Instance) -> str:
        """What abandoning ``instance`` does to its folder, in a user's words."""
        if self._keeps_folder(instance):
            return "its folder kept (the Pipeline's other instance writes in it)"
        return "its folder removed"

    def _abandon(self, instance: _Instance, call: _Call | None = None) -> str:
        """Forget an instance whose stop, warmup or start hangs: unregister it and remove its
        folder. A warmup or start still running for it disposes of the pipeline when it
        returns (or now, if it has just returned)."""
        call = call or instance.call
        fate, keep = self._folder_fate(instance), self._keeps_folder(instance)
        pipeline = self._manager._pipelines.pop(instance.pipeline_id, None)
        if self._instances.get(instance.key) is instance:  # not a newer one for the key
            del self._instances[instance.key]
        if pipeline is not None and pipeline.pipe_path and not keep:
            shutil.rmtree(pipeline.pipe_path, ignore_errors=True)
        if call is None:
            return fate
        with call.handoff:
            call.abandoned, call.keep_folder = True, keep
            finished = call.finished
        _settle_threadsafe(call.loop, call.done, _abandoned(call))
        if finished and call.pipeline is not None:
            threading.Thread(
                target=self._dispose,
                args=(call.pipeline, keep),
                name="juturna-dispose",
                daemon=True,
            ).start()
        return fate

    # -- a warm swap's primitive --

    async def _promote(self, key: PipelineKey) -> None:
        candidate = promotable(
            self._instances,
            key,
            lambda i: i.retired,
            lambda i: i.state.value,
            lambda i: f"pipeline {i.pipeline_id}",
        )
        if candidate is None:
            return  # promoted already
        candidate.key = key
        previous = swap_slots(self._instances, key)
        if previous is None:
            return
        previous.key, previous.retired = key.candidate, True
        log.info(
            "pipeline %s serves; pipeline %s retired",
            candidate.pipeline_id,
            previous.pipeline_id,
            extra=key.log_extra,
        )

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        """Delete within bounds: the operation in flight is waited for at most the stop
        timeout, then the instance is abandoned (``StopTimeout`` says so)."""
        bound = Bound(self._settings.stop_timeout_s, self._give_up, _ENDS_WITHIN_BOUND)
        await self.exclusive(key, self._delete, key, keep_output, bound=bound, final=True)

    def _give_up(self, key: PipelineKey, lock: KeyLock, limit: float) -> NoReturn:
        """A delete waited ``limit`` for the operation in flight (a hung warmup, a create
        queued behind a full pool): abandon the instance, and let go of the key."""
        holder = lock.holder
        lock.abandoned = True
        if self._locks.get(key) is lock:
            del self._locks[key]  # its waiters wait for the hung call: the key moves on
        instance = self._instances.get(key)
        call = instance.call if instance is not None else None
        fate = self._folder_fate(instance) if instance is not None else ""
        waited = f"delete waited {limit:g} s for the {holder or 'operation'} in flight"
        if call is not None:
            where = _Overran(call, _node_in_progress(call.thread)).where
            message = (
                f"delete waited {limit:g} s for the {call.step} in flight{where}. The instance "
                f"was abandoned and {fate}; the {call.step}'s thread stays in the "
                "operator process until it returns (the process engine can kill it instead)"
            )
        elif instance is not None:
            message = f"{waited}. The instance was abandoned and {fate}"
        else:  # a create queued behind a full pool: _create undoes it when it returns
            message = f"{waited}; nothing was registered yet, and what it makes is deleted"
        if instance is not None:
            self._abandon(instance, call)
        raise PipelineFailure(FailureReason.StopTimeout, Step.delete, message)

    async def _delete(self, key: PipelineKey, keep_output: bool = False) -> None:
        instance = self._instances.get(key)
        if instance is None:
            if not keep_output:  # a folder kept by an earlier delete (a redeploy)
                await asyncio.to_thread(self._wipe, key)
            return
        await self._stop_locked(instance)
        if key not in self._instances:  # abandoned by a stop timeout
            return
        try:
            await self._call(
                Step.delete, self._manager.delete_pipeline, instance.pipeline_id, not keep_output
            )
        except PipelineFailure as failure:
            if failure.reason is not FailureReason.InvalidPipelineId:
                self._abandon(instance)
                raise
        self._instances.pop(key, None)

    async def status(self, key: PipelineKey) -> InstanceInfo | None:
        instance = self._instances.get(key)
        return None if instance is None else self._info(instance)

    def _info(self, instance: _Instance) -> InstanceInfo:
        pipeline = self._pipeline(instance)
        nodes: dict[str, str] = {}
        crashes = list(instance.crashes)
        for name, node in (pipeline._nodes or {}).items() if pipeline else ():
            nodes[name] = node_status(node.status)
            if instance.state is InstanceState.Running:
                dead = [
                    t
                    for t in (node._worker_thread, node._update_thread)
                    if t is not None and not t.is_alive()
                ]
                if dead and not any(c.node == name for c in crashes):
                    crashes.append(NodeCrash(name, dead[0].name, "thread exited unexpectedly"))
        for crash in crashes:
            nodes[crash.node] = "Failed"
        return InstanceInfo(
            key=instance.key,
            pipeline_id=instance.pipeline_id,
            revision=instance.revision,
            state=instance.state,
            nodes=nodes,
            crashes=crashes,
        )

    async def sweep(self, keep: dict[str, str | None]) -> list[str]:
        """Remove folders whose resource is gone: kept output of a resource deleted while no
        operator ran (its instances all belong to reconciled resources: deletion removes
        them). Returns the folders removed."""
        held = {key.juturna_name for key in self._instances} | {
            key.juturna_name for key in self._locks
        }
        removed = []
        for folder in self._settings.workdir.glob("*__*__*_*-*-*-*-*"):
            name = folder.name.rsplit("_", 1)[0]  # "_<pipeline id>"
            if folder.is_dir() and name not in keep and name not in held:
                log.info(
                    "sweep: removing %s, whose resource is gone",
                    folder,
                    extra=log_extra_of_juturna_name(name),
                )
                await asyncio.to_thread(shutil.rmtree, folder, True)
                removed.append(folder.name)
        return removed

    async def close(self) -> None:
        for key in list(self._instances):
            try:
                await self.delete(key, keep_output=True)  # the resource outlives the operator
            except PipelineFailure as failure:
                log.warning("while shutting down: %s", failure, extra=key.log_extra)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._owners.uninstall()
        self._collector.uninstall()


def _started_nodes(pipeline: Any) -> list[Any]:
    return [
        node
        for node in (pipeline._nodes or {}).values()
        if any((node._worker_thread, node._update_thread, node._source_thread))
    ]


def _stop_started_nodes(pipeline: Any) -> None:
    """Stop the nodes that have threads, as Juturna's stop would (node by node, in
    configuration order): for a pipeline whose start raised half-way, which Juturna's own
    stop and delete leave running (it never reached "running")."""
    for node in _started_nodes(pipeline):
        node.stop()
    if pipeline._telemetry_manager is not None:
        pipeline._telemetry_manager.stop()  # Pipeline.start starts it first; a no-op if not


def _node_in_progress(thread: threading.Thread | None) -> str | None:
    """The node a running Juturna call is in: its loops keep the name in ``node_name``
    (as ``reasons.failing_node`` reads it from a traceback)."""
    frame = sys._current_frames().get(thread.ident) if thread and thread.ident else None
    while frame is not None:
        value = frame.f_locals.get("node_name")
        if frame.f_code.co_filename.startswith(JUTURNA_DIR) and isinstance(value, str):
            return value
        frame = frame.f_back
    return None


def _abandoned(call: _Call) -> PipelineFailure:
    return PipelineFailure(
        CALL_REASONS.get(call.step, FailureReason.DeleteFailed),
        call.step,
        f"the instance was deleted while its {call.step} ran",
    )


async def _on_own_thread(name: str, fn: Callable[[], object], limit_s: float) -> None:
    """Run ``fn`` on a daemon thread of its own, not the pool, and wait at most ``limit_s``
    (``TimeoutError``): a call that hangs forever (Pitfall 2) must not use up a pool worker
    for good. What ``fn`` raises is raised here."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            _settle_threadsafe(loop, done, exc)
        else:
            _settle_threadsafe(loop, done, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    await asyncio.wait_for(asyncio.shield(done), limit_s)


def _settle_threadsafe(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], exc: BaseException | None
) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(_settle, future, exc)


def _classified(exc: Exception, step: Step) -> PipelineFailure:
    """What a Juturna call raised, classified, naming the node where Juturna's error does."""
    failure = classify(exc, step)
    node = failing_node(exc)
    if node is not None and failure.reason.retryable:
        failure.message = f'node "{node}": {failure.message}'
    return failure


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
