"""Shared fixtures: one real local control plane per test session, a namespace per test."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from controlplane import ControlPlane, ensure_binaries
from kubernetes import client, config
from node import NODE_IP, Node, missing_prerequisites
from processes import pid_alive, processes_mentioning

from support import (
    DENSE_PROCESS,
    OPERATOR_ENGINES,
    PLAIN_SERVICE,
    PODMAN,
    JuturnaServe,
    Kubectl,
    Operator,
    Pipelines,
    assert_sole_operator,
    built_operator_image,
    built_plugins_image,
    free_port,
    install_crds,
)

KEPT_LOGS = Path(__file__).resolve().parents[1] / ".state" / "failed-session-logs"


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver and kube-controller-manager, started once for the session.

    Teardown stops exactly what it started and then proves that nothing is left. After a
    session with failures it first keeps the plane's and the node's logs (kubelet,
    containerd, scheduler) in ``.state/failed-session-logs``: a node failure that did not
    repeat could not be explained once they were gone.
    """
    plane = ControlPlane(ensure_binaries(), die_with_parent=True).start()
    try:
        yield plane
    finally:
        root = plane.root
        if request.session.testsfailed:
            shutil.rmtree(KEPT_LOGS, ignore_errors=True)
            shutil.copytree(plane.logs, KEPT_LOGS, dirs_exist_ok=True)
        plane.stop()
        left = plane.leftovers()
        assert not left, f"control plane processes left behind after teardown: {left}"
        assert not root.exists(), f"control plane folder left behind: {root}"


@pytest.fixture(scope="session")
def node(control_plane: ControlPlane) -> Iterator[Node]:
    """A real node (containerd, kubelet, kube-scheduler, kube-proxy, CoreDNS) on the session's
    plane, started when a test first needs it. Skips, saying why, on a machine that cannot run
    one (not root, a package missing); fails if another node runs on this machine (only one
    fits).

    Teardown deletes its pods, stops what it started and proves that nothing is left."""
    problems = missing_prerequisites()
    if problems:
        pytest.skip("no local node: " + "; ".join(problems))
    started = Node(control_plane, control_plane.binaries).start()
    try:
        yield started
    finally:
        started.stop()
        left = started.leftovers()
        assert not left, f"the node left these behind after teardown: {left}"


@pytest.fixture(scope="session")
def operator_image() -> str:
    """The operator's image in podman's store (built from the Dockerfile once per session)."""
    return built_operator_image()


@pytest.fixture(scope="session")
def node_image(node: Node, operator_image: str) -> str:
    """The operator's image in the node's containerd, for pods with imagePullPolicy Never."""
    node.load_podman_image(operator_image, PODMAN)
    return operator_image


@pytest.fixture(scope="session")
def plugins_image(node: Node, operator_image: str) -> str:
    """The operator's image plus the faulty test plugins (/plugins/faulty), in the node's
    containerd: what pipeline pods of the pod engine's tests run."""
    image = built_plugins_image(operator_image)
    node.load_podman_image(image, PODMAN)
    return image


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def api_client(kubeconfig: Path) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture(scope="session")
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture
def namespace(core: client.CoreV1Api) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        core.delete_namespace(name)
    except client.ApiException as err:
        if err.status != 404:
            raise


@pytest.fixture(scope="session")
def kubectl(kubeconfig: Path) -> Kubectl:
    return Kubectl(kubeconfig)


@pytest.fixture(scope="session")
def crd(kubectl: Kubectl) -> None:
    install_crds(kubectl)


