"""The Pipeline API (``juturna.io/v1alpha1``): pydantic models of spec and status.

These models are the one source of truth: ``crd`` turns them into the CRD's OpenAPI
schema (descriptions, enums, defaults, CEL rules), and the operator parses every
resource through them. The spec mirrors Juturna's own pipeline config, so a Juturna
JSON file converts to a manifest mechanically (see ``to_juturna_config``).
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

from juturna_operator.domain import WORKER_PORT

GROUP = "juturna.io"
VERSION = "v1alpha1"
KIND = "Pipeline"
PLURAL = "pipelines"
SINGULAR = "pipeline"
SHORT_NAMES = ["jtp"]
CATEGORIES = ["juturna"]

# Bounds keep the API server's CEL cost estimate within its budget, and refuse
# absurd manifests at admission with a clear message instead of in the operator.
MAX_NODES = 128
MAX_LINKS = 512
MAX_PLUGINS = 32
MAX_NAME = 63
# The API server stores deeper JSON, but pydantic cannot serialize it (the revision hash
# failed with "Maximum serialization depth exceeded" on every pass, found by the fuzzer).
MAX_CONFIGURATION_DEPTH = 32


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


MAX_PATH = 253
MAX_PORTS = 8
MAX_PORT_NAME = 15
PORT_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

SAFE_NAME = r"^[A-Za-z0-9_-]+$"
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"


def first_error(err: ValidationError) -> str:
    """The first problem of a spec, as users read it: ``spec.<path>: <message>``."""
    first = err.errors()[0]
    return f"spec.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


class _LifecycleOnly:
    """Marks a spec field that says how to run the pipeline, not what it is: changing it
    keeps the revision (and the instance). Any field without it redeploys when it changes."""


LIFECYCLE_ONLY = _LifecycleOnly()


class _AddedLater:
    """Marks a field added after Pipelines were stored: at its default it is left out of the
    revision, so that upgrading the operator redeploys no Pipeline that does not use it."""


ADDED_LATER = _AddedLater()


def _without_unset_additions(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    """``dumped`` (``model``'s dump) without the fields marked ADDED_LATER that hold their
    default, at any depth of nested models."""
    for name, field in type(model).model_fields.items():
        key, value = field.alias or name, getattr(model, name)
        if ADDED_LATER in field.metadata and value == field.get_default(call_default_factory=True):
            dumped.pop(key, None)
        elif isinstance(value, BaseModel) and isinstance(dumped.get(key), dict):
            _without_unset_additions(value, dumped[key])
    return dumped


def _cel(
    rule: str, message_expression: str, reason: str = "FieldValueInvalid"
) -> dict[str, JsonValue]:
    return {"rule": rule, "messageExpression": message_expression, "reason": reason}


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", use_enum_values=True)


def _validated(*rules: dict[str, JsonValue]) -> ConfigDict:
    """The shared model config, plus CEL rules the API server enforces on the object."""
    validations: list[JsonValue] = [*rules]
    return ConfigDict(
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        json_schema_extra={"x-kubernetes-validations": validations},
    )


# --- spec ---------------------------------------------------------------------------------


class DesiredState(StrEnum):
    """What the user asks for."""

    Running = "Running"
    Standby = "Standby"
    Stopped = "Stopped"


# Old words v1alpha1 still accepts, and what each means. ``Ready`` was the warm standby's
# name until it collided with the Ready condition and phase; a stored Pipeline that says it
# must stay warm, not start (an unknown state would be read as Running).
DEPRECATED_STATES = {"Ready": DesiredState.Standby}


def desired_state(raw: object) -> DesiredState | None:
    """The desired state a spec's ``state`` value means (a deprecated word included), or
    None for a value this operator does not know."""
    if not isinstance(raw, str):
        return None
    if raw in DEPRECATED_STATES:
        return DEPRECATED_STATES[raw]
    return DesiredState(raw) if raw in DesiredState.__members__ else None


def deprecation_warnings(spec: dict[str, Any]) -> list[str]:
    """What a raw spec says in words v1alpha1 still accepts but no longer wants."""
    state = spec.get("state")
    if isinstance(state, str) and state in DEPRECATED_STATES:
        new = DEPRECATED_STATES[state]
        return [
            f'spec.state "{state}" is deprecated: write "{new}" (the same warm standby: '
            f"created and warmed up, not started); it is read as {new} until then"
        ]
    return []


class NodeType(StrEnum):
    source = "source"
    proc = "proc"
    sink = "sink"


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"


class PortSpec(_Model):
    """A port a plugin node listens on. Juturna's own listening sources (RTP, json_http,
    json_websocket) need none: the operator knows their configuration keys."""

    model_config = _validated(
        _cel(
            f"!(self.port == {WORKER_PORT} && self.protocol == 'TCP')",
            f"'port \"%s\": TCP {WORKER_PORT} is the pipeline pod\\'s own (the operator talks "
            "to the pipeline there); choose another'.format([self.name])",
        ),
        _cel(
            "self.port != 0 || has(self.configKey)",
            '\'port "%s": port 0 (any) needs configKey, the configuration key the operator '
            "writes the port it assigns to'.format([self.name])",
        ),
    )

    name: str = Field(
        min_length=1,
        max_length=MAX_PORT_NAME,
        pattern=PORT_NAME,
        description="The port's name within its node, e.g. rtp or http: lowercase letters, "
        "digits and '-'.",
    )
    port: int = Field(
        ge=0,
        le=65535,
        description="The port the node listens on. 0: the operator assigns a fixed one "
        "(the same across revisions) and writes it to configKey. A configKey's value in "
        "the configuration wins over this.",
    )
    protocol: Protocol = Field(default=Protocol.TCP, description="TCP or UDP.")
    configKey: str | None = Field(
        default=None,
        max_length=MAX_NAME,
        description="The configuration key that holds the port. Only when it is named does "
        "the operator write the port into the node's configuration.",
    )
    hostKey: str | None = Field(
        default=None,
        max_length=MAX_NAME,
        description="The configuration key that holds the bind address. In a pipeline pod "
        "the operator sets it to 0.0.0.0, so that the pipeline's Service reaches it.",
    )


class NodeSpec(_Model):
    """One node of the graph, exactly as Juturna's pipeline config describes it."""

    model_config = _validated(
        _cel(
            "self.name.matches('" + SAFE_NAME + "')",
            '\'node name "%s" is not a safe folder name: use only letters, digits, '
            '"_" and "-"\'.format([self.name])',
        ),
        _cel(
            "self.mark.matches('" + IDENTIFIER + "')",
            '\'node "%s": mark "%s" must be a Python identifier (letters, digits '
            'and "_", not starting with a digit)\'.format([self.name, self.mark])',
        ),
    )

    name: str = Field(
        min_length=1,
        max_length=MAX_NAME,
        description=(
            "Node name, unique in the pipeline. Juturna makes it a folder name, so only "
            "letters, digits, '_' and '-' are allowed."
        ),
    )
    type: NodeType = Field(description="Node type: source, proc or sink.")
    mark: str = Field(
        min_length=1,
        max_length=MAX_NAME,
        description=(
            "The node kind: the plugin (or built-in node) that implements it. Juturna looks "
            "for <plugin>/nodes/<type>/_<mark>/<mark>.py."
        ),
    )
    configuration: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Free-form node arguments. Only keys declared in the node's config.toml "
            "[arguments] are used; the operator warns about any other key. A value "
            '"$JT_ENV_X" is read from the environment variable X.'
        ),
    )
    auto_dump: bool | None = Field(
        default=None, description="Juturna option: dump every transmitted message as JSON."
    )
    sync: str | None = Field(
        default=None, max_length=MAX_NAME, description="Juturna option: synchroniser name."
    )
    warped: bool | None = Field(
        default=None, description="Juturna option: run this node remotely through a warp node."
    )
    warp_configuration: dict[str, Any] | None = Field(
        default=None, description="Juturna option: the warp node's configuration (with warped)."
    )
    ports: list[PortSpec] | None = Field(
        default=None,
        max_length=MAX_PORTS,
        description="The ports a plugin node listens on, for the Pipeline's Service and "
        "status.endpoints. Juturna's own listening sources need none.",
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.all(p, self.exists_one(q, q.name == p.name))",
                    "'port names must be unique within a node: \"%s\" appears more than once'"
                    ".format([self.filter(p, self.filter(q, q.name == p.name).size() > 1)[0]"
                    ".name])",
                ),
                _cel(
                    "self.all(p, p.port == 0 || self.exists_one(q, q.port == p.port && "
                    "q.protocol == p.protocol))",
                    '\'ports "%s" and "%s" both listen on %s %d\'.format([self.filter(p, '
                    "p.port != 0 && self.filter(q, q.port == p.port && q.protocol == p.protocol)"
                    ".size() > 1)[0].name, self.filter(p, p.port != 0 && self.filter(q, q.port "
                    "== p.port && q.protocol == p.protocol).size() > 1)[1].name, self.filter(p, "
                    "p.port != 0 && self.filter(q, q.port == p.port && q.protocol == p.protocol)"
                    ".size() > 1)[0].protocol, self.filter(p, p.port != 0 && self.filter(q, "
                    "q.port == p.port && q.protocol == p.protocol).size() > 1)[0].port])",
                ),
            ]
        },
    )

    @field_validator("configuration", "warp_configuration")
    @classmethod
    def _not_too_deep(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and _depth(value) > MAX_CONFIGURATION_DEPTH:
            raise ValueError(f"nests deeper than {MAX_CONFIGURATION_DEPTH} levels")
        return value


class LinkSpec(_Model):
    """A directed edge: messages flow from one node to another."""

    model_config = _validated(
        _cel(
            "self.from != self.to",
            "'link from \"%s\" to itself is not allowed'.format([self.from])",
        )
    )

    from_: str = Field(
        alias="from", min_length=1, max_length=MAX_NAME, description="Name of the sending node."
    )
    to: str = Field(min_length=1, max_length=MAX_NAME, description="Name of the receiving node.")


class RestartPolicy(_Model):
    """How retryable (5xx) failures are retried."""

    maxRestarts: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="Redeploys after retryable failures before the phase becomes Failed.",
    )
    backoffSeconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="First wait before a redeploy; it doubles on each restart, capped at 300 s.",
    )


