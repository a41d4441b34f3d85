"""The chart's values as `helm template` renders them (no cluster): each value Helm users set
reaches the objects, the schema and the templates refuse mistakes with a message that names
them, and the chart's metadata, test hook and alerts match the operator they ship."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from juturna_operator.api import GROUP, PLURAL, VERSION, Phase
from juturna_operator.domain import PipelineKey
from juturna_operator.lifecycle import UpdateOutcome
from juturna_operator.metrics import Metrics
from juturna_operator.settings import Settings
from support import CHART, EXAMPLE, REPO, helm, pinned, rendered

DIGEST = "sha256:" + "ab" * 32


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one rendered object of ``kind`` (named ``name``, if given)."""
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}: {[o['kind'] for o in objects]}"
    return found[0]


def operator_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The Deployment's pod template."""
    template: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]
    return template


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (only,) = operator_pod(objects)["spec"]["containers"]
    return dict(only)


def env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(objects)["env"]}


def refused(*values: str) -> str:
    """What a user sees when `helm template` refuses these values."""
    proc = helm("template", "jo", str(CHART), *values, check=False)
    assert proc.returncode != 0, f"{values} rendered"
    return proc.stderr


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- the values ---------------------------------------------------------------------------


def test_names_follow_name_and_fullname_overrides() -> None:
    objects = rendered("--set", "nameOverride=jt", "--set", "fullnameOverride=media-ops")
    deployment = one(objects, "Deployment", "media-ops")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "jt", "app.kubernetes.io/instance": "jo"}
    assert operator_pod(objects)["spec"]["serviceAccountName"] == "media-ops"
    assert one(objects, "ServiceAccount")["metadata"]["name"] == "media-ops"
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Service"} == {
        "media-ops",
        "media-ops-metrics",
    }
    binding = one(objects, "ClusterRoleBinding", "media-ops")
    assert binding["subjects"][0]["name"] == "media-ops"
    # The NetworkPolicy peer the operator gives pipeline pods names the renamed labels.
    peers = json.loads(env(objects)["JUTURNA_OPERATOR_WORKER_PEERS"])
    assert peers[0]["podSelector"]["matchLabels"] == selector


def test_the_default_names_are_the_release_s() -> None:
    """Upgrades from earlier charts keep their objects (a renamed Deployment would run two
    operators for a moment)."""
    objects = rendered()
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("Deployment", "jo") in names
    assert ("ServiceAccount", "jo") in names
    assert ("ClusterRole", "jo") in names
    assert ("Service", "jo-metrics") in names


def test_image_digest_pins_the_operator_and_the_pipeline_pods() -> None:
    objects = rendered("--set", "image.repository=r.example/jo", "--set", f"image.digest={DIGEST}")
    assert container(objects)["image"] == f"r.example/jo@{DIGEST}"
    assert env(objects)["JUTURNA_OPERATOR_RUNTIME_IMAGE"] == f"r.example/jo@{DIGEST}"
    test_pod = one(objects, "Pod")
    assert test_pod["spec"]["containers"][0]["image"] == f"r.example/jo@{DIGEST}"
    runtime = rendered(
        *("--set", "runtimeImage.repository=r.example/rt", "--set", f"runtimeImage.digest={DIGEST}")
    )
    assert env(runtime)["JUTURNA_OPERATOR_RUNTIME_IMAGE"] == f"r.example/rt@{DIGEST}"
    assert container(runtime)["image"] == "juturna-operator:0.1.0"


