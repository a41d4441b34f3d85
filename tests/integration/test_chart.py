"""The Helm chart: lint, templates the real API server accepts, and RBAC that is enough."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import ControlPlane
from kubernetes import client

from juturna_operator.api import GROUP, PLURAL, VERSION
from support import (
    CHART,
    EVERY_CHART_VALUE,
    EXAMPLE,
    MANAGED,
    REPO,
    Kubectl,
    Operator,
    Pipelines,
    assert_nothing_made,
    assert_sole_operator,
    binaries,
    free_port,
    helm,
    managed,
    manifest,
    pod_ready,
    rendered,
    wait_until,
)

pytestmark = pytest.mark.cluster


def test_the_charts_crds_equal_the_generated_ones() -> None:
    top = {p.name: p.read_text() for p in (REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert chart == top, "charts/juturna-operator/crds differs from crds/: run `make crds`"


def test_helm_lint() -> None:
    out = helm("lint", str(CHART)).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "watchNamespaces={team-a,team-b}"],
        [
            "--set",
            "engine=service",
            "--set",
            "runtimes.gpu.url=http://gpu:8080",
            "--set",
            "runtimes.gpu.tokenSecret.name=gpu",
            "--set",
            "runtimes.gpu.tokenSecret.key=t",
            "--set",
            "defaultRuntime=gpu",
            "--set",
            "logFormat=json",
        ],
        ["--set", "engine=process", "--set", "pipelinesPerProcess=8"],
        [
            "--set",
            "allowedVolumeTypes={hostPath,nfs}",
            "--set",
            "allowedPriorityClasses={media-high}",
        ],
        EVERY_CHART_VALUE,
        ["--set", "metrics.port=0"],
        ["--set", "serviceAccount.create=false", "--set", "rbac.create=false"],
    ],
    ids=[
        "cluster-wide",
        "namespaced",
        "service-runtimes",
        "dense-processes",
        "pod-policy",
        "every-value",
        "metrics-off",
        "their-account",
    ],
)
def test_templates_pass_server_side_dry_run(
    kubeconfig: Path, kubectl: Kubectl, values: list[str]
) -> None:
    """What the chart renders (the `helm test` pod included), as the real API server checks
    it. The Prometheus Operator's objects are left out: its CRDs are not on the plane
    (tests/tooling/test_chart_values.py checks them)."""
    for ns in ("ops", "team-a", "team-b"):
        kubectl("create", "namespace", ns, check=False)
    # The class EVERY_CHART_VALUE names: the Priority admission plugin checks that it exists.
    kubectl("create", "priorityclass", "ops-high", "--value=1000", check=False)
    objects = [
        o for o in rendered(*values) if o["kind"] not in {"ServiceMonitor", "PrometheusRule"}
    ]
    assert objects
    kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(objects))


def test_the_values_schema_rejects_a_typo() -> None:
    def refused(value: str) -> str:
        proc = helm("template", "jo", str(CHART), "--set", value, check=False)
        assert proc.returncode != 0, value
        return proc.stderr

    engine = refused("engine=docker")
    assert "engine" in engine
    assert "value must be one of 'pod', 'process', 'inprocess', 'service'" in engine
    assert "at '/pipelinesPerProcess': minimum: got 0, want 1" in refused("pipelinesPerProcess=0")
    assert "additional properties 'enigne' not allowed" in refused("enigne=process")
    volume = refused("allowedVolumeTypes={hostpath}")
    assert "at '/allowedVolumeTypes/0': value must be one of" in volume, volume
    priority = refused("allowedPriorityClasses={High}")
    assert "at '/allowedPriorityClasses/0'" in priority, priority


def test_the_pod_policy_values_reach_the_operator() -> None:
    def env(*values: str) -> dict[str, str]:
        (deployment,) = [d for d in rendered(*values) if d["kind"] == "Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value", "") for e in container["env"]}

    defaults = env()
    assert defaults["JUTURNA_OPERATOR_ALLOWED_VOLUME_TYPES"] == ""
    assert defaults["JUTURNA_OPERATOR_ALLOWED_PRIORITY_CLASSES"] == ""
    more = env(
        "--set", "allowedVolumeTypes={hostPath,nfs}", "--set", "allowedPriorityClasses={a,b}"
    )
    assert more["JUTURNA_OPERATOR_ALLOWED_VOLUME_TYPES"] == "hostPath,nfs"
    assert more["JUTURNA_OPERATOR_ALLOWED_PRIORITY_CLASSES"] == "a,b"


@contextlib.contextmanager
def installed(kubeconfig: Path, kubectl: Kubectl, *values: str) -> Iterator[str]:
    """The chart installed as release "jo" into a new namespace, which it yields."""
    ns = f"ops-{uuid.uuid4().hex[:6]}"
    # --skip-crds: the session installed the CRD already.
    install = ["install", "jo", str(CHART), "-n", ns, "--create-namespace", "--skip-crds"]
    out = helm(*install, *values, kubeconfig=kubeconfig).stdout
    assert "STATUS: deployed" in out, out
    try:
        yield ns
    finally:
        helm("uninstall", "jo", "-n", ns, kubeconfig=kubeconfig)
        kubectl("delete", "namespace", ns, "--wait=false")


# What the operator uses, and nothing else: read and patch Pipelines (its finalizer),
# patch their status, post Events; cluster-wide, kopf also lists and watches namespaces and
# CRDs. No update, no delete, no create of Pipelines, no Secrets.
NAMESPACE_RULES = {
    "pipelines.juturna.io": {"get", "list", "watch", "patch"},
    "pipelines.juturna.io/status": {"get", "patch"},
    "events": {"create"},
}
CLUSTER_RULES = {
    "customresourcedefinitions.apiextensions.k8s.io": {"list", "watch"},
    "namespaces": {"list", "watch"},
}
# Granted to every authenticated user by the API server's default roles.
EVERY_USER = {
    "selfsubjectreviews.authentication.k8s.io",
    "selfsubjectaccessreviews.authorization.k8s.io",
    "selfsubjectrulesreviews.authorization.k8s.io",
    "clustertrustbundles.certificates.k8s.io",  # readable by all since Kubernetes 1.33
}


def held_rules(listing: str) -> dict[str, set[str]]:
    """``kubectl auth can-i --list`` as {resource: verbs} (non-resource URLs left out)."""
    held: dict[str, set[str]] = {}
    for line in listing.splitlines()[1:]:
        match = re.match(r"^(\S+)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$", line)
        if match:
            held.setdefault(match[1], set()).update(match[4].split())
    return held


def token_kubeconfig(plane: ControlPlane, token: str, path: Path) -> Path:
    """A kubeconfig that authenticates with ``token`` alone, for `kubectl auth can-i`."""
    cluster = {"server": plane.server, "certificate-authority": str(plane.pki / "ca.crt")}
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "sa",
                "clusters": [{"name": "local", "cluster": cluster}],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa"}}],
            }
        )
    )
    return path


def image_values(image: str) -> list[str]:
    """Helm values for an image that is already on the node: never pulled."""
    repository, tag = image.rsplit(":", 1)
    return [
        *("--set", f"image.repository={repository}"),
        *("--set", f"image.tag={tag}"),
        *("--set", "image.pullPolicy=Never"),
    ]


SELECTOR = "app.kubernetes.io/name=juturna-operator"


def operator_pod(kubectl: Kubectl, ns: str, timeout: float = 120, other_than: str = "") -> str:
    """The name of the chart's operator pod once it is Ready (its probe on kopf's /healthz)."""
    found: dict[str, Any] = {}

    def ready() -> bool:
        listed = json.loads(kubectl("get", "pods", "-n", ns, "-l", SELECTOR, "-o", "json").stdout)
        pods = [p for p in listed["items"] if p["metadata"]["name"] != other_than]
        found["pods"] = [p.get("status") for p in pods]
        ok = [p for p in pods if pod_ready(p) and "deletionTimestamp" not in p["metadata"]]
        if len(ok) == 1 and len(pods) == 1:
            found["name"] = ok[0]["metadata"]["name"]
            return True
        return False

    wait_until(ready, timeout, f"one Ready operator pod in {ns}", lambda: found.get("pods"))
    return str(found["name"])


def in_pod(kubectl: Kubectl, ns: str, pod: str, script: str) -> str:
    """Run a shell line inside the operator's pod (`kubectl exec`, through the kubelet)."""
    return kubectl("exec", "-n", ns, pod, "--", "sh", "-c", script).stdout


