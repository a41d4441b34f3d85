"""A worker process: Juturna's own HTTP service for one pipeline, plus what it lacks.

The process engine forks one worker per pipeline from its zygote (``zygote.py``), which
runs ``main`` with these arguments in the child; run as a program of its own (a runtime of
the service engine, or the engine's fallback when no zygote starts) it is::

    python -m juturna_operator.worker --folder DIR --port-file FILE --owner UID --token-file T

It serves Juturna's FastAPI ``app`` unchanged (the contract upstream ships and keeps) on a
free loopback port, and adds what it lacks in this thin module:

* a bearer token on every request (the file's content, which the engine made for this
  worker alone): any other local process gets 401, so it can neither create, stop nor shut
  down pipelines here; only ``GET /operator/ready`` answers without it, and says only yes
  (200) or no (503: a thread of a pipeline here died): the kubelet's readiness probe;
* ``GET /operator/health``: the threads that died (``threading.excepthook``), with
  exception type and message (Juturna's own status would still say running), each with the
  pipeline and node it was started for (read where it was started: a node's constructor,
  warmup, start or update; else from the thread that started it), and the pipelines whose
  warmup is in flight;
* a deleted pipeline is forgotten (a shard outlives many): its crashes, its start lock,
  Juturna's loggers of its name, and the programs its nodes left running, ended with what
  they started; ``GET /operator/retained`` says what the process keeps;
* one warmup per pipeline at a time: a warmup asked for while one is in flight waits for it
  and shares its outcome (Juturna would build and warm up a second set of nodes);
* ``POST /operator/deploy``: create, carry the resource's output folder over, warm up and
  start, in one request (Juturna's own deploy leaves no moment for the folder between create
  and warmup, and its error names neither the step that failed nor the pipeline it left);
* ``POST /operator/shutdown``: a clean exit;
* 500 answers that keep the exception's message and the failing node (Juturna's own say
  only "Unexpected <Type> exception, see logs");
* a start that fails stops the nodes it had started (Juturna leaves them running in a
  pipeline that is not running, which neither its stop nor its delete then stops).

Ready handshake: the port is written to ``--port-file`` (atomically) once the socket is
bound and listening; the engine then waits for ``/operator/health`` to answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

WORKER_MARKER = "juturna_operator.worker"
OPEN_PATHS = frozenset({"/operator/ready"})  # answered without the token: reveals nothing

# Deploys block for a whole warmup (minutes, for models): their own threads, so that a shard
# deploying many pipelines at once still answers its health route from the shared pool.
_deploys = ThreadPoolExecutor(max_workers=256, thread_name_prefix="deploy")
# Deploy steps in the order they run, and the state each leaves.
DEPLOY_STEPS = (("warmup", "Ready"), ("start", "Running"))
_server: Any = None
_app: FastAPI | None = None  # built once per process: a zygote's workers share it
_expected = b""  # the Authorization header every request must carry

# Each thread's origin, set when it is made: (pipeline id, node name, "" if not known).
ORIGIN = "juturna_operator_origin"
# Crashes kept per pipeline (and of threads no pipeline started): the first, which name the
# cause; the health answer stays small however often a node's threads die.
CRASHES_KEPT = 10
KILL_WAIT_S = 5.0  # for a killed program to be reaped


def origin_here() -> tuple[str, str] | None:
    """The pipeline (id, and node name, "" if not known) that the code running now works
    for: the nearest Juturna node (once its pipeline gave it its id) or pipeline among the
    calling frames (a node's constructor, warmup, start, update); else the origin of the
    running thread, which it took from the thread that started it (thread ancestry: a
    helper's helper). None: no pipeline's (the worker's own threads)."""
    from juturna.components import Node, Pipeline

    node = ""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if isinstance(owner, Node):
                node = node or str(owner.name)
                if owner.pipe_id:
                    return str(owner.pipe_id), node
            elif isinstance(owner, Pipeline):
                return str(owner.pipe_id), node
        frame = frame.f_back
    inherited: tuple[str, str] | None = getattr(threading.current_thread(), ORIGIN, None)
    return inherited


def remember_origins() -> None:
    """Give every thread made from now on its origin (``origin_here`` when it is made), and
    note every program started (``subprocess.Popen``) under its pipeline: Juturna's thread
    names (``_update_<node>``) are not unique across the pipelines of a shard, and a plugin's
    own threads and programs carry no name of theirs at all."""
    init = threading.Thread.__init__
    if getattr(init, "remembers_origin", False):
        return

    @functools.wraps(init)
    def thread_init(self: threading.Thread, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        setattr(self, ORIGIN, origin_here())

    popen_init = subprocess.Popen.__init__

    @functools.wraps(popen_init)
    def started(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
        popen_init(self, *args, **kwargs)
        programs.started(self)

    thread_init.remembers_origin = True  # type: ignore[attr-defined]
    threading.Thread.__init__ = thread_init  # type: ignore[method-assign]
    subprocess.Popen.__init__ = started  # type: ignore[method-assign]


class Crashes:
    """The threads that died here (``threading.excepthook``), by the pipeline they were
    started for (None: no pipeline's), at most ``CRASHES_KEPT`` of each; a pipeline's go when
    it is deleted (a shard outlives many)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._of: dict[str | None, list[dict[str, str]]] = {}

    def record(self, pipeline_id: str | None, crash: dict[str, str]) -> None:
        """Keep ``crash``, unless its pipeline is deleted already (a thread that outlived
        its pipeline's stop): checked under the lock ``forget`` takes, which a delete takes
        after the manager lets the pipeline go, so none is kept for a deleted pipeline."""
        from juturna.components._pipeline_manager import PipelineManager

        manager = PipelineManager._instance  # read only: never makes one in a thread's hook
        with self._lock:
            if pipeline_id is not None and pipeline_id not in getattr(manager, "_pipelines", {}):
                return
            kept = self._of.setdefault(pipeline_id, [])
            if len(kept) < CRASHES_KEPT:
                kept.append(crash if pipeline_id is None else {**crash, "pipeline": pipeline_id})

    def forget(self, pipeline_id: str) -> None:
        with self._lock:
            self._of.pop(pipeline_id, None)

    def listed(self) -> list[dict[str, str]]:
        """Every crash kept: ``{node, thread, error}``, and ``pipeline`` where known."""
        with self._lock:
            return [crash for kept in self._of.values() for crash in kept]


crashes = Crashes()


def _record_crash(args: threading.ExceptHookArgs) -> None:
    thread = args.thread.name if args.thread is not None else "?"
    origin: tuple[str, str] | None = getattr(args.thread, ORIGIN, None)
    named = thread.split("_", 2)[2] if thread.startswith("_") and thread.count("_") >= 2 else ""
    node = (origin[1] if origin else "") or named or thread
    error = (
        f"{args.exc_type.__name__}: {args.exc_value}"
        if args.exc_value
        else (args.exc_type.__name__)
    )
    crashes.record(origin[0] if origin else None, {"node": node, "thread": thread, "error": error})
    logging.getLogger("juturna_operator.worker").warning("node %s crashed: %s", node, error)


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs, from /proc (a shell's ffmpeg)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


class Programs:
    """The programs pipelines' nodes started (``subprocess.Popen``), by pipeline: those a
    deleted pipeline leaves running (a node that never ends its ffmpeg) end with it, with
    what they started in turn, instead of living as long as the shard."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._of: dict[str, list[subprocess.Popen[Any]]] = {}

    def started(self, popen: subprocess.Popen[Any]) -> None:
        origin = origin_here()
        if origin is None:
            return  # the worker's own
        with self._lock:
            # The node's own Popen object: polling it reaps an ended program for the node too.
            running = [p for p in self._of.get(origin[0], []) if p.poll() is None]
            self._of[origin[0]] = [*running, popen]

    def end(self, pipeline_id: str) -> None:
        """SIGKILL what is left of ``pipeline_id``'s programs, with their descendants."""
        with self._lock:
            left = self._of.pop(pipeline_id, [])
        for popen in left:
            if popen.poll() is not None:
                continue
            for pid in [popen.pid, *descendants(popen.pid)]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(KILL_WAIT_S)

    def count(self) -> int:
        with self._lock:
            return sum(len(kept) for kept in self._of.values())


programs = Programs()


class Warmups:
    """The warmups in flight in this worker, at most one per pipeline.

    Juturna starts a second warmup of a pipeline that is still warming up (its status says
    created until the first one ends): it builds a second set of nodes, loads every model
    again, and orphans the first set. An operator restarted during a warmup asks for it
    again (the worker's record still says Created), so a warmup asked for while one is in
    flight waits for that one and shares its outcome, its exception included.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, Future[None]] = {}

    def in_flight(self) -> list[str]:
        """The ids of the pipelines warming up now."""
        with self._lock:
            return sorted(self._running)

    def once(self, warmup: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
        """``warmup`` (``PipelineManager.warmup_pipeline``), joined while in flight."""

        @functools.wraps(warmup)
        def joined(manager: Any, pipeline_id: str) -> None:
            with self._lock:
                running = self._running.get(pipeline_id)
                if running is None:
                    mine = self._running[pipeline_id] = Future()
            if running is not None:
                running.result()  # no timeout: the engine's request has its own
                return
            try:
                warmup(manager, pipeline_id)
                mine.set_result(None)
            except BaseException as exc:
                mine.set_exception(exc)
                raise
            finally:
                with self._lock:
                    del self._running[pipeline_id]

        return joined


warmups = Warmups()
_start_locks: dict[str, threading.Lock] = {}
_start_locks_guard = threading.Lock()


def _start_lock(pipeline_id: str) -> threading.Lock:
    with _start_locks_guard:
        return _start_locks.setdefault(pipeline_id, threading.Lock())


def drop_loggers(name: str) -> None:
    """Remove Juturna's loggers of a pipeline name (``jt.<name>``, its nodes' below it) from
    logging's registry, which keeps every logger for the life of the process."""
    registry = logging.Logger.manager.loggerDict
    mine = f"jt.{name}"
    for logger in [n for n in list(registry) if n == mine or n.startswith(f"{mine}.")]:
        registry.pop(logger, None)


def forget_pipeline(pipeline_id: str, name: str, others: Iterable[Any]) -> None:
    """Drop what this process kept of a deleted pipeline: its crashes, its start lock, the
    programs its nodes left running, and Juturna's loggers of its name unless a pipeline in
    ``others`` still has that name (a redeploy of the same resource)."""
    crashes.forget(pipeline_id)
    with _start_locks_guard:
        _start_locks.pop(pipeline_id, None)
    programs.end(pipeline_id)
    if all(getattr(other, "name", None) != name for other in others):
        drop_loggers(name)


def forget_deleted_pipelines() -> None:
    """Make ``delete_pipeline`` forget the pipeline it deleted (``forget_pipeline``): a shard
    lives through many pipelines, and grew with each one it had run."""
    from juturna.components._pipeline_manager import PipelineManager

    delete = PipelineManager.delete_pipeline
    if getattr(delete, "forgets", False):
        return

    def delete_pipeline(self: PipelineManager, pipeline_id: str, wipe_folder: bool) -> None:
        pipeline = self._pipelines.get(pipeline_id)
        try:
            delete(self, pipeline_id, wipe_folder)
        finally:
            if pipeline is not None and pipeline_id not in self._pipelines:
                forget_pipeline(pipeline_id, pipeline.name, list(self._pipelines.values()))

    delete_pipeline.forgets = True  # type: ignore[attr-defined]
    PipelineManager.delete_pipeline = delete_pipeline


def stop_nodes_when_start_fails() -> None:
    """Make a failed ``start_pipeline`` (and so a failed deploy) stop what it started.

    Juturna starts the nodes one by one; when one raises, those already started keep their
    threads and the pipeline stays ready, so its stop refuses ("not running") and its
    delete stops nothing: they would run until the process ends. Only a start that Juturna
    began does so: one it refused (already running, not ready) started nothing."""
    from juturna.components._pipeline_manager import PipelineManager
    from juturna.names import PipelineStatus

    start = PipelineManager.start_pipeline
    if getattr(start, "stops_nodes_on_failure", False):
        return

    def start_pipeline(self: PipelineManager, pipeline_id: str) -> None:
        # One start of a pipeline at a time (an adopted deploy and the operator's own start
        # may race): the second finds it running and is refused, stopping nothing.
        with _start_lock(pipeline_id):
            pipeline = self._pipelines.get(pipeline_id)
            if pipeline is None or pipeline.status["self"] != PipelineStatus.READY:
                start(self, pipeline_id)  # refused (running, not ready, unknown): nothing ran
                return
            _start_or_stop_nodes(self, start, pipeline_id)

    start_pipeline.stops_nodes_on_failure = True  # type: ignore[attr-defined]
    PipelineManager.start_pipeline = start_pipeline


def _start_or_stop_nodes(manager: Any, start: Callable[[Any, str], None], pipeline_id: str) -> None:
    try:
        start(manager, pipeline_id)
    except Exception:
        nodes = getattr(manager._pipelines.get(pipeline_id), "_nodes", None) or {}
        for name, node in list(nodes.items()):
            try:
                node.stop()  # a node never started stops at once
            except Exception:  # the start's own error is the one to report
                logging.getLogger("juturna_operator.worker").exception("stopping %s", name)
        raise


def carry_output(workdir: Path, juturna_name: str, pipeline_id: str) -> None:
    """Give a new instance the folder its resource's previous instance left (the newest, if
    a crash left several): Juturna names a folder after the instance (``<name>_<id>``), and
    creates it only at warmup, so a rename after create keeps the pipeline's output across
    redeploys of the same resource."""
    target = workdir / f"{juturna_name}_{pipeline_id}"
    left = [p for p in workdir.glob(f"{juturna_name}_*") if p != target and p.is_dir()]
    if not left or target.exists():
        return
    left.sort(key=lambda p: p.stat().st_mtime)
    left[-1].rename(target)
    for older in left[:-1]:
        shutil.rmtree(older, ignore_errors=True)


def pipelines_now() -> dict[str, Any]:
    """``{pipeline id: Juturna's status}`` for every pipeline here. Not Juturna's
    ``pipeline_list``, which iterates the manager's dict while deploys add to it."""
    from juturna.components._pipeline_manager import PipelineManager

    manager = PipelineManager()
    return {str(pid): pipeline.status for pid, pipeline in list(manager._pipelines.items())}


def deploy(config: dict[str, Any], until: str) -> tuple[int, dict[str, Any]]:
    """Create a pipeline, carry its resource's output folder over, and take it as far as
    ``until`` (Created, Ready or Running): ``(HTTP status, answer)``. A failure's answer
    names the step that failed, and the pipeline it left behind (id and state), which is
    not rolled back: the engine holds it and deletes it like any other."""
    from juturna.cli.commands.models.api import PipelineConfig
    from juturna.components._pipeline_manager import PipelineManager
    from pydantic import ValidationError

    from juturna_operator.reasons import describe_exception, failing_node

    manager = PipelineManager()
    try:
        parsed = PipelineConfig.model_validate(config)
    except ValidationError as err:
        return 422, {"message": f"the config is not Juturna's: {err}", "step": "create"}
    step, state, pipeline_id = "create", "Created", None
    try:
        pipeline_id = str(manager.create_pipeline(parsed).pipeline_id)
        carry_output(Path(manager.base_folder), config["pipeline"]["name"], pipeline_id)
        for step, reached in DEPLOY_STEPS[: ("Created", "Ready", "Running").index(until)]:
            getattr(manager, f"{step}_pipeline")(pipeline_id)
            state = reached
    except Exception as exc:
        logging.getLogger("juturna_operator.worker").exception("deploy, at %s", step)
        node, message = failing_node(exc), describe_exception(exc)
        return 500, {
            "message": f'node "{node}": {message}' if node else message,
            "step": step,
            "pipeline_id": pipeline_id,
            "state": state,
        }
    return 200, {"pipeline_id": pipeline_id, "state": state}


def build_app(token: str) -> FastAPI:
    """Juturna's service app with the operator's routes added, behind ``token``.

    Built once per process (Juturna's app is a module global, and a started app takes no
    more middleware): a later call only puts the app behind its new ``token``, as a worker
    forked from the zygote does with its own."""
    global _app, _expected
    _expected = f"Bearer {token}".encode()
    if _app is None:
        _app = _build_app()
    return _app


def _build_app() -> FastAPI:
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from juturna.cli.commands._juturna_service import app as juturna_app

    app: FastAPI = juturna_app  # Juturna ships no types: its app is FastAPI's
    from juturna.components._pipeline_manager import PipelineManager

    from juturna_operator.reasons import describe_exception, failing_node

    # Juturna's routes (warmup and deploy) call the manager's method: joined there, they keep
    # their answers, and no HTTP detail (a client gone, a route replaced) matters.
    PipelineManager.warmup_pipeline = warmups.once(PipelineManager.warmup_pipeline)
    stop_nodes_when_start_fails()
    forget_deleted_pipelines()
    remember_origins()
    # Pitfall 5: an empty manager is falsy, so PipelineManager() makes a new one while none
    # has a pipeline; two deploys at once on an empty shard lost one's pipeline that way.
    PipelineManager.__bool__ = lambda self: True

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        given = request.headers.get("authorization", "").encode()
        if request.url.path not in OPEN_PATHS and not hmac.compare_digest(given, _expected):
            return JSONResponse(
                status_code=401,
                content={"message": "this worker answers only its operator (bearer token)"},
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)

    @app.get("/operator/ready", response_model=None)
    def ready() -> Any:
        """The kubelet's readiness probe (engine pod): it fails once a thread of a deployed
        pipeline's died, so the pod's Ready condition carries the crash to the operator's
        pod watch; a stuck worker fails it by not answering. Before any deploy it passes:
        the operator deploys to a Ready pod. Open, so it says yes or no and nothing else."""
        if crashes.listed():
            return JSONResponse(status_code=503, content={"ready": False})
        return {"ready": True}

    @app.post("/operator/validate")
    def validate(body: dict[str, Any]) -> dict[str, Any]:
        """The graph checks that read plugin files, against this process's own plugins (in a
        pod: its runtime image's, JUTURNA_OPERATOR_PLUGIN_PATH): the reasons and messages
        the operator gives where it checks them itself."""
        from juturna_operator import graph
        from juturna_operator.api import PipelineSpec
        from juturna_operator.reasons import PipelineFailure
        from juturna_operator.settings import CodePolicy

        roots = os.environ.get("JUTURNA_OPERATOR_PLUGIN_PATH", "")
        try:
            checked = graph.check_plugins(
                PipelineSpec.model_validate(body["spec"]),
                [Path(root) for root in roots.split(os.pathsep) if root],
                CodePolicy.from_json(body["policy"]),
            )
        except PipelineFailure as failure:
            return {"failure": {"reason": failure.reason.name, "message": failure.message}}
        return {"warnings": checked.warnings}

    @app.get("/operator/health")
    def health() -> dict[str, Any]:
        return {
            "pipelines": [pipelines_now()],
            "crashes": crashes.listed(),
            "warming": warmups.in_flight(),
        }

    @app.get("/operator/retained")
    def retained() -> dict[str, Any]:
        # What this process keeps per pipeline: all of it should go with a deleted one.
        return {
            "pipelines": len(pipelines_now()),
            "crashes": len(crashes.listed()),
            "start_locks": len(_start_locks),
            "programs": programs.count(),
            "loggers": sorted(n for n in logging.Logger.manager.loggerDict if n.startswith("jt.")),
        }

    # Annotations here are resolved in this module's globals (FastAPI reads them): only
    # names defined there, like Any.
    @app.post("/operator/deploy", response_model=None)
    async def deploy_route(body: dict[str, Any]) -> Any:
        until = body.get("until", "Running")
        if until not in ("Created", "Ready", "Running") or not isinstance(body.get("config"), dict):
            return JSONResponse(
                status_code=422,
                content={"message": 'expected {"config": {...}, "until": "Created|Ready|Running"}'},
            )
        loop = asyncio.get_running_loop()
        code, answer = await loop.run_in_executor(_deploys, deploy, body["config"], until)
        return JSONResponse(status_code=code, content=answer)

    @app.post("/operator/shutdown")
    def shutdown() -> dict[str, str]:
        if _server is not None:
            _server.should_exit = True
        return {"status": "shutting down"}

    async def detailed_500(request: Request, exc: Exception) -> JSONResponse:
        node = failing_node(exc)
        message = describe_exception(exc)
        logging.getLogger("juturna_operator.worker").exception("on %s", request.url.path)
        return JSONResponse(
            status_code=500,
            content={"message": f'node "{node}": {message}' if node else message},
        )

    app.add_exception_handler(Exception, detailed_500)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="juturna-operator-worker")
    parser.add_argument("--folder", required=True, help="Juturna's pipeline base folder")
    parser.add_argument("--port-file", required=True, help="where to write the bound port")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: any free one)")
    parser.add_argument("--owner", required=True, help="uid of the Pipeline this serves")
    parser.add_argument("--token-file", required=True, help="the bearer token requests carry")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--spawn-id", default="", help="the engine's id of this start (unused here: see zygote)"
    )
    args = parser.parse_args(argv)
    token = Path(args.token_file).read_text().strip()
    if not token:
        parser.error(f"--token-file {args.token_file} is empty")

    import uvicorn
    from juturna.components._pipeline_manager import PipelineManager

    global _server
    # Plugin folders are import paths (JUTURNA.md): their roots go on the path. In a pod the
    # image says where its plugins are (JUTURNA_OPERATOR_PLUGIN_PATH, /plugins in ours); the
    # process engine passes the operator's own roots in PYTHONPATH as well.
    for root in filter(None, os.environ.get("JUTURNA_OPERATOR_PLUGIN_PATH", "").split(":")):
        if root not in sys.path:
            sys.path.append(root)
    threading.excepthook = _record_crash
    Path(args.folder).mkdir(parents=True, exist_ok=True)
    PipelineManager.set_base_folder(args.folder)
    app = build_app(token)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    # Listening before the port is told: the engine's first health check then waits in the
    # backlog until uvicorn serves, instead of a refusal and its client's retry pause.
    sock.listen(2048)
    port_file = Path(args.port_file)
    tmp = port_file.with_name(port_file.name + ".tmp")  # the engine's record has <uid>.json.tmp
    tmp.write_text(str(sock.getsockname()[1]))
    os.replace(tmp, port_file)
    logging.getLogger("jt").setLevel(logging.WARNING)
    _server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    _server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
