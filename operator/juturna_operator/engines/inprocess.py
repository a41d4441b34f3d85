"""The in-process engine: Juturna's ``PipelineManager`` inside the operator's own process.

Dense and fast (create + warmup + start of a light pipeline takes about 2 ms), but every
pipeline shares this process. It handles the Juturna 2.1.1 pitfalls that apply here:

1. A crashing node is invisible: a ``threading.excepthook`` maps each dead node thread to
   its pipeline (thread names are not unique across pipelines), and ``status`` also checks
   that every node thread of a running pipeline is alive.
2. Stop can hang forever: it runs on a thread of its own and is abandoned after the stop
   timeout (``StopTimeout``); the stuck threads stay in this process until it restarts.
   The process engine is the real cure.
3. Start after stop is a no-op: a stopped instance is reported as ``Spent``.
5. The singleton breaks while empty: one reference is held for the engine's life.
6. The base folder is set once per process: a second, different workdir is refused.
7. Names are not sanitised: ``PipelineKey.juturna_name`` is safe by construction.
8. No locking: every call for one instance runs under that instance's lock.
"""

from __future__ import annotations

import asyncio
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
from typing import Any, TypeVar

from juturna.cli.commands.models.api import PipelineConfig
from juturna.components import _pipeline as _pipeline_module
from juturna.components import _pipeline_manager as _pipeline_manager_module
from juturna.components._pipeline_manager import PipelineManager

from juturna_operator.engines.base import (
    DEFAULT_PLAN,
    Exclusive,
    InstanceInfo,
    InstanceState,
    NodeCrash,
    PipelineKey,
    Plan,
    confined,
    held,
    log_extra_of_juturna_name,
    node_status,
    vacant,
)
from juturna_operator.reasons import (
    FailureReason,
    PipelineFailure,
    Step,
    classify,
    failing_node,
)
from juturna_operator.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
JUTURNA_MODULES_THAT_COLLECT = (_pipeline_module, _pipeline_manager_module)


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
            module.gc = self  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        for module in JUTURNA_MODULES_THAT_COLLECT:
            module.gc = gc  # type: ignore[attr-defined]
        self._closed.set()


@dataclass
class _Instance:
    key: PipelineKey
    pipeline_id: str
    revision: str
    state: InstanceState = InstanceState.Created
    crashes: list[NodeCrash] = field(default_factory=list)


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
        instance.crashes.append(NodeCrash(node=node, thread=args.thread.name, error=error))
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