def pipeline_pod(kubectl: Kubectl, ns: str, name: str) -> str:
    """The pod engine's pod for Pipeline ``name``."""
    selector = f"juturna.io/pipeline={name}"
    return kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "name").stdout.strip()


def assert_output_grows(kubectl: Kubectl, ns: str, body: dict[str, Any]) -> None:
    """The example's output file, inside its Pipeline's own pod, gains lines."""
    pod = pipeline_pod(kubectl, ns, body["metadata"]["name"])
    out = f"/var/lib/juturna/*_{body['status']['pipelineId']}/out/output.jsonl"
    count = f"cat {out} | wc -l"
    first = int(in_pod(kubectl, ns, pod, count))
    wait_until(
        lambda: int(in_pod(kubectl, ns, pod, count)) > first,
        20,
        f"the output of {body['metadata']['name']} growing inside {pod}",
    )


# Worker processes in a pod (the name is split so that this script does not count itself).
WORKERS = (
    "import pathlib; w = b'juturna_operator' + b'.worker'; "
    "print(sum(w in p.read_bytes() for p in pathlib.Path('/proc').glob('[0-9]*/cmdline')))"
)

# The engine pod's rights on top of the Pipeline rules, in each watched namespace: no
# pods/log (never used), no list or watch of Secrets, no update of anything.
POD_ENGINE_RULES = {
    "pods": {"get", "list", "watch", "create", "delete", "patch"},
    "secrets": {"get", "create", "delete"},
    "services": {"get", "create", "patch", "delete"},
    "events": {"create", "list"},  # list: a pod's eviction, where its status lost it
    "networkpolicies.networking.k8s.io": {"get", "create", "patch", "delete"},
}


