"""A real, local Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager.

The same idea as controller-runtime's envtest: the binaries are built from source by
``hack/build-binaries.sh`` (no Docker, no kind, no downloads from release URLs), then
started here on free loopback ports with all state in one temporary folder.

Users of this module:

* the session-scoped pytest fixture in ``tests/conftest.py``;
* ``hack/cluster.py``, the command line of ``make cluster-up`` / ``make cluster-down`` and
  ``make run``; it puts the node (``hack/node.py``, which builds on this module) on the plane.

Teardown stops exactly the processes that were started, by PID (``hack/processes.py``), and
removes the folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from processes import (
    Component,
    Starter,
    free_port,
    log_tail,
    processes_mentioning,
    stop_pid,
    stopped_on_failure,
)

HACK_DIR = Path(__file__).resolve().parent
REPO_DIR = HACK_DIR.parent
READY_TIMEOUT_S = float(os.environ.get("JUTURNA_OPERATOR_CLUSTER_TIMEOUT", "90"))
PORT_ATTEMPTS = 3


class ControlPlaneError(RuntimeError):
    """A control-plane problem, phrased as cause and fix for a person to read."""


class PortInUse(ControlPlaneError):
    """A component could not bind its port: somebody took it between our check and its start."""


# --- binaries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Binaries:
    """Folders that hold the pinned, locally built binaries."""

    kube: Path
    etcd: Path
    helm: Path
    coredns: Path

    @property
    def kube_apiserver(self) -> Path:
        return self.kube / "kube-apiserver"

    @property
    def kube_controller_manager(self) -> Path:
        return self.kube / "kube-controller-manager"

    @property
    def etcd_server(self) -> Path:
        return self.etcd / "etcd"

    @property
    def kubectl(self) -> Path:
        """kubectl of the plane's own version: no version-skew warning against it."""
        return self.kube / "kubectl"


def ensure_binaries(quiet: bool = True) -> Binaries:
    """Build the binaries if they are missing (idempotent) and return where they are."""
    env = dict(os.environ, QUIET="1" if quiet else "0")
    proc = subprocess.run(
        ["bash", str(HACK_DIR / "build-binaries.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=None if not quiet else subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ControlPlaneError((proc.stderr or "").strip() or "hack/build-binaries.sh failed")
    dirs = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return Binaries(
        kube=Path(dirs["KUBE_BIN"]),
        etcd=Path(dirs["ETCD_BIN"]),
        helm=Path(dirs["HELM_BIN"]),
        coredns=Path(dirs["COREDNS_BIN"]),
    )


# --- certificates -------------------------------------------------------------------------


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _cert(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def write_certificates(pki: Path) -> None:
    """A CA, the apiserver's serving certificate, an admin client certificate and the SA key."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("juturna-operator-local-ca")
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(pki / "ca.key", ca_key)

    serving_key = _key()
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
    ]
    serving = _cert(
        _name("kube-apiserver"),
        serving_key,
        ca_name,
        ca_key,
        sans=sans,
        usage=[x509.ExtendedKeyUsageOID.SERVER_AUTH],
    )
    (pki / "apiserver.crt").write_bytes(serving.public_bytes(serialization.Encoding.PEM))
    _write_key(pki / "apiserver.key", serving_key)

    admin_key = _key()
    admin = _cert(
        _name("admin", "system:masters"),
        admin_key,
        ca_name,
        ca_key,
        usage=[x509.ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    (pki / "admin.crt").write_bytes(admin.public_bytes(serialization.Encoding.PEM))
    _write_key(pki / "admin.key", admin_key)

    sa_key = _key()
    _write_key(pki / "sa.key", sa_key)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def write_kubeconfig(path: Path, server: str, pki: Path) -> None:
    """An admin kubeconfig with absolute paths, so it works from any folder."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {
                    "client-certificate": str(pki / "admin.crt"),
                    "client-key": str(pki / "admin.key"),
                },
            }
        ],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
        "current-context": "local",
    }
    # JSON is valid YAML, and kubectl and the Python client both read it.
    path.write_text(json.dumps(config, indent=2))


