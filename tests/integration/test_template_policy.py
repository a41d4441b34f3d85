"""What a Pipeline's template may give its pod (engine pod), on real parts and without a node:
the operator refuses before anything exists, in a namespace with no Pod Security label; the
real ServiceAccount admission honours an account's own automount setting; the operator
reads its account from a token as the API server issues it; and the pod's interpreter
imports nothing from its working folder or a user site."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from juturna_operator.domain import PipelineKey
from juturna_operator.engines.pod import runtime_pod
from juturna_operator.settings import ServiceAccount, Settings, read_service_account
from support import (
    Kubectl,
    Operator,
    Pipelines,
    assert_nothing_made,
    assert_sole_operator,
    manifest,
    wait_until,
)

SETTINGS = Settings(engine="pod", runtime_image="localhost/juturna-operator:unused")

# The issue's examples, each with the message its author reads.
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "host-root": (
        {
            "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
            "volumeMounts": [{"name": "host", "mountPath": "/host"}],
        },
        'spec.template.volumes[0].hostPath: host paths are not allowed (volume "host" would '
        "reach the node's own files); allowed types: configMap, csi, downwardAPI, emptyDir, "
        "ephemeral, image, persistentVolumeClaim, projected, secret; the administrator allows "
        "more with JUTURNA_OPERATOR_ALLOWED_VOLUME_TYPES (chart: allowedVolumeTypes)",
    ),
    "unconfined": (
        {"annotations": {"container.apparmor.security.beta.kubernetes.io/juturna": "unconfined"}},
        'spec.template.annotations["container.apparmor.security.beta.kubernetes.io/juturna"]: '
        "security annotations are not allowed: they would change the pod's AppArmor or "
        "seccomp profile, which the operator sets (RuntimeDefault)",
    ),
    "critical": (
        {
            "priorityClassName": "system-node-critical",
            "tolerations": [{"operator": "Exists"}],
            "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        },
        'spec.template.priorityClassName: priority class "system-node-critical" is not allowed '
        "(a priority class lets the pod preempt other workloads); allowed: none; the "
        "administrator allows classes with JUTURNA_OPERATOR_ALLOWED_PRIORITY_CLASSES (chart: "
        "allowedPriorityClasses)",
    ),
    "default-token": (
        {
            "volumes": [
                {
                    "name": "api",
                    "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
                }
            ],
            "volumeMounts": [{"name": "api", "mountPath": "/api"}],
        },
        "spec.template.volumes[0].projected.sources[0].serviceAccountToken: a ServiceAccount "
        "token needs spec.template.serviceAccountName: without one it would be the namespace's "
        "default account's, which the pipeline's pod does not get",
    ),
    "sitecustomize": (
        {
            "annotations": {"code": "import os; os.system('id')"},
            "volumes": [
                {
                    "name": "code",
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "sitecustomize.py",
                                "fieldRef": {"fieldPath": "metadata.annotations['code']"},
                            }
                        ]
                    },
                }
            ],
            "volumeMounts": [{"name": "code", "mountPath": "/code"}],
            "env": [{"name": "PYTHONPATH", "value": "/code"}],
        },
        "spec.template.env[0].name: PYTHONPATH is not allowed: it changes how the worker's "
        "Python interpreter starts, so it could run code the image does not hold (refused: "
        "PYTHON*, LD_*, JUTURNA_OPERATOR_*, PATH, GCONV_PATH, OPENSSL_CONF, OPENSSL_MODULES, "
        "OPENSSL_ENGINES)",
    ),
}


@pytest.mark.cluster
@pytest.mark.own_operator
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("crd")
def test_an_unlabelled_namespace_gets_no_more_than_restricted_and_nothing_is_made(
    kubeconfig: Path,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
) -> None:
    """The operator with the pod engine, as a process: each template of the issue is
    InvalidSpec at validate naming its field, in a namespace without a Pod Security label
    (which enforces nothing), and no pod, Secret or Service of the operator's exists. No
    node is needed: nothing gets as far as a pod."""
    labels = kubectl("get", "namespace", namespace, "-o", "jsonpath={.metadata.labels}").stdout
    assert "pod-security.kubernetes.io" not in labels
    assert_sole_operator(kubeconfig)
    op = Operator(kubeconfig, tmp_path / "work", tmp_path / "operator.log", tmp_path, "pod")
    op.env["JUTURNA_OPERATOR_RUNTIME_IMAGE"] = SETTINGS.runtime_image
    pipelines = Pipelines(objects, namespace, kubectl)
    op.start()
    try:
        for name, (template, _) in REFUSED.items():
            pipelines.apply(manifest(name, template=template))
        for name, (_, message) in REFUSED.items():
            body = pipelines.wait_phase(name, "Failed", timeout=60)
            assert body["status"]["failure"] == {
                "reason": "InvalidSpec",
                "code": 422,
                "step": "validate",
                "message": message,
            }
            assert ("Warning", "InvalidSpec", message) in pipelines.events(name)
        assert_nothing_made(kubectl, namespace)
        for name in REFUSED:
            pipelines.delete(name)
            pipelines.wait_gone(name)
    finally:
        op.stop()


def admitted(core: client.CoreV1Api, pod: dict[str, Any]) -> dict[str, Any]:
    """The pod as the API server and its admission (ServiceAccount included) would store it:
    a server-side dry run, as the pod engine's own."""
    made = core.create_namespaced_pod(pod["metadata"]["namespace"], pod, dry_run="All")
    return dict(core.api_client.sanitize_for_serialization(made))


