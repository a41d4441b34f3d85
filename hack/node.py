"""A real, local Kubernetes node on the local control plane: containerd, kubelet, kube-scheduler,
kube-proxy and cluster DNS (CoreDNS).

Where the plane (``controlplane.py``) proves the API, this proves what Kubernetes does to a pod:
the scheduler, admission with real ServiceAccount tokens, the kubelet's probes, volumes,
securityContext and restarts, under containerd and runc from Debian's packages.

The shape follows ``../shared/PLATFORM.md`` ("A real node"):

* containerd runs with a config of its own (socket, state and CNI folders in the node's
  folder; its image store in the cache, so an imported image survives the node);
* pods sit on a bridge of their own with no default route: they reach the node's bridge
  address, each other and the Service range, nothing else. ``net.ipv4.ip_forward`` stays 0;
  forwarding is on for the bridge alone (kube-proxy's DNAT of a ClusterIP needs it), and a
  ``FORWARD -i jtop0 ! -o jtop0 -j DROP`` rule keeps anything from leaving through it;
* kube-proxy (iptables mode) makes Service ClusterIPs work from pods and from the node;
  CoreDNS answers ``cluster.local`` on the bridge address from the API and refuses every
  other name: it forwards nothing, so no query leaves the machine;
* what the node changes on the machine (sysctls set by kube-proxy and the kubelet, the
  kubelet's and kube-proxy's iptables chains, our FORWARD rule) is recorded and undone at
  teardown; ``leftovers`` checks iptables too;
* the ``kubernetes`` Service IP lives on the bridge and is forwarded (socat) to the API
  server on loopback, so in-cluster config works with TLS verified;
* the kubelet's API listens on the bridge address only (anonymous, for ``kubectl logs``:
  a throwaway test node);
* no image is ever pulled: the pause image is built here, everything is under ``localhost/``.

One node per machine (the bridge and its addresses are fixed): ``/run/juturna-operator/
node.json`` records the running one, and a second start says so. Teardown deletes the pods,
stops exactly the processes started, by PID, unmounts what the kubelet and containerd mounted,
removes the bridge, the folders and the empty ``kubepods`` cgroups; ``leftovers`` proves it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import ssl
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from controlplane import Binaries, ControlPlane, ControlPlaneError
from processes import (
    Component,
    Starter,
    log_tail,
    pid_alive,
    processes_mentioning,
    stop_pid,
    stopped_on_failure,
)

BRIDGE = "jtop0"
NODE_IP = "10.244.0.1"  # the bridge's address, and the node's name
POD_SUBNET = "10.244.0.0/24"
SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service: first address of the plane's service range
SERVICE_RANGE = "10.0.0.0/24"  # the plane's --service-cluster-ip-range
CLUSTER_DOMAIN = "cluster.local"
RULE_COMMENT = "juturna-operator node: nothing leaves through the pod bridge"
# Machine-wide values the kubelet (kernel.*, vm.*) and kube-proxy (route_localnet,
# conntrack) may set: recorded before the node starts, put back at teardown.
SYSCTLS = (
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "net/ipv4/conf/all/route_localnet",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "net/netfilter/nf_conntrack_udp_timeout",
    "net/netfilter/nf_conntrack_udp_timeout_stream",
)
IPTABLES_TABLES = ("filter", "nat", "mangle")
KUBELET_PORT = 10250
PAUSE_IMAGE = "localhost/juturna-operator-pause:1"
MACHINE_RECORD = Path("/run/juturna-operator/node.json")
CNI_BIN = Path("/usr/lib/cni")
# podman as it works on these machines (../shared/PLATFORM.md): crun fails on hybrid cgroups.
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
# Folders outside the node's own that the kubelet or CNI may create; removed only if we did.
SYSTEM_FOLDERS = (Path("/var/lib/kubelet"), Path("/var/lib/cni"))
NETNS_DIR = Path("/var/run/netns")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NODE_READY_TIMEOUT_S = float(os.environ.get("JUTURNA_OPERATOR_NODE_TIMEOUT", "120"))
POD_DELETE_TIMEOUT_S = 60.0

PAUSE_C = r"""
/* The pod sandbox's one process: sleep until told to stop; reap nothing (no children). */
#include <signal.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    for (;;) pause();
}
"""


class NodeError(ControlPlaneError):
    """A node problem, phrased as cause and fix for a person to read."""


class NodeUnavailable(NodeError):
    """This machine cannot run a node (not root, not Linux, a package missing): skip, say why."""


def cache_dir() -> Path:
    return Path(os.environ.get("JUTURNA_OPERATOR_CACHE", Path.home() / ".cache/juturna-operator"))


def missing_prerequisites() -> list[str]:
    """What this machine lacks for a node, each with the fix; empty when it can run one."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the node needs root (bridge, mounts, cgroups)")
    for tool in ("containerd", "ctr", "runc", "socat", "ip", "gcc", "iptables"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (hack/install-packages.sh installs it)")
    for plugin in ("bridge", "host-local", "loopback"):
        if not (CNI_BIN / plugin).exists():
            problems.append(
                f"CNI plugin {CNI_BIN / plugin} is missing (containernetworking-plugins)"
            )
    return problems


def node_record() -> dict[str, object] | None:
    """The machine's record of its node (``stop_node`` reads it), alive or not."""
    try:
        return dict(json.loads(MACHINE_RECORD.read_text()))
    except (FileNotFoundError, ValueError):
        return None


def running_node() -> dict[str, object] | None:
    """The record of the node that runs on this machine now, if one does."""
    record = node_record()
    pids = record.get("pids", {}) if record else {}
    if isinstance(pids, dict) and any(pid_alive(int(p)) for p in pids.values()):
        return record
    return None


def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A command whose failure is a NodeError naming it (unless ``check`` is off)."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NodeError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


# --- the pause image ----------------------------------------------------------------------


def pause_image_tarball() -> Path:
    """A one-layer OCI image of a static pause binary, built with gcc; cached by its source."""
    digest = hashlib.sha256(PAUSE_C.encode()).hexdigest()[:12]
    out = cache_dir() / f"pause-{digest}.oci.tar"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f"pause-{digest}.build"
    work.mkdir(exist_ok=True)
    (work / "pause.c").write_text(PAUSE_C)
    run("gcc", "-static", "-Os", "-o", str(work / "pause"), str(work / "pause.c"))
    run("strip", str(work / "pause"), check=False)
    layer = _layer_with(work / "pause", "pause")
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "annotations": {"io.containerd.image.name": PAUSE_IMAGE},
                }
            ],
        }
    ).encode()
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": index,
        f"blobs/sha256/{layer_digest[7:]}": layer,
        f"blobs/sha256/{config_digest[7:]}": config,
        f"blobs/sha256/{manifest_digest[7:]}": manifest,
    }
    part = out.with_suffix(".part")
    with tarfile.open(part, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    part.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _layer_with(binary: Path, name: str) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tar.gettarinfo(str(binary), arcname=name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755
        with open(binary, "rb") as f:
            tar.addfile(info, f)
    return gzip.compress(raw.getvalue(), mtime=0)


# --- the node -----------------------------------------------------------------------------


@dataclass
class Node(Starter):
    """containerd + kubelet + kube-scheduler (+ socat for the API's Service IP) on ``plane``."""

    plane: ControlPlane
    binaries: Binaries
    components: list[Component] = field(default_factory=list)
    ready_timeout_s: float = NODE_READY_TIMEOUT_S
    created: list[Path] = field(default_factory=list)  # system folders this node created
    sysctls: dict[str, str] = field(default_factory=dict)  # machine values before the node

    @property
    def root(self) -> Path:
        return self.plane.root / "node"

    @property
    def socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def containerd_root(self) -> Path:
        """The image store: in the cache, so imported images outlive a node."""
        return cache_dir() / "containerd"

    @property
    def name(self) -> str:
        return NODE_IP

    @property
    def logs(self) -> Path:
        return self.plane.logs

    @property
    def log_folder(self) -> Path:
        return self.plane.logs

    @property
    def tied(self) -> bool:
        return self.plane.die_with_parent

    # -- start --

    def start(self) -> Node:
        """Start the node and wait until it is Ready; on failure, undo what was done."""
        problems = missing_prerequisites()
        if problems:
            raise NodeUnavailable("this machine cannot run a node: " + "; ".join(problems))
        other = running_node()
        if other is not None:
            raise NodeError(
                f"a local node already runs on this machine (state in {other.get('root')}, "
                f"PIDs {other.get('pids')}). Only one node per machine: its bridge {BRIDGE} and "
                f"addresses {NODE_IP}, {SERVICE_IP} are fixed. Stop it first (`make "
                "cluster-down` in the clone that started it, or end the test run that did)."
            )
        self._clear_stale()
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.plane.kubeconfig, self.kubeconfig)
        self.created = [p for p in SYSTEM_FOLDERS if not p.exists()]
        self.sysctls = read_sysctls()
        with stopped_on_failure(self.stop):
            self._network()
            self._start_containerd()
            self.import_image(pause_image_tarball())
            self._start_api_forward()
            self._start_kubelet()
            self._start_scheduler()
            self._start_proxy()
            self._start_dns()
            self._wait_ready()
        self._record()
        return self

    def _clear_stale(self) -> None:
        """A node whose processes died without teardown (a killed test run) left its bridge,
        shims and mounts: finish that teardown first."""
        stale = node_record()
        if stale is not None:
            stop_node(stale)
        elif _link_exists(BRIDGE):
            run("ip", "link", "delete", BRIDGE, check=False)
            remove_iptables(None)

    def _network(self) -> None:
        if IP_FORWARD.read_text().strip() != "0":
            # Not ours to change back; but pods could then reach beyond the node. Say so.
            raise NodeError(
                "net.ipv4.ip_forward is 1 on this machine: pods could reach other networks. "
                "The local node needs it 0 (sysctl -w net.ipv4.ip_forward=0)."
            )
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        run("ip", "addr", "add", f"{SERVICE_IP}/32", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        # The node's own ClusterIP traffic: routed to the bridge, where kube-proxy's DNAT
        # rewrites it (a blackhole would fail the route lookup before the DNAT).
        run("ip", "route", "replace", SERVICE_RANGE, "dev", BRIDGE)
        # A pod's ClusterIP packet is DNATed to another pod and forwarded back out of the
        # bridge: forwarding on this interface only (it goes with the bridge); nothing that
        # comes in from it may leave by another.
        Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/forwarding").write_text("1\n")
        run("iptables", "-I", "FORWARD", *_forward_rule())
        conf = self.root / "cni" / "net.d"
        conf.mkdir(parents=True, exist_ok=True)
        plugins = [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                # Not a gateway: the plugin would switch ip_forward on. Routes only to the
                # pod subnet (on-link) and to the API server's Service address.
                "isGateway": False,
                "isDefaultGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "rangeStart": "10.244.0.10"}]],
                    "routes": [{"dst": SERVICE_RANGE, "gw": NODE_IP}],
                    "dataDir": str(self.root / "cni" / "ipam"),
                },
            }
        ]
        (conf / "10-juturna-operator.conflist").write_text(
            json.dumps({"cniVersion": "0.4.0", "name": "juturna-operator", "plugins": plugins})
        )

    def _failure(self, comp: Component, what: str, exited: bool) -> NodeError:
        tail = log_tail(comp.log)
        if exited:
            return NodeError(
                f"{comp.name} exited with code {comp.returncode}"
                f" before {what}. Last lines of its log ({comp.log}):\n{tail}"
            )
        return NodeError(
            f"{comp.name}: no {what} within {self.ready_timeout_s:.0f} s. Last lines "
            f"of its log ({comp.log}):\n{tail}\nOn a slow machine raise "
            "JUTURNA_OPERATOR_NODE_TIMEOUT (seconds)."
        )

    def ctr(self, *args: str, check: bool = True, timeout: float = 60):
        """``ctr`` on this node's containerd, in the Kubernetes namespace."""
        return ctr(self.socket, *args, check=check, timeout=timeout)

    @property
    def kubeconfig(self) -> Path:
        """The plane's admin kubeconfig, copied into the node's folder: every process of the
        node then names that folder on its command line, which is how teardown finds them."""
        return self.root / "kubeconfig"

    def _start_containerd(self) -> None:
        base = self.root / "containerd"
        base.mkdir(parents=True, exist_ok=True)
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{self.containerd_root}"
state = "{base / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{base / "ttrpc.sock"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"
{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails to start.
  restrict_oom_score_adj = true
  enable_selinux = false
{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{self.root / "cni" / "net.d"}"
"""
        (base / "config.toml").write_text(config)
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        comp = self._launch("containerd", ["containerd", "--config", str(base / "config.toml")])
        self._wait(
            comp,
            lambda: self.socket.exists() and self.ctr("version", check=False).returncode == 0,
            f"answer on {self.socket}",
        )
        if self.ctr("containers", "list", "--quiet").stdout.strip():
            # A killed earlier run left containers in the shared store: remove them, then
            # start containerd again so that its CRI plugin forgets their sandboxes.
            remove_containers(self.socket)
            self.components.remove(comp)
            stop_pid(comp.pid, str(self.root))
            self._start_containerd()

    def import_image(self, tarball: Path) -> None:
        """Load an image archive (OCI or docker) into containerd: no registry involved."""
        self.ctr("images", "import", "--all-platforms", str(tarball), timeout=600)

    def load_podman_image(self, image: str, podman: list[str]) -> bool:
        """Copy ``image`` from podman's store into this node's; see ``load_podman_image``."""
        return load_podman_image(self.socket, image, podman)

    def _start_api_forward(self) -> None:
        port = self.plane.server.rsplit(":", 1)[1]
        self._launch(
            "api-forward",
            [
                "socat",
                "-lf",  # its log path names the node's folder, as every process of ours does
                str(self.root / "api-forward.log"),
                f"TCP-LISTEN:443,bind={SERVICE_IP},fork,reuseaddr",
                f"TCP:127.0.0.1:{port}",
            ],
        )

    def _start_kubelet(self) -> None:
        kubelet_dir = self.root / "kubelet"
        kubelet_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,  # cgroups here are v1 (hybrid)
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "shutdownGracePeriod": "0s",
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            # No image garbage collection: the machine's disk is shared, and at 85 % used the
            # kubelet removed the pause image and the operator's image mid-session (every
            # later pod then failed: "no pod sandbox exists"). 100 turns it off.
            "imageGCHighThresholdPercent": 100,
            # emptyDir usage measured every 5 s (default 1 min): an emptyDir's sizeLimit
            # eviction then comes within seconds, in test time.
            "volumeStatsAggPeriod": "5s",
            "imageGCLowThresholdPercent": 99,
            "resolvConf": str(self.root / "resolv.conf"),
            "clusterDNS": [NODE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "podLogsDir": str(self.root / "pod-logs"),
            "authentication": {
                "anonymous": {"enabled": True},
                "webhook": {"enabled": False},
                "x509": {},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "serializeImagePulls": False,
        }
        (self.root / "kubelet.yaml").write_text(json.dumps(config, indent=1))
        self._launch(
            "kubelet",
            [
                str(self.binaries.kube / "kubelet"),
                f"--config={self.root / 'kubelet.yaml'}",
                f"--kubeconfig={self.kubeconfig}",
                f"--root-dir={kubelet_dir}",
                f"--hostname-override={NODE_IP}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )

    def _start_scheduler(self) -> None:
        self._launch(
            "kube-scheduler",
            [
                str(self.binaries.kube / "kube-scheduler"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                "--v=1",
            ],
        )

    def _start_proxy(self) -> None:
        """kube-proxy in iptables mode; it changes no machine-wide value it can leave alone
        (conntrack sizes and timeouts 0, no localhost node ports: no route_localnet)."""
        self._launch(
            "kube-proxy",
            [
                str(self.binaries.kube / "kube-proxy"),
                f"--kubeconfig={self.kubeconfig}",
                f"--hostname-override={NODE_IP}",
                f"--cluster-cidr={POD_SUBNET}",
                "--proxy-mode=iptables",
                "--metrics-bind-address=127.0.0.1:10249",
                "--healthz-bind-address=127.0.0.1:10256",
                "--conntrack-max-per-core=0",
                "--conntrack-min=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--conntrack-udp-timeout=0",
                "--conntrack-udp-timeout-stream=0",
                "--iptables-localhost-nodeports=false",
                "--v=1",
            ],
        )

    def _start_dns(self) -> None:
        """CoreDNS on the bridge address: ``cluster.local`` from the API, every other name
        REFUSED. It has no ``forward``: no query leaves the machine."""
        corefile = self.root / "Corefile"
        corefile.write_text(
            f"""{CLUSTER_DOMAIN}:53 {{
    bind {NODE_IP}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {self.kubeconfig}
        pods insecure
    }}
}}
.:53 {{
    bind {NODE_IP}
    template ANY ANY {{
        rcode REFUSED
    }}
}}
"""
        )
        comp = self._launch(
            "coredns", [str(self.binaries.coredns / "coredns"), "-conf", str(corefile)]
        )
        self._wait(comp, lambda: "CoreDNS-" in comp.log.read_text(errors="replace"), "start")

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60):
        """The node's own kubectl (the plane's version) with the admin kubeconfig."""
        return run(
            str(self.binaries.kube / "kubectl"),
            f"--kubeconfig={self.kubeconfig}",
            *args,
            check=check,
            timeout=timeout,
        )

    def ready(self) -> bool:
        """The node reports Ready to the API server."""
        proc = self.kubectl(
            "get",
            "node",
            self.name,
            "-o",
            'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
            check=False,
        )
        return proc.stdout.strip() == "True"

    def _wait_ready(self) -> None:
        kubelet = next(c for c in self.components if c.name == "kubelet")
        self._wait(kubelet, self.ready, f"node {self.name} Ready")

    def state(self) -> dict[str, object]:
        """What ``stop_node`` needs, also from another process (``make cluster-down``)."""
        return {
            "root": str(self.root),
            "socket": str(self.socket),
            "kubeconfig": str(self.kubeconfig),
            "kubectl": str(self.binaries.kube / "kubectl"),
            "created": [str(p) for p in self.created],
            "sysctls": self.sysctls,
            "kube_proxy": str(self.binaries.kube / "kube-proxy"),
            "pids": {c.name: c.pid for c in self.components},
        }

    def _record(self) -> None:
        MACHINE_RECORD.parent.mkdir(parents=True, exist_ok=True)
        MACHINE_RECORD.write_text(json.dumps(self.state(), indent=1))

    # -- faults: a component killed and started again (tests/integration/test_pod_faults.py) --

    def restart_kubelet(self, down_s: float = 0.0) -> float:
        """Kill the kubelet (SIGKILL, as a crash would), leave it dead ``down_s`` seconds, and
        start it again with the same arguments; return once its API answers, with the seconds
        it was away. Its pods run on meanwhile: containerd and the shims keep them."""
        return self._restart("kubelet", down_s, self._kubelet_answers, f"/healthz on {NODE_IP}")

    def restart_containerd(self, down_s: float = 0.0) -> float:
        """Kill containerd (SIGKILL), leave it dead ``down_s`` seconds, and start it again with
        the same config; return once it answers on its socket, with the seconds it was away.
        Its shims outlive it, and so may the containers under them; the state folder and the
        image store are kept."""
        return self._restart(
            "containerd",
            down_s,
            lambda: self.ctr("version", check=False).returncode == 0,
            f"answer on {self.socket}",
        )

    def _restart(self, name: str, down_s: float, ready: Callable[[], bool], what: str) -> float:
        comp = next(c for c in self.components if c.name == name)
        assert comp.popen is not None
        began = time.monotonic()
        comp.popen.kill()  # our child, not yet reaped: its PID cannot have been reused
        comp.popen.wait(timeout=30)
        time.sleep(down_s)
        comp.start(tied=self.tied)
        self._record()  # the new PID, for `make cluster-down` and a later run's cleanup
        self._wait(comp, ready, what)
        return time.monotonic() - began

    def _kubelet_answers(self) -> bool:
        """The kubelet's API answers ``/healthz`` (anonymous: a throwaway node; its serving
        certificate is self-signed)."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        url = f"https://{NODE_IP}:{KUBELET_PORT}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as answer:
                return bool(answer.read() == b"ok")
        except OSError:
            return False

    # -- stop --

    def stop(self) -> None:
        """Delete the pods, stop what was started (by PID), undo mounts, bridge and folders."""
        stop_node(self.state())
        for comp in self.components:  # reap our children
            if comp.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    comp.popen.wait(timeout=5)
        self.components.clear()

    def leftovers(self) -> list[str]:
        """What still exists of this node after ``stop``; empty when teardown was complete:
        machine-wide values not back to what they were before the node included."""
        changed = [
            f"sysctl {name} is {now}, was {self.sysctls[name]}"
            for name, now in read_sysctls().items()
            if name in self.sysctls and now != self.sysctls[name]
        ]
        return leftovers(self.root, self.socket) + changed


