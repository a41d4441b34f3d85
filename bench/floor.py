"""The floor: a framework-free operator that makes the real operator's writes and no work.

    python bench/floor.py -n <namespace>        (KUBECONFIG names the cluster)

It watches one namespace's Pipelines and, for each new generation, makes what the operator
writes on its way to Ready (docs/benchmarks.md, "writes by kind", in-process): the finalizer
(PATCH on the object, the operator's own guarded JSON patch: ``patching.finalizer_patch``),
one status (PATCH on ``/status``, the shape ``status.build_status`` writes for a Running
pipeline: phase, observedGeneration, the four conditions with ``Ready=True``, nodes;
tests/integration/test_bench_smoke.py holds it to ``build_status``) and one Normal Event
(POST, kopf's body). It deploys nothing. When a Pipeline is deleted it removes its
finalizer, as the operator does.

What it is for: on our 2 shared cores the API server, etcd and the operator compete for the
same CPU, so an absolute latency says as much about the machine as about the operator. The
floor is what any operator written with no framework reaches on the same API server, in the
same run: the benchmark reports each operator row as a ratio to it (``xfloor``).

It is as lean as Python makes it: one process, one asyncio loop, aiohttp (kopf's own HTTP
client) straight to the API server with the kubeconfig's credentials, one task per Pipeline.
Its log says ``Initial authentication has finished`` (kopf's line, which the harness waits
for) once its watch is open.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import ssl
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from juturna_operator.api import GROUP, PLURAL, VERSION, PipelineSpec
from juturna_operator.patching import FINALIZER, JSON_PATCH, finalizer_patch

UP_LINE = "Initial authentication has finished"  # what hack/operator_process.py waits for
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}
WRITE_ATTEMPTS = 5  # a write that fails for a transient reason is retried

log = logging.getLogger("floor")


# -- the cluster, from the kubeconfig ---------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """The server, its TLS context and the headers that authenticate us."""

    server: str
    tls: ssl.SSLContext | bool
    headers: dict[str, str] = field(default_factory=dict)


def _file(entry: dict[str, Any], key: str, folder: Path) -> str | None:
    """``key`` (a path) or ``key-data`` (base64, written to ``folder``) of a kubeconfig entry."""
    if entry.get(key):
        return str(entry[key])
    data = entry.get(f"{key}-data")
    if not data:
        return None
    path = folder / key
    path.write_bytes(base64.b64decode(data))
    return str(path)


def load_cluster(kubeconfig: Path) -> Cluster:
    """The current context's cluster and user: CA, client certificate and key, or token."""
    config = yaml.safe_load(kubeconfig.read_text())
    context_name = config.get("current-context")
    context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
    folder = Path(tempfile.mkdtemp(prefix="floor-tls-"))  # for inline (base64) credentials
    tls: ssl.SSLContext | bool
    if cluster.get("insecure-skip-tls-verify"):
        tls = False
    else:
        tls = ssl.create_default_context(cafile=_file(cluster, "certificate-authority", folder))
    certificate = _file(user, "client-certificate", folder)
    if certificate and isinstance(tls, ssl.SSLContext):
        tls.load_cert_chain(certificate, _file(user, "client-key", folder))
    headers = {"Authorization": f"Bearer {user['token']}"} if user.get("token") else {}
    return Cluster(cluster["server"].rstrip("/"), tls, headers)


