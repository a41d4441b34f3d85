"""The kopf layer: thin handlers that hand each Pipeline to the reconciler.

* ``on.event``: every watch event wakes the resource's daemon; it stores nothing, so
  kopf writes no diff-base or progress for it (no GitOps drift).
* ``daemon``: one per Pipeline, level-triggered: reconcile, then sleep until woken, the
  health interval, or a backoff deadline.
* ``on.delete``: the finalizer ``juturna.io/cleanup``: a bounded stop and delete.

kopf's own state goes to ``status.kopf`` (never ``kopf.zalando.org/*`` annotations), and
kopf keeps no diff-base at all (``NoDiffBase``).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from juturna_operator import api
from juturna_operator.domain import PipelineKey
from juturna_operator.engines import Router, make_engine
from juturna_operator.metrics import Metrics
from juturna_operator.patching import StatusPatcher
from juturna_operator.reconciler import Reconciler, Resource
from juturna_operator.settings import Settings

FINALIZER = f"{api.GROUP}/cleanup"
RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)

log = logging.getLogger(__name__)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps the last handled spec to tell creations from updates for ``on.create`` and
    ``on.update`` handlers. This operator has none: the daemon reconciles level-triggered and
    ``on.delete`` needs only the finalizer. Storing it would cost one more status write per
    Pipeline; without it, kopf sees every event as a creation that no handler wants."""

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


# Blocking calls (the Kubernetes client of the pod engine and of the orphan sweep, file
# work of the engines) run in the default executor; its default size, cores + 4, queued
# them behind each other when many Pipelines change at once.
BLOCKING_CALL_THREADS = 32
# Status writes: one bounded pool of connections on the event loop (patching.py).
STATUS_WRITE_CONNECTIONS = 32


def _api_client() -> k8s.ApiClient:
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = k8s.Configuration.get_default_copy()
    # One pooled connection per thread: the client's default pool (10) made urllib3
    # discard and reopen connections under a burst.
    configuration.connection_pool_maxsize = BLOCKING_CALL_THREADS
    return k8s.ApiClient(configuration)


class Operator:
    """What the handlers share, built once at startup and handed to each through kopf's
    ``memo`` (``memo.operator``): no module-wide state, so one process can hold two."""

    def __init__(
        self,
        settings: Settings,
        objects: k8s.CustomObjectsApi,
        engine: Router,
        metrics: Metrics | None,
    ) -> None:
        self.settings, self.objects, self.engine = settings, objects, engine
        self.reconciler = Reconciler(
            engine, settings, self.write_status, self.post_event, metrics=metrics
        )
        self.sweeper: asyncio.Task[None] | None = None
        self.wakeups: dict[str, asyncio.Event] = {}  # uid -> wakes its daemon
        self.bodies: dict[str, Any] = {}  # uid -> latest body, for Events
        self.patcher = StatusPatcher(objects.api_client.configuration, STATUS_WRITE_CONNECTIONS)

    async def write_status(self, key: PipelineKey, status: dict[str, Any]) -> None:
        """One merge patch of the status subresource (never the spec), on the event loop."""
        await self.patcher.patch(key, status)

    def post_event(self, key: PipelineKey, kind: str, reason: str, message: str) -> None:
        body = self.bodies.get(key.uid)
        if body is not None:
            kopf.event(body, type=kind, reason=reason, message=message[:1024])

    def references(self) -> dict[str, str | None]:
        """Juturna name -> referenced pipeline id, for every Pipeline this operator watches."""
        objects: Any = self.objects  # the client's hints say object; it returns parsed JSON
        if self.settings.namespaces:
            items = [
                item
                for ns in self.settings.namespaces
                for item in objects.list_namespaced_custom_object(
                    api.GROUP, api.VERSION, ns, api.PLURAL
                )["items"]
            ]
        else:
            items = objects.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL)["items"]
        return {
            PipelineKey(
                i["metadata"]["namespace"], i["metadata"]["name"], i["metadata"]["uid"]
            ).juturna_name: (i.get("status") or {}).get("pipelineId")
            for i in items
        }

    async def sweep_orphans(self) -> None:
        """Now and then, remove engine instances that no Pipeline references any more."""
        interval = self.settings.sweep_interval_s
        await asyncio.sleep(min(10.0, interval))
        while True:
            try:
                keep = await asyncio.to_thread(self.references)
                removed = await self.engine.sweep(keep)
                if removed:
                    log.warning("removed %d orphaned pipeline(s): %s", len(removed), removed)
            except Exception:  # the sweep must never take the operator down
                log.exception("orphan sweep failed; trying again later")
            await asyncio.sleep(interval)