# --- teardown, also for `make cluster-down` from the machine record --------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return "(gone)"


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _mounts_under(prefixes: list[str]) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
            found.append(point)
    return found


def _cni_netns() -> list[Path]:
    """Network namespaces the CRI plugin made for sandboxes (named cni-<uuid>)."""
    return sorted(NETNS_DIR.glob("cni-*")) if NETNS_DIR.exists() else []


def _kubepods_cgroups() -> list[Path]:
    return sorted(p for p in CGROUP_ROOT.glob("*/kubepods") if p.is_dir())


def _remove_kubepods_cgroups() -> None:
    for top in _kubepods_cgroups():
        # Deepest first: a cgroup folder goes only once it is empty (rmdir, not rm).
        for folder in sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def read_sysctls() -> dict[str, str]:
    """The machine's values of ``SYSCTLS`` (those this kernel has)."""
    values = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = Path("/proc/sys", name).read_text().strip()
    return values


def restore_sysctls(values: dict[str, str]) -> list[str]:
    """Put back what the node changed; returns the names that could not be."""
    failed = []
    for name, value in values.items():
        path = Path("/proc/sys", name)
        try:
            if path.read_text().strip() != value:
                path.write_text(value + "\n")
        except OSError:
            failed.append(name)
    return failed


def _forward_rule() -> list[str]:
    return [
        "-i",
        BRIDGE,
        "!",
        "-o",
        BRIDGE,
        "-m",
        "comment",
        "--comment",
        RULE_COMMENT,
        "-j",
        "DROP",
    ]