def test_pod_values_reach_the_operator_s_pod() -> None:
    objects = rendered(
        "--set-json",
        'imagePullSecrets=[{"name": "regcred"}]',
        "--set-json",
        'podAnnotations={"prometheus.io/scrape": "false"}',
        "--set-json",
        'podLabels={"team": "media", "app.kubernetes.io/name": "mine"}',
        "--set",
        "priorityClassName=ops-high",
        "--set-json",
        'nodeSelector={"pool": "ops"}',
        "--set-json",
        'tolerations=[{"key": "ops", "operator": "Exists"}]',
        "--set-json",
        'affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": '
        '{"nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", '
        '"values": ["ops"]}]}]}}}',
    )
    pod = operator_pod(objects)
    spec = pod["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "false"}
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "juturna-operator",  # the selector's, not podLabels'
        "app.kubernetes.io/instance": "jo",
        "team": "media",
    }
    assert spec["priorityClassName"] == "ops-high"
    assert spec["nodeSelector"] == {"pool": "ops"}
    assert spec["tolerations"] == [{"key": "ops", "operator": "Exists"}]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["ops"]
    # The test pod runs the same image on the same nodes, with the same pull Secrets.
    test_spec = one(objects, "Pod")["spec"]
    assert test_spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert test_spec["nodeSelector"] == {"pool": "ops"}
    assert test_spec["tolerations"] == [{"key": "ops", "operator": "Exists"}]


