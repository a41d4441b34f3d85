"""What a Pipeline's ``spec.template`` may give its pod (engine pod), checked before anything
is created.

The operator creates each pipeline's pod with its own rights, so it holds the template to
what a Pod author has under the ``restricted`` Pod Security Standard itself, whatever the
namespace's Pod Security label says (an unlabelled namespace enforces nothing):

* volumes of the restricted profile's types only (no ``hostPath``, ``nfs``, ...), unless
  the administrator allows more (``PodPolicy.volume_types``);
* no projected ServiceAccount token without ``serviceAccountName``: it would be the
  namespace's default account's, which the pod is meant not to have;
* no security annotations (AppArmor, seccomp): the operator sets the pod's profiles;
* a ``priorityClassName`` only from the administrator's list (none by default);
* never the operator's own ServiceAccount (``PodPolicy.forbidden_account``);
* unless authors may choose the image anyway (``PodPolicy.chooses_code``), nothing that
  would make the worker run code of the author's choice: no environment variable that
  changes how the interpreter, the loader or the worker start (``PYTHONPATH`` pointing at a
  volume with a ``sitecustomize.py``, ``LD_PRELOAD``, the worker's plugin roots), and no
  mount over the image's programs, libraries, code, plugins or the pod's tokens.

Host namespaces and host ports cannot be asked for at all: the template has no such field
(``api.PodTemplate``). ``nodeSelector``, ``tolerations``, ``affinity``, ``runtimeClassName``
and ``imagePullSecrets`` (Secrets of the Pipeline's namespace) stay the author's, as in a Pod.

Each refusal is ``InvalidSpec`` naming the field, e.g. ``spec.template.volumes[0].hostPath:
...``. Pure: no I/O.
"""

from __future__ import annotations

import posixpath
from typing import Any

from juturna_operator.api import PodTemplate
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import ENV_PREFIX, PodPolicy

# The volume types the restricted Pod Security Standard allows (Kubernetes'
# pod-security-admission, check_restrictedVolumes.go).
RESTRICTED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "image",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
VOLUME_TYPES_SETTING = f"{ENV_PREFIX}ALLOWED_VOLUME_TYPES (chart: allowedVolumeTypes)"
PRIORITY_SETTING = f"{ENV_PREFIX}ALLOWED_PRIORITY_CLASSES (chart: allowedPriorityClasses)"

# Annotation domains that set a pod's AppArmor or seccomp profile (or, once, its sysctls):
# container.apparmor.security.beta.kubernetes.io/<c>, seccomp.security.alpha.kubernetes.io/pod,
# container.seccomp.security.alpha.kubernetes.io/<c>.
SECURITY_ANNOTATION_DOMAINS = ("security.beta.kubernetes.io", "security.alpha.kubernetes.io")

# Environment variables that choose code: what the interpreter imports, what the loader
# preloads, which program a name runs, which modules a library loads, and the worker's own
# settings (its plugin roots go on the import path).
CODE_ENV_PREFIXES = {
    "PYTHON": "it changes how the worker's Python interpreter starts",
    "LD_": "it changes how the dynamic loader starts every program in the pod",
    ENV_PREFIX: "it is an operator setting, which the worker reads (its plugin roots)",
}
CODE_ENV_NAMES = {
    "PATH": "it chooses the programs the pod runs, the worker's interpreter first",
    "GCONV_PATH": "it makes the C library load code from a folder",
    "OPENSSL_CONF": "it makes OpenSSL load code named in a file",
    "OPENSSL_MODULES": "it makes OpenSSL load code from a folder",
    "OPENSSL_ENGINES": "it makes OpenSSL load code from a folder",
}
# Folders a mount may not be, lie in or contain: the image's programs and libraries, the
# loader's and libraries' configuration (/etc: ld.so.preload, openssl.cnf), its Python code
# (/opt/juturna-operator), its plugins (/plugins, and the operator's plugin roots), and the
# pod's tokens (/var/run/secrets: the worker's, engines.pod.TOKEN_DIR, and Kubernetes'; /var/run
# is /run in the image).
CODE_PATHS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr", "/etc", "/opt")
PLUGIN_PATHS = ("/plugins",)
TOKEN_PATHS = ("/var/run/secrets", "/run/secrets")


def _refuse(field: str, message: str) -> PipelineFailure:
    return PipelineFailure(FailureReason.InvalidSpec, Step.validate, f"{field}: {message}")


