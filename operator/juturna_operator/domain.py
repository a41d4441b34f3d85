"""The operator's own domain types, shared by every layer: which resource, what its
instance is doing, how a node died. No Juturna, no Kubernetes client, no settings here:
the pure lifecycle and the metrics use these without pulling in an engine."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import StrEnum

# The pipeline pod's worker listens here (engine pod): no listener of a Pipeline may take it.
WORKER_PORT = 8080
NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # DNS-1123 label


class InstanceState(StrEnum):
    """What an engine holds for one Pipeline resource."""

    Absent = "Absent"
    Created = "Created"
    Ready = "Ready"  # warmed up, never started (Juturna's "ready"; a Standby Pipeline's)
    Running = "Running"
    Spent = "Spent"  # warmed up and stopped once: Juturna cannot start it again (Pitfall 3)


class Slot(StrEnum):
    """Which of a Pipeline's two instances: the one that serves, or the next revision warming
    up beside it during a warm swap (and, after the switch, the old one while it drains)."""

    active = "active"
    candidate = "candidate"


# A DNS-1123 subdomain, as the API server checks object names: dot-separated labels.
OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
MAX_OBJECT_NAME = 253


@dataclass(frozen=True)
class PipelineKey:
    """Identifies one Pipeline resource; ``juturna_name`` is unique and safe as a folder name."""

    namespace: str
    name: str
    uid: str
    slot: Slot = Slot.active

    def __post_init__(self) -> None:
        # The API server only admits DNS-1123 names; the engine layer checks again, so that
        # no caller can turn a name into a path outside the work folder (Pitfall 7).
        if not NAMESPACE_NAME.fullmatch(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} is not a Kubernetes object name")
        if len(self.name) > MAX_OBJECT_NAME or not OBJECT_NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} is not a Kubernetes object name")

    @property
    def juturna_name(self) -> str:
        # namespace and name are DNS-1123 (lowercase letters, digits, '-' and '.'),
        # so this holds no '/' and is never '.' or '..' (Pitfall 7).
        return f"{self.namespace}__{self.name}__{self.uid[:8]}"

    def __str__(self) -> str:
        suffix = "" if self.slot is Slot.active else f" ({self.slot})"
        return f"{self.namespace}/{self.name}{suffix}"

    @property
    def candidate(self) -> PipelineKey:
        """The same Pipeline's candidate slot (a warm swap's other instance)."""
        return replace(self, slot=Slot.candidate)

    @property
    def active(self) -> PipelineKey:
        """The same Pipeline's active slot."""
        return replace(self, slot=Slot.active)

    @property
    def log_extra(self) -> dict[str, object]:
        """``extra=`` for a log line about this pipeline. kopf's formatters then name it as
        they name their own: a ``[namespace/name]`` prefix in text, an ``object`` in JSON."""
        return log_extra(self.namespace, self.name, self.uid)


def log_extra(namespace: str, name: str, uid: str = "") -> dict[str, object]:
    """See ``PipelineKey.log_extra``; ``k8s_skip`` keeps the line out of Kubernetes Events."""
    ref = {"apiVersion": "juturna.io/v1alpha1", "kind": "Pipeline", "namespace": namespace}
    return {"k8s_ref": ref | {"name": name, "uid": uid}, "k8s_skip": True}


def log_extra_of_juturna_name(juturna_name: str) -> dict[str, object]:
    """``log_extra`` for an instance known only by its Juturna name (orphans, old folders)."""
    namespace, _, rest = juturna_name.partition("__")
    name, _, uid8 = rest.rpartition("__")
    return log_extra(namespace, name or rest, uid8)


@dataclass(frozen=True)
class NodeCrash:
    """A node thread that died while the pipeline ran (Juturna does not report it), or,
    with ``node == WHOLE_RUNTIME``, the process that ran the whole pipeline."""

    node: str
    thread: str
    error: str

    def describe(self) -> str:
        if self.node == WHOLE_RUNTIME:
            return self.error
        return f'node "{self.node}" crashed: {self.error} (thread {self.thread})'


WHOLE_RUNTIME = "(worker)"


@dataclass(frozen=True)
class Address:
    """Where one listening port of a pipeline takes input (``status.endpoints``)."""

    node: str
    name: str  # the port's name within its node
    protocol: str  # TCP or UDP
    host: str  # a Service's DNS name, or the address a local engine binds
    port: int
    cluster_ip: str | None = None