def test_service_account_and_rbac_values() -> None:
    annotated = rendered(
        "--set-json", 'serviceAccount.annotations={"iam.gke.io/gcp-service-account": "jo@p"}'
    )
    account = one(annotated, "ServiceAccount", "jo")
    assert account["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "jo@p"}

    # Someone else's account and rules: the chart makes neither, and the pod runs as it.
    theirs = rendered(
        *("--set", "serviceAccount.create=false", "--set", "serviceAccount.name=platform-jo"),
        *("--set", "rbac.create=false"),
    )
    kinds = {o["kind"] for o in theirs}
    assert not kinds & {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role"}
    assert operator_pod(theirs)["spec"]["serviceAccountName"] == "platform-jo"

    # An account of its own name, bound by the chart's rules (both RBAC modes).
    named = rendered("--set", "serviceAccount.name=jo-sa", "--set", "watchNamespaces={a}")
    assert one(named, "ServiceAccount")["metadata"]["name"] == "jo-sa"
    assert one(named, "RoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "jo-sa", "namespace": "ops"}
    ]
    assert operator_pod(named)["spec"]["serviceAccountName"] == "jo-sa"
    # Not created and not named: the namespace's default account.
    default = rendered("--set", "serviceAccount.create=false")
    assert operator_pod(default)["spec"]["serviceAccountName"] == "default"
    assert one(default, "ClusterRoleBinding")["subjects"][0]["name"] == "default"


def test_extra_env_and_args_reach_the_operator() -> None:
    objects = rendered(
        "--set-json",
        'extraEnv=[{"name": "JUTURNA_OPERATOR_MAX_CONCURRENCY", "value": "16"}, '
        '{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]',
        "--set-json",
        'extraArgs=["-v", "--max-concurrency=16"]',
    )
    variables = container(objects)["env"]
    assert {"name": "JUTURNA_OPERATOR_MAX_CONCURRENCY", "value": "16"} in variables
    assert {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}} in variables
    args = container(objects)["args"]
    assert args[:3] == ["run", "-A", "--liveness=http://0.0.0.0:8080/healthz"]
    assert args[3:] == ["-v", "--max-concurrency=16"]


def test_extra_env_may_not_replace_a_setting_the_chart_makes() -> None:
    message = refused(
        "--set-json", 'extraEnv=[{"name": "JUTURNA_OPERATOR_ENGINE", "value": "process"}]'
    )
    assert (
        "extraEnv: JUTURNA_OPERATOR_ENGINE is set by the chart from its values; set that value "
        "instead of adding it to extraEnv"
    ) in message


def test_no_fixed_user_by_default_so_a_platform_may_assign_one() -> None:
    """OpenShift's restricted SCC refuses a pod that fixes a user outside the namespace's
    range: the defaults fix none and run as the image's numeric user (runAsNonRoot)."""
    objects = rendered()
    specs = [operator_pod(objects)["spec"]] + [o["spec"] for o in objects if o["kind"] == "Pod"]
    for spec in specs:
        assert spec["securityContext"] == {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        (main,) = spec["containers"]
        assert main["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
    assert len(specs) == 2, "the operator's pod and the test pod"
    fixed = rendered(
        *(
            "--set",
            "podSecurityContext.runAsUser=10001",
            "--set",
            "podSecurityContext.fsGroup=2000",
        ),
        *("--set", "securityContext.readOnlyRootFilesystem=false"),
    )
    pod_context = operator_pod(fixed)["spec"]["securityContext"]
    assert pod_context["runAsUser"] == 10001
    assert pod_context["fsGroup"] == 2000
    assert container(fixed)["securityContext"]["readOnlyRootFilesystem"] is False


def pipeline_pod_settings(objects: list[dict[str, Any]]) -> Settings:
    """The operator's settings of pipeline pods' user and pull Secrets, read by its own parser
    from the env the chart renders."""
    variables = env(objects)
    return Settings.from_env(
        {
            name: variables[f"JUTURNA_OPERATOR_{name}"]
            for name in ("POD_USER", "POD_IMAGE_PULL_SECRETS")
        }
    )


def test_pipeline_pods_user_and_pull_secrets_reach_the_operator() -> None:
    defaults = rendered()
    assert env(defaults)["JUTURNA_OPERATOR_POD_USER"] == ""
    assert env(defaults)["JUTURNA_OPERATOR_POD_IMAGE_PULL_SECRETS"] == ""
    settings = pipeline_pod_settings(defaults)
    assert (settings.pod_user, settings.pod_image_pull_secrets) == (None, ())  # the image's

    given = rendered(
        *("--set-json", 'pipelinePod.imagePullSecrets=[{"name": "corp"}, {"name": "mirror.io"}]'),
        *("--set-string", "pipelinePod.user=10001:2000"),
    )
    assert env(given)["JUTURNA_OPERATOR_POD_IMAGE_PULL_SECRETS"] == "corp,mirror.io"
    assert env(given)["JUTURNA_OPERATOR_POD_USER"] == "10001:2000"
    settings = pipeline_pod_settings(given)
    assert settings.pod_image_pull_secrets == ("corp", "mirror.io")
    assert settings.pod_user == (10001, 2000)
    # The operator's own pod keeps its own pull Secrets (none given here).
    assert "imagePullSecrets" not in operator_pod(given)["spec"]


@pytest.mark.parametrize("source", ["--set", "values file"])
def test_a_numeric_pipeline_pod_user_stays_an_integer(source: str, tmp_path: Path) -> None:
    """`--set user=N` gives Helm an int64, a values file's `user: N` a float64 (which Helm's
    toString prints as 1.00068e+09): both reach the operator as the digits. An OpenShift-range
    UID is the large kind."""
    if source == "--set":
        objects = rendered("--set", "pipelinePod.user=1000680000")
    else:
        values = tmp_path / "values.yaml"
        values.write_text("pipelinePod:\n  user: 1000680000\n")
        objects = rendered("-f", str(values))
    assert env(objects)["JUTURNA_OPERATOR_POD_USER"] == "1000680000"
    assert pipeline_pod_settings(objects).pod_user == (1000680000, None)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (("--set", "pipelinePod.user=0"), "at '/pipelinePod/user': minimum: got 0, want 1"),
        (("--set-string", "pipelinePod.user=0"), "at '/pipelinePod/user': '0' does not match"),
        (("--set-string", "pipelinePod.user=0:0"), "at '/pipelinePod/user': '0:0' does not"),
        (("--set-string", "pipelinePod.user=root"), "at '/pipelinePod/user': 'root' does not"),
        (("--set-string", "pipelinePod.user=10001:x"), "'10001:x' does not match pattern"),
        (("--set", "pipelinePod.user=true"), "at '/pipelinePod/user': got boolean, want"),
    ],
)
def test_the_pipeline_pod_user_is_numeric_and_never_root(
    value: tuple[str, str], message: str
) -> None:
    assert message in refused(*value)


# --- metrics ------------------------------------------------------------------------------


def test_metrics_port_zero_turns_metrics_off() -> None:
    objects = rendered("--set", "metrics.port=0")
    assert env(objects)["JUTURNA_OPERATOR_METRICS_PORT"] == "0"
    assert [p["name"] for p in container(objects)["ports"]] == ["liveness"]
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Service"] == ["jo"]
    monitor = refused("--set", "metrics.port=0", "--set", "metrics.serviceMonitor.enabled=true")
    assert (
        "metrics.serviceMonitor.enabled needs the metrics endpoint, but metrics.port is 0 (off)"
    ) in monitor
    rule = refused("--set", "metrics.port=0", "--set", "metrics.prometheusRule.enabled=true")
    assert (
        "metrics.prometheusRule.enabled needs the metrics endpoint, but metrics.port is 0 (off)"
    ) in rule


def test_metrics_and_health_need_two_ports() -> None:
    message = refused("--set", "metrics.port=8080")
    assert "metrics.port and liveness.port are both 8080: give them different ports" in message


def test_the_service_monitor_selects_the_metrics_service_whatever_the_version() -> None:
    objects = rendered(
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set-json",
        'metrics.serviceMonitor.labels={"release": "kube-prometheus-stack"}',
        "--set",
        "metrics.serviceMonitor.scrapeTimeout=10s",
    )
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/name"] == "juturna-operator"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "honorLabels": True,  # a Pipeline's namespace label stays its own
        "interval": "30s",
        "scrapeTimeout": "10s",
    }
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert "app.kubernetes.io/version" not in selector
    assert "helm.sh/chart" not in selector
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ops"]}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    assert selects(selector, services["jo-metrics"]["metadata"]["labels"])
    assert not selects(selector, services["jo"]["metadata"]["labels"])
    # The metrics Service's port is the one the ServiceMonitor names.
    assert [p["name"] for p in services["jo-metrics"]["spec"]["ports"]] == ["metrics"]
    # No scrapeTimeout: Prometheus' own default (the key is left out).
    plain = one(rendered("--set", "metrics.serviceMonitor.enabled=true"), "ServiceMonitor")
    assert "scrapeTimeout" not in plain["spec"]["endpoints"][0]


