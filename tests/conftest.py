"""Shared fixtures: one real local control plane per test session, a namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from controlplane import ControlPlane, ensure_binaries, pid_alive
from kubernetes import client, config

from support import REPO, Kubectl, Operator, Pipelines


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd, kube-apiserver and kube-controller-manager, started once for the session.

    Teardown stops exactly what it started and then proves that nothing is left.
    """
    plane = ControlPlane(ensure_binaries()).start()
    try:
        yield plane
    finally:
        root = plane.root
        plane.stop()
        left = plane.leftovers()
        assert not left, f"control plane processes left behind after teardown: {left}"
        assert not root.exists(), f"control plane folder left behind: {root}"


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
    kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/pipelines.juturna.io", "--timeout=30s")


@pytest.fixture(scope="session")
def operator(
    crd: None, kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    base = tmp_path_factory.mktemp("operator")
    # A third plugin root whose "escape" folder is a symlink that leaves the root.
    (base / "root").mkdir()
    (base / "outside").mkdir()
    (base / "root" / "escape").symlink_to(base / "outside")
    op = Operator(kubeconfig, base / "work", base / "operator.log", base / "root")
    op.start()
    yield op
    op.stop()
    assert op.proc is not None
    assert not pid_alive(op.proc.pid), "the operator process is still alive"


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