def node_iptables_lines() -> list[str]:
    """The rules and chains of the node still on the machine: KUBE-* (kubelet, kube-proxy)
    and our FORWARD rule, in iptables and ip6tables."""
    found = []
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        for table in IPTABLES_TABLES:
            listed = run(tool, "-t", table, "-S", check=False).stdout.splitlines()
            found += [
                f"{tool} -t {table} {line}"
                for line in listed
                if "KUBE-" in line or RULE_COMMENT in line
            ]
    return found


def remove_iptables(kube_proxy: str | None) -> None:
    """kube-proxy's own cleanup, then every rule that jumps to a KUBE-* chain, every KUBE-*
    chain (the kubelet's KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT, ...), and
    our FORWARD rule."""
    if kube_proxy and Path(kube_proxy).exists():
        run(kube_proxy, "--cleanup", check=False, timeout=60)
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        for table in IPTABLES_TABLES:
            listed = run(tool, "-t", table, "-S", check=False).stdout.splitlines()
            for line in listed:
                # Rules of built-in chains that name ours (-A INPUT ... -j KUBE-FIREWALL).
                if (
                    line.startswith("-A ")
                    and not line.split()[1].startswith("KUBE-")
                    and ("KUBE-" in line or RULE_COMMENT in line)
                ):
                    run(tool, "-t", table, *shlex.split(line.replace("-A", "-D", 1)), check=False)
            chains = [ln.split()[1] for ln in listed if ln.startswith("-N KUBE-")]
            for chain in chains:
                run(tool, "-t", table, "-F", chain, check=False)
            for chain in chains:
                run(tool, "-t", table, "-X", chain, check=False)