def granted(role: dict[str, Any]) -> dict[str, set[str]]:
    """A Role's or ClusterRole's rules as {resource[.group]: verbs}, as `can-i --list` names
    them."""
    held: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                base, _, sub = resource.partition("/")  # pipelines/status: pipelines.<group>/status
                name = f"{base}.{group}" if group else base
                held.setdefault(name + (f"/{sub}" if sub else ""), set()).update(rule["verbs"])
    return held


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_the_chart_grants_the_pod_engine_exactly_what_it_uses(mode: str) -> None:
    """What the node test proves with the operator's own token (can-i), checked on the
    rendering, so that it holds where no node runs."""
    namespaced = mode == "namespaced"
    values = ["--set", "watchNamespaces={team-a}"] if namespaced else []
    kind = "Role" if namespaced else "ClusterRole"
    (role,) = [d for d in rendered(*values) if d["kind"] == kind]
    expected = NAMESPACE_RULES | POD_ENGINE_RULES | ({} if namespaced else CLUSTER_RULES)
    assert granted(role) == expected


@pytest.mark.reliability
@pytest.mark.own_operator
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_the_chart_runs_the_operator_as_a_pod_on_a_real_node(
    control_plane: ControlPlane,
    node_image: str,  # the image on the node (so a node runs)
    kubectl: Kubectl,
    namespace: str,
    objects: client.CustomObjectsApi,
    tmp_path: Path,
    mode: str,
) -> None:
    """helm install on a real kubelet: the operator's pod gets Ready, refuses its own account
    to Pipelines of its namespace and, with the rights of its own mounted token and no more,
    runs the example in a pod of its own (the chart's default engine), says so in its log,
    survives an upgrade that rolls it (the pipeline's pod is adopted, never redeployed), and
    leaves nothing behind; without its status rule it says why."""
    assert_sole_operator(control_plane.kubeconfig)
    namespaced = mode == "namespaced"
    values = ["--set", f"watchNamespaces={{{namespace}}}"] if namespaced else []
    with installed(control_plane.kubeconfig, kubectl, *image_values(node_image), *values) as ops:
        pod = operator_pod(kubectl, ops)
        # The RBAC proof, with the token Kubernetes mounted into the pod (projected, signed).
        token = in_pod(kubectl, ops, pod, "cat /var/run/secrets/kubernetes.io/serviceaccount/token")
        sa = token_kubeconfig(control_plane, token, tmp_path / "sa")

        def can_i(*args: str) -> str:
            return kubectl("auth", "can-i", *args, f"--kubeconfig={sa}", check=False).stdout

        assert can_i("patch", "pipelines/status", "-n", namespace).strip() == "yes"
        assert can_i("list", "pipelines", "-A").strip() == ("no" if namespaced else "yes")
        assert can_i("create", "pods", "-n", namespace).strip() == "yes"
        assert can_i("list", "secrets", "-n", namespace).strip() == "no"
        assert can_i("update", "pods", "-n", namespace).strip() == "no"
        assert can_i("list", "customresourcedefinitions").strip() == ("no" if namespaced else "yes")
        held = held_rules(can_i("--list", "-n", namespace))
        expected = NAMESPACE_RULES | POD_ENGINE_RULES | ({} if namespaced else CLUSTER_RULES)
        assert {r: v for r, v in held.items() if r not in EVERY_USER} == expected
        if not namespaced:
            # Round 3, item 6: the operator's own account, named by a Pipeline of its own
            # namespace, is refused; the operator read it from the token in its pod.
            own = Pipelines(objects, ops, kubectl)
            own.apply(manifest("borrow", template={"serviceAccountName": "jo"}))
            refused = own.wait_phase("borrow", "Failed", timeout=60)["status"]["failure"]
            assert refused == {
                "reason": "InvalidSpec",
                "code": 422,
                "step": "validate",
                "message": 'spec.template.serviceAccountName: "jo" is the ServiceAccount the '
                "operator itself runs as, in this namespace; a pipeline's pod never gets the "
                "operator's rights: name another account",
            }
            assert_nothing_made(kubectl, ops)
            own.delete("borrow")
            own.wait_gone("borrow", timeout=60)

        # The example Pipeline, in a pod of its own; its output grows there.
        pipelines = Pipelines(objects, namespace, kubectl)
        pipelines.apply(manifest("tones"))
        body = pipelines.wait_ready("tones", timeout=120)
        assert body["status"]["phase"] == "Running"
        assert body["status"]["pod"]["node"] == "10.244.0.1"
        assert_output_grows(kubectl, namespace, body)
        logs = kubectl("logs", "-n", ops, pod).stdout
        assert f"[{namespace}/tones] Started: " in logs, logs[-3000:]
        assert "Traceback" not in logs, logs[-3000:]
        workers = f'python3 -c "{WORKERS}"'
        assert in_pod(kubectl, ops, pod, workers).strip() == "0"  # none in the operator's pod

        # A Pipeline that listens: with the operator's token and no more, it gets a Service
        # of its own, named in its status, gone with it.
        pipelines.apply(yaml.safe_load((REPO / "examples" / "json-events.yaml").read_text()))
        listening = pipelines.wait_ready("json-in", timeout=120)
        (web,) = listening["status"]["endpoints"]
        assert web["host"] == f"json-in.{namespace}.svc"
        service = kubectl("get", "service", "json-in", "-n", namespace, "-o", "json").stdout
        assert web["clusterIP"] == json.loads(service)["spec"]["clusterIP"]
        # Its NetworkPolicy lets the worker's port be reached from the operator's own pod
        # (the chart's peer), the input port from anyone.
        (policy,) = [
            p
            for p in managed(kubectl, "networkpolicies", namespace)
            if p["metadata"]["ownerReferences"][0]["uid"] == listening["metadata"]["uid"]
        ]
        operator_peer = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ops}},
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/instance": "jo",
                    "app.kubernetes.io/name": "juturna-operator",
                }
            },
        }
        assert policy["spec"]["ingress"] == [
            {"from": [operator_peer], "ports": [{"protocol": "TCP", "port": 8080}]},
            {"ports": [{"protocol": "TCP", "port": web["port"]}]},
        ]
        pipelines.delete("json-in")
        pipelines.wait_gone("json-in", timeout=60)
        wait_until(
            lambda: kubectl("get", "service", "json-in", "-n", namespace, check=False).returncode,
            30,
            "the Service gone with its Pipeline",
        )

        # Take away one rule, patching the status subresource: the pod's log says so.
        where = ["role", "jo", "-n", namespace] if namespaced else ["clusterrole", "jo"]
        role = json.loads(kubectl("get", *where, "-o", "json").stdout)
        index = next(
            i for i, r in enumerate(role["rules"]) if r["resources"] == ["pipelines/status"]
        )

        def patch_role(operation: dict[str, object]) -> None:
            kubectl("patch", *where, "--type=json", "-p", json.dumps([operation]))

        patch_role({"op": "remove", "path": f"/rules/{index}"})
        pipelines.apply(manifest("rbac2"))
        expected_error = 'cannot patch resource "pipelines/status" in API group "juturna.io"'
        wait_until(
            lambda: expected_error in kubectl("logs", "-n", ops, pod).stdout,
            60,
            "the forbidden status patch in the pod's log",
        )
        assert f"system:serviceaccount:{ops}:jo" in kubectl("logs", "-n", ops, pod).stdout
        patch_role({"op": "add", "path": f"/rules/{index}", "value": role["rules"][index]})
        pipelines.delete("rbac2")
        pipelines.wait_gone("rbac2", timeout=60)

        # A value changes: the operator's pod is replaced; the new one adopts the pipeline's
        # pod, whose pipeline never stops (the same instance, its output still growing).
        pipeline_pod_before = pipeline_pod(kubectl, namespace, "tones")
        helm(
            "upgrade",
            "jo",
            str(CHART),
            "-n",
            ops,
            "--reuse-values",
            "--set",
            "logFormat=json",
            kubeconfig=control_plane.kubeconfig,
        )
        new = operator_pod(kubectl, ops, other_than=pod)
        assert new != pod
        wait_until(
            lambda: "adopted pod tones-" in kubectl("logs", "-n", ops, new).stdout,
            60,
            "the new operator adopting the pipeline's pod",
        )
        new_logs = kubectl("logs", "-n", ops, new).stdout.strip().splitlines()
        assert all(line.startswith("{") for line in new_logs), new_logs[:5]
        after = pipelines.wait_ready("tones", timeout=30)
        assert after["status"]["pipelineId"] == body["status"]["pipelineId"]
        assert pipeline_pod(kubectl, namespace, "tones") == pipeline_pod_before
        assert_output_grows(kubectl, namespace, after)

        pipelines.delete("tones")
        pipelines.wait_gone("tones", timeout=60)
        wait_until(
            lambda: (
                not kubectl(
                    "get", "pods,secrets", "-n", namespace, "-l", MANAGED, "-o", "name"
                ).stdout.strip()
            ),
            60,
            "the pipeline's pod and Secret gone with it",
        )
    # helm uninstall (in `installed`): the operator's pod goes, and nothing is left running.
    wait_until(
        lambda: not kubectl("get", "pods", "-n", ops, "-o", "name").stdout.strip(),
        60,
        f"no pod left in {ops} after helm uninstall",
    )
    assert not pipelines.names()