@dataclass
class ControlPlane(Starter):
    """etcd + kube-apiserver + kube-controller-manager, in one temporary folder."""

    binaries: Binaries
    root: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="juturna-operator-cluster-"))
    )
    components: list[Component] = field(default_factory=list)
    server: str = ""
    etcd_url: str = ""
    ready_timeout_s: float = READY_TIMEOUT_S
    die_with_parent: bool = False  # tests: a killed test run takes its plane with it

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def log_folder(self) -> Path:
        return self.logs

    @property
    def tied(self) -> bool:
        return self.die_with_parent

    # -- start --

    def start(self) -> ControlPlane:
        """Start all three and wait until each is ready; on failure, stop what was started."""
        self.logs.mkdir(parents=True, exist_ok=True)
        write_certificates(self.pki)
        with stopped_on_failure(self.stop):
            self._with_fresh_ports(self._start_etcd)
            self._with_fresh_ports(self._start_apiserver)
            self._start_controller_manager()
        self.save_state()
        return self

    def _with_fresh_ports(self, starter: Callable[[], None]) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                starter()
                return
            except PortInUse as err:
                if attempt == PORT_ATTEMPTS:
                    raise ControlPlaneError(
                        f"{err} Tried {PORT_ATTEMPTS} different free ports. Something on this "
                        "machine is grabbing loopback ports quickly; stop it or try again."
                    ) from err

    def _failure(self, comp: Component, what: str, exited: bool) -> ControlPlaneError:
        tail = log_tail(comp.log)
        if not exited:
            return ControlPlaneError(
                f"{comp.name} was not ready ({what}) within {self.ready_timeout_s:.0f} s. "
                f"Last lines of its log ({comp.log}):\n{tail}\n"
                "Fix: look at the log for the cause; on a slow machine raise "
                "JUTURNA_OPERATOR_CLUSTER_TIMEOUT (seconds)."
            )
        self.components.remove(comp)
        if "address already in use" in tail:
            return PortInUse(f"{comp.name} could not bind its port: address already in use.")
        return ControlPlaneError(
            f"{comp.name} exited with code {comp.returncode} "
            f"before it was ready. Last lines of its log ({comp.log}):\n{tail}"
        )

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        data = self.root / "etcd"
        shutil.rmtree(data, ignore_errors=True)
        comp = self._launch(
            "etcd",
            [
                str(self.binaries.etcd_server),
                "--name=default",
                f"--data-dir={data}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        self._wait(comp, self._etcd_ready, f"GET {self.etcd_url}/health")

    def _etcd_ready(self) -> bool:
        return _http_ok(f"{self.etcd_url}/health")

    def _start_apiserver(self) -> None:
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        pki = self.pki
        comp = self._launch(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers={self.etcd_url}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--secure-port={port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",  # a loopback address cannot be published
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                # ServiceAccount admission stays on (the default): pods on the local node get
                # real projected tokens signed with sa.key, so the chart runs unchanged.
                "--allow-privileged=true",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--v=1",
            ],
        )
        write_kubeconfig(self.kubeconfig, self.server, pki)
        self._wait(comp, self._apiserver_ready, f"GET {self.server}/readyz")

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _apiserver_ready(self) -> bool:
        return _http_ok(f"{self.server}/readyz", self._ssl())

    def _start_controller_manager(self) -> None:
        pki = self.pki
        comp = self._launch(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                "--use-service-account-credentials=false",
                "--v=1",
            ],
        )
        # Its own health port is off (--secure-port=0); its work is the readiness signal:
        # the service-account controller creates the `default` ServiceAccount.
        self._wait(
            comp,
            lambda: _http_ok(
                f"{self.server}/api/v1/namespaces/default/serviceaccounts/default", self._ssl()
            ),
            "the default ServiceAccount in namespace default",
        )

    # -- fault injection (tests/integration/test_faults.py) --

    def component(self, name: str) -> Component:
        for comp in self.components:
            if comp.name == name:
                return comp
        raise ControlPlaneError(f"no component {name!r} in this control plane")

    def pause(self, name: str) -> None:
        """Stop one component by PID (SIGTERM, then SIGKILL after 10 s); ``resume`` starts it
        again with the same arguments, so the same port and the same data."""
        comp = self.component(name)
        stop_pid(comp.pid, str(self.root))
        if comp.popen is not None:
            comp.popen.wait(timeout=10)

    def resume(self, name: str) -> None:
        """Start a paused component again and wait until it answers."""
        readiness = {
            "etcd": (self._etcd_ready, "GET /health"),
            "kube-apiserver": (self._apiserver_ready, "GET /readyz"),
        }
        if name not in readiness:
            raise ControlPlaneError(f"resume knows etcd and kube-apiserver, not {name!r}")
        comp = self.component(name)
        comp.start(tied=self.die_with_parent)
        self._wait(comp, *readiness[name])
        self.save_state()

    # -- state shared with `down` --

    def save_state(self) -> None:
        state = {
            "root": str(self.root),
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "pids": {c.name: c.pid for c in self.components},
        }
        (self.root / "state.json").write_text(json.dumps(state, indent=2))

    # -- stop --

    def stop(self) -> None:
        """Stop what this object started, newest first, by PID; then remove the folder."""
        for comp in reversed(self.components):
            stop_pid(comp.pid, str(self.root))
            if comp.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    comp.popen.wait(timeout=5)
        self.components.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """Live processes that still mention this plane's folder (should be none after stop)."""
        return processes_mentioning(str(self.root))


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stop_from_state(root: Path) -> list[int]:
    """Stop a plane started by another process, from its state file. Returns PIDs still alive."""
    state_file = root / "state.json"
    if state_file.exists():
        pids = json.loads(state_file.read_text())["pids"]
        for pid in reversed(list(pids.values())):
            stop_pid(int(pid), str(root))
    left = processes_mentioning(str(root))
    if not left:
        shutil.rmtree(root, ignore_errors=True)
    return left