# -- what the operator writes -----------------------------------------------------------------


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def running_status(
    body: dict[str, Any], pipeline_id: str, revision: str | None = None
) -> dict[str, Any]:
    """The status the operator writes when a pipeline reaches Running (the same fields and
    nulls as ``build_status``: a merge patch of the same size). The benchmark's Pipelines
    ask for Running; the floor writes this shape whatever they ask. ``revision``: the spec's
    (``PipelineSpec.revision``), computed here unless given."""
    if revision is None:
        revision = PipelineSpec.model_validate(body["spec"]).revision()
    generation = body["metadata"]["generation"]
    now = now_rfc3339()
    nodes = [node["name"] for node in body["spec"]["nodes"]]

    def condition(kind: str, reason: str, message: str, status: str = "True") -> dict[str, Any]:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
            "observedGeneration": generation,
        }

    return {
        "phase": "Running",
        "observedGeneration": generation,
        "conditions": [
            condition("Created", "Created", "the pipeline instance exists"),
            condition("WarmedUp", "WarmedUp", "all nodes are warmed up"),
            condition("Running", "Started", "the pipeline is processing data"),
            condition("Ready", "DesiredStateReached", f"the pipeline is {body['spec']['state']}"),
            condition("Updating", "NotUpdating", "", "False"),
        ],
        "failure": None,
        "pipelineId": pipeline_id,
        "restarts": 0,
        "nodes": [{"name": name, "status": "Running"} for name in nodes],
        "nodesReady": f"{len(nodes)}/{len(nodes)}",
        "pod": None,
        "endpoints": [],
        "address": None,
        "lastStableRevision": revision,
        "update": None,
    }


def started_event(body: dict[str, Any], pipeline_id: str) -> dict[str, Any]:
    """The one Normal Event of a creation pass, in kopf's body (``kopf.event``)."""
    meta = body["metadata"]
    now = dt.datetime.now(dt.UTC).isoformat()
    return {
        "metadata": {"namespace": meta["namespace"], "generateName": "kopf-event-"},
        "action": "Action?",
        "type": "Normal",
        "reason": "Started",
        "message": (
            f"pipeline instance {pipeline_id} created; all nodes warmed up; pipeline started"
        ),
        "reportingComponent": "kopf",
        "reportingInstance": "dev",
        "source": {"component": "kopf"},
        "involvedObject": {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "name": meta["name"],
            "uid": meta["uid"],
            "namespace": meta["namespace"],
        },
        "firstTimestamp": now,
        "lastTimestamp": now,
        "eventTime": now,
    }


# -- the operator -----------------------------------------------------------------------------


class TransientError(Exception):
    """A write the API server refused for now (429, 5xx) or a dropped connection."""