@pytest.mark.reliability
@pytest.mark.own_operator
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            ["--set", "pluginPath=/plugins:/no/such/plugins"],
            "juturna-operator: configuration error: JUTURNA_OPERATOR_PLUGIN_PATH: plugin root "
            "'/no/such/plugins' is not a directory",
        ),
        (
            ["--set", "engine=service", "--set", "defaultRuntime=gpu"],
            "juturna-operator: configuration error: JUTURNA_OPERATOR_DEFAULT_RUNTIME: engine "
            "'service' needs the name of one of the configured runtimes (none configured), got "
            "'gpu'",
        ),
    ],
    ids=["missing-plugin-root", "default-runtime-not-configured"],
)
def test_a_broken_install_crash_loops_saying_why_and_touches_nothing(
    control_plane: ControlPlane,
    node_image: str,  # the image on the node (so a node runs)
    kubectl: Kubectl,
    namespace: str,
    objects: client.CustomObjectsApi,
    values: list[str],
    message: str,
) -> None:
    assert_sole_operator(control_plane.kubeconfig)
    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(manifest("untouched"))
    before = pipelines.get("untouched")
    with installed(control_plane.kubeconfig, kubectl, *image_values(node_image), *values) as ops:
        seen: dict[str, Any] = {}

        def crash_looping() -> bool:
            listed = json.loads(kubectl("get", "pods", "-n", ops, "-o", "json").stdout)["items"]
            statuses = [c for p in listed for c in p.get("status", {}).get("containerStatuses", [])]
            seen["statuses"] = statuses
            return any(
                s["restartCount"] >= 2
                and s.get("state", {}).get("waiting", {}).get("reason") == "CrashLoopBackOff"
                for s in statuses
            )

        wait_until(crash_looping, 120, "a crash loop with back-off", lambda: seen.get("statuses"))
        pod = kubectl("get", "pods", "-n", ops, "-o", "name").stdout.split()[0]
        logs = kubectl("logs", "-n", ops, pod, "--previous").stdout
        assert message in logs
        assert "Traceback" not in logs
        described = kubectl("describe", "-n", ops, pod).stdout
        assert message in described  # the termination message (FallbackToLogsOnError)
        assert "Back-off restarting failed container" in described
    after = pipelines.get("untouched")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert "status" not in after
    assert not after["metadata"].get("finalizers")