class UpdateStrategy(StrEnum):
    """How a change to a running pipeline lands."""

    WarmSwap = "WarmSwap"
    Recreate = "Recreate"


class UpdateFallback(StrEnum):
    """What a warm swap does when the new instance finds no room beside the old one."""

    Recreate = "Recreate"
    Abort = "None"


class UpdatePolicy(_Model):
    """How a change of the pipeline itself (configuration, nodes, links, template) lands on a
    running Pipeline. Editing this never starts an update by itself."""

    strategy: UpdateStrategy | None = Field(
        default=None,
        description=(
            "WarmSwap: the new revision is created and warmed up beside the running one, "
            "started, given the Pipeline's address, and the old one stops after drainSeconds; "
            "it needs room for both at once. Recreate: the running instance stops, then the new "
            "one is deployed (the stream stops for a whole warmup). Unset: WarmSwap where the "
            "engine can run two instances side by side (engine pod; engines process and "
            "inprocess where the Pipeline listens on no port), else Recreate."
        ),
    )
    timeoutSeconds: int = Field(
        default=600,
        ge=1,
        le=86_400,
        description=(
            "How long the new instance may take to become ready (a model load); past it the "
            "update is abandoned (or falls back, see fallback) and the old instance serves on."
        ),
    )
    drainSeconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description=(
            "How long the old instance keeps running after the switch, with no new traffic: "
            "its connections may finish and its sinks may still emit for that long."
        ),
    )
    fallback: UpdateFallback = Field(
        default=UpdateFallback.Recreate,
        description=(
            "When the new instance cannot be scheduled beside the old one within "
            "timeoutSeconds (no room for two, e.g. GPUs). Recreate: the change lands the "
            "Recreate way, with a Warning Event saying why. None: the update is abandoned and "
            "the old instance serves on."
        ),
    )


