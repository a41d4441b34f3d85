"""What a Pipeline's template may give its pod (engine pod): every refusal, with the message a
user reads, and what stays allowed (placement, GPUs, models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from juturna_operator import podpolicy
from juturna_operator.api import PipelineSpec, PodTemplate, first_error
from juturna_operator.engines.pod import TOKEN_DIR
from juturna_operator.graph import validate
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import SERVICE_ACCOUNT_TOKEN, ServiceAccount, Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plugins"
ROOT = "/srv/juturna-plugins"
OPERATOR = ServiceAccount("ops", "jo")
SETTINGS = Settings(
    engine="pod",
    runtime_image="localhost/jo:1",
    plugin_roots=[Path(ROOT)],
    service_account=OPERATOR,
)
TYPES = (
    "configMap, csi, downwardAPI, emptyDir, ephemeral, image, persistentVolumeClaim, "
    "projected, secret"
)
VOLUME_SETTING = "JUTURNA_OPERATOR_ALLOWED_VOLUME_TYPES (chart: allowedVolumeTypes)"
REFUSED_ENV = (
    "(refused: PYTHON*, LD_*, JUTURNA_OPERATOR_*, PATH, GCONV_PATH, OPENSSL_CONF, "
    "OPENSSL_MODULES, OPENSSL_ENGINES)"
)
TOKEN_VOLUME = {"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}


def refusal(template: dict[str, Any], settings: Settings = SETTINGS, ns: str = "team-a") -> str:
    policy = settings.pod_policy(None, ns)
    assert policy is not None
    with pytest.raises(PipelineFailure) as refused:
        podpolicy.check_template(PodTemplate.model_validate(template), policy)
    failure = refused.value
    assert (failure.reason, failure.reason.code, failure.step) == (
        FailureReason.InvalidSpec,
        422,
        Step.validate,
    )
    return failure.message


def allowed(template: dict[str, Any], settings: Settings = SETTINGS, ns: str = "team-a") -> None:
    policy = settings.pod_policy(None, ns)
    assert policy is not None
    podpolicy.check_template(PodTemplate.model_validate(template), policy)


def mount(path: str) -> dict[str, Any]:
    return {
        "volumes": [{"name": "m", "persistentVolumeClaim": {"claimName": "models"}}],
        "volumeMounts": [{"name": "m", "mountPath": path}],
    }


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]},
            'spec.template.volumes[0].hostPath: host paths are not allowed (volume "host" '
            f"would reach the node's own files); allowed types: {TYPES}; the administrator "
            f"allows more with {VOLUME_SETTING}",
        ),
        (
            {
                "volumes": [
                    {"name": "cfg", "configMap": {"name": "c"}},
                    {"name": "share", "nfs": {"server": "nas", "path": "/"}},
                ]
            },
            'spec.template.volumes[1].nfs: volume type nfs is not allowed (volume "share"); '
            f"allowed types: {TYPES}; the administrator allows more with {VOLUME_SETTING}",
        ),
        (
            {"volumes": [TOKEN_VOLUME]},
            "spec.template.volumes[0].projected.sources[0].serviceAccountToken: a "
            "ServiceAccount token needs spec.template.serviceAccountName: without one it would "
            "be the namespace's default account's, which the pipeline's pod does not get",
        ),
        (
            {"annotations": {"container.apparmor.security.beta.kubernetes.io/juturna": "x"}},
            'spec.template.annotations["container.apparmor.security.beta.kubernetes.io/'
            "juturna\"]: security annotations are not allowed: they would change the pod's "
            "AppArmor or seccomp profile, which the operator sets (RuntimeDefault)",
        ),
        (
            {"annotations": {"note": "x", "seccomp.security.alpha.kubernetes.io/pod": "x"}},
            'spec.template.annotations["seccomp.security.alpha.kubernetes.io/pod"]: security '
            "annotations are not allowed: they would change the pod's AppArmor or seccomp "
            "profile, which the operator sets (RuntimeDefault)",
        ),
        (
            {"priorityClassName": "system-node-critical"},
            'spec.template.priorityClassName: priority class "system-node-critical" is not '
            "allowed (a priority class lets the pod preempt other workloads); allowed: none; "
            "the administrator allows classes with JUTURNA_OPERATOR_ALLOWED_PRIORITY_CLASSES "
            "(chart: allowedPriorityClasses)",
        ),
        (
            {"env": [{"name": "MODEL", "value": "/models/x"}, {"name": "PYTHONPATH"}]},
            "spec.template.env[1].name: PYTHONPATH is not allowed: it changes how the worker's "
            "Python interpreter starts, so it could run code the image does not hold "
            + REFUSED_ENV,
        ),
        (
            {"env": [{"name": "LD_PRELOAD", "value": "/models/x.so"}]},
            "spec.template.env[0].name: LD_PRELOAD is not allowed: it changes how the dynamic "
            "loader starts every program in the pod, so it could run code the image does not "
            "hold " + REFUSED_ENV,
        ),
        (
            {"env": [{"name": "JUTURNA_OPERATOR_PLUGIN_PATH", "value": "/plugins:/models"}]},
            "spec.template.env[0].name: JUTURNA_OPERATOR_PLUGIN_PATH is not allowed: it is an "
            "operator setting, which the worker reads (its plugin roots), so it could run code "
            "the image does not hold " + REFUSED_ENV,
        ),
        (
            {"env": [{"name": "PATH", "value": "/models/bin"}]},
            "spec.template.env[0].name: PATH is not allowed: it chooses the programs the pod "
            "runs, the worker's interpreter first, so it could run code the image does not "
            "hold " + REFUSED_ENV,
        ),
        (
            mount("/opt/juturna-operator/lib/python3.12/site-packages"),
            'spec.template.volumeMounts[0].mountPath: "/opt/juturna-operator/lib/python3.12/'
            "site-packages\" is not allowed: it is in /opt, which holds the image's programs, "
            "libraries or code; mount volumes elsewhere, e.g. /models or /data",
        ),
        (
            mount("/etc"),
            'spec.template.volumeMounts[0].mountPath: "/etc" is not allowed: /etc holds the '
            "image's programs, libraries or code; mount volumes elsewhere, e.g. /models or /data",
        ),
        (
            mount("/"),
            'spec.template.volumeMounts[0].mountPath: "/" is not allowed: it would hide /bin, '
            "which holds the image's programs, libraries or code; mount volumes elsewhere, "
            "e.g. /models or /data",
        ),
        (
            mount("/var/"),
            'spec.template.volumeMounts[0].mountPath: "/var" is not allowed: it would hide '
            "/var/run/secrets, which holds the pod's tokens; mount volumes elsewhere, e.g. "
            "/models or /data",
        ),
        (
            mount("/plugins/tones"),
            'spec.template.volumeMounts[0].mountPath: "/plugins/tones" is not allowed: it is '
            "in /plugins, which holds the plugins; mount volumes elsewhere, e.g. /models or "
            "/data",
        ),
        (
            mount(ROOT + "/extra"),
            f'spec.template.volumeMounts[0].mountPath: "{ROOT}/extra" is not allowed: it is in '
            f"{ROOT}, which holds the plugins; mount volumes elsewhere, e.g. /models or /data",
        ),
        (
            mount("usr/../var/run/secrets/kubernetes.io/serviceaccount"),
            'spec.template.volumeMounts[0].mountPath: "/var/run/secrets/kubernetes.io/'
            "serviceaccount\" is not allowed: it is in /var/run/secrets, which holds the pod's "
            "tokens; mount volumes elsewhere, e.g. /models or /data",
        ),
    ],
    ids=[
        "hostPath",
        "nfs",
        "projected-token-without-account",
        "apparmor-annotation",
        "seccomp-annotation",
        "system-priority-class",
        "PYTHONPATH",
        "LD_PRELOAD",
        "operator-setting",
        "PATH",
        "mount-in-image-code",
        "mount-at-etc",
        "mount-at-root",
        "mount-over-tokens",
        "mount-in-image-plugins",
        "mount-in-plugin-root",
        "mount-at-service-account-token",
    ],
)
def test_a_template_that_asks_for_more_than_a_pod_author_gets_is_refused(
    template: dict[str, Any], message: str
) -> None:
    assert refusal(template) == message


def test_the_operators_own_account_is_refused_in_its_namespace_only() -> None:
    assert refusal({"serviceAccountName": "jo"}, ns="ops") == (
        'spec.template.serviceAccountName: "jo" is the ServiceAccount the operator itself '
        "runs as, in this namespace; a pipeline's pod never gets the operator's rights: name "
        "another account"
    )
    allowed({"serviceAccountName": "jo"}, ns="team-a")  # another namespace's account "jo"
    allowed({"serviceAccountName": "reader"}, ns="ops")
    outside = Settings(engine="pod", runtime_image="x")  # not in a pod: no account to refuse
    allowed({"serviceAccountName": "jo"}, outside, ns="ops")


def test_placement_gpus_models_and_a_named_accounts_token_stay_allowed() -> None:
    allowed(
        {
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
            "tolerations": [{"operator": "Exists"}],
            "affinity": {"nodeAffinity": {}},
            "runtimeClassName": "nvidia",
            "serviceAccountName": "reader",
            "env": [{"name": "MODEL", "value": "/models/x"}, {"name": "CUDA_VISIBLE_DEVICES"}],
            "volumes": [
                {"name": "models", "persistentVolumeClaim": {"claimName": "models"}},
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
                {"name": "cfg", "configMap": {"name": "c"}},
                {"name": "weights", "image": {"reference": "registry.example.com/weights:1"}},
                {"name": "plain"},  # no source: the API's default, an emptyDir
                TOKEN_VOLUME,  # the named account's own token
            ],
            "volumeMounts": [
                {"name": "models", "mountPath": "/models"},
                {"name": "shm", "mountPath": "/dev/shm"},
                {"name": "cfg", "mountPath": "/var/lib/juturna/cfg"},
                {"name": "weights", "mountPath": "/plugins-data"},
            ],
            "labels": {"team": "a"},
            "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
            "imagePullSecrets": [{"name": "regcred"}],  # a Secret of its namespace, as a Pod
        }
    )
    allowed({})


def test_shapes_the_api_server_refuses_are_left_to_it() -> None:
    """Free-form template objects of the wrong shape are the dry run's to refuse (with the API
    server's message); the policy neither crashes on them nor lets a token through."""
    allowed({"volumes": [{"name": "p", "projected": "x"}, {"name": "q", "projected": {}}]})
    allowed({"env": [{"value": "no name"}], "volumeMounts": [{"name": "m"}]})