def exposed_series() -> set[str]:
    """The operator's metric names, each with its labels (`name.label`) and the values they
    take (`name.label=value`), with a Failed Pipeline tracked and an Aborted warm swap ended:
    a labelled series exists only once something was counted in it."""
    metrics = Metrics()
    key = PipelineKey("team-a", "p", "uid-1")
    metrics.observed(key, Phase.Failed, 0, ready=False)
    metrics.update_ended(key, UpdateOutcome.Aborted, 42.0)
    names = set()
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.add(sample.name)
            for label, value in sample.labels.items():
                names.update({f"{sample.name}.{label}", f"{sample.name}.{label}={value}"})
    return names


# A series selector of an alert's expression: `juturna_...{label="value", ...}`.
SELECTOR = re.compile(r"\b(juturna_[a-z_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*=~?\s*"([^"]*)"')
GROUPED = re.compile(r"\bby \(([^)]*)\)")


def series_read_by(expr: str) -> set[str]:
    """What an alert's expression reads, as exposed_series() spells it: each juturna series,
    the labels its selectors match (with their values) and those it is grouped by. `job` is
    Prometheus' own label, not the operator's."""
    read = set()
    selectors = SELECTOR.findall(expr)
    for name, matchers in selectors:
        read.add(name)
        for label, value in MATCHER.findall(matchers):
            if label != "job":
                read.update({f"{name}.{label}", f"{name}.{label}={value}"})
        for labels in GROUPED.findall(expr):
            read.update(f"{name}.{label.strip()}" for label in labels.split(","))
    return read


def test_the_prometheus_rule_alerts_on_what_the_operator_exposes() -> None:
    objects = rendered(
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set-json",
        'metrics.prometheusRule.labels={"release": "kube-prometheus-stack"}',
        "--set",
        "metrics.prometheusRule.pipelineFailedFor=15m",
        "--set",
        "metrics.prometheusRule.updateAbortedWindow=30m",
    )
    rule = one(objects, "PrometheusRule", "jo")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == {
        "JuturnaOperatorDown",
        "JuturnaPipelinesFailed",
        "JuturnaPipelineUpdatesFailing",
    }
    down = alerts["JuturnaOperatorDown"]
    # The job is the metrics Service's name: what a ServiceMonitor's targets are called.
    assert down["expr"] == 'absent(up{job="jo-metrics", namespace="ops"} == 1)'
    assert down["for"] == "5m"
    failed = alerts["JuturnaPipelinesFailed"]
    assert failed["for"] == "15m"
    assert failed["labels"] == {"severity": "warning"}
    assert failed["expr"] == (
        'sum by (namespace) (juturna_pipelines{job="jo-metrics", phase="Failed"}) > 0'
    )
    # Prometheus' own templates reach the rule untouched by Helm.
    assert "{{ $labels.namespace }}" in failed["annotations"]["summary"]
    # Aborted warm swaps in the window: a series younger than the window (made by its first
    # abort, at 1) counts whole, since increase() sees no rise in a first sample.
    updates = alerts["JuturnaPipelineUpdatesFailing"]
    aborted = 'juturna_pipeline_updates_total{job="jo-metrics", outcome="Aborted"}'
    assert " ".join(updates["expr"].split()) == (
        f"sum by (namespace) ( ({aborted} unless {aborted} offset 30m) "
        f"or increase({aborted}[30m]) ) > 0"
    )
    assert "for" not in updates  # the abort has happened: no wait
    assert updates["labels"] == {"severity": "warning"}
    assert "{{ $labels.namespace }}" in updates["annotations"]["summary"]
    description = updates["annotations"]["description"]
    assert '{{ printf "%.0f" $value }} warm swap(s)' in description
    assert "were Aborted in the last 30m" in description
    # Every series, label and value the alerts read is one the operator's registry exposes.
    series = exposed_series()
    read = set().union(*(series_read_by(r["expr"]) for r in group["rules"]))
    assert {
        "juturna_pipelines.phase=Failed",
        "juturna_pipelines.namespace",
        "juturna_pipeline_updates_total.outcome=Aborted",
        "juturna_pipeline_updates_total.namespace",
    } <= read
    assert read <= series, read - series
    # Off by default: the Prometheus Operator's CRDs may not exist.
    assert not [o for o in rendered() if o["kind"] in {"PrometheusRule", "ServiceMonitor"}]
    # The window's default.
    default = one(rendered("--set", "metrics.prometheusRule.enabled=true"), "PrometheusRule")
    (default_group,) = default["spec"]["groups"]
    (default_updates,) = [
        r for r in default_group["rules"] if r["alert"] == "JuturnaPipelineUpdatesFailing"
    ]
    assert "offset 15m" in default_updates["expr"]
    assert "[15m]" in default_updates["expr"]


# --- the schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("metrics.port=-1", "at '/metrics/port': minimum: got -1, want 0"),
        ("metrics.serviceMonitor.scrapeTimeout=10 s", "at '/metrics/serviceMonitor/scrapeTimeout'"),
        ("metrics.prometheusRule.enabeld=true", "additional properties 'enabeld' not allowed"),
        ("serviceAccount.create=yes", "at '/serviceAccount/create': got string, want boolean"),
        ("rbac.craete=false", "additional properties 'craete' not allowed"),
        ("image.digest=latest", "at '/image/digest'"),
        ("imagePullSecrets[0].secret=regcred", "missing property 'name'"),
        ("extraArgs[0]=1", "at '/extraArgs/0': got number, want string"),
        ("podLabels.team=1", "at '/podLabels/team': got number, want string"),
        (
            "pipelinePod.imagePullSecrets[0].name=Team_Registry",
            "at '/pipelinePod/imagePullSecrets/0/name': 'Team_Registry' does not match",
        ),
        ("metrics.prometheusRule.updateAbortedWindow=15", "at '/metrics/prometheusRule/update"),
    ],
)
def test_the_schema_refuses_a_mistake_saying_where(value: str, message: str) -> None:
    assert message in refused("--set", value)


def test_an_older_kubernetes_is_refused() -> None:
    """The CRD's rules need CEL's list library (Kubernetes 1.34): an older cluster is told so
    at install, not by a CRD the API server refuses."""
    proc = helm("template", "jo", str(CHART), "--kube-version=1.33.0", check=False)
    assert proc.returncode != 0
    assert (
        "chart requires kubeVersion: >=1.34.0-0 which is incompatible with Kubernetes v1.33.0"
    ) in proc.stderr
    assert "distinct()" in (REPO / "crds" / f"{PLURAL}.{GROUP}.yaml").read_text()
    assert pinned("KUBERNETES_VERSION") >= "v1.34"


# --- metadata and the test hook -----------------------------------------------------------

CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())


