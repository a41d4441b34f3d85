"""Test helpers: kubectl bound to the test plane, the operator process, Pipeline waits."""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import lupa.lua51
import pytest
import yaml
from controlplane import Binaries, ControlPlane, ensure_binaries
from kubernetes import client
from node import PODMAN, PODMAN_LIMITS, ImageUnavailable, build_operator_image
from operator_process import OperatorProcess
from processes import (
    cpu_seconds,
    exit_with_parent,
    free_port,
    pid_alive,
    processes_mentioning,
    stop_popen,
)
from prometheus_client.parser import text_string_to_metric_families

from juturna_operator.api import GROUP, PLURAL, VERSION
from juturna_operator.registry import ENGINES as ENGINE_REGISTRY

LIMITS = PODMAN_LIMITS


@functools.cache
def binaries() -> Binaries:
    """The pinned binaries, built or found once per test session."""
    return ensure_binaries()


class Kubectl:
    """`kubectl` (the plane's own version) bound to the test plane's kubeconfig."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def command(self, *args: str) -> list[str]:
        """The kubectl command line of ``args``, for a process a test follows (``logs -f``)."""
        return [str(binaries().kubectl), f"--kubeconfig={self.kubeconfig}", *args]

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.command(*args),
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
            )
        return proc


REPO = Path(__file__).resolve().parents[1]
EXAMPLE = yaml.safe_load((REPO / "examples" / "pipeline.yaml").read_text())
ARGOCD_HEALTH = REPO / "argocd" / "juturna.io" / "Pipeline"
PLUGIN_ROOTS = [REPO / "examples" / "plugins", REPO / "tests" / "plugins"]
CHART = REPO / "charts" / "juturna-operator"


def pinned(name: str) -> str:
    """A version pinned in hack/versions.env (``KUBERNETES_VERSION``, say)."""
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == name:
            return value.strip()
    raise KeyError(f"{name} is not pinned in hack/versions.env")


def helm(
    *args: str, kubeconfig: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """The pinned helm. ``helm template`` renders for the plane's Kubernetes version: the
    chart's kubeVersion needs one, and a helm built by ``go install`` assumes 1.20."""
    command = [str(binaries().helm / "helm"), *args]
    if kubeconfig is not None:
        command.append(f"--kubeconfig={kubeconfig}")
    if args[0] == "template" and not any(a.startswith("--kube-version") for a in args):
        command.append(f"--kube-version={pinned('KUBERNETES_VERSION')}")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}:\n{proc.stderr}{proc.stdout}")
    return proc


# Spread the operator's pod from the team's (an affinity a user might set).
ANTI_AFFINITY = {
    "podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 1,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"team": "media"}},
                },
            }
        ]
    }
}
# Every value the chart offers Helm users, set at once (with the Prometheus Operator's objects).
EVERY_CHART_VALUE = [
    *("--set", "nameOverride=jt", "--set", "fullnameOverride=media-ops"),
    *("--set", "image.repository=r.example/jo", "--set", "image.digest=sha256:" + "ab" * 32),
    *("--set-json", 'imagePullSecrets=[{"name": "regcred"}]'),
    *("--set-json", 'podAnnotations={"a": "b"}', "--set-json", 'podLabels={"team": "media"}'),
    *("--set", "priorityClassName=ops-high", "--set-json", 'nodeSelector={"pool": "ops"}'),
    *("--set-json", 'tolerations=[{"key": "ops", "operator": "Exists"}]'),
    *("--set-json", "affinity=" + json.dumps(ANTI_AFFINITY)),
    *("--set-json", 'serviceAccount.annotations={"a": "b"}'),
    *("--set-json", 'extraEnv=[{"name": "JUTURNA_OPERATOR_MAX_CONCURRENCY", "value": "16"}]'),
    *("--set-json", 'extraArgs=["-v"]'),
    *("--set", "podSecurityContext.runAsUser=10001", "--set", "securityContext.privileged=false"),
    *("--set-json", 'pipelinePod.imagePullSecrets=[{"name": "corp"}]'),
    *("--set-string", "pipelinePod.user=10001:10001"),
    *("--set", "metrics.serviceMonitor.enabled=true"),
    *("--set", "metrics.prometheusRule.enabled=true"),
    *("--set-json", 'metrics.serviceMonitor.labels={"release": "kps"}'),
    *("--set", "metrics.serviceMonitor.scrapeTimeout=10s"),
]