def teardown(root: Path, socket: Path, created: list[str]) -> None:
    """Everything after the processes: shims, mounts, netns, bridge, folders, cgroups, record."""
    # What our processes started and left: containerd's shims (they name its socket) and
    # socat's forks, one per connection still open (they name the node's folder).
    for pid in processes_mentioning(str(root)):
        stop_pid(pid, str(root), grace_s=2)
    for point in reversed(_mounts_under([str(root), *created])):
        run("umount", "--lazy", point, check=False)
    for ns in _cni_netns():
        run("umount", str(ns), check=False)
        with contextlib.suppress(OSError):
            ns.unlink()
    if _link_exists(BRIDGE):
        run("ip", "link", "delete", BRIDGE, check=False)
    _remove_kubepods_cgroups()
    for folder in [root, *map(Path, created)]:
        shutil.rmtree(folder, ignore_errors=True)
    MACHINE_RECORD.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        MACHINE_RECORD.parent.rmdir()


def leftovers(root: Path, socket: Path) -> list[str]:
    """Processes, mounts, bridge, cgroups and record a stopped node would have left."""
    left = [f"process {pid}: {_cmdline(pid)}" for pid in processes_mentioning(str(root))]
    left += [f"mount {m}" for m in _mounts_under([str(root)])]
    left += [f"netns {n}" for n in _cni_netns()]
    if _link_exists(BRIDGE):
        left.append(f"bridge {BRIDGE}")
    left += [f"cgroup {c}" for c in _kubepods_cgroups()]
    left += [f"iptables: {line}" for line in node_iptables_lines()]
    if MACHINE_RECORD.exists():
        left.append(f"record {MACHINE_RECORD}")
    if root.exists():
        left.append(f"folder {root}")
    return left