def memo_for(settings: Settings) -> kopf.Memo:
    """The memo the CLI gives ``kopf.operator``: the settings, until startup adds the rest."""
    return kopf.Memo(settings=settings)


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING  # our own Events are explicit
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 15
    settings.peering.standalone = True
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=BLOCKING_CALL_THREADS, thread_name_prefix="k8s-call")
    )
    ours: Settings = memo.get("settings") or Settings.from_env()
    # Watching named namespaces needs no cluster-wide right: kopf would otherwise list
    # namespaces (to match patterns; ours are exact names) and watch CRDs, and without the
    # rights retry for ~45 s before falling back. The CRD must then exist at startup.
    settings.scanning.disabled = bool(ours.namespaces)
    api_client = _api_client()
    metrics = None
    if ours.metrics_port:
        metrics = Metrics()
        metrics.serve(ours.metrics_port)
    operator = Operator(
        ours, k8s.CustomObjectsApi(api_client), make_engine(ours, api_client), metrics
    )
    operator.sweeper = asyncio.create_task(operator.sweep_orphans())
    memo.operator = operator
    logger.info(
        "juturna-operator ready: engine=%s workdir=%s plugin roots=%s",
        ours.engine,
        ours.workdir,
        [str(r) for r in ours.plugin_roots] or "none",
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    operator: Operator | None = memo.get("operator")
    if operator is None:
        return
    if operator.sweeper is not None:
        operator.sweeper.cancel()
    await operator.engine.close()
    await operator.patcher.close()
    logger.info("engine closed")


@kopf.on.event(*RESOURCE)
async def wake(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo.operator
    uid = body.get("metadata", {}).get("uid")
    if not uid:
        return
    if type == "DELETED":
        operator.bodies.pop(uid, None)
        return
    operator.bodies[uid] = body
    event = operator.wakeups.get(uid)
    if event is not None:
        event.set()


async def pod_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A change of one of our pods (engine pod): the engine sees it, and its Pipeline wakes
    at once, without waiting for its next health check. Registered by the CLI for that
    engine only (it needs the right to watch pods)."""
    operator: Operator = memo.operator
    uid = operator.engine.observe(type or "", dict(body))
    wakeup = operator.wakeups.get(uid or "")
    if wakeup is not None:
        wakeup.set()


# backoff: a pass that fails unexpectedly (e.g. an API error on a status write) is tried
# again in 2 s, not kopf's default 60 s.
@kopf.daemon(*RESOURCE, cancellation_timeout=5.0, backoff=2.0)
async def run_pipeline(
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Keep one Pipeline at its desired state for as long as it exists."""
    operator: Operator = memo.operator
    uid = body["metadata"]["uid"]
    operator.bodies[uid] = body
    wakeup = operator.wakeups.setdefault(uid, asyncio.Event())
    try:
        while not stopped:
            wakeup.clear()
            delay = await operator.reconciler.reconcile(Resource.from_body(body), logger)
            waiters = [asyncio.ensure_future(wakeup.wait()), asyncio.ensure_future(stopped.wait())]
            try:
                await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
    finally:
        operator.wakeups.pop(uid, None)


@kopf.on.delete(*RESOURCE)
async def delete_pipeline(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Stop and delete the instance; the finalizer goes when this returns."""
    operator: Operator = memo.operator
    operator.bodies[body["metadata"]["uid"]] = body
    await operator.reconciler.finalize(Resource.from_body(body, deleting=True), logger)
    operator.bodies.pop(body["metadata"]["uid"], None)