def rendered(*values: str) -> list[dict[str, Any]]:
    """The chart's objects as `helm template` renders them, release "jo" in namespace ops."""
    out = helm("template", "jo", str(CHART), "-n", "ops", *values).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


# Names that must never become a folder name: paths, lookalikes, control characters.
UNSAFE_NAMES = [
    "",
    ".",
    "..",
    "../escaped",
    "../../escaped",
    "/tmp/escaped",
    "a/b",
    "a\\b",
    "\uff0e\uff0e",  # fullwidth "..", a lookalike
    "\uff41\uff4d\uff50",  # fullwidth "amp"
    "amp\u2215x",  # division slash, looks like "/"
    "über",
    "a b",
    "nul\x00",
    "trailing\n",
    "x" * 64,
    "x" * 300,
]


class Operator(OperatorProcess):
    """``juturna-operator run -A`` as its own process, as in production, with the tests'
    settings (short timeouts and intervals, the test plugin roots and ``extra_root``)."""

    def __init__(
        self,
        kubeconfig: Path,
        workdir: Path,
        log: Path,
        extra_root: Path,
        engine: str,
        namespaces: tuple[str, ...] = (),
    ) -> None:
        self.kubeconfig, self.workdir, self.engine = kubeconfig, workdir, engine
        self.extra_root = extra_root
        self.metrics_port = free_port()
        self.serve: JuturnaServe | None = None  # the default runtime (engine "service")
        self.later_port = 0  # the runtime "later" (engine "service")
        self.runtime_token = ""  # both runtimes' bearer token (engine "service")
        roots = [*PLUGIN_ROOTS, extra_root]
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "JUTURNA_OPERATOR_PLUGIN_PATH": os.pathsep.join(map(str, roots)),
            "JUTURNA_OPERATOR_WORKDIR": str(workdir),
            "JUTURNA_OPERATOR_STOP_TIMEOUT": "3",
            "JUTURNA_OPERATOR_HEALTH_INTERVAL": "1",
            "JUTURNA_OPERATOR_ENGINE": engine,
            "JUTURNA_OPERATOR_SWEEP_INTERVAL": "2",
            "JUTURNA_OPERATOR_METRICS_PORT": str(self.metrics_port),
        }
        where = [a for ns in namespaces for a in ("-n", ns)] or ["-A"]
        super().__init__(log, env, where)


# The engines beside the operator that warm-swap a Pipeline listening on no port (the others
# update by Recreate).
WARM_SWAP_ENGINES = {"process", "inprocess"}
# The session operator's variant with many pipelines per worker process (engine process,
# JUTURNA_OPERATOR_PIPELINES_PER_PROCESS=3): not one of the engines every such test runs on,
# but one a test asks for besides them, ``@pytest.mark.parametrize("operator",
# [*OPERATOR_ENGINES, DENSE_PROCESS], indirect=True)``.
DENSE_PROCESS = "process-dense"
# Every registered engine but pod, whose tests need the real node (test_pod_engine.py).
OPERATOR_ENGINES = [name for name in ENGINE_REGISTRY if name != "pod"]


def pipelines_per_process(operator: Operator) -> int:
    """How many pipelines one worker process of ``operator`` runs at most (engine process)."""
    return int(operator.env.get("JUTURNA_OPERATOR_PIPELINES_PER_PROCESS", "1"))


def only_on(operator: Operator, engine: str, why: str) -> Operator:
    """The operator, if it runs ``engine``; otherwise skip the test, saying why."""
    if operator.engine != engine:
        pytest.skip(why)
    return operator


PLAIN_SERVICE = (
    "a plain `juturna serve` cannot report dead node threads nor be killed, so the "
    "operator cannot see a node crash or end a hung stop there (docs/engines.md: what each "
    "engine contains)"
)


CRD_NAME = f"{PLURAL}.{GROUP}"


