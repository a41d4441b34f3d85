"""A real Argo CD against the local control plane, out of cluster: Redis, the repo server and
the application controller (no API server, no UI, no Dex: Applications are written with kubectl).

Argo CD is built from source by ``hack/build-argocd.sh`` (the version pinned in
``hack/versions.env``) and cached beside the plane's binaries. Here it runs as it would in its
namespace ``argocd``, with the in-cluster destination (``https://kubernetes.default.svc``) faked
onto the plane's kubeconfig (``ARGOCD_FAKE_IN_CLUSTER``). Everything it writes lives in one
temporary folder; the processes are stopped by PID and ``leftovers`` proves nothing is left.

Users: ``tests/integration/test_gitops.py``; ``make argocd`` (``python hack/argocd.py build``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from processes import (
    Component,
    Starter,
    free_port,
    log_tail,
    pid_alive,
    processes_mentioning,
    stop_popen,
    stopped_on_failure,
)
from processes import rss_kib as _rss_kib

HACK_DIR = Path(__file__).resolve().parent
NAMESPACE = "argocd"
IN_CLUSTER = "https://kubernetes.default.svc"
READY_TIMEOUT_S = float(os.environ.get("JUTURNA_OPERATOR_ARGOCD_TIMEOUT", "120"))
FIELD_MANAGER = "juturna-operator-tests"


class ArgoCDUnavailable(RuntimeError):
    """Argo CD cannot run on this machine (no Go, no Go module proxy, no redis-server): the
    GitOps test skips with this message."""


class ArgoCDError(RuntimeError):
    """Argo CD failed to build or start; the message names the cause and ends with its log."""


@dataclass(frozen=True)
class ArgoCDBuild:
    """The cached build: the binary, the wrapper scripts beside it, the manifests it needs."""

    folder: Path

    @property
    def binary(self) -> Path:
        return self.folder / "argocd"

    @property
    def crds(self) -> Path:
        return self.folder / "manifests" / "crds"

    @property
    def config(self) -> Path:
        return self.folder / "manifests" / "config"


def ensure_argocd(quiet: bool = True) -> ArgoCDBuild:
    """Build Argo CD if it is missing (idempotent) and say where it is."""
    proc = subprocess.run(
        ["bash", str(HACK_DIR / "build-argocd.sh")],
        env=dict(os.environ, QUIET="1" if quiet else "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if quiet else None,
        text=True,
        check=False,
    )
    message = (proc.stderr or "").strip()
    if proc.returncode == 3:
        raise ArgoCDUnavailable(message or "Argo CD cannot be built here (the reason is above)")
    if proc.returncode != 0:
        raise ArgoCDError(message or "hack/build-argocd.sh failed")
    dirs = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return ArgoCDBuild(Path(dirs["ARGOCD_BIN"]))


def redis_server() -> str:
    """Debian's redis-server, Argo CD's cache (hack/install-packages.sh installs it)."""
    found = shutil.which("redis-server")
    if found is None:
        raise ArgoCDUnavailable(
            "no redis-server on PATH: Argo CD keeps its cache in Redis "
            "(Debian: apt-get install redis-server, which `make packages` does as root)"
        )
    return found


def rss_mib(pid: int) -> float:
    return _rss_kib(pid) / 1024


@dataclass
class ArgoCD(Starter):
    """Redis, argocd-repo-server and argocd-application-controller against one kubeconfig.

    ``argocd_cm`` is added to the stock ``argocd-cm`` (a health check, say); ``kubectl`` is the
    binary used to write Argo CD's objects (its CRDs, ConfigMaps, Secret, the default
    AppProject). ``tools``: folders put on the components' PATH, for the programs the repo
    server runs to render manifests (helm, for a Helm chart). ``tied``: the processes die with
    this one (tests)."""

    build: ArgoCDBuild
    kubeconfig: Path
    kubectl: Path
    argocd_cm: dict[str, str] = field(default_factory=dict)
    tools: tuple[Path, ...] = ()
    reconciliation_timeout: str = "10s"
    tied: bool = True
    root: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="juturna-operator-argocd-"))
    )
    components: list[Component] = field(default_factory=list)
    redis_port: int = 0
    repo_port: int = 0
    repo_metrics_port: int = 0
    controller_metrics_port: int = 0
    ready_timeout_s: float = READY_TIMEOUT_S

    @property
    def log_folder(self) -> Path:
        return self.root / "logs"

    # -- start --

    def start(self) -> ArgoCD:
        """Write Argo CD's objects, start the three and wait until each answers; on failure,
        stop what was started."""
        with stopped_on_failure(self.stop):
            self._prepare_folders()
            self.install_objects()
            self._start_redis()
            self._start_repo_server()
            self._start_controller()
        return self

    def _prepare_folders(self) -> None:
        for sub in ("logs", "bin", "tmp", "home", "tls", "ssh", "gpg/keys", "gpg/source"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "gpg" / "keys").chmod(0o700)  # gpg refuses a home others can read
        # One binary, the component picked by its name: a link in our folder also puts the
        # folder in each command line, so a leftover is found by it (processes_mentioning).
        for name in ("argocd-repo-server", "argocd-application-controller"):
            link = self.root / "bin" / name
            if not link.exists():
                link.symlink_to(self.build.binary)

    def _kubectl(self, *args: str, input: str | None = None) -> str:
        proc = subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise ArgoCDError(f"kubectl {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")
        return proc.stdout

    def install_objects(self) -> None:
        """What Argo CD's install manifest would give the two components: the namespace, the
        Application and AppProject CRDs, the stock ConfigMaps and Secret, and the ``default``
        AppProject (argocd-server would create that one; it is not run)."""
        # Server-side: the CRDs are too big for kubectl's last-applied annotation.
        self._kubectl(
            "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", str(self.build.crds)
        )
        # A CRD just created has no conditions yet, which `kubectl wait` reports as an error.
        deadline = time.monotonic() + 60
        while True:
            try:
                self._kubectl(
                    "wait",
                    "--for=condition=Established",
                    "crd/applications.argoproj.io",
                    "crd/appprojects.argoproj.io",
                    "--timeout=10s",
                )
                break
            except ArgoCDError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        items: list[dict[str, object]] = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        ]
        for path in sorted(self.build.config.glob("*.yaml")):
            obj = yaml.safe_load(path.read_text())
            obj["metadata"]["namespace"] = NAMESPACE
            if obj["metadata"]["name"] == "argocd-cm":
                obj["data"] = {**(obj.get("data") or {}), **self.argocd_cm}
            if obj["metadata"]["name"] == "argocd-secret":
                # The controller's settings refuse to load without a server secret key.
                key = base64.b64encode(secrets.token_bytes(32)).decode()
                obj["data"] = {"server.secretkey": base64.b64encode(key.encode()).decode()}
            items.append(obj)
        items.append(
            {
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "AppProject",
                "metadata": {"name": "default", "namespace": NAMESPACE},
                "spec": {
                    "sourceRepos": ["*"],
                    "destinations": [{"server": "*", "namespace": "*"}],
                    "clusterResourceWhitelist": [{"group": "*", "kind": "*"}],
                },
            }
        )
        self._kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",  # a second start in the same plane takes its fields back
            f"--field-manager={FIELD_MANAGER}",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )

    def _env(self, component: str) -> dict[str, str]:
        """The environment both Argo CD components run with: state in our folder, not /app."""
        root = self.root
        return {
            **os.environ,
            "ARGOCD_BINARY_NAME": component,
            "KUBECONFIG": str(self.kubeconfig),
            "ARGOCD_FAKE_IN_CLUSTER": "true",  # in-cluster destination = KUBECONFIG's cluster
            # Argo CD's image has git-verify-wrapper.sh, gpg-wrapper.sh and helm on PATH.
            "PATH": os.pathsep.join(
                [str(self.build.folder), *map(str, self.tools), os.environ.get("PATH", "")]
            ),
            "TMPDIR": str(root / "tmp"),  # the repo server's clones
            "HOME": str(root / "home"),  # no user git config leaks in
            "GIT_CONFIG_NOSYSTEM": "1",
            "ARGOCD_GPG_ENABLED": "false",
            "ARGOCD_TLS_DATA_PATH": str(root / "tls"),
            "ARGOCD_SSH_DATA_PATH": str(root / "ssh"),
            "ARGOCD_GNUPGHOME": str(root / "gpg" / "keys"),
            "ARGOCD_GPG_DATA_PATH": str(root / "gpg" / "source"),
            "ARGOCD_ASK_PASS_SOCK": str(root / "askpass.sock"),  # default: a fixed /tmp path
            "ARGOCD_PLUGINSOCKFILEPATH": str(root / "plugins"),
            "ARGOCD_APP_CONF_PATH": str(root / "config"),
            "ARGOCD_RECONCILIATION_TIMEOUT": self.reconciliation_timeout,
            # Its default adds up to 60 s at random to each periodic reconciliation.
            "ARGOCD_RECONCILIATION_JITTER": "0s",
        }

    def _failure(self, proc: Component, what: str, exited: bool) -> ArgoCDError:
        if exited:
            return ArgoCDError(
                f"{proc.name} exited with code {proc.returncode}"
                f" before it was ready. Last lines of its log ({proc.log}):\n"
                f"{log_tail(proc.log)}"
            )
        return ArgoCDError(
            f"{proc.name} was not ready ({what}) within {self.ready_timeout_s:.0f} s. Last lines"
            f" of its log ({proc.log}):\n{log_tail(proc.log)}\nOn a slow machine raise "
            "JUTURNA_OPERATOR_ARGOCD_TIMEOUT (seconds)."
        )

    def _start_redis(self) -> None:
        self.redis_port = free_port()
        folder = self.root / "redis"
        folder.mkdir(exist_ok=True)
        conf = folder / "redis.conf"
        # A cache: no persistence. Redis rewrites its process title by default, which would hide
        # our folder from its command line (and from leftovers); set-proc-title no keeps it.
        conf.write_text(
            f'port {self.redis_port}\nbind 127.0.0.1\nsave ""\nappendonly no\n'
            f"dir {folder}\nset-proc-title no\ndaemonize no\n"
        )
        proc = self._launch("redis", [redis_server(), str(conf)], dict(os.environ))
        self._wait(proc, self._redis_ready, f"PING on 127.0.0.1:{self.redis_port}")

    def _redis_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _start_repo_server(self) -> None:
        self.repo_port, self.repo_metrics_port = free_port(), free_port()
        proc = self._launch(
            "argocd-repo-server",
            [
                str(self.root / "bin" / "argocd-repo-server"),
                "--address=127.0.0.1",
                f"--port={self.repo_port}",
                "--metrics-address=127.0.0.1",
                f"--metrics-port={self.repo_metrics_port}",
                f"--redis=127.0.0.1:{self.redis_port}",
                "--disable-tls",  # loopback only; the controller connects in plaintext
                # v3.6.1 refuses --disable-tls beside its own default client CA path.
                "--client-ca-path=",
                "--logformat=text",
                "--loglevel=info",
            ],
            self._env("argocd-repo-server"),
        )
        # full=true: the server answers its own gRPC health check, not just HTTP.
        url = f"http://127.0.0.1:{self.repo_metrics_port}/healthz?full=true"
        self._wait(proc, lambda: _http_ok(url), f"GET {url}")

    def _start_controller(self) -> None:
        self.controller_metrics_port = free_port()
        proc = self._launch(
            "argocd-application-controller",
            [
                str(self.root / "bin" / "argocd-application-controller"),
                f"--namespace={NAMESPACE}",
                f"--redis=127.0.0.1:{self.redis_port}",
                f"--repo-server=127.0.0.1:{self.repo_port}",
                "--repo-server-plaintext",
                f"--metrics-port={self.controller_metrics_port}",
                # v3 defaults to false, and then the Lua health message is not in the status.
                "--persist-resource-health=true",
                "--logformat=text",
                "--loglevel=info",
            ],
            self._env("argocd-application-controller"),
        )
        url = f"http://127.0.0.1:{self.controller_metrics_port}/healthz"
        self._wait(proc, lambda: _http_ok(url), f"GET {url}")

    # -- observe --

    def metrics(self) -> str:
        """The application controller's Prometheus metrics, as text."""
        url = f"http://127.0.0.1:{self.controller_metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())

    def memory_mib(self) -> dict[str, float]:
        """Resident memory of each running process, in MiB."""
        return {p.name: rss_mib(p.pid) for p in self.components if not p.exited()}

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    # -- stop --

    def stop(self, remove: bool = True) -> None:
        """Stop what this object started, newest first, by PID; then remove its folder."""
        for proc in reversed(self.components):
            if proc.popen is not None:
                stop_popen(proc.popen, grace_s=10)
        self.components.clear()
        # git and ssh children of the repo server name our folder in their command lines.
        for pid in processes_mentioning(str(self.root)):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """Live processes that still mention this Argo CD's folder (none after ``stop``)."""
        return processes_mentioning(str(self.root))


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


# --- CLI ----------------------------------------------------------------------------------


def _cmd_build(_: argparse.Namespace) -> int:
    """``make argocd``: where Argo CD cannot be built, say why and succeed (the test skips)."""
    try:
        build = ensure_argocd(quiet=False)
    except ArgoCDUnavailable as err:
        print(f"note: {err}; the GitOps test will skip", file=sys.stderr)
        return 0
    except ArgoCDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"ARGOCD_BIN={build.folder}")
    try:
        redis_server()
    except ArgoCDUnavailable as err:
        print(f"note: {err}; the GitOps test will skip", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build or reuse Argo CD (hack/build-argocd.sh); print its folder")
    args = parser.parse_args(argv)
    return {"build": _cmd_build}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