def ctr(socket: Path, *args: str, check: bool = True, timeout: float = 60):
    """``ctr`` on the containerd at ``socket``, in the Kubernetes namespace."""
    return run("ctr", "--address", str(socket), "-n", "k8s.io", *args, check=check, timeout=timeout)


# setrlimit is refused above these limits here (../shared/PLATFORM.md).
PODMAN_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
BASE_IMAGE = "localhost/juturna-operator-base:python3.12"


class ImageUnavailable(NodeError):
    """This machine cannot build or run images (a tool missing, containers refused)."""


def build_operator_image(image: str) -> str:
    """The operator's image, built by podman from the Dockerfile on a locally made base (no
    registry is reachable here). ImageUnavailable says why where containers cannot run."""
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            raise ImageUnavailable(
                f"{tool} is not installed (hack/install-packages.sh installs it as root)"
            )
    repo = Path(__file__).resolve().parents[1]
    run(str(repo / "hack" / "make-base-image.sh"), BASE_IMAGE, timeout=600)
    probe = run(
        *PODMAN,
        "run",
        "--rm",
        "--network=host",
        *PODMAN_LIMITS,
        BASE_IMAGE,
        "python3",
        "-c",
        "print(42)",
        check=False,
        timeout=120,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "42":
        raise ImageUnavailable(f"containers cannot run on this machine: {probe.stderr[-800:]}")
    run(
        *PODMAN,
        "build",
        "--network=host",
        *PODMAN_LIMITS,
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "-t",
        image,
        str(repo),
        timeout=900,
    )
    return image


def load_podman_image(socket: Path, image: str, podman: list[str]) -> bool:
    """Copy ``image`` from podman's store into the node's (``podman save | ctr import``),
    unless the node has that very image already (the store outlives the node, and an
    import of the operator's image takes about a minute). True if it was copied."""
    inspect = run(*podman, "image", "inspect", "--format", "{{.Id}}", image)
    label = f"juturna.io/podman-id={inspect.stdout.strip()}"
    if label in ctr(socket, "images", "list", f"name=={image}").stdout:
        return False
    with subprocess.Popen(
        [*podman, "save", "--format", "docker-archive", image],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as save:
        loaded = subprocess.run(
            ["ctr", "--address", str(socket), "-n", "k8s.io", "images", "import", "-"],
            stdin=save.stdout,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        saved_err = save.stderr.read().decode(errors="replace") if save.stderr else ""
    if save.returncode != 0 or loaded.returncode != 0:
        raise NodeError(
            f"copying {image} from podman into the node failed: podman save said "
            f"{saved_err.strip() or 'nothing'}; ctr import said {loaded.stderr.strip()}"
        )
    ctr(socket, "images", "label", image, label)
    return True


def remove_containers(socket: Path) -> None:
    """Kill and remove every container containerd still has (once the kubelet is gone)."""
    listed = ctr(socket, "containers", "list", "--quiet", check=False).stdout.split()
    for cid in listed:
        ctr(socket, "tasks", "kill", "--signal", "SIGKILL", cid, check=False)
    for cid in listed:
        ctr(socket, "tasks", "delete", "--force", cid, check=False)
        ctr(socket, "containers", "delete", cid, check=False)


def delete_pods(kubectl: str, kubeconfig: str, node: str) -> None:
    """Every pod on ``node``, with a short grace period, while its kubelet still runs."""
    base = [kubectl, f"--kubeconfig={kubeconfig}", "--request-timeout=10s"]
    on_node = ["-A", f"--field-selector=spec.nodeName={node}"]
    run(*base, "delete", "pods", *on_node, "--grace-period=2", "--wait=false", check=False)
    deadline = time.monotonic() + POD_DELETE_TIMEOUT_S
    while time.monotonic() < deadline:
        listed = run(*base, "get", "pods", *on_node, "-o", "name", check=False)
        if listed.returncode != 0 or not listed.stdout.strip():
            return
        time.sleep(0.5)


def stop_node(state: dict[str, object]) -> list[str]:
    """Stop a node from its state (this process's, or the machine record's), by PID; returns
    what is left of it (nothing, normally)."""
    root, socket = Path(str(state["root"])), Path(str(state["socket"]))
    pids = {name: int(pid) for name, pid in dict(state["pids"]).items()}  # type: ignore[call-overload]
    if "kubelet" in pids and pid_alive(pids["kubelet"]):
        delete_pods(str(state["kubectl"]), str(state["kubeconfig"]), NODE_IP)
    for name in ("kube-scheduler", "kube-proxy", "coredns", "kubelet", "api-forward"):
        if name in pids:
            stop_pid(pids[name], str(root))
    if "containerd" in pids and pid_alive(pids["containerd"]):
        remove_containers(socket)
        stop_pid(pids["containerd"], str(root))
    teardown(root, socket, [str(p) for p in state.get("created", [])])  # type: ignore[union-attr]
    remove_iptables(str(state.get("kube_proxy") or "") or None)
    left = leftovers(root, socket)
    changed = restore_sysctls(dict(state.get("sysctls") or {}))  # type: ignore[call-overload]
    left += [f"sysctl {name} could not be restored" for name in changed]
    return left