def install_crds(kubectl: Kubectl) -> None:
    """The project's CRDs (crds/), as the session installs them, once established."""
    # Forced: a test may have left a CRD another field manager wrote (as Helm creates it).
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))

    # Polled: `kubectl wait` (and a jsonpath filter) fails at once on a CRD so new that it
    # has no conditions yet.
    def established() -> bool:
        status = json.loads(kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)["status"]
        return any(
            c["type"] == "Established" and c["status"] == "True"
            for c in status.get("conditions") or []
        )

    wait_until(established, 30, f"crd/{CRD_NAME} Established")


def assert_sole_operator(kubeconfig: Path) -> None:
    """Fail if another operator runs against this plane: two would fight over each Pipeline.
    Tests marked ``own_operator`` run first, before the session's operator starts."""
    ours = f"KUBECONFIG={kubeconfig}".encode()
    others = [
        pid
        for pid in processes_mentioning("juturna_operator.cli run")
        if ours in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ]
    if others:
        pytest.fail(
            f"another operator runs against this plane ({others}); this test must be the "
            "only one: mark it own_operator, so that it runs before the session's operator"
        )


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    """The example pipeline under another name, with spec fields overridden."""
    body = copy.deepcopy(EXAMPLE)
    body["metadata"] = {"name": name}
    body["spec"].update(spec)
    return body


# A Pipeline that listens (source/json_http): on the pod engine it gets a Service.
LISTENING = yaml.safe_load((REPO / "examples" / "json-events.yaml").read_text())


def listening(name: str, state: str = "Running", **spec: Any) -> dict[str, Any]:
    """examples/json-events.yaml under another name, with spec fields overridden."""
    body = copy.deepcopy(LISTENING)
    body["metadata"] = {"name": name}
    body["spec"].update(state=state, **spec)
    return body