def wait_for_default_account(core: client.CoreV1Api, namespace: str) -> None:
    """A new namespace's ``default`` ServiceAccount, which pod admission looks up."""
    wait_until(
        lambda: bool(
            core.list_namespaced_service_account(
                namespace, field_selector="metadata.name=default"
            ).items
        ),
        30,
        f"the default ServiceAccount in {namespace}",
    )


def api_token_volumes(pod: dict[str, Any]) -> list[str]:
    return [v["name"] for v in pod["spec"].get("volumes", []) if v["name"].startswith("kube-api")]


@pytest.mark.cluster
def test_a_named_account_that_opted_out_of_automount_gives_the_pod_no_token(
    core: client.CoreV1Api, namespace: str
) -> None:
    """The real ServiceAccount admission decides from what the pod engine writes: an account
    with automountServiceAccountToken false gives its pods no token; one without that
    setting does; no account named, no token."""
    wait_for_default_account(core, namespace)
    for name, automount in (("quiet", False), ("loud", None)):
        account = client.V1ServiceAccount(
            metadata=client.V1ObjectMeta(name=name), automount_service_account_token=automount
        )
        core.create_namespaced_service_account(namespace, account)
    key = PipelineKey(namespace, "tones", "40ffacf7-0000-4000-8000-000000000000")

    def pod_of(template: dict[str, Any]) -> dict[str, Any]:
        return admitted(core, runtime_pod(key, "r", SETTINGS, template))

    quiet = pod_of({"serviceAccountName": "quiet"})
    assert quiet["spec"]["serviceAccountName"] == "quiet"
    assert api_token_volumes(quiet) == []
    assert api_token_volumes(pod_of({"serviceAccountName": "loud"})) != []  # the account's way
    assert api_token_volumes(pod_of({})) == []


@pytest.mark.cluster
def test_a_pipeline_pod_is_restricted_as_the_images_own_user_and_pulls_with_its_secrets(
    core: client.CoreV1Api, kubectl: Kubectl, namespace: str
) -> None:
    """No fixed user (OpenShift's restricted SCC refuses one outside the namespace's range):
    the pod says runAsNonRoot and runs as its image's numeric user, which the restricted Pod
    Security Standard admits; its image is pulled with the administrator's Secrets, then the
    template's."""
    kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    wait_for_default_account(core, namespace)
    key = PipelineKey(namespace, "tones", "40ffacf7-0000-4000-8000-000000000000")
    settings = Settings(
        engine="pod", runtime_image=SETTINGS.runtime_image, pod_image_pull_secrets=("corp",)
    )
    template = {"imagePullSecrets": [{"name": "team"}]}
    pod = admitted(core, runtime_pod(key, "r", settings, template))
    assert pod["spec"]["imagePullSecrets"] == [{"name": "corp"}, {"name": "team"}]
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(security), security


@pytest.mark.cluster
def test_the_operators_account_is_read_from_a_token_the_api_server_issued(
    core: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """A real token (TokenRequest, as the kubelet asks for the one it mounts into a pod)."""
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="jo"))
    )
    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    issued = core.create_namespaced_service_account_token("jo", namespace, request)
    token = tmp_path / "token"
    token.write_text(issued.status.token)
    assert read_service_account(token) == ServiceAccount(namespace, "jo")


def test_the_pods_interpreter_imports_nothing_from_its_working_folder_or_a_user_site(
    tmp_path: Path,
) -> None:
    """The pod's command, run by a plain interpreter (not a virtualenv, which has no user
    site), from a working folder that holds a package of the worker's name (what a volume
    mounted at /juturna_operator would be, the image's working folder being /) and with a
    HOME whose user site holds a .pth file: neither runs."""
    command = runtime_pod(PipelineKey("ns", "p", "u" * 36), "r", SETTINGS)["spec"]["containers"][0][
        "command"
    ]
    assert command[0] == "python"
    marks = tmp_path / "marks"
    marks.mkdir()
    cwd = tmp_path / "cwd" / "juturna_operator"
    cwd.mkdir(parents=True)
    (cwd / "__init__.py").write_text("")
    (cwd / "worker.py").write_text(f"open({str(marks / 'cwd')!r}, 'w').close()\n")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = tmp_path / "home" / ".local" / "lib" / version / "site-packages"
    site.mkdir(parents=True)
    (site / "shadow.pth").write_text(f"import os; open({str(marks / 'pth')!r}, 'w').close()\n")
    interpreter = getattr(sys, "_base_executable", sys.executable)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [interpreter, *command[1:]],
        cwd=tmp_path / "cwd",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sorted(p.name for p in marks.iterdir()) == []
    # The real one is looked for where it is installed, and a plain interpreter has none.
    assert "No module named 'juturna_operator'" in proc.stderr, proc.stderr