class Floor:
    """Watches one namespace's Pipelines; one task per Pipeline makes its writes."""

    def __init__(self, session: aiohttp.ClientSession, cluster: Cluster, namespace: str) -> None:
        self.session, self.cluster, self.namespace = session, cluster, namespace
        self.collection = f"{cluster.server}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
        self.handled: set[tuple[str, int]] = set()  # (uid, generation) given its writes
        self.releasing: set[str] = set()  # uids whose finalizer is being removed
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """List, then watch from the list's version; list again when the version is gone."""
        announced = False
        while True:
            async with self.session.get(self.collection) as reply:
                reply.raise_for_status()
                listed = await reply.json()
            for item in listed["items"]:
                self.seen(item)
            version = listed["metadata"]["resourceVersion"]
            async for kind, body in self.watch(version):
                if kind == "OPEN":
                    if not announced:
                        log.info(UP_LINE)
                        announced = True
                elif kind != "BOOKMARK":
                    self.seen(body)

    async def watch(self, version: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Watch events from ``version`` on; a stream that ends is resumed where it stopped.
        Yields ``("OPEN", {})`` each time the stream opens; ends at an ERROR event (410 Gone:
        the version is too old, the caller lists again)."""
        while True:
            params = {
                "watch": "1",
                "resourceVersion": version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": "300",
            }
            try:
                async with self.session.get(
                    self.collection, params=params, timeout=aiohttp.ClientTimeout(None)
                ) as reply:
                    reply.raise_for_status()
                    yield "OPEN", {}
                    async for line in reply.content:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind, body = event["type"], event["object"]
                        if kind == "ERROR":
                            log.warning("watch ended: %s", body.get("message"))
                            return
                        version = body["metadata"]["resourceVersion"]
                        yield kind, body
            except (aiohttp.ClientError, TimeoutError) as error:
                log.warning("watch dropped (%s); resuming", error)
                await asyncio.sleep(0.2)

    def seen(self, body: dict[str, Any]) -> None:
        """Start the writes a Pipeline needs, if it needs any not already under way."""
        meta = body["metadata"]
        uid, finalizers = meta["uid"], meta.get("finalizers") or []
        if meta.get("deletionTimestamp"):
            if FINALIZER in finalizers and uid not in self.releasing:
                self.releasing.add(uid)
                self.spawn(self.release(body))
            return
        key = (uid, meta["generation"])
        status = body.get("status") or {}
        if key in self.handled or status.get("observedGeneration") == meta["generation"]:
            return  # given its writes already (by us, or by a previous floor process)
        self.handled.add(key)
        self.spawn(self.reconcile(body))

    def spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)  # a reference, so that the task is not collected midway
        task.add_done_callback(self.tasks.discard)

    async def reconcile(self, body: dict[str, Any]) -> None:
        """The finalizer, the Ready status, one Event: the operator's writes, in its order."""
        meta = body["metadata"]
        url = f"{self.collection}/{meta['name']}"
        pipeline_id = uuid.uuid4().hex[:12]
        adding = finalizer_patch(meta, add=True)
        json_patch = {"Content-Type": JSON_PATCH}
        if adding is not None and not await self.write("PATCH", url, adding, json_patch):
            return
        status = {"status": running_status(body, pipeline_id)}
        if not await self.write("PATCH", f"{url}/status", status, MERGE_PATCH):
            return
        events = f"{self.cluster.server}/api/v1/namespaces/{self.namespace}/events"
        await self.write("POST", events, started_event(body, pipeline_id))

    async def release(self, body: dict[str, Any]) -> None:
        """Remove our finalizer from a Pipeline being deleted (nothing to stop: no work)."""
        meta = body["metadata"]
        removing = finalizer_patch(meta, add=False)
        url = f"{self.collection}/{meta['name']}"
        if removing is not None:
            await self.write("PATCH", url, removing, {"Content-Type": JSON_PATCH})
        self.releasing.discard(meta["uid"])

    async def write(
        self, method: str, url: str, payload: Any, headers: dict[str, str] | None = None
    ) -> bool:
        """One write, retried while the failure is transient; False when it did not land."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                async with self.session.request(
                    method, url, json=payload, headers=headers
                ) as reply:
                    await reply.read()  # an unread reply would poison the pooled connection
                    if reply.status == 429 or reply.status >= 500:
                        raise TransientError(f"{reply.status} {reply.reason}")
                    if reply.status >= 400:
                        log.warning("%s %s: %s %s", method, url, reply.status, reply.reason)
                        return False  # e.g. 404: the Pipeline is gone
                    return True
            except (aiohttp.ClientError, TimeoutError, TransientError) as error:
                log.warning("%s %s failed (%s), attempt %d", method, url, error, attempt + 1)
                await asyncio.sleep(0.2 * 2**attempt)
        return False


async def serve(kubeconfig: Path, namespace: str) -> None:
    cluster = load_cluster(kubeconfig)
    connector = aiohttp.TCPConnector(ssl=cluster.tls, limit=100)
    async with aiohttp.ClientSession(
        connector=connector,
        headers=cluster.headers,
        read_bufsize=2**20,  # a watch event is one line: room for a large Pipeline
    ) as session:
        await Floor(session, cluster, namespace).run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--namespace", required=True)
    parser.add_argument("--kubeconfig", type=Path, default=os.environ.get("KUBECONFIG"))
    args = parser.parse_args()
    if args.kubeconfig is None:
        parser.error("no kubeconfig: set KUBECONFIG or pass --kubeconfig")
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s"
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends it quietly
        asyncio.run(serve(args.kubeconfig, args.namespace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