def nodes(*specs: tuple[str, str, str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": n, "type": t, "mark": m, "configuration": c} for n, t, m, c in specs]


def chain(*names: str) -> list[dict[str, str]]:
    return [{"from": a, "to": b} for a, b in itertools.pairwise(names)]


def faulty(name: str, *specs: tuple[str, str, str, dict[str, Any]], **spec: Any) -> dict:
    """A pipeline of the given nodes in a chain, using the deliberately faulty plugins."""
    return manifest(
        name,
        plugins=["tones", "faulty"],
        nodes=nodes(*specs),
        links=chain(*(n for n, *_ in specs)),
        **spec,
    )


class Pipelines:
    """Create, read, patch and wait for Pipelines in one namespace."""

    def __init__(self, objects: client.CustomObjectsApi, namespace: str, kubectl: Kubectl) -> None:
        self.objects, self.namespace, self.kubectl = objects, namespace, kubectl

    def apply(self, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.kubectl("-n", self.namespace, "apply", "-f", "-", input=json.dumps(body))

    def get(self, name: str) -> dict[str, Any]:
        return self.objects.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.objects.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def delete(self, name: str) -> None:
        self.objects.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def bodies(self) -> dict[str, dict[str, Any]]:
        """Every Pipeline in the namespace, by name."""
        items = self.objects.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        return {item["metadata"]["name"]: item for item in items["items"]}

    def names(self) -> list[str]:
        return list(self.bodies())

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except client.ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def wait(
        self,
        name: str,
        check: Callable[[dict[str, Any]], bool],
        timeout: float = 30,
        what: str = "condition",
    ) -> dict[str, Any]:
        """Poll until ``check(body)`` holds; fail with the last status seen."""
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.get(name)
            if check(body):
                return body
            time.sleep(0.1)
        pytest.fail(
            f"{name}: {what} not met in {timeout} s; status: "
            f"{json.dumps(body.get('status'), indent=1)}"
        )

    def wait_ready(self, name: str, timeout: float = 30) -> dict[str, Any]:
        """Ready=True for the current generation (a stale Ready does not count)."""
        return self.wait(name, is_ready, timeout, "Ready for the current generation")

    def wait_failure(
        self, name: str, reason: str, timeout: float = 30, what: str = ""
    ) -> dict[str, Any]:
        """``status.failure.reason == reason`` for the current generation (the operator writes
        observedGeneration with every status, so an older generation's failure does not count)."""
        return self.wait(
            name,
            lambda b: current(b) and failure_reason(b) == reason,
            timeout,
            what or f"failure {reason}",
        )

    def wait_phase(self, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
        return self.wait(
            name,
            lambda b: current(b) and b.get("status", {}).get("phase") == phase,
            timeout,
            f"phase {phase}",
        )

    def wait_gone(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.exists(name):
            if time.monotonic() > deadline:
                pytest.fail(f"{name} still exists {timeout} s after deletion: {self.get(name)}")
            time.sleep(0.1)

    def events(self, name: str) -> list[tuple[str, str, str]]:
        out = self.kubectl(
            "-n",
            self.namespace,
            "get",
            "events",
            "--field-selector",
            f"involvedObject.name={name}",
            "-o",
            "json",
        ).stdout
        return [(e["type"], e["reason"], e.get("message", "")) for e in json.loads(out)["items"]]


def current(body: dict[str, Any]) -> bool:
    return body.get("status", {}).get("observedGeneration") == body["metadata"]["generation"]


def failure_reason(body: dict[str, Any]) -> str | None:
    """``status.failure.reason``, or None while no failure is reported."""
    return ((body.get("status") or {}).get("failure") or {}).get("reason")


def condition(body: dict[str, Any], ctype: str) -> dict[str, Any]:
    for cond in body.get("status", {}).get("conditions", []):
        if cond["type"] == ctype:
            return dict(cond)
    return {}


def is_ready(body: dict[str, Any]) -> bool:
    return current(body) and condition(body, "Ready").get("status") == "True"


def output_lines(workdir: Path, body: dict[str, Any]) -> int:
    """Lines the example sink wrote for this resource's current instance (0 if none)."""
    pid = body.get("status", {}).get("pipelineId")
    files = list(workdir.glob(f"*_{pid}/out/output.jsonl")) if pid else []
    return len(files[0].read_text().splitlines()) if files else 0


def output_of(workdir: Path, body: dict[str, Any]) -> list[dict[str, Any]]:
    pid = body.get("status", {}).get("pipelineId")
    files = list(workdir.glob(f"*_{pid}/out/output.jsonl")) if pid else []
    return [json.loads(line) for line in files[0].read_text().splitlines()] if files else []


def instance_folders(workdir: Path, body: dict[str, Any]) -> list[Path]:
    uid8 = body["metadata"]["uid"][:8]
    return [p for p in workdir.glob(f"*__{uid8}_*") if p.is_dir()]


class JuturnaServe:
    """`python -m juturna serve` on a loopback port, stopped by PID."""

    def __init__(self, folder: Path, log: Path, port: int | None = None) -> None:
        self.folder, self.log = folder, log
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> JuturnaServe:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, PLUGIN_ROOTS))}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "juturna",
                    "serve",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-f",
                    str(self.folder),
                    "-l",
                    "WARNING",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                preexec_fn=exit_with_parent,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/pipelines", timeout=1).close()
                return self
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-2000:]
                assert time.monotonic() < deadline, "juturna serve did not come up"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            stop_popen(self.proc, grace_s=10)
        assert self.proc is None or not pid_alive(self.proc.pid)


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Evaluate health.lua with ``obj`` as Argo CD passes it (a global Lua table).

    Lua 5.1: Argo CD runs gopher-lua, a 5.1 dialect; lupa's default runtime is newer and would
    accept what gopher-lua refuses (integer division, goto, utf8). An absent message is "", as
    in Argo CD's HealthStatus (``message,omitempty``)."""
    lua = lupa.lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute((ARGOCD_HEALTH / "health.lua").read_text())
    return {"status": result["status"], "message": result["message"] or ""}


# --- container images: podman builds, containerd (the node) runs ----------------------------

IMAGE = "localhost/juturna-operator:test"


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)


def must(proc: subprocess.CompletedProcess[str], what: str) -> str:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


def built_operator_image() -> str:
    """The operator's image (hack/node.py builds it); skips, saying why, where it cannot."""
    try:
        return build_operator_image(IMAGE)
    except ImageUnavailable as err:
        pytest.skip(str(err))


PLUGINS_IMAGE = "localhost/juturna-operator:test-plugins"


