"""Engines: implementations of the PipelineManager port (``base.Engine``).

``make_engine`` returns a ``Router``: each pipeline goes to the default engine
(``JUTURNA_OPERATOR_ENGINE``), or to the service engine when ``spec.runtime`` names one of
the administrator's runtimes.
"""

from __future__ import annotations

import importlib
from typing import Any

from juturna_operator.domain import PipelineKey, Slot
from juturna_operator.engines.base import DEFAULT_PLAN, Engine, InstanceInfo, Plan
from juturna_operator.reasons import Step
from juturna_operator.registry import ENGINES
from juturna_operator.settings import Settings


def _default_engine(settings: Settings, api_client: Any) -> Engine:
    entry = ENGINES.get(settings.engine)
    if entry is None:
        raise ValueError(
            f"unknown engine {settings.engine!r}: JUTURNA_OPERATOR_ENGINE must be one of "
            f"{', '.join(ENGINES)}"
        )
    engine_class = getattr(importlib.import_module(entry.module), entry.cls)
    engine: Engine = (
        engine_class(settings, api_client) if entry.needs_api_client else engine_class(settings)
    )
    return engine


def engine_name(engine: Engine) -> str:
    """The name an administrator gives this engine's kind (``registry.ENGINES``)."""
    where = (type(engine).__module__, type(engine).__name__)
    return next((name for name, e in ENGINES.items() if (e.module, e.cls) == where), where[1])


class Router:
    """One ``Engine`` made of the default engine and, with runtimes configured, the service
    engine; it remembers which one holds each instance."""

    def __init__(self, default: Engine, service: Engine | None) -> None:
        self._default, self._service = default, service
        self._owner: dict[PipelineKey, Engine] = {}
        self._names = {id(e): engine_name(e) for e in (default, service) if e is not None}

    def _for(self, key: PipelineKey) -> Engine:
        return self._owner.get(key, self._default)

    async def create(
        self, key: PipelineKey, config: dict[str, Any], revision: str, plan: Plan = DEFAULT_PLAN
    ) -> str:
        engine = self._service if plan.runtime and self._service else self._default
        pipeline_id = await engine.create(key, config, revision, plan)
        self._owner[key] = engine
        return pipeline_id

    async def warmup(self, key: PipelineKey) -> None:
        await self._for(key).warmup(key)

    async def start(self, key: PipelineKey) -> None:
        await self._for(key).start(key)

    async def stop(self, key: PipelineKey) -> None:
        await self._for(key).stop(key)

    async def delete(
        self, key: PipelineKey, release: bool = True, keep_output: bool = False
    ) -> None:
        owner = self._owner.get(key)
        if owner is not None:
            await owner.delete(key, release, keep_output)
        else:  # a create may still be in flight on either: each waits for its own
            for engine in filter(None, (self._default, self._service)):
                await engine.delete(key, release, keep_output)
        self._owner.pop(key, None)

    @property
    def two_slots(self) -> bool:
        # The default engine's: it may hold a candidate an earlier operator process left;
        # the service engine never does.
        return self._default.two_slots

    def warm_swap(self, plan: Plan) -> str | None:
        engine = self._service if plan.runtime and self._service else self._default
        why_not = engine.warm_swap(plan)
        return None if why_not is None else f"engine {engine_name(engine)} {why_not}"

    async def promote(self, key: PipelineKey) -> None:
        await self._for(key.candidate).promote(key)
        active, candidate = self._owner.pop(key, None), self._owner.pop(key.candidate, None)
        if candidate is not None:
            self._owner[key] = candidate
        if active is not None:
            self._owner[key.candidate] = active

    def observe(self, event: str, body: dict[str, Any]) -> str | None:
        """A watch event for a pod of the pod engine (handlers.pod_event); returns the uid
        of the Pipeline the pod belongs to."""
        observe = getattr(self._default, "observe", None)
        return observe(event, body) if observe is not None else None

    async def status(self, key: PipelineKey) -> InstanceInfo | None:
        if key.slot is Slot.candidate and key not in self._owner and not self.two_slots:
            return None  # no engine here makes candidates: nothing to ask
        engine = self._for(key)
        info = await engine.status(key)
        if info is None:
            self._owner.pop(key, None)
        else:  # an instance this process did not create (adopted after a restart) counts too
            self._owner.setdefault(key, engine)
        return info

    def instances(self) -> dict[str, int]:
        """How many instances each engine holds, by engine name (0 for an engine with none).
        Safe from another thread (the metrics server's): it reads a snapshot."""
        counts = dict.fromkeys(self._names.values(), 0)
        for engine in list(self._owner.values()):
            name = self._names[id(engine)]
            counts[name] += 1
        return counts

    def health_asks(self) -> int:
        """How many health requests the engines sent their workers' pods so far (the pod
        engine's; 0 where an engine keeps no count)."""
        return sum(
            getattr(engine, "health_asks", 0) for engine in (self._default, self._service) if engine
        )

    def step_under_way(self, key: PipelineKey) -> Step | None:
        # A create in flight has no owner yet: either engine may hold it.
        engines = (self._owner[key],) if key in self._owner else (self._default, self._service)
        return next(
            (step for e in engines if e is not None and (step := e.step_under_way(key))), None
        )

    def pod_under_way(self, key: PipelineKey) -> str | None:
        return self._for(key).pod_under_way(key)

    async def sweep(self, keep: dict[str, str | None]) -> list[str]:
        removed = await self._default.sweep(keep)
        if self._service is not None:
            removed += await self._service.sweep(keep)
        return removed

    async def close(self) -> None:
        await self._default.close()
        if self._service is not None:
            await self._service.close()


def make_engine(settings: Settings, api_client: Any = None) -> Router:
    """The default engine named by ``settings.engine``, plus the service engine if needed.
    ``api_client`` (a ``kubernetes.client.ApiClient``) is for the pod engine."""
    service = None
    if settings.runtimes:
        from juturna_operator.engines.service import ServiceEngine

        service = ServiceEngine(settings)
    if settings.engine == "service":
        assert service is not None  # Settings.check() requires a default runtime
        return Router(service, service)
    return Router(_default_engine(settings, api_client), service)
