"""The Helm chart: lint, templates the real API server accepts, and RBAC that is enough."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from controlplane import ControlPlane, ensure_binaries

from support import REPO, Kubectl, Operator, Pipelines, assert_sole_operator, manifest

pytestmark = pytest.mark.cluster
CHART = REPO / "charts" / "juturna-operator"


def helm(kubeconfig: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = ensure_binaries().helm / "helm"
    proc = subprocess.run(
        [str(binary), f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}:\n{proc.stderr}{proc.stdout}")
    return proc


def test_the_charts_crds_equal_the_generated_ones() -> None:
    top = {p.name: p.read_text() for p in (REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert chart == top, "charts/juturna-operator/crds differs from crds/: run `make crds`"


def test_helm_lint(kubeconfig: Path) -> None:
    out = helm(kubeconfig, "lint", str(CHART)).stdout
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
    ],
    ids=["cluster-wide", "namespaced", "service-runtimes"],
)
def test_templates_pass_server_side_dry_run(
    kubeconfig: Path, kubectl: Kubectl, values: list[str]
) -> None:
    for ns in ("ops", "team-a", "team-b"):
        kubectl("create", "namespace", ns, check=False)
    rendered = helm(kubeconfig, "template", "jo", str(CHART), "-n", "ops", *values).stdout
    kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)


def test_the_values_schema_rejects_a_typo(kubeconfig: Path) -> None:
    proc = helm(kubeconfig, "template", "jo", str(CHART), "--set", "engine=docker", check=False)
    assert proc.returncode != 0
    assert "engine" in proc.stderr
    assert "value must be one of 'process', 'inprocess', 'service'" in proc.stderr
    proc = helm(kubeconfig, "template", "jo", str(CHART), "--set", "enigne=process", check=False)
    assert "additional properties 'enigne' not allowed" in proc.stderr


@contextlib.contextmanager
def installed(kubeconfig: Path, kubectl: Kubectl, *values: str) -> Iterator[str]:
    """The chart installed as release "jo" into a new namespace, which it yields."""
    ns = f"ops-{uuid.uuid4().hex[:6]}"
    # --skip-crds: the session installed the CRD already.
    install = ["install", "jo", str(CHART), "-n", ns, "--create-namespace", "--skip-crds"]
    out = helm(kubeconfig, *install, *values).stdout
    assert "STATUS: deployed" in out, out
    try:
        yield ns
    finally:
        helm(kubeconfig, "uninstall", "jo", "-n", ns)
        kubectl("delete", "namespace", ns, "--wait=false")


# What the operator uses, and nothing else: read and patch Pipelines (kopf's finalizer),
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


def service_account_kubeconfig(plane: ControlPlane, kubectl: Kubectl, ns: str, path: Path) -> Path:
    token = kubectl("create", "token", "jo", "-n", ns, "--duration=1h").stdout.strip()
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "sa",
                "clusters": [
                    {
                        "name": "local",
                        "cluster": {
                            "server": plane.server,
                            "certificate-authority": str(plane.pki / "ca.crt"),
                        },
                    }
                ],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa"}}],
            }
        )
    )
    return path


@pytest.mark.reliability
@pytest.mark.own_operator
@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_the_chart_rbac_is_enough_and_each_rule_is_needed(
    control_plane: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    objects: object,
    tmp_path: Path,
    mode: str,
) -> None:
    """helm install, then the operator runs as the chart's ServiceAccount and nothing else:
    create -> Ready -> delete works; without the status rule it fails, saying so."""
    assert_sole_operator(control_plane.kubeconfig)
    namespaced = mode == "namespaced"
    values = ["--set", f"watchNamespaces={{{namespace}}}"] if namespaced else []
    with installed(control_plane.kubeconfig, kubectl, *values) as ops:
        sa = service_account_kubeconfig(control_plane, kubectl, ops, tmp_path / "sa")

        def can_i(*args: str) -> str:
            return kubectl("auth", "can-i", *args, f"--kubeconfig={sa}", check=False).stdout

        assert can_i("patch", "pipelines/status", "-n", namespace).strip() == "yes"
        assert can_i("list", "pipelines", "-A").strip() == ("no" if namespaced else "yes")
        assert can_i("get", "secrets", "-n", namespace).strip() == "no"
        assert can_i("list", "customresourcedefinitions").strip() == ("no" if namespaced else "yes")
        # Every verb it holds, against the allow-list of what the operator uses.
        held = held_rules(can_i("--list", "-n", namespace))
        expected = dict(NAMESPACE_RULES) | ({} if namespaced else CLUSTER_RULES)
        assert {r: v for r, v in held.items() if r not in EVERY_USER} == expected

        op = Operator(
            sa,
            tmp_path / "work",
            tmp_path / "operator.log",
            tmp_path,
            "inprocess",
            namespaces=(namespace,) if namespaced else (),
        )
        op.start()
        try:
            pipelines = Pipelines(objects, namespace, kubectl)  # type: ignore[arg-type]
            pipelines.apply(manifest("rbac"))
            assert pipelines.wait_ready("rbac")["status"]["phase"] == "Running"
            pipelines.delete("rbac")
            pipelines.wait_gone("rbac")
            assert "Forbidden" not in op.log_text()

            # Take away one rule: patching the status subresource.
            where = ["role", "jo", "-n", namespace] if namespaced else ["clusterrole", "jo"]
            role = json.loads(kubectl("get", *where, "-o", "json").stdout)
            index = next(
                i for i, r in enumerate(role["rules"]) if r["resources"] == ["pipelines/status"]
            )

            def patch_role(operation: dict[str, object]) -> None:
                kubectl("patch", *where, "--type=json", "-p", json.dumps([operation]))

            patch_role({"op": "remove", "path": f"/rules/{index}"})
            pipelines.apply(manifest("rbac2"))
            expected = 'cannot patch resource "pipelines/status" in API group "juturna.io"'
            pipelines.wait(
                "rbac2",
                lambda _: expected in op.log_text(),
                timeout=30,
                what="the forbidden status patch in the operator's log",
            )
            assert f'User "system:serviceaccount:{ops}:jo"' in op.log_text()
            # Without it even deletion stalls (kopf keeps its progress in the status), so the
            # rule goes back before cleaning up.
            patch_role({"op": "add", "path": f"/rules/{index}", "value": role["rules"][index]})
            pipelines.delete("rbac2")
            pipelines.wait_gone("rbac2")
        finally:
            op.stop()


def test_metrics_service_and_optional_service_monitor(kubeconfig: Path) -> None:
    plain = helm(kubeconfig, "template", "jo", str(CHART)).stdout
    assert "kind: Service\n" in plain
    assert "ServiceMonitor" not in plain
    monitored = helm(
        kubeconfig, "template", "jo", str(CHART), "--set", "metrics.serviceMonitor.enabled=true"
    ).stdout
    assert "kind: ServiceMonitor" in monitored
    assert "port: metrics" in monitored