def built_plugins_image(base: str) -> str:
    """``base`` with the faulty test plugins added under /plugins/faulty: a layer of the
    user's own, the way docs/install.md tells users to bring plugins to pipeline pods (no
    hostPath, no environment of its own: the pod policy refuses both)."""
    with tempfile.TemporaryDirectory() as context:
        shutil.copytree(
            REPO / "tests" / "plugins" / "faulty",
            Path(context, "faulty"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        Path(context, "Containerfile").write_text(f"FROM {base}\nCOPY faulty /plugins/faulty\n")
        must(
            podman("build", *PODMAN_LIMITS, "-t", PLUGINS_IMAGE, context, timeout=300),
            f"building {PLUGINS_IMAGE}",
        )
    return PLUGINS_IMAGE


def answered_size(message: str, url: str) -> int:
    """The size an ``AnswerTooLarge`` message says the answer of ``url`` (a regular
    expression) had, once the whole message is checked: what the user reads, with the cap."""
    said = re.fullmatch(
        rf"{url} answered (\d+) bytes, over the size cap of the operator's answers "
        r"\(4194304 bytes, 4 MiB\): the rest was not read",
        message,
    )
    assert said, message
    return int(said[1])


# --- pods on the local node -------------------------------------------------------------------


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    last: Callable[[], object] | None = None,
    interval: float = 0.2,
) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` and, if given, the last state seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    seen = f"; last seen: {json.dumps(last(), indent=1, default=str)}" if last else ""
    pytest.fail(f"{what} not met in {timeout:g} s{seen}")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples_of(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, read by prometheus_client's own parser:
    (sample name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(operator: Operator) -> str:
    """The operator's ``/metrics``, as Prometheus reads it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics") as resp:
        return str(resp.read().decode())


def sample(text: str, metric: str, /, **labels: str) -> float | None:
    """One sample of a scrape, by name and its exact labels (None: not there)."""
    return samples_of(text).get((metric, frozenset(labels.items())))


# What a PromQL expression names besides metrics: strings, label matchers, ranges and
# subqueries, grouping labels, Grafana's variables; then keywords and function calls.
_PROMQL_NOISE = re.compile(
    r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\{[^}]*\}|\[[^\]]*\]'
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)|\$\{[^}]*\}|\$\w+"
)
_PROMQL_WORDS = frozenset(
    [
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "inf",
        "nan",
        "atan2",
    ]
)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a Grafana ``label_values(expr, label)``
    query reads those of ``expr``; ``label_values(label)`` none)."""
    grafana = re.fullmatch(r"\s*label_values\((?:(.*),)?\s*\w+\s*\)\s*", expr, re.DOTALL)
    if grafana:
        expr = grafana.group(1) or ""  # label_values(label) reads no metric
    bare = _PROMQL_NOISE.sub(" ", expr)
    return {
        m.group(1)
        for m in re.finditer(r"\b([A-Za-z_:][\w:]*)\b(?!\s*\()", bare)
        if m.group(1).lower() not in _PROMQL_WORDS
    }


# The securityContext of the `restricted` Pod Security Standard, for a container of our image.
RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def wait_default_account(kubectl: Kubectl, namespace: str) -> None:
    """ServiceAccount admission refuses pods until the namespace's `default` account exists
    (a moment after the namespace)."""
    wait_until(
        lambda: kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
        30,
        f"the default ServiceAccount in {namespace}",
    )


def run_pod(
    kubectl: Kubectl,
    namespace: str,
    name: str,
    image: str,
    command: list[str],
    labels: dict[str, str] | None = None,
) -> None:
    """A pod of ``image`` running ``command`` once, restricted, never pulling an image."""
    wait_default_account(kubectl, namespace)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "securityContext": RESTRICTED,
                }
            ],
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(pod))


def send_tone(
    kubectl: Kubectl, namespace: str, image: str, host: str, port: int, seconds: int
) -> None:
    """A sender pod: ffmpeg's own sine at ``TONE_HZ``, Opus over RTP (payload type 97, as
    Juturna's audio_rtp source expects) to ``host:port`` for ``seconds``, in real time."""
    run_pod(
        kubectl,
        namespace,
        "sender",
        image,
        [
            "ffmpeg", "-nostdin", "-loglevel", "error", "-re",
            "-f", "lavfi", "-i", f"sine=frequency={TONE_HZ}:sample_rate=48000",
            "-t", str(seconds), "-ac", "2", "-c:a", "libopus", "-payload_type", "97",
            "-f", "rtp", f"rtp://{host}:{port}",
        ],
    )  # fmt: skip


MANAGED = "app.kubernetes.io/managed-by=juturna-operator"


def managed(kubectl: Kubectl, kind: str, namespace: str) -> list[dict[str, Any]]:
    """The operator's objects of ``kind`` (pods, secrets, services) in ``namespace``."""
    listed = kubectl("get", kind, "-n", namespace, "-l", MANAGED, "-o", "json").stdout
    return list(json.loads(listed)["items"])


def assert_nothing_made(kubectl: Kubectl, namespace: str) -> None:
    """No pod, Secret or Service of the operator's in ``namespace``."""
    for kind in ("pods", "secrets", "services"):
        assert managed(kubectl, kind, namespace) == [], f"{kind} made in {namespace}"


def pod_body(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)


def wait_pod(
    kubectl: Kubectl,
    namespace: str,
    name: str,
    ok: Callable[[dict[str, Any]], bool],
    timeout: float = 60,
    what: str = "the pod's state",
) -> dict[str, Any]:
    """Poll a pod until ``ok(body)``; the failure names the pod's last status."""
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = pod_body(kubectl, namespace, name)
        return ok(last)

    wait_until(check, timeout, f"{what} of pod {namespace}/{name}", lambda: last.get("status"))
    return last


def pod_ready(body: dict[str, Any]) -> bool:
    conditions = body.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def pod_finished(body: dict[str, Any]) -> bool:
    return body.get("status", {}).get("phase") in ("Succeeded", "Failed")


def pod_output_lines(kubectl: Kubectl, pod: str, namespace: str, pipeline_id: str) -> int:
    """Lines the example sink wrote for ``pipeline_id`` inside pipeline pod ``pod``."""
    out = f"/var/lib/juturna/*_{pipeline_id}/out/output.jsonl"
    script = f"cat {out} | wc -l"
    return int(kubectl("exec", "-n", namespace, pod, "--", "sh", "-c", script).stdout)


def assert_pod_output_grows(kubectl: Kubectl, pod: str, namespace: str, pipeline_id: str) -> None:
    first = pod_output_lines(kubectl, pod, namespace, pipeline_id)
    wait_until(
        lambda: pod_output_lines(kubectl, pod, namespace, pipeline_id) > first,
        20,
        f"the output growing inside pod {pod}",
    )


def minimal_path(tmp_path: Path, *tools: str) -> str:
    """A PATH holding only the named tools, as symlinks (a machine that lacks the others)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool)
        assert found, tool
        (bindir / tool).symlink_to(found)
    return str(bindir)


# --- fault injection: counts, churn, convergence (test_faults.py, test_pod_faults.py) -------

# `make reliability` runs the full counts; `make test` a few injections of each fault.
FULL = os.environ.get("RELIABILITY") == "full"


def count(name: str, short: int, full: int) -> int:
    """How many times to inject a fault: ``name`` from the environment, else the short or
    the full count."""
    return int(os.environ.get(name, full if FULL else short))


KILLS = count("FAULT_KILLS", 2, 20)
OUTAGES = count("FAULT_APISERVER_OUTAGES", 1, 5)
STATES = ["Running", "Running", "Standby", "Stopped"]
CHURN_SEED = 20261128  # every engine's churn makes the same steps


def slow_manifest(name: str, state: str = "Running", rate: float = 2.0) -> dict[str, Any]:
    body = manifest(name, state=state)
    body["spec"]["nodes"][0]["configuration"] = {"rate": rate}
    return body


def create_all(pipelines: Pipelines, bodies: list[dict[str, Any]]) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda b: pipelines.objects.create_namespaced_custom_object(
                    GROUP, VERSION, pipelines.namespace, PLURAL, b
                ),
                bodies,
            )
        )


def not_converged(pipelines: Pipelines, desired: dict[str, str]) -> list[str]:
    """What still differs from the desired state (empty when converged): a resource lost, a
    deleted one still present (its finalizer stuck), one not Ready at its desired phase."""
    bodies = pipelines.bodies()
    problems = [f"{n}: deleted but still present" for n in bodies if n not in desired]
    for name, state in desired.items():
        body = bodies.get(name)
        if body is None:
            problems.append(f"{name}: LOST (no resource)")
        elif not (is_ready(body) and body["status"].get("phase") == state):
            status = body.get("status") or {}
            problems.append(
                f"{name}: want {state}, phase {status.get('phase')} "
                f"(generation {body['metadata']['generation']}, observed "
                f"{status.get('observedGeneration')}, failure {status.get('failure')})"
            )
    return problems


def wait_settled(
    pipelines: Pipelines,
    desired: dict[str, str],
    timeout: float,
    leaks: Callable[[], list[str]],
) -> float:
    """Wait until every resource is at its desired state and ``leaks()`` (the engine's own
    check: every instance has its resource, each resource exactly its instance) finds
    nothing; return how long that took, or fail naming what still differs."""
    started = time.monotonic()
    problems: list[str] = []
    while time.monotonic() - started < timeout:
        try:
            problems = not_converged(pipelines, desired) or leaks()
        except client.ApiException as err:  # a 5xx while etcd comes back
            if err.status < 500:
                raise
            problems = [f"API server: {err.status} {err.reason}"]
        if not problems:
            return time.monotonic() - started
        time.sleep(0.5)
    pytest.fail(f"not settled in {timeout:.0f} s ({len(problems)}):\n" + "\n".join(problems))


def outage(control_plane: ControlPlane, component: str, down_s: float, operator: Operator) -> float:
    """Stop ``component`` for ``down_s`` seconds and start it again; return the cores the
    operator used meanwhile, and fail if it exited."""
    assert operator.proc is not None
    pid = operator.proc.pid
    control_plane.pause(component)
    try:
        cpu0, started = cpu_seconds(pid), time.monotonic()
        time.sleep(down_s)
        cores = (cpu_seconds(pid) - cpu0) / (time.monotonic() - started)
    finally:  # a test that fails here must not leave the plane without it
        control_plane.resume(component)
    assert operator.proc.poll() is None, f"the operator exited while {component} was down"
    return cores


def change_after_fault(pipelines: Pipelines, desired: dict[str, str], round_: int) -> set[str]:
    """Changes made once a fault is over, which the operator must see and act on: one of
    ``a1``-``a4`` flipped between Running and Standby (``a0`` is never changed), a new Running
    Pipeline ``b<round_>``, and the previous round's deleted. Returns the names changed."""
    flip, new, old = f"a{1 + round_ % 4}", f"b{round_}", f"b{round_ - 1}"
    desired[flip] = "Standby" if desired[flip] == "Running" else "Running"
    pipelines.patch_spec(flip, {"state": desired[flip]})
    desired[new] = "Running"
    create_all(pipelines, [slow_manifest(new)])
    if round_:
        pipelines.delete(old)
        del desired[old]
    return {flip, new, old}


class Churn:
    """Creates, changes and deletes Pipelines at random; ``desired`` is what the user asked."""

    def __init__(self, pipelines: Pipelines, rng: random.Random, desired: dict[str, str]) -> None:
        self.pipelines, self.rng, self.desired = pipelines, rng, desired
        self.made = len(desired)
        self.errors: list[str] = []

    def step(self) -> None:
        p, rng = self.pipelines, self.rng
        names = sorted(self.desired)
        action = rng.choice(["create", "delete", "state", "state", "config"])
        if action == "create" or not names:
            name = f"c{self.made:03d}"
            self.made += 1
            state = rng.choice(STATES)
            create_all(p, [slow_manifest(name, state)])
            self.desired[name] = state
        elif action == "delete":
            name = rng.choice(names)
            del self.desired[name]
            p.delete(name)
        elif action == "state":
            name = rng.choice(names)
            state = rng.choice([s for s in sorted(set(STATES)) if s != self.desired[name]])
            p.patch_spec(name, {"state": state})
            self.desired[name] = state
        else:  # a new revision: the instance is replaced
            name = rng.choice(names)
            spec = slow_manifest(name)["spec"]
            spec["nodes"][1]["configuration"] = {"factor": rng.randint(1, 99), "label": "churn"}
            # With its links: a Pipeline of another graph (one that listens) takes this one.
            p.patch_spec(name, {"nodes": spec["nodes"], "links": spec["links"]})

    def run(self, steps: int) -> None:
        try:
            for _ in range(steps):
                self.step()
                time.sleep(self.rng.uniform(0, 0.2))
        except Exception as err:  # reported by the test, not lost in a thread
            self.errors.append(repr(err))


def kills_under_churn(operator: OperatorProcess, churn: Churn, kills: int) -> Iterator[float]:
    """SIGKILL the operator ``kills`` times, each at a random point of a burst of churn, and
    start it again after a random pause (changes land while no operator runs). Yields, after
    each, the moment (``time.monotonic()``) it was started again, once the burst is over:
    the caller checks the invariants and times the recovery from there."""
    rng = churn.rng
    for _ in range(kills):
        burst = threading.Thread(target=churn.run, args=(rng.randint(5, 15),))
        burst.start()
        try:
            time.sleep(rng.uniform(0, 1.5))  # a random point in the churn
            operator.kill()
            time.sleep(rng.uniform(0, 2))
            operator.start()
            restarted = time.monotonic()
        finally:  # a failed start leaves no churn running into the teardown
            burst.join()
        assert not churn.errors, churn.errors
        yield restarted


# A receiver: every POST body is printed as one line, with the time it came. One write per
# line, under a lock: print() writes the line and its newline apart, and two of the server's
# threads interleaved them (two bodies on one line, once in a run of the warm swap tests).
RECEIVER = """
import http.server, json, sys, threading, time
lock = threading.Lock()
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        line = json.dumps({"at": time.time(), "body": json.loads(body or b"null")}) + "\\n"
        with lock:
            sys.stdout.write(line)
            sys.stdout.flush()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Receiver).serve_forever()
"""


def receiver(kubectl: Kubectl, namespace: str, image: str) -> str:
    """The receiver pod and its Service ``receiver``; returns its URL by DNS name."""
    run_pod(kubectl, namespace, "receiver", image, ["python", "-c", RECEIVER], {"app": "receiver"})
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "receiver", "namespace": namespace},
        "spec": {"selector": {"app": "receiver"}, "ports": [{"port": 8000, "protocol": "TCP"}]},
    }
    kubectl("apply", "-f", "-", input=json.dumps(service))
    wait_pod(
        kubectl, namespace, "receiver", lambda b: b.get("status", {}).get("phase") == "Running"
    )
    return f"http://receiver.{namespace}.svc:8000/results"


def received(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    logs = kubectl("logs", "receiver", "-n", namespace, check=False).stdout
    return [json.loads(line) for line in logs.splitlines() if line.startswith("{")]


LIVE_AUDIO = yaml.safe_load((REPO / "examples" / "live-audio.yaml").read_text())
TONE_HZ = 440


def frequencies(kubectl: Kubectl, namespace: str) -> list[tuple[float, float, int]]:
    """(arrival time, frequency, block) of every result the receiver got."""
    out = []
    for row in received(kubectl, namespace):
        payload = (row["body"] or {}).get("payload") or {}
        if "frequency" in payload:
            out.append((row["at"], float(payload["frequency"]), int(payload["block"])))
    return out


def endpoint(body: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [e for e in body["status"]["endpoints"] if e["name"] == name]
    return found


def live_audio(receiver_url: str) -> dict[str, Any]:
    manifest = json.loads(json.dumps(LIVE_AUDIO))
    for node in manifest["spec"]["nodes"]:
        if node["mark"] == "notifier_http":
            node["configuration"]["endpoint"] = receiver_url
    return manifest


class CannedAnswer(BaseHTTPRequestHandler):
    """A stand-in HTTP peer (a worker, a runtime) that answers every GET and POST with
    ``status`` and the JSON ``body``: what a real one cannot be made to say on cue."""

    status = 200
    body = b"{}"

    def answer(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = answer

    def log_message(self, *args: Any) -> None:
        pass
