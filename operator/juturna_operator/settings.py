"""Operator configuration: command-line flags override environment variables; both go
through the same checks, and an error starts with the flag or variable that was set.

``SETTINGS`` is the one list of settings: each has a variable ``JUTURNA_OPERATOR_<NAME>``,
a flag ``--<name>`` (``juturna-operator run --help`` lists them all, with their defaults),
its default and what it means.

The ServiceAccount the operator runs as is not a setting: it is read from the token the
kubelet mounted into the operator's pod (``read_service_account``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from juturna_operator.domain import MAX_OBJECT_NAME, NAMESPACE_NAME, OBJECT_NAME
from juturna_operator.registry import ENGINES

ENV_PREFIX = "JUTURNA_OPERATOR_"
MAX_HEALTH_INTERVAL_S = 5.0
MAX_GIL_SWITCH_INTERVAL_S = 0.1  # beyond it, one busy node thread stalls all others
DEFAULT_HEALTH_INTERVAL_S = 3.0  # a dead node is seen within ~3 s
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "juturna-operator"
DEFAULT_POD_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}}
BOOLEAN = ("true", "false")
LOG_FORMATS = ("text", "json")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


class SettingsError(ValueError):
    """A setting has a value the operator cannot use; the message says which and why."""


@dataclass(frozen=True)
class Setting:
    """One setting: its raw default (the text a flag or variable would give; None: unset),
    what it means, and for an enumerated one its choices."""

    name: str
    default: str | None
    help: str
    metavar: str = "VALUE"
    choices: tuple[str, ...] | None = None
    shown: str = ""  # the default as people read it, where the raw text says little

    @property
    def env(self) -> str:
        """The environment variable."""
        return ENV_PREFIX + self.name

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return "--" + self.name.lower().replace("_", "-")

    @property
    def shown_default(self) -> str:
        """The default, for ``--help`` and the docs."""
        return self.shown or (self.default if self.default is not None else "unset")


def _engines() -> str:
    return "; ".join(f"{name}: {entry.summary}" for name, entry in ENGINES.items())


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "PLUGIN_PATH",
        "",
        f"plugin roots, separated by {os.pathsep!r}; spec.plugins names folders under them",
        "DIR" + os.pathsep + "...",
        shown="none (Juturna's built-ins only)",
    ),
    Setting("WORKDIR", str(DEFAULT_WORKDIR), "folder for pipeline folders", "DIR"),
    Setting("ENGINE", "process", f"where pipelines run ({_engines()})", choices=tuple(ENGINES)),
    Setting("STOP_TIMEOUT", "10", "seconds a stop may take before StopTimeout", "SECONDS"),
    Setting(
        "HEALTH_INTERVAL",
        f"{DEFAULT_HEALTH_INTERVAL_S:g}",
        f"seconds between health checks (at most {MAX_HEALTH_INTERVAL_S:g})",
        "SECONDS",
    ),
    Setting("LOG_FORMAT", "text", "how log lines are written", choices=LOG_FORMATS),
    Setting("MAX_CONCURRENCY", "8", "threads for blocking Juturna calls", "N"),
    Setting("METRICS_PORT", "9090", "port of the Prometheus endpoint; 0 turns it off", "PORT"),
    Setting(
        "PROGRESS_THRESHOLD",
        "1",
        "seconds a step may take before its phase (e.g. WarmingUp) is written",
        "SECONDS",
    ),
    Setting(
        "GIL_SWITCH_INTERVAL",
        "0.02",
        "seconds a Python thread may keep the GIL while others wait (at most "
        f"{MAX_GIL_SWITCH_INTERVAL_S:g}; CPython's default, 0.005, starves the operator "
        "under hundreds of in-process pipelines)",
        "SECONDS",
    ),
    Setting("SWEEP_INTERVAL", "60", "seconds between sweeps for orphaned instances", "SECONDS"),
    Setting("RECONCILE_WORKERS", "128", "reconcile passes at once, over every Pipeline", "N"),
    Setting(
        "ALLOWED_BUILTINS",
        None,
        "Juturna built-ins Pipelines may use, as type/mark separated by commas "
        "(sink/notifier_http,source/audio_rtp), or * for all; empty: none",
        "TYPE/MARK,...",
        shown="all on engine pod, none elsewhere",
    ),
    Setting(
        "ALLOW_ENV_REFERENCES",
        "false",
        "engine inprocess: may a configuration value $JT_ENV_<NAME> read the operator's own "
        "environment",
        choices=BOOLEAN,
    ),
    Setting(
        "PIPELINES_PER_PROCESS",
        "1",
        "engine process: the most pipelines one worker process runs, all of one namespace (1: "
        "a process per pipeline; more: fewer processes, but a worker's death fails all of its)",
        "N",
    ),
    Setting(
        "RUNTIMES",
        "{}",
        'named remote Juturna services, as JSON: {"gpu": {"url": "http://gpu:8080", '
        '"tokenFile": "/path/to/token"}}',
        "JSON",
    ),
    Setting(
        "DEFAULT_RUNTIME",
        "",
        "the runtime for Pipelines without spec.runtime (engine service needs one)",
        "NAME",
        shown="none",
    ),
    Setting(
        "RUNTIME_IMAGE",
        "",
        "engine pod: the image each Pipeline's pod runs (engine pod needs one)",
        "IMAGE",
        shown="none",
    ),
    Setting(
        "RUNTIME_PULL_POLICY",
        "IfNotPresent",
        "engine pod: the runtime image's pull policy",
        choices=PULL_POLICIES,
    ),
    Setting(
        "ALLOW_IMAGE_OVERRIDE",
        "false",
        "engine pod: may spec.template.image replace the runtime image",
        choices=BOOLEAN,
    ),
    Setting(
        "ALLOWED_VOLUME_TYPES",
        "",
        "engine pod: volume types a template may use beyond the restricted profile's, "
        "separated by commas (hostPath,nfs)",
        "TYPE,...",
        shown="none",
    ),
    Setting(
        "ALLOWED_PRIORITY_CLASSES",
        "",
        "engine pod: the PriorityClasses a template may name, separated by commas",
        "NAME,...",
        shown="none",
    ),
    Setting(
        "POD_WORK_SIZE_LIMIT",
        "1Gi",
        "engine pod: the size limit of a pipeline pod's work folder; empty: none",
        "QUANTITY",
    ),
    Setting(
        "POD_TMP_SIZE_LIMIT",
        "64Mi",
        "engine pod: the size limit of a pipeline pod's /tmp; empty: none",
        "QUANTITY",
    ),
    Setting(
        "POD_DEFAULT_RESOURCES",
        json.dumps(DEFAULT_POD_RESOURCES),
        "engine pod: the resources of a pod whose template gives none, as JSON",
        "JSON",
    ),
    Setting(
        "POD_USER",
        "",
        "engine pod: the user pipeline pods run as, UID or UID:GID (then also their group and "
        "fsGroup), never 0; empty: runAsNonRoot with the runtime image's own numeric user",
        "UID[:GID]",
        shown="the image's",
    ),
    Setting(
        "POD_IMAGE_PULL_SECRETS",
        "",
        "engine pod: Secrets every pipeline pod pulls its image with, separated by commas, "
        "before its template's imagePullSecrets; each must exist in every namespace that has "
        "Pipelines",
        "NAME,...",
        shown="none",
    ),
    Setting(
        "POD_START_TIMEOUT",
        "60",
        "engine pod: seconds a placed pod may stay unstarted while the kubelet warns about "
        "it, before PodNotStarted",
        "SECONDS",
    ),
    Setting(
        "WORKER_PEERS",
        None,
        "engine pod: NetworkPolicy peers (a JSON list) that may reach a pipeline pod's worker",
        "JSON",
        shown="unset: no NetworkPolicy",
    ),
)
SETTING = {setting.name: setting for setting in SETTINGS}


def env_name(name: str) -> str:
    """How a setting is named where no flag or variable gave it: its variable."""
    return SETTING[name].env


class _Sources:
    """Raw values from flags, then the environment, and where each came from: one set of
    checks for both, and each error names what the administrator actually set."""

    def __init__(self, flags: dict[str, str]) -> None:
        unknown = set(flags) - set(SETTING)
        if unknown:
            raise ValueError(f"no such settings: {', '.join(sorted(unknown))}")
        self._flags = flags

    def get(self, name: str) -> str:
        """The raw value, or the setting's default."""
        value = self.given(name)
        return (SETTING[name].default or "") if value is None else value

    def given(self, name: str) -> str | None:
        """The raw value, or None where neither a flag nor the variable is set."""
        if name in self._flags:
            return self._flags[name]
        return os.environ.get(SETTING[name].env)

    def where(self, name: str) -> str:
        """The flag or variable that gave the value; both where neither did."""
        setting = SETTING[name]
        if name in self._flags:
            return setting.flag
        if setting.env in os.environ:
            return setting.env
        return f"{setting.flag} or {setting.env}"

    def seconds(self, name: str) -> float:
        return _positive(self.where(name), self.get(name))

    def count(self, name: str) -> int:
        raw = self.get(name)
        if not raw.isdigit() or int(raw) < 1:
            raise SettingsError(
                f"{self.where(name)}: must be a whole number of at least 1, got {raw!r}"
            )
        return int(raw)

    def boolean(self, name: str) -> bool:
        raw = self.get(name)
        if raw.lower() not in BOOLEAN:
            raise SettingsError(f"{self.where(name)}: must be true or false, got {raw!r}")
        return raw.lower() == "true"