def test_chart_metadata_for_helm_and_artifact_hub() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    annotations = CHART_META["annotations"]
    assert CHART_META["kubeVersion"] == ">=1.34.0-0"
    assert CHART_META["home"].startswith("https://")
    assert all(s.startswith("https://") for s in CHART_META["sources"])
    assert "juturna" in CHART_META["keywords"]
    assert f'license = "{annotations["artifacthub.io/license"]}"' in pyproject
    (image,) = yaml.safe_load(annotations["artifacthub.io/images"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert image["image"] == f"{values['image']['repository']}:{CHART_META['appVersion']}"
    # The CRD's own names and description.
    crd = yaml.safe_load((CHART / "crds" / f"{PLURAL}.{GROUP}.yaml").read_text())
    (listed,) = yaml.safe_load(annotations["artifacthub.io/crds"])
    assert listed == {
        "kind": crd["spec"]["names"]["kind"],
        "version": VERSION,
        "name": crd["metadata"]["name"],
        "displayName": crd["spec"]["names"]["kind"],
        "description": crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"],
    }
    # The example is the repository's example Pipeline (its default state left out).
    (example,) = yaml.safe_load(annotations["artifacthub.io/crdsExamples"])
    assert example == example_without_defaults()


def example_without_defaults() -> dict[str, Any]:
    """examples/pipeline.yaml as the chart shows it: `state: Running` is the default."""
    body = json.loads(json.dumps(EXAMPLE))
    assert body["spec"].pop("state") == "Running"
    return dict(body)


def test_the_helm_test_pod_checks_the_operator_and_the_crd() -> None:
    objects = rendered()
    pod = one(objects, "Pod", "jo-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (main,) = pod["spec"]["containers"]
    assert main["command"][:2] == ["python3", "-c"]
    assert main["command"][2] == (CHART / "files" / "helm-test.py").read_text()
    health = one(objects, "Service", "jo")
    port = health["spec"]["ports"][0]["port"]
    assert main["command"][3:] == [
        f"http://jo.ops.svc:{port}/healthz",
        f"{GROUP}/{VERSION}",
        PLURAL,
    ]
    # The health Service reaches the operator's health port, and not the test pod itself.
    assert selects(health["spec"]["selector"], operator_pod(objects)["metadata"]["labels"])
    assert not selects(health["spec"]["selector"], pod["metadata"]["labels"])
    assert health["spec"]["ports"][0]["targetPort"] == "liveness"


def test_helmignore_leaves_out_python_and_editor_leftovers() -> None:
    ignored = (CHART / ".helmignore").read_text().split()
    assert {"__pycache__/", "*.pyc", "*.swp", ".git/"} <= set(ignored)


def test_values_documented_in_the_readme_are_those_of_values_yaml() -> None:
    """Every key the schema allows at the top is in values.yaml (so in the README too)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(schema["properties"]) == set(values)