class InProcessEngine(Exclusive):
    """Runs every pipeline in this process through one ``PipelineManager``."""

    name = "inprocess"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings
        workdir = settings.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        PipelineManager.set_base_folder(str(workdir))
        if Path(PipelineManager._base_folder or "") != workdir:
            raise RuntimeError(
                f"Juturna's base folder is already {PipelineManager._base_folder} in this "
                f"process and cannot change to {workdir} (Juturna sets it once per process)"
            )
        self._manager = PipelineManager()  # the one reference (Pitfall 5)
        self._remove_stale_folders(workdir)
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

    def _remove_stale_folders(self, workdir: Path) -> None:
        """In-process instances die with their process: folders left by a killed operator
        (``<ns>__<name>__<uid8>_<pipeline id>``) belong to nothing now."""
        for folder in workdir.glob("*__*__*_*-*-*-*-*"):
            if folder.is_dir() and not self._manager._pipelines:
                log.info(
                    "removing a pipeline folder left by a previous process: %s",
                    folder,
                    extra=log_extra_of_juturna_name(folder.name.rsplit("_", 1)[0]),  # "_<id>"
                )
                shutil.rmtree(folder, ignore_errors=True)

    async def _call(self, step: Step, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking Juturna call on the pool; classify what it raises."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except Exception as exc:
            failure = classify(exc, step)
            node = failing_node(exc)
            if node is not None and failure.reason.retryable:
                failure.message = f'node "{node}": {failure.message}'
            raise failure from exc

    def _pipeline(self, instance: _Instance) -> Any:
        return self._manager._pipelines.get(instance.pipeline_id)

    # -- the Engine interface --

    async def create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan = DEFAULT_PLAN
    ) -> str:
        return await self.exclusive(key, self._create, key, confined(key, config), revision)

    async def _create(self, key: PipelineKey, config: dict[str, Any], revision: str) -> str:
        vacant(self._instances, key)
        created = await self._call(
            Step.create, self._manager.create_pipeline, PipelineConfig(**config)
        )
        self._instances[key] = _Instance(key, created.pipeline_id, revision)
        return str(created.pipeline_id)

    async def warmup(self, key: PipelineKey) -> None:
        await self.exclusive(key, self._warmup, key)

    async def _warmup(self, key: PipelineKey) -> None:
        instance = held(self._instances, key, Step.warmup)
        await self._call(Step.warmup, self._manager.warmup_pipeline, instance.pipeline_id)
        instance.state = InstanceState.Ready

    async def start(self, key: PipelineKey) -> None:
        await self.exclusive(key, self._start, key)

    async def _start(self, key: PipelineKey) -> None:
        instance = held(self._instances, key, Step.start)
        starting = (instance, list(self._pipeline(instance)._nodes or {}))
        self._owners.starting.append(starting)
        try:
            await self._call(Step.start, self._manager.start_pipeline, instance.pipeline_id)
        finally:
            self._owners.starting.remove(starting)
        instance.state = InstanceState.Running
        for node_name, node in (self._pipeline(instance)._nodes or {}).items():
            for thread in (node._worker_thread, node._update_thread, node._source_thread):
                self._owners.register(thread, instance, node_name)

    async def stop(self, key: PipelineKey) -> None:
        await self.exclusive(key, lambda: self._stop_locked(held(self._instances, key, Step.stop)))

    async def _stop_locked(self, instance: _Instance) -> None:
        if instance.state is not InstanceState.Running:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def run() -> None:
            try:
                self._manager.stop_pipeline(instance.pipeline_id)
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, done, exc)
            else:
                loop.call_soon_threadsafe(_settle, done, None)

        # A thread of its own, not the pool: a stop that hangs forever (Pitfall 2) must
        # not use up a pool worker for good.
        threading.Thread(target=run, name=f"juturna-stop-{instance.key}", daemon=True).start()
        timeout = self._settings.stop_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
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

    def _live_node_threads(self, instance: _Instance) -> list[str]:
        pipeline = self._pipeline(instance)
        names = []
        for node in (pipeline._nodes or {}).values() if pipeline else ():
            for thread in (node._worker_thread, node._update_thread, node._source_thread):
                if thread is not None and thread.is_alive():
                    names.append(thread.name)
        return names

    def _abandon(self, instance: _Instance) -> None:
        """Forget an instance whose stop hangs: unregister it and remove its folder."""
        pipeline = self._manager._pipelines.pop(instance.pipeline_id, None)
        self._instances.pop(instance.key, None)
        if pipeline is not None and pipeline.pipe_path:
            shutil.rmtree(pipeline.pipe_path, ignore_errors=True)

    async def delete(self, key: PipelineKey, release: bool = True) -> None:
        await self.exclusive(key, self._delete, key)
        self.drop_lock(key)

    async def _delete(self, key: PipelineKey) -> None:
        instance = self._instances.get(key)
        if instance is None:
            return
        await self._stop_locked(instance)
        if key not in self._instances:  # abandoned by a stop timeout
            return
        try:
            await self._call(Step.delete, self._manager.delete_pipeline, instance.pipeline_id, True)
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
            folder=str(pipeline.pipe_path) if pipeline else "",
            nodes=nodes,
            crashes=crashes,
        )

    async def list(self) -> list[InstanceInfo]:
        return [self._info(i) for i in list(self._instances.values())]

    async def sweep(self, keep: dict[str, str | None]) -> list[str]:
        """Local instances all belong to reconciled resources; a deletion removes them."""
        return []

    async def close(self) -> None:
        for key in list(self._instances):
            try:
                await self.delete(key)
            except PipelineFailure as failure:
                log.warning("while shutting down: %s", failure, extra=key.log_extra)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._owners.uninstall()
        self._collector.uninstall()


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
