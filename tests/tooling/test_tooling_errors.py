"""The local tooling explains each failure: cause and fix, never a bare traceback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import controlplane
import node
import pytest
from controlplane import ControlPlane, ControlPlaneError, ensure_binaries
from node import Node, NodeError, NodeUnavailable

from support import minimal_path

HACK = Path(controlplane.__file__).parent


def test_no_go_toolchain_is_explained(tmp_path: Path) -> None:
    path = minimal_path(tmp_path, "grep", "dirname", "basename")
    proc = subprocess.run(
        ["/bin/bash", str(HACK / "build-binaries.sh")],
        env={"PATH": path, "HOME": str(tmp_path), "JUTURNA_OPERATOR_CACHE": str(tmp_path / "c")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "error: no Go toolchain on PATH" in proc.stderr
    assert "Fix: install Go" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_python312_is_explained(tmp_path: Path) -> None:
    path = minimal_path(tmp_path, "python3")  # python3 is 3.11 here: not good enough
    proc = subprocess.run(
        ["/bin/bash", str(HACK / "find-python.sh")],
        env={"PATH": path, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "error: no Python 3.12 found" in proc.stderr
    assert "PYTHON312=" in proc.stderr


def test_go_build_failure_shows_the_tail_of_go_output(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "JUTURNA_OPERATOR_CACHE": str(tmp_path / "cache"),
        "GOFLAGS": "-mod=vendor",
    }
    proc = subprocess.run(
        ["bash", str(HACK / "build-binaries.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "error: go build of k8s.io/kubernetes/cmd/kube-apiserver failed." in proc.stderr
    assert "Last lines of the go output" in proc.stderr
    assert "vendor" in proc.stderr  # go's own words about the cause are shown


@pytest.fixture
def plane() -> Iterator[ControlPlane]:
    p = ControlPlane(ensure_binaries())
    p.logs.mkdir(parents=True)
    yield p
    p.stop()
    assert not p.leftovers()


def test_port_in_use_is_retried_on_another_port(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy, controlplane.free_port()])
        real = controlplane.free_port
        monkeypatch.setattr(controlplane, "free_port", lambda: next(ports, None) or real())
        plane._with_fresh_ports(plane._start_etcd)
    assert plane.etcd_url
    assert f":{busy}" not in plane.etcd_url
    assert len(plane.components) == 1
    assert not plane.components[0].exited()


def test_port_always_in_use_gives_up_with_a_clear_error(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(controlplane, "free_port", lambda: busy)
        with pytest.raises(ControlPlaneError) as err:
            plane._with_fresh_ports(plane._start_etcd)
    assert "etcd could not bind its port: address already in use." in str(err.value)
    assert "Tried 3 different free ports" in str(err.value)


def test_component_not_ready_in_time_prints_its_log(plane: ControlPlane) -> None:
    controlplane.write_certificates(plane.pki)
    plane.ready_timeout_s = 4
    plane.etcd_url = f"http://127.0.0.1:{controlplane.free_port()}"  # nobody listens there
    with pytest.raises(ControlPlaneError) as err:
        plane._start_apiserver()
    msg = str(err.value)
    assert "kube-apiserver was not ready (GET https://127.0.0.1:" in msg
    assert "within 4 s. Last lines of its log" in msg
    assert "JUTURNA_OPERATOR_CLUSTER_TIMEOUT" in msg


def test_a_second_run_builds_nothing() -> None:
    """Idempotent: with the binaries present, the script only checks their versions."""
    ensure_binaries()
    proc = subprocess.run(
        ["bash", str(HACK / "build-binaries.sh")],
        env={**os.environ, "QUIET": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "building" not in proc.stderr, proc.stderr
    assert "installing" not in proc.stderr, proc.stderr
    assert [line.split("=")[0] for line in proc.stdout.splitlines()] == [
        "KUBE_BIN",
        "ETCD_BIN",
        "HELM_BIN",
        "COREDNS_BIN",
    ]


def test_a_killed_test_run_takes_its_plane_with_it() -> None:
    """A test plane is tied to the process that started it: SIGKILL that, and none is left."""
    code = (
        "import sys, time; sys.path.insert(0, 'hack')\n"
        "from controlplane import ControlPlane, ensure_binaries\n"
        "p = ControlPlane(ensure_binaries(), die_with_parent=True).start()\n"
        "print(p.root, flush=True); time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=HACK.parent
    )
    assert child.stdout is not None
    root = child.stdout.readline().strip()
    try:
        assert root.startswith(tempfile.gettempdir()), root
        assert len(controlplane.processes_mentioning(root)) == 3
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 10
    while controlplane.processes_mentioning(root):
        assert time.monotonic() < deadline, controlplane.processes_mentioning(root)
        time.sleep(0.1)
    shutil.rmtree(root, ignore_errors=True)


# --- the node (hack/node.py) ------------------------------------------------------------------


def test_a_machine_without_the_node_packages_is_told_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", minimal_path(tmp_path, "gcc"))
    monkeypatch.setattr(node, "CNI_BIN", tmp_path / "no-cni")
    with pytest.raises(NodeUnavailable) as refused:
        Node(plane=None, binaries=None).start()  # type: ignore[arg-type]
    message = str(refused.value)
    assert message.startswith("this machine cannot run a node: ")
    for tool in ("containerd", "ctr", "runc", "socat", "ip"):
        assert f"{tool} is not installed (hack/install-packages.sh installs it)" in message
    assert "gcc is not installed" not in message
    assert f"CNI plugin {tmp_path / 'no-cni' / 'bridge'} is missing" in message


def test_forwarding_on_is_refused_before_anything_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ip_forward 1, pods could reach other networks: the node refuses, touching nothing
    (no bridge, no files)."""
    forward = tmp_path / "ip_forward"
    forward.write_text("1\n")
    monkeypatch.setattr(node, "IP_FORWARD", forward)
    plane = ControlPlane.__new__(ControlPlane)
    plane.root = tmp_path / "plane"
    with pytest.raises(NodeError) as refused:
        Node(plane=plane, binaries=None)._network()  # type: ignore[arg-type]
    assert str(refused.value) == (
        "net.ipv4.ip_forward is 1 on this machine: pods could reach other networks. "
        "The local node needs it 0 (sysctl -w net.ipv4.ip_forward=0)."
    )
    assert not plane.root.exists()