# The CRD types a field marked with this as Kubernetes' own type of that name (``of`` the
# field itself, its items or its values), from the OpenAPI schemas of the pinned Kubernetes
# version (``crd.KUBERNETES_FILE``): ``kubectl explain`` goes on into it, and the API server
# refuses a wrong field at apply. The operator reads such fields as plain JSON.
KUBERNETES_TYPE = "x-juturna-kubernetes-type"
CORE = "io.k8s.api.core.v1."
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"


def _kubernetes(type_name: str, of: str = "field") -> dict[str, JsonValue]:
    return {KUBERNETES_TYPE: {"type": type_name, "of": of}}


def _pod_objects(description: str, kind: str) -> Any:
    """A list of Pod-spec objects of Kubernetes' type ``kind`` (Toleration, EnvVar, ...)."""
    return Field(
        default_factory=list,
        description=description,
        json_schema_extra=_kubernetes(CORE + kind, of="items"),
    )


class LocalObjectReference(_Model):
    """An object of the Pipeline's own namespace, by name."""

    name: str = Field(
        min_length=1, max_length=253, description="The object's name, in the Pipeline's namespace."
    )


class ResourceRequirements(_Model):
    """Compute resources of the pipeline's container, as in a Pod."""

    requests: dict[str, Any] = Field(
        default_factory=dict,
        description="Minimum resources, e.g. {cpu: 500m, memory: 1Gi}; the scheduler places "
        "the pod where they fit.",
        json_schema_extra=_kubernetes(QUANTITY, of="values"),
    )
    limits: dict[str, Any] = Field(
        default_factory=dict,
        description="Maximum resources, e.g. {memory: 2Gi, nvidia.com/gpu: 1}; extended "
        "resources such as GPUs are requested here.",
        json_schema_extra=_kubernetes(QUANTITY, of="values"),
    )