def check_template(template: PodTemplate | None, policy: PodPolicy) -> None:
    """Refuse what ``template`` may not give the pipeline's pod, naming the first field."""
    if template is None:
        return
    _check_account(template, policy)
    _check_priority(template.priorityClassName, policy)
    for i, volume in enumerate(template.volumes):
        _check_volume(f"spec.template.volumes[{i}]", volume, template, policy)
    for key in template.annotations:
        domain = key.split("/", 1)[0] if "/" in key else ""
        if domain.endswith(SECURITY_ANNOTATION_DOMAINS):
            raise _refuse(
                f'spec.template.annotations["{key}"]',
                "security annotations are not allowed: they would change the pod's AppArmor "
                "or seccomp profile, which the operator sets (RuntimeDefault)",
            )
    if policy.chooses_code:
        return  # authors choose the image, and so every line of code the pod runs
    for i, env in enumerate(template.env):
        _check_env(f"spec.template.env[{i}].name", env)
    for i, mount in enumerate(template.volumeMounts):
        _check_mount(f"spec.template.volumeMounts[{i}].mountPath", mount, policy)


def _check_account(template: PodTemplate, policy: PodPolicy) -> None:
    name = template.serviceAccountName
    if name and name == policy.forbidden_account:
        raise _refuse(
            "spec.template.serviceAccountName",
            f'"{name}" is the ServiceAccount the operator itself runs as, in this namespace; '
            "a pipeline's pod never gets the operator's rights: name another account",
        )


def _check_priority(name: str | None, policy: PodPolicy) -> None:
    if not name or name in policy.priority_classes:
        return
    allowed = ", ".join(sorted(policy.priority_classes)) or "none"
    raise _refuse(
        "spec.template.priorityClassName",
        f'priority class "{name}" is not allowed (a priority class lets the pod preempt '
        f"other workloads); allowed: {allowed}; the administrator allows classes with "
        f"{PRIORITY_SETTING}",
    )


def _check_volume(
    field: str, volume: dict[str, Any], template: PodTemplate, policy: PodPolicy
) -> None:
    name = volume.get("name")
    for kind in sorted(k for k in volume if k != "name"):  # a volume has one source
        if kind in RESTRICTED_VOLUME_TYPES or kind in policy.volume_types:
            continue
        allowed = ", ".join(sorted(RESTRICTED_VOLUME_TYPES | policy.volume_types))
        what = (
            f'host paths are not allowed (volume "{name}" would reach the node\'s own files)'
            if kind == "hostPath"
            else f'volume type {kind} is not allowed (volume "{name}")'
        )
        raise _refuse(
            f"{field}.{kind}",
            f"{what}; allowed types: {allowed}; the administrator allows more with "
            f"{VOLUME_TYPES_SETTING}",
        )
    if template.serviceAccountName:
        return  # the named account's token, which that account lets its pods have
    projected = volume.get("projected")
    sources = projected.get("sources") if isinstance(projected, dict) else None
    for j, source in enumerate(sources if isinstance(sources, list) else []):
        if isinstance(source, dict) and "serviceAccountToken" in source:
            raise _refuse(
                f"{field}.projected.sources[{j}].serviceAccountToken",
                "a ServiceAccount token needs spec.template.serviceAccountName: without one "
                "it would be the namespace's default account's, which the pipeline's pod "
                "does not get",
            )


def _check_env(field: str, env: dict[str, Any]) -> None:
    name = str(env.get("name", ""))
    why = CODE_ENV_NAMES.get(name) or next(
        (why for prefix, why in CODE_ENV_PREFIXES.items() if name.startswith(prefix)), None
    )
    if why is not None:
        raise _refuse(
            field,
            f"{name} is not allowed: {why}, so it could run code the image does not hold "
            f"(refused: {', '.join(f'{p}*' for p in CODE_ENV_PREFIXES)}, "
            f"{', '.join(CODE_ENV_NAMES)})",
        )


def _check_mount(field: str, mount: dict[str, Any], policy: PodPolicy) -> None:
    raw = mount.get("mountPath")
    if not isinstance(raw, str) or not raw:
        return  # the API server's to refuse: a mount needs its path
    path = posixpath.normpath("/" + raw.lstrip("/"))
    protected = [
        *((p, "the image's programs, libraries or code") for p in CODE_PATHS),
        *((p, "the plugins") for p in (*PLUGIN_PATHS, *policy.plugin_roots)),
        *((p, "the pod's tokens") for p in TOKEN_PATHS),
    ]
    for folder, what in protected:
        if path == folder:
            where = folder
        elif _covers(folder, path):
            where = f"it is in {folder}, which"
        elif _covers(path, folder):
            where = f"it would hide {folder}, which"
        else:
            continue
        raise _refuse(
            field,
            f'"{path}" is not allowed: {where} holds {what}; mount volumes elsewhere, e.g. '
            "/models or /data",
        )


def _covers(outer: str, inner: str) -> bool:
    """Whether a mount at ``outer`` hides ``inner``: the same folder or one inside it."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")