def _positive(where: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{where}: must be a number of seconds, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{where}: must be positive, got {raw!r}")
    return value


def _port(where: str, raw: str) -> int:
    if not raw.isdigit() or int(raw) > 65535:
        raise SettingsError(f"{where}: must be a port number (0 turns it off), got {raw!r}")
    return int(raw)


BUILTIN_MARK = re.compile(r"(source|proc|sink)/[a-z0-9_]+")
ALL = "*"


# A Kubernetes quantity as pods take it: "64Mi", "1Gi", "100m", "0.5".
QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
RESOURCE_KINDS = ("requests", "limits")


def parse_size_limit(raw: str, where: str) -> str | None:
    """An emptyDir ``sizeLimit`` (a quantity), or None for none (empty)."""
    if not raw:
        return None
    if not QUANTITY.fullmatch(raw):
        raise SettingsError(
            f"{where}: must be a quantity such as 64Mi or 1Gi (empty: no limit), got {raw!r}"
        )
    return raw


def parse_resources(raw: str, where: str) -> dict[str, dict[str, str]]:
    """``{"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {...}}``: what a pipeline
    pod gets where its template gives no ``resources``."""
    try:
        data = json.loads(raw or "{}")
    except json.JSONDecodeError as err:
        raise SettingsError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(data, dict) or not set(data) <= set(RESOURCE_KINDS):
        raise SettingsError(
            f"{where}: must be a JSON object with requests and/or limits, got {raw!r}"
        )
    resources: dict[str, dict[str, str]] = {}
    for kind, amounts in data.items():
        if not isinstance(amounts, dict):
            raise SettingsError(f"{where}: {kind} must be an object of quantities by resource")
        for name, quantity in amounts.items():
            if not QUANTITY.fullmatch(str(quantity)):
                raise SettingsError(
                    f"{where}: {kind}.{name} must be a quantity such as 100m or 128Mi, "
                    f"got {quantity!r}"
                )
        if amounts:
            resources[kind] = {name: str(q) for name, q in amounts.items()}
    return resources


PEER_KINDS = ("podSelector", "namespaceSelector", "ipBlock")


def parse_worker_peers(raw: str | None, where: str) -> list[dict[str, object]] | None:
    """NetworkPolicy peers (``[{"ipBlock": {"cidr": "10.0.0.0/24"}}, ...]``) that may reach
    a pipeline pod's worker: the operator and the kubelet's probes. None (unset): no
    NetworkPolicy. Never empty: a rule with no peers would let everyone in."""
    if raw is None:
        return None
    try:
        peers = json.loads(raw)
    except json.JSONDecodeError as err:
        raise SettingsError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(peers, list) or not peers:
        raise SettingsError(
            f"{where}: must be a JSON list of at least one NetworkPolicy peer (unset it for no "
            f"NetworkPolicy: an empty list would let everyone in), got {raw!r}"
        )
    for peer in peers:
        if not isinstance(peer, dict) or not peer or not set(peer) <= set(PEER_KINDS):
            raise SettingsError(
                f"{where}: each peer is an object of {', '.join(PEER_KINDS)}, got {peer!r}"
            )
    return peers


def parse_names(
    raw: str | None, where: str, valid: Callable[[str], bool], what: str
) -> tuple[str, ...]:
    """Entries separated by commas, each ``valid`` (``what`` says what they must be)."""
    entries = tuple(e.strip() for e in (raw or "").split(",") if e.strip())
    for entry in entries:
        if not valid(entry):
            raise SettingsError(f"{where}: {entry!r} is not {what}")
    return entries


def parse_builtins(raw: str | None, where: str) -> tuple[str, ...] | None:
    """``type/mark`` entries separated by commas, or ``*`` for all; None when not set."""
    if raw is None:
        return None
    return parse_names(
        raw,
        where,
        lambda entry: entry == ALL or bool(BUILTIN_MARK.fullmatch(entry)),
        "a built-in as type/mark (e.g. sink/notifier_http), or * for all of them",
    )


# Every volume type of a Pod, as the API spells it: the vocabulary of ALLOWED_VOLUME_TYPES.
VOLUME_TYPES = frozenset(
    {
        "awsElasticBlockStore",
        "azureDisk",
        "azureFile",
        "cephfs",
        "cinder",
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "fc",
        "flexVolume",
        "flocker",
        "gcePersistentDisk",
        "gitRepo",
        "glusterfs",
        "hostPath",
        "image",
        "iscsi",
        "nfs",
        "persistentVolumeClaim",
        "photonPersistentDisk",
        "portworxVolume",
        "projected",
        "quobyte",
        "rbd",
        "scaleIO",
        "secret",
        "storageos",
        "vsphereVolume",
    }
)


POD_USER = re.compile(r"([0-9]+)(?::([0-9]+))?")


def parse_pod_user(raw: str, where: str) -> tuple[int, int | None] | None:
    """``UID`` or ``UID:GID`` for pipeline pods (runAsUser; runAsGroup and fsGroup), or None
    (empty): the runtime image's own numeric user."""
    if not raw:
        return None
    found = POD_USER.fullmatch(raw)
    if found is None or int(found[1]) == 0:
        raise SettingsError(
            f"{where}: must be a numeric user, UID or UID:GID, and not 0 (pipeline pods never "
            f"run as root); empty: the runtime image's own user; got {raw!r}"
        )
    return int(found[1]), None if found[2] is None else int(found[2])


# Where the kubelet mounts a pod's ServiceAccount token (in-cluster config reads it too).
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
SERVICE_ACCOUNT_SUBJECT = re.compile(r"system:serviceaccount:([^:]+):([^:]+)")


@dataclass(frozen=True)
class ServiceAccount:
    """A ServiceAccount, by namespace and name."""

    namespace: str
    name: str


def read_service_account(token_file: Path = SERVICE_ACCOUNT_TOKEN) -> ServiceAccount | None:
    """The ServiceAccount whose token the kubelet mounted into the operator's pod: the one the
    operator runs as in a cluster. None outside a pod (no such file).

    The token is a JWT whose subject is ``system:serviceaccount:<namespace>:<name>``, as the
    API server authenticates it. Its signature is not checked: the file is the kubelet's
    mount in the operator's own pod, not anybody's input. The chart's account name is a
    value, so it is read here rather than assumed."""
    try:
        token = token_file.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SettingsError(f"cannot read the ServiceAccount token {token_file}: {err}") from None
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        subject = SERVICE_ACCOUNT_SUBJECT.fullmatch(str(claims["sub"]))
    except (IndexError, ValueError, binascii.Error, KeyError, TypeError):
        subject = None
    if subject is None:
        raise SettingsError(
            f"the ServiceAccount token {token_file} names no ServiceAccount (a JWT whose "
            "subject is system:serviceaccount:<namespace>:<name>); the operator cannot tell "
            "which account it runs as"
        )
    return ServiceAccount(subject[1], subject[2])


@dataclass(frozen=True)
class PodPolicy:
    """What a Pipeline's ``spec.template`` may give its pod (engine pod), checked before
    anything is created (``podpolicy``), whatever the namespace's Pod Security label says."""

    volume_types: frozenset[str]  # allowed beyond the restricted profile's
    priority_classes: frozenset[str]  # the only priorityClassName values allowed
    # May authors choose the code the pod runs (spec.template.image)? Then the checks that
    # keep their code out of the runtime image's (env, mounts) guard nothing, and are off.
    chooses_code: bool
    plugin_roots: tuple[str, ...]  # the operator's, in the runtime image too
    forbidden_account: str | None  # the operator's own ServiceAccount, in its namespace


@dataclass(frozen=True)
class CodePolicy:
    """What a Pipeline may make run, beyond the administrator's plugins, where it runs
    (docs/juturna.md, pitfalls 11-12): which Juturna built-ins, and whether a configuration
    value may read that process's environment (``$JT_ENV_<NAME>``)."""

    engine: str  # where the pipeline runs, for messages
    builtins: frozenset[str] | None  # "type/mark" entries; None: every built-in
    env_references: bool

    def allows_builtin(self, node_type: str, mark: str) -> bool:
        return self.builtins is None or f"{node_type}/{mark}" in self.builtins

    def to_json(self) -> dict[str, object]:
        """For the worker that checks a pipeline's plugins where they are (engine pod)."""
        builtins = None if self.builtins is None else sorted(self.builtins)
        return {"engine": self.engine, "builtins": builtins, "envReferences": self.env_references}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CodePolicy:
        builtins = data["builtins"]
        return cls(
            str(data["engine"]),
            None if builtins is None else frozenset(map(str, builtins)),
            bool(data["envReferences"]),
        )


def parse_plugin_path(raw: str, where: str = ENV_PREFIX + "PLUGIN_PATH") -> list[Path]:
    """``os.pathsep``-separated plugin roots; each must be an existing directory."""
    roots = []
    for part in filter(None, raw.split(os.pathsep)):
        path = Path(part).expanduser().resolve()
        if not path.is_dir():
            raise SettingsError(f"{where}: plugin root {part!r} is not a directory")
        roots.append(path)
    return roots


@dataclass(frozen=True)
class Runtime:
    """A remote Juturna service (``juturna serve``) the administrator named.

    ``token_file`` holds a bearer token (a mounted Secret); it is read at each use, so a
    rotated Secret applies without a restart, and it is never logged.
    """

    name: str
    url: str
    token_file: Path | None = None

    def token(self) -> str | None:
        return self.token_file.read_text().strip() if self.token_file else None


def parse_runtimes(raw: str, where: str = ENV_PREFIX + "RUNTIMES") -> dict[str, Runtime]:
    """``{"gpu": {"url": "http://…:8080", "tokenFile": "/var/run/secrets/gpu/token"}}``."""
    try:
        data = json.loads(raw or "{}")
    except json.JSONDecodeError as err:
        raise SettingsError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: must be a JSON object of runtimes by name")
    runtimes = {}
    for name, entry in data.items():
        url = entry.get("url", "") if isinstance(entry, dict) else ""
        if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
            raise SettingsError(f"{where}: runtime {name!r} needs an http(s) url, got {url!r}")
        token_file = entry.get("tokenFile")
        runtimes[name] = Runtime(name, url, Path(token_file) if token_file else None)
    return runtimes


@dataclass
class Settings:
    """Everything the operator reads from its environment and flags."""

    plugin_roots: list[Path] = field(default_factory=list)
    workdir: Path = DEFAULT_WORKDIR
    engine: str = "process"
    stop_timeout_s: float = 10.0
    health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S
    log_format: str = "text"
    max_concurrency: int = 8
    progress_threshold_s: float = 1.0
    # CPython's default is 5 ms. With thousands of in-process Juturna threads, every thread
    # waiting for the GIL wakes each interval to ask for it; at ~800 running example
    # pipelines that storm (500 runnable threads, 1.6 cores in futex) starved the event loop
    # for good. 20 ms ended it (docs/benchmarks.md). It only bounds how long a thread that
    # never blocks keeps the GIL; threads that block hand it over at once.
    gil_switch_interval_s: float = 0.02
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    default_runtime: str | None = None  # for pipelines without spec.runtime (engine "service")
    sweep_interval_s: float = 60.0
    metrics_port: int = 9090  # 0: no Prometheus endpoint
    namespaces: list[str] = field(default_factory=list)
    all_namespaces: bool = False
    # Engine "pod": the image each Pipeline's pod runs (the operator's own holds the worker
    # and the plugins; the chart sets it), and its pull policy.
    runtime_image: str = ""
    runtime_pull_policy: str = "IfNotPresent"
    allow_image_override: bool = False  # may spec.template.image replace runtime_image?
    # Juturna built-ins a Pipeline may use ("type/mark", "*": all). None: the engine's
    # default, all in a pod of the Pipeline's own, none beside the operator.
    allowed_builtins: tuple[str, ...] | None = None
    # "$JT_ENV_<NAME>" in-process reads the operator's own environment: refused unless set.
    allow_env_references: bool = False
    # Engine "process": the most pipelines one worker process runs (all of one namespace). A
    # worker that dies fails all of them at once; more workers cost more memory.
    pipelines_per_process: int = 1
    # Engine "pod": past these the kubelet evicts the pod (its work folder, its /tmp); None:
    # no limit. A live stream that dumps to disk would otherwise fill the node.
    pod_work_size_limit: str | None = "1Gi"
    pod_tmp_size_limit: str | None = "64Mi"
    # What a pipeline pod whose template gives no resources gets: never BestEffort.
    pod_default_resources: dict[str, dict[str, str]] = field(
        default_factory=lambda: json.loads(json.dumps(DEFAULT_POD_RESOURCES))
    )

    # Engine "pod": who may reach a pipeline pod's worker port (NetworkPolicy peers: the
    # operator, the kubelet's probes). None: no NetworkPolicy is made.
    worker_peers: list[dict[str, object]] | None = None
    # Engine "pod": how long a placed pod may stay unstarted while the kubelet warns (a
    # volume it cannot mount, a sandbox it cannot make) before the Pipeline fails with
    # PodNotStarted in the kubelet's words. Without a warning (an image pull) it waits on.
    pod_start_timeout_s: float = 60.0
    # Passes at once, over every Pipeline. A pass that waits long (a pod starting, a model
    # loading) gives its place to another meanwhile (workqueue.released).
    reconcile_workers: int = 128
    # Engine "pod": volume types a template may use beyond the restricted profile's (e.g.
    # hostPath), and the PriorityClasses it may name (system-* only if listed).
    allowed_volume_types: tuple[str, ...] = ()
    allowed_priority_classes: tuple[str, ...] = ()
    # The account the operator runs as (its pod's), refused in templates of its namespace.
    service_account: ServiceAccount | None = None
    # Engine "pod": the user pipeline pods run as, (UID, GID or None); None: the runtime
    # image's own numeric user (runAsNonRoot alone), which OpenShift's restricted SCC lets
    # it replace with one of the namespace's range.
    pod_user: tuple[int, int | None] | None = None
    # Engine "pod": Secrets every pipeline pod pulls its image with (each must exist in every
    # Pipeline's namespace), before those its template names.
    pod_image_pull_secrets: tuple[str, ...] = ()

    @classmethod
    def from_env(
        cls, flags: dict[str, str] | None = None, namespaces: Sequence[str] | None = None
    ) -> Settings:
        """Settings from the environment; ``flags`` (raw strings by setting name, see
        ``SETTINGS``) override it and go through the same checks. ``namespaces``: those the
        operator watches (none: all)."""
        src = _Sources(flags or {})
        settings = cls(
            plugin_roots=parse_plugin_path(src.get("PLUGIN_PATH"), src.where("PLUGIN_PATH")),
            workdir=Path(src.get("WORKDIR")).expanduser().resolve(),
            engine=src.get("ENGINE"),
            stop_timeout_s=src.seconds("STOP_TIMEOUT"),
            health_interval_s=src.seconds("HEALTH_INTERVAL"),
            log_format=src.get("LOG_FORMAT"),
            max_concurrency=src.count("MAX_CONCURRENCY"),
            progress_threshold_s=src.seconds("PROGRESS_THRESHOLD"),
            gil_switch_interval_s=src.seconds("GIL_SWITCH_INTERVAL"),
            runtimes=parse_runtimes(src.get("RUNTIMES"), src.where("RUNTIMES")),
            default_runtime=src.get("DEFAULT_RUNTIME") or None,
            sweep_interval_s=src.seconds("SWEEP_INTERVAL"),
            metrics_port=_port(src.where("METRICS_PORT"), src.get("METRICS_PORT")),
            runtime_image=src.get("RUNTIME_IMAGE"),
            runtime_pull_policy=src.get("RUNTIME_PULL_POLICY"),
            allow_image_override=src.boolean("ALLOW_IMAGE_OVERRIDE"),
            allowed_builtins=parse_builtins(
                src.given("ALLOWED_BUILTINS"), src.where("ALLOWED_BUILTINS")
            ),
            allow_env_references=src.boolean("ALLOW_ENV_REFERENCES"),
            pipelines_per_process=src.count("PIPELINES_PER_PROCESS"),
            pod_work_size_limit=parse_size_limit(
                src.get("POD_WORK_SIZE_LIMIT"), src.where("POD_WORK_SIZE_LIMIT")
            ),
            pod_tmp_size_limit=parse_size_limit(
                src.get("POD_TMP_SIZE_LIMIT"), src.where("POD_TMP_SIZE_LIMIT")
            ),
            pod_default_resources=parse_resources(
                src.get("POD_DEFAULT_RESOURCES"), src.where("POD_DEFAULT_RESOURCES")
            ),
            worker_peers=parse_worker_peers(src.given("WORKER_PEERS"), src.where("WORKER_PEERS")),
            pod_start_timeout_s=src.seconds("POD_START_TIMEOUT"),
            reconcile_workers=src.count("RECONCILE_WORKERS"),
            allowed_volume_types=parse_names(
                src.get("ALLOWED_VOLUME_TYPES"),
                src.where("ALLOWED_VOLUME_TYPES"),
                VOLUME_TYPES.__contains__,
                "a volume type of a Pod as Kubernetes spells it (e.g. hostPath, nfs)",
            ),
            allowed_priority_classes=parse_names(
                src.get("ALLOWED_PRIORITY_CLASSES"),
                src.where("ALLOWED_PRIORITY_CLASSES"),
                lambda name: len(name) <= MAX_OBJECT_NAME and bool(OBJECT_NAME.fullmatch(name)),
                "a PriorityClass name (lowercase letters, digits, '-' and '.')",
            ),
            service_account=read_service_account(),
            pod_user=parse_pod_user(src.get("POD_USER"), src.where("POD_USER")),
            pod_image_pull_secrets=parse_names(
                src.get("POD_IMAGE_PULL_SECRETS"),
                src.where("POD_IMAGE_PULL_SECRETS"),
                lambda name: bool(OBJECT_NAME.fullmatch(name)),
                "a Secret name (lowercase letters, digits, '-' and '.')",
            ),
        )
        if namespaces is not None:
            settings.namespaces, settings.all_namespaces = list(namespaces), not namespaces
        settings.check(src.where)
        return settings

    def engine_for(self, runtime: str | None) -> str:
        """The engine a Pipeline runs on: the service engine when it names a runtime."""
        return "service" if runtime or self.engine == "service" else self.engine

    def code_policy(self, runtime: str | None) -> CodePolicy:
        """What a Pipeline with this ``spec.runtime`` may run where it runs."""
        engine = self.engine_for(runtime)
        if self.allowed_builtins is None:
            builtins = None if engine == "pod" else frozenset[str]()
        else:
            builtins = None if ALL in self.allowed_builtins else frozenset(self.allowed_builtins)
        return CodePolicy(engine, builtins, self.allow_env_references or engine != "inprocess")

    def pod_policy(self, runtime: str | None, namespace: str) -> PodPolicy | None:
        """What the template of a Pipeline in ``namespace`` with this ``spec.runtime`` may
        give its pod; None where it runs on another engine (which ignores the template)."""
        if self.engine_for(runtime) != "pod":
            return None
        own = self.service_account
        return PodPolicy(
            volume_types=frozenset(self.allowed_volume_types),
            priority_classes=frozenset(self.allowed_priority_classes),
            chooses_code=self.allow_image_override,
            plugin_roots=tuple(str(root) for root in self.plugin_roots),
            forbidden_account=own.name if own and own.namespace == namespace else None,
        )

    def check(self, where: Callable[[str], str] = env_name) -> None:
        """Refuse values the operator cannot work with; ``where`` names a setting (by its
        name in ``SETTINGS``) as it was given: flag or variable."""
        for name, value in (
            ("ENGINE", self.engine),
            ("LOG_FORMAT", self.log_format),
            ("RUNTIME_PULL_POLICY", self.runtime_pull_policy),
        ):
            choices = SETTING[name].choices or ()
            if name == "ENGINE" and value == "shard":
                raise SettingsError(
                    f"{where(name)}: engine 'shard' is no more: use engine 'process' with "
                    f"{where('PIPELINES_PER_PROCESS')} above 1 (the pipelines one worker "
                    "process runs; chart value pipelinesPerProcess)"
                )
            if value not in choices:
                raise SettingsError(
                    f"{where(name)}: must be one of {', '.join(choices)}, got {value!r}"
                )
        for name, seconds, most in (
            ("HEALTH_INTERVAL", self.health_interval_s, MAX_HEALTH_INTERVAL_S),
            ("GIL_SWITCH_INTERVAL", self.gil_switch_interval_s, MAX_GIL_SWITCH_INTERVAL_S),
        ):
            if seconds > most:
                raise SettingsError(f"{where(name)}: must be at most {most:g} s, got {seconds:g}")
        if self.engine == "service" and self.default_runtime not in self.runtimes:
            configured = ", ".join(sorted(self.runtimes)) or "none configured"
            raise SettingsError(
                f"{where('DEFAULT_RUNTIME')}: engine 'service' needs the name of one of the "
                f"configured runtimes ({configured}), got {self.default_runtime or ''!r}"
            )
        if self.engine == "pod" and not self.runtime_image:
            raise SettingsError(
                f"{where('RUNTIME_IMAGE')}: engine 'pod' needs the image each Pipeline's pod "
                "runs (the operator's own image holds the worker and the plugins)"
            )
        if self.namespaces and self.all_namespaces:
            raise SettingsError("--namespace: choose either namespaces (-n) or all (-A), not both")
        for ns in self.namespaces:
            # Exact names only: the namespaced mode does not list namespaces (see handlers).
            if not NAMESPACE_NAME.fullmatch(ns):
                raise SettingsError(
                    f"--namespace: {ns!r} is not a namespace name (lowercase letters, digits "
                    "and '-', at most 63); name each watched namespace exactly"
                )