class PodTemplate(_Model):
    """Where and with what the pipeline runs, with the pod engine: the fields of a Pod that a
    Pipeline may set. Before anything deploys, the operator holds them to what the restricted
    Pod Security Standard lets a Pod author do, in any namespace (volume types, security
    annotations, priority classes the administrator allows, no code of the author's choice),
    and the API server checks the Pod as it creates it (a refused one leaves nothing
    behind); other engines ignore them."""

    resources: ResourceRequirements | None = Field(
        default=None, description="Requests and limits of the pipeline's container."
    )
    nodeSelector: dict[str, str] = Field(
        default_factory=dict, description="Labels a node must have to run the pod."
    )
    tolerations: list[dict[str, Any]] = _pod_objects(
        "Pod tolerations, as in a Pod spec.", "Toleration"
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="Pod affinity rules, as in a Pod spec.",
        json_schema_extra=_kubernetes(CORE + "Affinity"),
    )
    priorityClassName: str | None = Field(
        default=None,
        max_length=253,
        description="The pod's PriorityClass: one the administrator allows (none by default).",
    )
    runtimeClassName: str | None = Field(
        default=None, max_length=253, description="The pod's RuntimeClass (e.g. for GPUs)."
    )
    serviceAccountName: str | None = Field(
        default=None,
        max_length=253,
        description="A ServiceAccount of the namespace for the pod; its own "
        "automountServiceAccountToken decides whether the pod gets its token. Without one "
        "Kubernetes mounts no token, and projected ServiceAccount tokens are refused. Never "
        "the operator's own account.",
    )
    env: list[dict[str, Any]] = _pod_objects(
        "Environment variables of the pipeline's container, as in a Pod spec; not PATH, "
        "PYTHON*, LD_* or JUTURNA_OPERATOR_* (they choose the code the worker runs).",
        "EnvVar",
    )
    volumes: list[dict[str, Any]] = _pod_objects(
        "Extra volumes (models, media), as in a Pod spec, of the types the restricted Pod "
        "Security Standard allows (and those the administrator adds).",
        "Volume",
    )
    volumeMounts: list[dict[str, Any]] = _pod_objects(
        "Where the extra volumes are mounted in the pipeline's container: not over the "
        "image's code (/usr, /etc, /opt, ...), its plugins or the pod's tokens.",
        "VolumeMount",
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Extra pod annotations; not AppArmor or seccomp ones (the operator sets "
        "the pod's profiles).",
    )
    image: str | None = Field(
        default=None,
        max_length=1024,
        description="Another runtime image; only where the administrator allows overrides.",
    )
    imagePullSecrets: Annotated[list[LocalObjectReference], ADDED_LATER] = Field(
        default_factory=list,
        description="Secrets of the Pipeline's namespace that hold registry credentials for "
        "the pod's image, as in a Pod; added to those the administrator gives every pipeline "
        "pod.",
    )


def _link_end_rule(end: str) -> dict[str, JsonValue]:
    """CEL: every link's ``end`` names a node; the message names the first bad link.

    Messages use ``format``: concatenating a filtered element makes the API server's
    cost estimate unbounded and the CRD is refused.
    """
    names = "self.nodes.map(n, n.name)"
    bad = f"self.links.filter(l, !(l.{end} in {names}))[0]"
    return _cel(
        f"!has(self.links) || self.links.all(l, l.{end} in {names})",
        f"'link %d: \\'{end}\\' names no node (got \"%s\")'.format("
        f"[self.links.indexOf({bad}), {bad}.{end}])",
    )


class PipelineSpec(_Model):
    """The desired pipeline: Juturna's pipeline config plus the desired lifecycle state."""

    model_config = _validated(
        _cel(
            "self.nodes.map(n, n.name).distinct().size() == size(self.nodes)",
            "'node names must be unique: \"%s\" appears more than once'.format([self.nodes"
            ".filter(n, self.nodes.filter(m, m.name == n.name).size() > 1)[0].name])",
        ),
        _link_end_rule("from"),
        _link_end_rule("to"),
    )

    state: Annotated[DesiredState, LIFECYCLE_ONLY] = Field(
        default=DesiredState.Running,
        description=(
            "Desired lifecycle. Running: created, warmed up and started. Standby: created "
            'and warmed up but not started (a warm standby; Juturna\'s "ready"). Stopped: '
            "no pipeline instance and no resources held; the resource is kept. Ready is a "
            "deprecated word for Standby."
        ),
        json_schema_extra={"enum": [*(s.value for s in DesiredState), *DEPRECATED_STATES]},
    )
    version: str = Field(default="1.0", max_length=MAX_NAME, description="Juturna config version.")
    plugins: list[str] = Field(
        default_factory=list,
        max_length=MAX_PLUGINS,
        description=(
            "Plugin folders, each relative to one of the plugin roots the operator's "
            "administrator configured. Absolute paths and '..' are not allowed."
        ),
        json_schema_extra={
            "items": {
                "type": "string",
                "description": "A plugin folder, relative to a plugin root.",
                "minLength": 1,
                "maxLength": MAX_PATH,
                "x-kubernetes-validations": [
                    _cel(
                        "!self.startsWith('/') && !self.split('/').exists(s, s == '..')",
                        "'plugin folder \"' + self + '\" must be relative to a plugin root: "
                        'no leading "/" and no ".."\'',
                    )
                ],
            }
        },
    )
    nodes: list[NodeSpec] = Field(
        min_length=1, max_length=MAX_NODES, description="The nodes of the graph."
    )
    links: list[LinkSpec] = Field(
        default_factory=list,
        max_length=MAX_LINKS,
        description="The edges of the graph; both ends name nodes.",
    )
    telemetry: str | None = Field(
        default=None,
        max_length=MAX_NAME,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Optional telemetry file name, written in the pipeline folder.",
    )
    runtime: str | None = Field(
        default=None,
        max_length=MAX_NAME,
        description="Name of a runtime the administrator configured. Empty: the default.",
    )
    restartPolicy: Annotated[RestartPolicy, LIFECYCLE_ONLY] = Field(
        default_factory=RestartPolicy, description="How runtime failures are retried."
    )
    template: PodTemplate | None = Field(
        default=None,
        description="Engine pod: where and with what the pipeline's pod runs (resources, "
        "node selection, volumes, ...). A change replaces the pod.",
    )
    update: Annotated[UpdatePolicy, LIFECYCLE_ONLY] = Field(
        default_factory=UpdatePolicy,
        description="How a change to the running pipeline lands: a warm swap or a recreate.",
    )

    @field_validator("state", mode="before")
    @classmethod
    def _deprecated_state(cls, value: Any) -> Any:
        return DEPRECATED_STATES.get(value, value) if isinstance(value, str) else value

    def revision(self) -> str:
        """A digest of what defines the pipeline itself (not ``state`` or ``restartPolicy``).

        Two generations with the same revision can share one instance: changing only the
        desired state stops or starts it instead of redeploying.
        """
        lifecycle_only = {
            name
            for name, field in type(self).model_fields.items()
            if LIFECYCLE_ONLY in field.metadata
        }
        defining = _without_unset_additions(
            self, self.model_dump(mode="json", by_alias=True, exclude=lifecycle_only)
        )
        digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()
        return digest[:16]

    def to_juturna_config(self, name: str) -> dict[str, Any]:
        """Juturna's own config dict (``PipelineConfig``), for a pipeline called ``name``."""
        # ports are the operator's (the pipeline's Service), not Juturna's.
        nodes = [n.model_dump(exclude_none=True, exclude={"ports"}) for n in self.nodes]
        pipeline: dict[str, Any] = {
            "name": name,
            "nodes": nodes,
            "links": [link.model_dump(by_alias=True) for link in self.links],
        }
        if self.telemetry:
            pipeline["telemetry"] = self.telemetry
        return {"version": self.version, "plugins": list(self.plugins), "pipeline": pipeline}


# --- status -------------------------------------------------------------------------------


class Phase(StrEnum):
    Pending = "Pending"
    Creating = "Creating"
    WarmingUp = "WarmingUp"
    Standby = "Standby"
    Starting = "Starting"
    Running = "Running"
    Stopping = "Stopping"
    Stopped = "Stopped"
    Failed = "Failed"
    Deleting = "Deleting"


class ConditionType(StrEnum):
    Created = "Created"
    WarmedUp = "WarmedUp"
    Running = "Running"
    Ready = "Ready"
    Updating = "Updating"


class UpdateStep(StrEnum):
    """Where a warm swap is (the ``Updating`` condition's reason while it is True)."""

    WarmingUpNew = "WarmingUpNew"
    Switching = "Switching"
    Draining = "Draining"


def _timestamp(description: str) -> Any:
    """An RFC 3339 time, typed as one in the CRD (``format: date-time``)."""
    return Field(description=description, json_schema_extra={"format": "date-time"})


def _list_map(key: str) -> dict[str, JsonValue]:
    """A list whose entries are told apart by ``key`` (unique), as Kubernetes lists of
    conditions are: ``kubectl explain``, server-side apply and the API server know it."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


class Condition(_Model):
    """A standard Kubernetes condition."""

    type: ConditionType = Field(description="Created, WarmedUp, Running, Ready or Updating.")
    status: str = Field(description="True, False or Unknown.", pattern="^(True|False|Unknown)$")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable details.")
    lastTransitionTime: str = _timestamp("When status last changed (RFC 3339).")
    observedGeneration: int = Field(description="The generation this condition describes.")


class Failure(_Model):
    """Present only while the last attempt failed."""

    reason: str = Field(description="CamelCase failure reason from the documented set.")
    code: int = Field(description="HTTP-like: 4xx needs a spec change; 5xx is retried.")
    step: str = Field(description="validate, create, warmup, start, stop, delete or run.")
    message: str = Field(description="What a person needs in order to fix it.")


class NodeStatus(_Model):
    """One node's observed status."""

    name: str = Field(description="Node name.")
    status: str = Field(description="Created, Configured, Running, Stopped or Failed.")


class PodPlacement(_Model):
    """Where the pipeline runs (engine pod)."""

    name: str = Field(description="The pipeline's pod, in the Pipeline's namespace.")
    node: str | None = Field(default=None, description="The node the scheduler placed it on.")


class Endpoint(_Model):
    """Where one listening port of the pipeline takes input."""

    node: str = Field(description="The node that listens.")
    name: str = Field(description="The port's name within its node (rtp, rtcp, http, ...).")
    protocol: Protocol = Field(description="TCP or UDP.")
    host: str = Field(
        description="Engine pod: the pipeline's Service, by its DNS name "
        "(<service>.<namespace>.svc). Engines beside the operator: the address it binds."
    )
    port: int = Field(description="The port to send to.")
    clusterIP: str | None = Field(
        default=None, description="The Service's cluster IP (engine pod only)."
    )
    address: str = Field(description="host:port, for the ADDRESS column.")


class UpdateStatus(_Model):
    """A warm swap under way: the instance being prepared beside the serving one."""

    step: UpdateStep = Field(description="WarmingUpNew, Switching or Draining.")
    revision: str = Field(description="The revision being deployed.")
    previousRevision: str | None = Field(
        default=None,
        description="The revision it replaces: serving until the switch, draining after it.",
    )
    pod: PodPlacement | None = Field(
        default=None,
        description="Engine pod: the pod being prepared (Draining: the old one, going).",
    )


class PipelineStatus(_Model):
    """What the operator observed. Written only through the status subresource."""

    phase: Phase | None = Field(default=None, description="Convenience summary of the lifecycle.")
    observedGeneration: int | None = Field(
        default=None, description="The metadata.generation this status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Created, WarmedUp, Running, Ready and Updating.",
        json_schema_extra=_list_map("type"),
    )
    failure: Failure | None = Field(default=None, description="The last attempt's failure.")
    pipelineId: str | None = Field(default=None, description="Juturna's id of the instance.")
    restarts: int = Field(default=0, description="Restarts since the last spec change.")
    nodes: list[NodeStatus] = Field(
        default_factory=list, description="Per-node status.", json_schema_extra=_list_map("name")
    )
    nodesReady: str | None = Field(
        default=None, description="Running (or warm) nodes over all nodes, e.g. 2/2."
    )
    pod: PodPlacement | None = Field(
        default=None, description="The pipeline's pod and its node (engine pod only)."
    )
    endpoints: list[Endpoint] = Field(
        default_factory=list,
        description="Where the pipeline takes input: one entry per listening port. Engine "
        "pod: a Service of the Pipeline's own name, whose address survives pod replacement.",
    )
    address: str | None = Field(
        default=None,
        description="The first endpoint's host:port (and how many more), for the ADDRESS column.",
    )
    lastStableRevision: str | None = Field(
        default=None,
        description="The revision that last ran as asked: what serves while an update fails.",
    )
    update: UpdateStatus | None = Field(
        default=None, description="A warm swap under way (absent otherwise)."
    )
