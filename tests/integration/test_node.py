"""The local node (hack/node.py): real pods under containerd, on a network that reaches the
node and other pods and nothing else; the operator's image as Kubernetes runs it."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from controlplane import ControlPlane
from node import KUBELET_PORT, NODE_IP, SERVICE_IP, Node, NodeError

from support import Kubectl, pod_finished, pod_ready, run_pod, wait_pod

pytestmark = [pytest.mark.cluster]

# Run inside a pod: which addresses answer, and the pod's routes. 192.0.2.1 is TEST-NET-1
# (RFC 5737): with no default route the kernel refuses at once and nothing is sent.
PROBE = """
import json, socket, sys
def tcp(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as err:
        return err.strerror or str(err)
routes = [line.split()[1] for line in open("/proc/net/route").read().splitlines()[1:]]
peer, api, node, kubelet_port = sys.argv[1:]
print(json.dumps({
    "peer": tcp(peer, 8000),
    "api": tcp(api, 443),
    "kubelet": tcp(node, int(kubelet_port)),
    "outside": tcp("192.0.2.1", 80),
    "default_route": "00000000" in routes,
}))
"""


def logs(kubectl: Kubectl, namespace: str, pod: str) -> str:
    return kubectl("logs", pod, "-n", namespace).stdout


@pytest.mark.reliability
def test_pods_reach_the_node_and_each_other_and_nothing_else(
    node: Node, node_image: str, kubectl: Kubectl, namespace: str
) -> None:
    run_pod(kubectl, namespace, "server", node_image, ["python3", "-m", "http.server", "8000"])
    server = wait_pod(kubectl, namespace, "server", pod_ready, what="Ready")
    peer = server["status"]["podIP"]
    run_pod(
        kubectl,
        namespace,
        "probe",
        node_image,
        ["python3", "-c", PROBE, peer, SERVICE_IP, NODE_IP, str(KUBELET_PORT)],
    )
    probe = wait_pod(kubectl, namespace, "probe", pod_finished, what="the end")
    out = logs(kubectl, namespace, "probe")
    assert probe["status"]["phase"] == "Succeeded", out
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {
        "peer": "connected",
        "api": "connected",
        "kubelet": "connected",
        "outside": "Network is unreachable",
        "default_route": False,
    }
    # The node forwards nothing, and the kubelet's API is on the bridge address only.
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", KUBELET_PORT), timeout=3).close()
    listening = subprocess.run(
        ["ss", "-Hltn", f"sport = :{KUBELET_PORT}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert f"{NODE_IP}:{KUBELET_PORT}" in listening, listening
    assert not [a for a in listening if a.endswith(f":{KUBELET_PORT}") and NODE_IP not in a]


IDENTITY = """
import getpass, os
print(getpass.getuser(), os.getuid(), os.getgid())
try:
    open("/opt/juturna-operator/x", "w")
except OSError as err:
    print("write to /opt:", err.strerror)
"""


def test_the_image_runs_under_containerd_as_10001_with_a_read_only_root(
    node: Node, node_image: str, kubectl: Kubectl, namespace: str
) -> None:
    """containerd adds no passwd entry (podman does): the image must carry its own, or kopf's
    getpass.getuser() crashes the operator (the crash loop this test was written for)."""
    run_pod(kubectl, namespace, "whoami", node_image, ["python3", "-c", IDENTITY])
    body = wait_pod(kubectl, namespace, "whoami", pod_finished, what="the end")
    out = logs(kubectl, namespace, "whoami")
    assert body["status"]["phase"] == "Succeeded", out
    assert out.splitlines() == ["juturna 10001 10001", "write to /opt: Read-only file system"]


def test_a_second_node_on_the_machine_is_refused_clearly(
    node: Node, control_plane: ControlPlane
) -> None:
    with pytest.raises(NodeError) as refused:
        Node(control_plane, control_plane.binaries).start()
    message = str(refused.value)
    assert "a local node already runs on this machine" in message
    assert "Only one node per machine" in message
    assert "make cluster-down" in message
    assert node.ready(), "the refused start must leave the running node alone"
