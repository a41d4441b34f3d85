"""The kopf layer: thin handlers that hand each Pipeline to the reconciler.

* ``on.event``: every watch event (and kopf's listing of every Pipeline at startup: how a
  restarted operator adopts them) puts the Pipeline's uid on one reconcile queue
  (``workqueue.WorkQueue``); it stores nothing, so kopf writes no diff-base or progress
  for it (no GitOps drift).
* The queue's workers, a bounded set shared by every Pipeline, reconcile level-triggered;
  each pass says when it wants its next look (a backoff deadline, or a resync), kept in the
  queue's one timer heap.
* One health loop asks the engine about every instance each health interval and queues
  only the Pipelines whose instance changed (``Reconciler.changed_instances``).
* The finalizer ``juturna.io/cleanup`` is the operator's own, written by its own patcher
  (``patching.FinalizerPatcher``), not kopf's: a Pipeline's first pass adds it before
  anything deploys (one PATCH per Pipeline; a status write cannot carry it, the status
  subresource writes no metadata). A watch event with a ``deletionTimestamp`` starts the
  deletion: a bounded stop and delete (``Reconciler.finalize``, one pass at a time per
  Pipeline, as every pass), then one PATCH that removes the finalizer. A Pipeline gone
  without it (removed by hand, or deleted before the first pass added it) is finalized on
  its ``DELETED`` event.

kopf is the watch, the startup listing and the liveness endpoint, and writes nothing: with
no ``on.create``/``on.update``/``on.delete`` handler it keeps no progress and asks for no
finalizer (``KOPF_FINALIZER``). kopf keeps no diff-base at all (``NoDiffBase``) and never
``kopf.zalando.org/*`` annotations. Events come from ``juturna-operator``, and
kopf's per-event success lines are DEBUG (``SuccessesAtDebug``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from juturna_operator import api, crd
from juturna_operator.domain import PipelineKey
from juturna_operator.engines import Router, make_engine
from juturna_operator.metrics import Metrics
from juturna_operator.patching import (
    FinalizerPatcher,
    FinalizerWriteRefused,
    StatusPatcher,
    holds_finalizer,
)
from juturna_operator.reconciler import Reconciler, Resource
from juturna_operator.settings import Settings
from juturna_operator.workqueue import WorkQueue

# kopf's finalizer name, which it never writes here (no handler needs one). It must not be
# ours: kopf removes its own name from any object it finds it on while no handler needs it,
# and at every event of an object being deleted.
KOPF_FINALIZER = f"{api.GROUP}/kopf-unused"
RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)
# Who the Events say they come from (kubectl describe's "From"), and their names' prefix.
COMPONENT = "juturna-operator"
# kopf's logger of the Events it posts: a failed post is a warning there (metrics.EventFailures).
KOPF_POSTING_LOGGER = "kopf._core.engines.posting"

log = logging.getLogger(__name__)


class SuccessesAtDebug(logging.Filter):
    """kopf logs ``Handler 'x' succeeded.`` (and ``... is processed: n succeeded; 0 failed.``)
    at INFO for every watch event it handles: every change of every Pipeline, and with the
    pod engine of every labelled pod in the cluster, other tenants' included. Those lines
    become DEBUG (shown with ``-v``), so the INFO log holds transitions and problems."""

    SUCCESS = re.compile(r"Handler '[^']*' succeeded\.|\w+ is processed: \d+ succeeded; 0 failed\.")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self.SUCCESS.fullmatch(record.getMessage()):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        # The logger let it through as INFO; as DEBUG it is shown only where DEBUG is.
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps the last handled spec to tell creations from updates for ``on.create`` and
    ``on.update`` handlers. This operator has none: the queue reconciles level-triggered and
    the operator keeps its own finalizer. Storing it would cost one more status write per
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
# A pass that failed unexpectedly (e.g. an API error on a status write) is tried again soon.
RETRY_AFTER_ERROR_S = 2.0
# How long a pass in flight may go on once its Pipeline is deleted, or the operator stops,
# before it is cancelled (engine operations are shielded: they finish on their own).
PASS_GRACE_S = 5.0
# A finalizer removal that failed for want of an answer (a 5xx, a dropped connection) is
# made again after this, doubled each time up to the cap.
RELEASE_RETRY_S = 1.0
RELEASE_RETRY_MAX_S = 30.0


# How long a starting operator waits for the API server to serve the CRD: a Helm install or
# an Argo CD sync applies it moments before the operator's pod starts.
CRD_WAIT_S = 30.0
CRD_READ_TIMEOUT_S = 10.0
# How long a start waits for an API server that does not answer before it goes on unchecked.
UNREACHABLE_WAIT_S = 5.0


class CrdNotUsable(Exception):
    """The CRD is missing or older than this operator; the message says what to apply."""


def check_crd(client: k8s.ApiClient, wait_s: float = CRD_WAIT_S) -> None:
    """Refuse to start against a CRD that does not know what this operator writes (its
    status fields and values): an older CRD would refuse the new phase, or prune a field,
    on every status write. Read from the API server's OpenAPI document of the group, which
    every authenticated client may read (no RBAC on CRDs needed, namespaced mode included)."""
    began = time.monotonic()
    while True:
        status, data = crd.api_get(client, crd.OPENAPI_PATH, CRD_READ_TIMEOUT_S)
        answered = status in (200, 404)
        deadline = began + (wait_s if answered else min(wait_s, UNREACHABLE_WAIT_S))
        installed = crd.published_status(_json(data)) if status == 200 else None
        if installed is not None:
            break
        if status == 403:
            log.warning("cannot read %s (403): the CRD is not checked", crd.OPENAPI_PATH)
            return
        if status in (200, 404):  # a CRD just created is served a moment later
            if time.monotonic() > deadline:
                raise CrdNotUsable(
                    f"the CRD {crd.CRD_NAME} is not installed; apply it: {crd.APPLY_COMMAND}"
                )
        elif time.monotonic() > deadline:
            # No answer (or a 5xx): an outage, not a configuration error. The operator
            # starts, and its watches retry until the API server answers, as they do for an
            # outage later on; the CRD is then not checked.
            said = " ".join(data.decode(errors="replace")[:300].split())
            log.warning(
                "cannot read the CRD's schema (%s): %s; starting without checking it",
                crd.OPENAPI_PATH,
                f"{status} {said}" if status else said,
            )
            return
        time.sleep(1.0)
    gaps = crd.status_unknown_to(installed)
    if gaps:
        shown = "; ".join(gaps[:3]) + (f"; and {len(gaps) - 3} more" if len(gaps) > 3 else "")
        raise CrdNotUsable(
            f"the installed CRD {crd.CRD_NAME} is older than this operator ({shown}); apply "
            f"this version's CRD first: {crd.APPLY_COMMAND}"
        )


def _json(data: bytes) -> dict[str, Any]:
    """A JSON object, or {} for anything else (an answer cut short)."""
    try:
        found = json.loads(data)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


class NoCluster(Exception):
    """No cluster configuration to run against; the message says what is missing."""


def load_cluster_configuration() -> None:
    """Load the client's configuration: the pod's ServiceAccount in a cluster, else the
    kubeconfig's current context. Raises ``NoCluster``, in one line, where neither loads.

    Only files and the environment are read: an API server that does not answer is an
    outage, which the watches retry, at start as later."""
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
        return
    except k8s_config.ConfigException as err:
        in_pod = str(err) if os.environ.get("KUBERNETES_SERVICE_HOST") else None
    location: str = k8s_config.KUBE_CONFIG_DEFAULT_LOCATION  # $KUBECONFIG or ~/.kube/config
    where = f"{location} (KUBECONFIG)" if os.environ.get("KUBECONFIG") else location
    if not any(Path(f).expanduser().exists() for f in location.split(os.pathsep) if f):
        pod = (
            f"in a pod, but its ServiceAccount does not load ({in_pod})"
            if in_pod
            else "not in a pod (KUBERNETES_SERVICE_HOST is not set)"
        )
        raise NoCluster(
            f"no cluster configuration: {pod}, and no kubeconfig at {where}; set KUBECONFIG "
            "to a kubeconfig file, or run the operator in a pod"
        )
    try:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    except Exception as err:  # whatever the client trips on (YAML, a missing key): the file's
        raise NoCluster(
            f"cannot use the kubeconfig {where}: {' '.join(str(err).split())}"
        ) from None


def api_client() -> k8s.ApiClient:
    """A Kubernetes API client: in-cluster configuration, else the kubeconfig
    (``load_cluster_configuration``)."""
    load_cluster_configuration()
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
        kopf_settings: kopf.OperatorSettings | None = None,
    ) -> None:
        self.settings, self.objects, self.engine = settings, objects, engine
        self.metrics = metrics
        self.kopf_settings = kopf_settings or kopf.OperatorSettings()
        self.reconciler = Reconciler(
            engine, settings, self.write_status, self.post_event, metrics=metrics
        )
        self.sweeper: asyncio.Task[None] | None = None
        self.health_watch: asyncio.Task[None] | None = None
        self.bodies: dict[str, Any] = {}  # uid -> latest body, for passes and Events
        # uid -> kopf's logger for that Pipeline: its warnings are posted as Events too.
        self.loggers: dict[str, kopf.ObjectLogger] = {}
        self.queue: WorkQueue[str] = WorkQueue(
            self.reconcile,
            settings.reconcile_workers,
            retry_after_error_s=RETRY_AFTER_ERROR_S,
            observer=metrics.queue if metrics is not None else None,
        )
        if metrics is not None:
            metrics.watch(self.queue, engine.instances, engine.health_asks)
        self.reconciler.released = self.queue.released
        self.patcher = StatusPatcher(objects.api_client.configuration, STATUS_WRITE_CONNECTIONS)
        self.finalizers = FinalizerPatcher(self.patcher.connection)  # the same pool
        # uid -> the resourceVersion of the body its finalizer was added from: until a newer
        # body comes, that one's missing finalizer is no reason to add it again.
        self.added: dict[str, str] = {}
        self.deletions: dict[str, asyncio.Task[None]] = {}  # uid -> its finalize, at most one

    def observe(self, body: kopf.Body, deleted: bool) -> None:
        """A watch event of a Pipeline: keep its latest body, and queue it; or, for one being
        deleted, start its finalize (once)."""
        meta = body.get("metadata", {})
        uid = meta.get("uid")
        if not uid:
            return
        if deleted:
            self.bodies.pop(uid, None)
            self.loggers.pop(uid, None)
            self.added.pop(uid, None)
            if not self.reconciler.finished(uid) and uid not in self.deletions:
                # Gone without its finalizer (removed by hand, or a delete that came before
                # it was added): its instance must not run on until the operator restarts.
                self._deletion(uid, self.finalize_vanished(body))
            return
        self.bodies[uid] = body
        if meta.get("deletionTimestamp"):
            # Ours to finalize: once, and again only to remove a finalizer still there.
            wanted = holds_finalizer(meta) or not self.reconciler.finished(uid)
            if wanted and uid not in self.deletions:
                self._deletion(uid, self.release(body))
            return
        if holds_finalizer(meta):
            self.added.pop(uid, None)
        self.start_queue()
        self.queue.add(uid)

    def _deletion(self, uid: str, work: Coroutine[Any, Any, None]) -> None:
        """Run a deletion's work as a task of its own (a queue worker is never held by it),
        created here, inside kopf's handler: it inherits kopf's context for Events."""
        task = asyncio.ensure_future(work)
        self.deletions[uid] = task

        def done(_: asyncio.Future[None]) -> None:
            if self.deletions.get(uid) is task:
                del self.deletions[uid]

        task.add_done_callback(done)

    def start_queue(self) -> None:
        """Start the queue's workers from inside a kopf handler, once: ``kopf.event`` (and
        the Events kopf's logger posts) find kopf's event queue in context variables that
        kopf sets for its handlers only, and a task inherits its creator's."""
        if not self.queue.started:
            self.queue.start()

    async def reconcile(self, uid: str) -> float | None:
        """One pass over a Pipeline (a queue worker's): seconds until its next look."""
        began = time.monotonic()
        delay, error = await self._reconcile(uid)
        if self.metrics is not None:
            self.metrics.reconciled(time.monotonic() - began, delay, error)
        return delay

    async def _reconcile(self, uid: str) -> tuple[float | None, bool]:
        """A pass: its next look, and whether it failed unexpectedly."""
        body = self.bodies.get(uid)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None, False  # gone, or its finalizer owns it now
        logger = self.loggers.get(uid)
        if logger is None:
            logger = self.loggers[uid] = kopf.ObjectLogger(body=body, settings=self.kopf_settings)
        try:
            if not await self.hold(uid, body):
                return None, False  # being deleted, or gone: its watch event says so
            return await self.reconciler.reconcile(Resource.from_body(body), logger), False
        except Exception:
            logger.exception("reconcile failed; trying again in %g s", RETRY_AFTER_ERROR_S)
            return RETRY_AFTER_ERROR_S, True

    async def hold(self, uid: str, body: kopf.Body) -> bool:
        """The finalizer, before anything deploys: one PATCH in a Pipeline's life (none where
        it is there already). False when the Pipeline is being deleted or gone."""
        meta = body["metadata"]
        if holds_finalizer(meta) or self.added.get(uid) == meta.get("resourceVersion"):
            return True
        key = PipelineKey(meta["namespace"], meta["name"], uid)
        try:
            held = await self.finalizers.add(key, meta)
        except Exception:
            if self.metrics is not None:
                self.metrics.write_failed("finalizer")
            raise
        if held:
            self.added[uid] = meta["resourceVersion"]
        return held

    async def release(self, body: kopf.Body) -> None:
        """A Pipeline being deleted: finalize it (unless done), then remove the finalizer.
        A removal the API server does not answer is made again, with a bounded backoff; one
        it refuses is logged (the next watch event of the Pipeline tries again)."""
        meta = body["metadata"]
        uid = meta["uid"]
        logger = self.loggers.get(uid) or kopf.ObjectLogger(body=body, settings=self.kopf_settings)
        if not self.reconciler.finished(uid):
            if not holds_finalizer(meta):
                logger.warning("deleted without its finalizer: stopping and deleting its instance")
            await self.finalize(body, logger)
        key = PipelineKey(meta["namespace"], meta["name"], uid)
        pause = RELEASE_RETRY_S
        while holds_finalizer(meta):
            try:
                await self.finalizers.remove(key, meta)
                return
            except Exception as error:
                if self.metrics is not None:
                    self.metrics.write_failed("finalizer")
                if isinstance(error, FinalizerWriteRefused) and error.status < 500:
                    logger.error("%s; it stays until the next change of the Pipeline", error)
                    return
                logger.warning("finalizer not removed (%s); trying again in %g s", error, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RELEASE_RETRY_MAX_S)

    async def finalize(self, body: kopf.Body, logger: kopf.Logger) -> None:
        """Deletion: the reconciler stops any pass at its next step and finalizes; a pass
        stuck in one step past the grace is cancelled."""
        uid = body["metadata"]["uid"]
        self.bodies[uid] = body
        finalizing = asyncio.ensure_future(
            self.reconciler.finalize(Resource.from_body(body, deleting=True), logger)
        )
        try:
            done, _ = await asyncio.wait({finalizing}, timeout=PASS_GRACE_S)
            if not done:
                self.queue.cancel(uid)
            await finalizing
        except asyncio.CancelledError:
            finalizing.cancel()  # the operator stops: so does it
            raise
        self.bodies.pop(uid, None)
        self.loggers.pop(uid, None)

    async def finalize_vanished(self, body: kopf.Body) -> None:
        """What the finalizer would have done, for a Pipeline deleted without it: a bounded
        stop and delete of its instance."""
        logger = kopf.ObjectLogger(body=body, settings=self.kopf_settings)
        logger.warning("deleted without its finalizer: stopping and deleting its instance")
        try:
            await self.reconciler.finalize(Resource.from_body(body, deleting=True), logger)
        except Exception:  # never ends the operator; the orphan sweep is the last resort
            logger.exception("could not finalize a Pipeline deleted without its finalizer")

    async def write_status(self, key: PipelineKey, status: dict[str, Any]) -> None:
        """One merge patch of the status subresource (never the spec), on the event loop."""
        try:
            await self.patcher.patch(key, status)
        except Exception:
            if self.metrics is not None:
                self.metrics.write_failed("status")
            raise

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

    async def watch_health(self) -> None:
        """Each health interval, queue the Pipelines whose instance changed (the reconciler
        asks the engine about all of them at once); the others get no pass."""
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                for uid in await self.reconciler.changed_instances():
                    if uid in self.bodies:
                        self.queue.add(uid)
            except Exception:  # the loop must never end: it is how crashes are seen
                log.exception("health check round failed; trying again")

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
    settings.persistence.finalizer = KOPF_FINALIZER
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING  # our own Events are explicit
    settings.posting.reporting_component = COMPONENT
    settings.posting.reporting_instance = socket.gethostname()  # in a cluster: the pod's name
    settings.posting.event_name_prefix = f"{COMPONENT}-"
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
    client = api_client()
    metrics = None
    if ours.metrics_port:
        metrics = Metrics()
        logging.getLogger(KOPF_POSTING_LOGGER).addFilter(metrics.event_failures)
        metrics.serve(ours.metrics_port)
    operator = Operator(
        ours, k8s.CustomObjectsApi(client), make_engine(ours, client), metrics, settings
    )
    operator.sweeper = asyncio.create_task(operator.sweep_orphans())
    operator.health_watch = asyncio.create_task(operator.watch_health())
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
    if operator.metrics is not None:
        logging.getLogger(KOPF_POSTING_LOGGER).removeFilter(operator.metrics.event_failures)
    for task in (operator.sweeper, operator.health_watch, *operator.deletions.values()):
        if task is not None:
            task.cancel()
    # The watches have ended: nothing queues any more. Passes in flight finish or are cancelled.
    await operator.queue.stop(PASS_GRACE_S)
    await operator.engine.close()
    await operator.patcher.close()
    logger.info("engine closed")


@kopf.on.event(*RESOURCE)
async def enqueue(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Every watch event of a Pipeline queues it; kopf's listing at startup queues them all."""
    operator: Operator = memo.operator
    operator.observe(body, deleted=type == "DELETED")


async def pod_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A change of one of our pods (engine pod): the engine sees it, and its Pipeline is
    queued at once, without waiting for its next health check. Registered by the CLI for
    that engine only (it needs the right to watch pods)."""
    operator: Operator = memo.operator
    uid = operator.engine.observe(type or "", dict(body))
    if uid and uid in operator.bodies:
        operator.start_queue()
        operator.queue.add(uid)