def test_metrics_service_and_optional_service_monitor() -> None:
    plain = helm("template", "jo", str(CHART)).stdout
    assert "kind: Service\n" in plain
    assert "ServiceMonitor" not in plain
    monitored = helm(
        "template", "jo", str(CHART), "--set", "metrics.serviceMonitor.enabled=true"
    ).stdout
    assert "kind: ServiceMonitor" in monitored
    assert "port: metrics" in monitored


def install_notes(kubeconfig: Path, *values: str) -> str:
    """The notes `helm install` prints, from a server-side dry run on the plane."""
    out = helm(
        *("install", "jo", str(CHART), "-n", "ops", "--dry-run=server", "--skip-crds", *values),
        kubeconfig=kubeconfig,
    ).stdout
    return out[out.index("NOTES:\n") + len("NOTES:\n") :]


@pytest.mark.usefixtures("crd")
def test_the_install_notes_work_from_the_chart_alone(
    kubeconfig: Path, kubectl: Kubectl, tmp_path: Path
) -> None:
    """The notes name no file of a git checkout (crds/, examples/); their first Pipeline is
    the repository's example, and their commands run as printed: the heredoc ends where it
    should and the API server accepts the Pipeline it holds."""
    kubectl("create", "namespace", "ops", check=False)
    kubectl("create", "namespace", "team-a", check=False)
    notes = install_notes(kubeconfig)
    assert "crds/" not in notes
    assert "examples/" not in notes
    assert "helm test jo -n ops\n" in notes
    assert "kubectl -n ops rollout status deployment/jo\n" in notes
    assert "helm show crds <the chart you upgrade to> --version <its version> | kubectl " in notes
    assert "Metrics: http://jo-metrics.ops.svc:9090/metrics" in notes
    start = notes.index("kubectl apply")
    commands = notes[start : notes.index("\nEOF\n", start) + len("\nEOF\n")]
    body = yaml.safe_load(commands[commands.index("\n") + 1 : -len("EOF\n")])
    example = copy.deepcopy(EXAMPLE)
    assert example["spec"].pop("state") == "Running"  # the default, left out of the notes
    assert body == example

    # `kubectl` for the notes' commands: the plane's, always as a server-side dry run.
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "kubectl"
    wrapper.write_text(
        f'#!/bin/sh\nexec {binaries().kubectl} --kubeconfig={kubeconfig} "$@" '
        "--dry-run=server -o name\n"
    )
    wrapper.chmod(0o755)

    def run_as_printed(commands: str) -> None:
        """The notes' commands, exactly as printed, run by bash."""
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", commands],
            env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "pipeline.juturna.io/tones"

    run_as_printed(commands)
    # Namespaced: the Pipeline goes where the operator looks.
    namespaced = install_notes(kubeconfig, "--set", "watchNamespaces={team-a,team-b}")
    assert "kubectl apply -n team-a -f - <<'EOF'\n" in namespaced
    assert "kubectl wait -n team-a --for=condition=Ready pipeline/tones" in namespaced
    start = namespaced.index("kubectl apply")
    run_as_printed(namespaced[start : namespaced.index("\nEOF\n", start) + len("\nEOF\n")])
    off = install_notes(kubeconfig, "--set", "metrics.port=0")
    assert "Metrics are off (metrics.port is 0)." in off