@pytest.fixture
def pod_operator(
    request: pytest.FixtureRequest,
    plugins_image: str,
    crd: None,
    kubeconfig: Path,
    tmp_path: Path,
) -> Iterator[Operator]:
    """The operator as a local process with the pod engine; its pods run the test image with
    the faulty plugins, with the settings a test's ``@pytest.mark.operator_env(NAME=value)``
    adds (or replaces)."""
    assert_sole_operator(kubeconfig)
    op = Operator(kubeconfig, tmp_path / "work", tmp_path / "operator.log", tmp_path, "pod")
    op.env["JUTURNA_OPERATOR_RUNTIME_IMAGE"] = plugins_image
    op.env["JUTURNA_OPERATOR_RUNTIME_PULL_POLICY"] = "Never"
    # This operator and the kubelet reach pipeline pods from the node's own address; each
    # pipeline pod gets its NetworkPolicy (our CNI does not enforce it; tests read it).
    op.env["JUTURNA_OPERATOR_WORKER_PEERS"] = json.dumps([{"ipBlock": {"cidr": f"{NODE_IP}/32"}}])
    for marker in request.node.iter_markers("operator_env"):
        op.env.update(marker.kwargs)
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture(scope="session", params=OPERATOR_ENGINES)
def operator(
    request: pytest.FixtureRequest,
    crd: None,
    kubeconfig: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Operator]:
    """The operator as its own process, once per engine; tests using it run for each (and
    on the process engine with many pipelines per process where they ask, ``DENSE_PROCESS``)."""
    base = tmp_path_factory.mktemp(f"operator-{request.param}")
    engine = "process" if request.param == DENSE_PROCESS else request.param
    # A third plugin root whose "escape" folder is a symlink that leaves the root.
    (base / "root").mkdir()
    (base / "outside").mkdir()
    (base / "root" / "escape").symlink_to(base / "outside")
    op = Operator(kubeconfig, base / "work", base / "operator.log", base / "root", engine)
    if request.param == DENSE_PROCESS:
        op.env["JUTURNA_OPERATOR_PIPELINES_PER_PROCESS"] = "3"
    serve = None
    try:
        if engine == "service":
            # A real `juturna serve` as the default runtime, writing where tests look for
            # output; a second runtime, "later", has nobody listening until a test starts it.
            serve = op.serve = JuturnaServe(op.workdir, base / "serve.log").start()
            op.later_port = free_port()
            # A bearer token, as the chart mounts it from a Secret: it must appear nowhere.
            op.runtime_token = f"jt-secret-{secrets.token_hex(16)}"
            token_file = base / "runtime-token"
            token_file.write_text(op.runtime_token + "\n")
            token_file.chmod(0o600)
            op.env["JUTURNA_OPERATOR_RUNTIMES"] = json.dumps(
                {
                    "local": {"url": serve.url, "tokenFile": str(token_file)},
                    "later": {
                        "url": f"http://127.0.0.1:{op.later_port}",
                        "tokenFile": str(token_file),
                    },
                }
            )
            op.env["JUTURNA_OPERATOR_DEFAULT_RUNTIME"] = "local"
        op.start()
        yield op
    finally:
        op.stop()
        if serve is not None:
            serve.stop()
    assert op.proc is not None
    assert not pid_alive(op.proc.pid), "the operator process is still alive"
    workers = processes_mentioning(f"--folder {op.workdir} ")
    assert not workers, f"worker processes left behind: {workers}"


@pytest.fixture(scope="session")
def objects(api_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


@pytest.fixture
def pipelines(
    operator: Operator, objects: client.CustomObjectsApi, namespace: str, kubectl: Kubectl
) -> Iterator[Pipelines]:
    p = Pipelines(objects, namespace, kubectl)
    yield p
    # Delete what the test left, and wait: the finalizer must never keep one.
    left = p.names()
    for name in left:
        p.delete(name)
    for name in left:
        p.wait_gone(name, timeout=30)


class FaultLog:
    """One row per injected fault: what, on which engine, how it ended, how long recovery took.
    ``make reliability`` writes the rows to ``RELIABILITY_RESULTS`` for docs/reliability.md."""

    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []

    def record(
        self,
        fault: str,
        engine: str,
        outcome: str,
        recovery_s: float | None = None,
        **figures: float,
    ) -> None:
        self.rows.append(
            {"fault": fault, "engine": engine, "outcome": outcome, "recovery_s": recovery_s}
            | {"at": time.time()}
            | figures
        )


@pytest.fixture(scope="session")
def fault_log() -> Iterator[FaultLog]:
    log = FaultLog()
    yield log
    results = os.environ.get("RELIABILITY_RESULTS")
    if results and log.rows:
        Path(results).write_text(json.dumps(log.rows, indent=1) + "\n")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``RELIABILITY_REPEAT=n`` runs each ``reliability(repeat=True)`` test n times (``make
    reliability``); tests that inject a fault many times take their counts from the environment."""
    marker = metafunc.definition.get_closest_marker("reliability")
    repeat = int(os.environ.get("RELIABILITY_REPEAT", "1"))
    if marker is not None and marker.kwargs.get("repeat") and repeat > 1:
        metafunc.fixturenames.append("fault_round")
        metafunc.parametrize("fault_round", range(repeat))


@pytest.hookimpl(trylast=True)  # after pytest has grouped the tests by engine
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests a plain `juturna serve` cannot pass are expected failures there, not run: a hung
    stop blocks one of its request threads for good and would starve the shared runtime."""
    for item in items:
        params = getattr(item, "callspec", None)
        on_service = params is not None and params.params.get("operator") == "service"
        if on_service and item.get_closest_marker("not_on_plain_service"):
            item.add_marker(pytest.mark.xfail(reason=PLAIN_SERVICE, run=False))
    # Tests that run an operator of their own go first: the session's operator watches every
    # namespace, and two operators would fight over each Pipeline.
    items.sort(key=lambda item: item.get_closest_marker("own_operator") is None)