def test_an_administrator_allows_more() -> None:
    more = Settings(
        engine="pod",
        runtime_image="x",
        allowed_volume_types=("hostPath",),
        allowed_priority_classes=("system-cluster-critical", "media-high"),
    )
    allowed({"volumes": [{"name": "cache", "hostPath": {"path": "/var/cache/models"}}]}, more)
    allowed({"priorityClassName": "media-high"}, more)
    assert refusal({"priorityClassName": "system-node-critical"}, more) == (
        'spec.template.priorityClassName: priority class "system-node-critical" is not '
        "allowed (a priority class lets the pod preempt other workloads); allowed: media-high, "
        "system-cluster-critical; the administrator allows classes with "
        "JUTURNA_OPERATOR_ALLOWED_PRIORITY_CLASSES (chart: allowedPriorityClasses)"
    )
    assert refusal({"volumes": [{"name": "n", "nfs": {}}]}, more).endswith(
        "allowed types: configMap, csi, downwardAPI, emptyDir, ephemeral, hostPath, image, "
        f"persistentVolumeClaim, projected, secret; the administrator allows more with "
        f"{VOLUME_SETTING}"
    )


def test_where_authors_choose_the_image_env_and_mounts_are_theirs_but_not_the_node() -> None:
    """With image overrides allowed, authors run code of their choice anyway: the checks that
    keep it out of the image's guard nothing. What reaches beyond the pod stays refused."""
    own_code = Settings(engine="pod", runtime_image="x", allow_image_override=True)
    allowed(
        {
            "env": [{"name": "PYTHONPATH", "value": "/models"}],
            "volumes": [{"name": "m", "emptyDir": {}}],
            "volumeMounts": [{"name": "m", "mountPath": "/plugins/mine"}],
        },
        own_code,
    )
    assert refusal({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}, own_code).startswith(
        "spec.template.volumes[0].hostPath: host paths are not allowed"
    )
    assert refusal({"volumes": [TOKEN_VOLUME]}, own_code).startswith(
        "spec.template.volumes[0].projected.sources[0].serviceAccountToken:"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hostNetwork", True),
        ("hostPID", True),
        ("hostIPC", True),
        ("ports", [{"containerPort": 9000, "hostPort": 9000}]),
    ],
)
def test_host_namespaces_and_ports_cannot_be_asked_for(field: str, value: Any) -> None:
    """The template has no such field: the API server prunes it (its schema is closed), and
    the operator refuses a spec that has it anyway (an older CRD)."""
    body = {"nodes": [{"name": "a", "type": "source", "mark": "m"}], "template": {field: value}}
    with pytest.raises(ValidationError) as refused:
        PipelineSpec.model_validate(body)
    assert first_error(refused.value) == f"spec.template.{field}: Extra inputs are not permitted"


def test_the_pods_token_folders_are_among_the_protected() -> None:
    for token in (TOKEN_DIR, str(SERVICE_ACCOUNT_TOKEN.parent)):
        assert refusal(mount(token)).startswith(
            f'spec.template.volumeMounts[0].mountPath: "{token}" is not allowed: it is in '
            "/var/run/secrets, which holds the pod's tokens"
        )


def test_only_the_pod_engine_checks_the_template() -> None:
    assert Settings(engine="process").pod_policy(None, "ns") is None
    assert SETTINGS.pod_policy("gpu", "ns") is None  # spec.runtime: the service engine


def test_validation_checks_the_template_before_anything_deploys() -> None:
    body = {
        "plugins": ["tones"],
        "nodes": [{"name": "src", "type": "source", "mark": "ticker"}],
        "template": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]},
    }
    spec = PipelineSpec.model_validate(body)
    assert "src" in validate(spec, [EXAMPLES]).impls  # other engines ignore the template
    with pytest.raises(PipelineFailure) as refused:
        validate(spec, [EXAMPLES], pod_policy=SETTINGS.pod_policy(None, "team-a"))
    assert refused.value.message.startswith(
        "spec.template.volumes[0].hostPath: host paths are not allowed"
    )