HELM_TEST = CHART / "files" / "helm-test.py"


@pytest.mark.own_operator
@pytest.mark.usefixtures("crd")
def test_the_helm_test_script_against_the_real_api_server_and_operator(
    control_plane: ControlPlane, kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    """The `helm test` pod's script, run here as the pod would run it: as the namespace's
    default ServiceAccount (no rule of its own), against the plane's API server and a real
    operator's health endpoint. Then each check fails, saying why."""
    assert_sole_operator(control_plane.kubeconfig)
    port = free_port()
    operator = Operator(
        control_plane.kubeconfig,
        tmp_path / "work",
        tmp_path / "operator.log",
        tmp_path,
        "process",
        namespaces=(namespace,),
    )
    operator.where = [*operator.where, f"--liveness=http://127.0.0.1:{port}/healthz"]
    # The pod's account: the default ServiceAccount's token, and the cluster's CA.
    account = tmp_path / "account"
    account.mkdir()
    shutil.copy(control_plane.pki / "ca.crt", account / "ca.crt")
    wait_until(
        lambda: (
            kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode
            == 0
        ),
        30,
        f"the default ServiceAccount of {namespace}",
    )
    token = kubectl("create", "token", "default", "-n", namespace).stdout.strip()
    (account / "token").write_text(token)
    api = urllib.parse.urlsplit(control_plane.server)
    env = {
        "PATH": os.environ["PATH"],
        "KUBERNETES_SERVICE_HOST": str(api.hostname),
        "KUBERNETES_SERVICE_PORT": str(api.port),
        "JUTURNA_TEST_ACCOUNT": str(account),
    }
    health = f"http://127.0.0.1:{port}/healthz"

    def script(*args: str, patience_s: float = 30) -> subprocess.CompletedProcess[str]:
        """The script; it tries the health endpoint for ``patience_s`` (30 in the pod)."""
        return subprocess.run(
            [sys.executable, str(HELM_TEST), *args],
            env={**env, "JUTURNA_TEST_PATIENCE": str(patience_s)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    operator.start()
    try:
        ok = script(health, f"{GROUP}/{VERSION}", PLURAL)
        assert (ok.returncode, ok.stderr) == (0, "")
        assert ok.stdout == (
            f"ok: the operator answers {health}\n"
            f"ok: the API server serves {PLURAL}.{GROUP}/{VERSION} (its CRD is Established)\n"
        )
        missing = script(health, f"nothing.{GROUP}/v1", PLURAL)
        assert missing.returncode == 1
        assert missing.stderr == (
            f"FAIL: the API server does not serve nothing.{GROUP}/v1: the CRD "
            f"{PLURAL}.nothing.{GROUP} is missing or not Established (kubectl get crd "
            f"{PLURAL}.nothing.{GROUP})\n"
        )
    finally:
        operator.stop()
    down = script(health, f"{GROUP}/{VERSION}", PLURAL, patience_s=2)
    assert down.returncode == 1
    assert down.stderr == (
        f"FAIL: the operator does not answer {health}: [Errno 111] Connection refused\n"
    )
    assert down.stdout.startswith("ok: the API server serves")


@pytest.mark.own_operator
@pytest.mark.timeout(400)
@pytest.mark.usefixtures("crd")
def test_helm_test_passes_on_a_real_node_and_says_why_it_fails(
    control_plane: ControlPlane,
    node_image: str,  # the image on the node (so a node runs)
    kubectl: Kubectl,
) -> None:
    """`helm test` on the real kubelet: its pod (the operator's image, the namespace's
    default ServiceAccount) reaches the operator through its Service (kube-proxy, CoreDNS)
    and sees Pipelines served. With the operator scaled to zero, `helm test` fails, and its
    pod's log says the operator does not answer."""
    assert_sole_operator(control_plane.kubeconfig)
    with installed(control_plane.kubeconfig, kubectl, *image_values(node_image)) as ops:
        operator_pod(kubectl, ops)
        run = ["test", "jo", "-n", ops, "--logs", "--timeout", "180s"]
        passed = helm(*run, kubeconfig=control_plane.kubeconfig)
        assert re.search(r"^Phase:\s+Succeeded$", passed.stdout, re.M), passed.stdout
        health = f"http://jo.{ops}.svc:8080/healthz"
        assert f"ok: the operator answers {health}\n" in passed.stdout
        assert (
            f"ok: the API server serves {PLURAL}.{GROUP}/{VERSION} (its CRD is Established)\n"
        ) in passed.stdout

        kubectl("scale", "deployment/jo", "-n", ops, "--replicas=0")
        wait_until(
            lambda: not kubectl("get", "pods", "-n", ops, "-l", SELECTOR, "-o", "name").stdout,
            60,
            f"no operator pod left in {ops}",
        )
        failed = helm(*run, kubeconfig=control_plane.kubeconfig, check=False)
        assert failed.returncode != 0
        assert re.search(r"^Phase:\s+Failed$", failed.stdout, re.M), failed.stdout
        assert f"FAIL: the operator does not answer {health}: " in failed.stdout
        # The test pod stays for `helm test --logs`; helm uninstall leaves hooks alone.
        kubectl("delete", "pod", "jo-test", "-n", ops, "--wait=false")
