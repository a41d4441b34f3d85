"""Which ports a Pipeline listens on, and the address each gets.

Juturna's live sources listen: the RTP sources for UDP (ffmpeg or PyAV also bind the RTCP
port, RTP + 1), ``json_http`` and ``json_websocket`` for TCP. Their configuration keys for
host and port are known here, so a Pipeline that uses them needs to say nothing more. A
plugin node declares its own in ``nodes[].ports``; a declaration wins over what is known of
a built-in of the same mark (a plugin may shadow one).

In a pipeline pod, a listener must be reachable from outside the pod and have a port a
Service can name: the host key is bound to every address of the pod (``0.0.0.0``) and a port
of ``0`` or ``"auto"`` (Juturna would pick one at random) gets a fixed one, derived from the
node's and the port's names, so it stays the same across revisions of the Pipeline.

Pure: no I/O, no Kubernetes, no Juturna import.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from juturna_operator.api import MAX_PORT_NAME, PORT_NAME, NodeSpec, PipelineSpec, PortSpec
from juturna_operator.domain import WORKER_PORT, Address
from juturna_operator.reasons import FailureReason, PipelineFailure, Step

BIND_ALL = "0.0.0.0"
AUTO = (0, "auto")
# Ports the operator assigns: even (RTP's convention; RTCP takes the odd one above).
ASSIGNED_FIRST, ASSIGNED_SPAN = 20000, 10000
MAX_PORT = 65535
# A Service port name is a declared port's name too: the same rules (api.PortSpec.name).
SERVICE_PORT_NAME = re.compile(PORT_NAME)


@dataclass(frozen=True)
class BuiltinListener:
    """What the operator knows of a built-in node that listens."""

    host_key: str
    port_key: str
    default_port: int | str  # its config.toml's
    protocol: str
    rtcp: bool  # it also binds port + 1 (RTCP)


BUILTIN_LISTENERS: dict[tuple[str, str], BuiltinListener] = {
    ("source", "audio_rtp"): BuiltinListener("rec_host", "rec_port", 0, "UDP", True),
    ("source", "audio_rtp_av"): BuiltinListener("host", "port", 8888, "UDP", True),
    ("source", "video_rtp"): BuiltinListener("rec_host", "rec_port", "auto", "UDP", True),
    ("source", "video_rtp_av"): BuiltinListener("rec_host", "rec_port", "auto", "UDP", True),
    ("source", "json_http"): BuiltinListener("host", "port", 8888, "TCP", False),
    ("source", "json_websocket"): BuiltinListener("rtx_host", "rtx_port", 1237, "TCP", False),
}


@dataclass(frozen=True)
class Listener:
    """One port a node listens on, resolved: ``port`` is what it binds in a pipeline pod."""

    node: str
    name: str  # the port's name within its node (rtp, rtcp, http, ...)
    port: int
    protocol: str
    host_key: str | None = None  # the configuration key of the bind address, if known
    port_key: str | None = None  # the configuration key of the port, if the operator writes it
    host: str = "127.0.0.1"  # what the configuration binds, as written (engines beside us)
    assigned: bool = False  # the operator chose the port (the configuration asked for any)

    @property
    def service_port_name(self) -> str:
        """A Service port name: at most 15 characters, lowercase letters, digits and ``-``
        (a digest of the names where ``<node>-<port>`` is not one already)."""
        plain = f"{self.node}-{self.name}"
        if (
            len(plain) <= MAX_PORT_NAME
            and SERVICE_PORT_NAME.match(plain)
            and "--" not in plain
            and any(c.isalpha() for c in plain)
        ):
            return plain
        digest = hashlib.sha256(f"{self.node}/{self.name}".encode()).hexdigest()[:5]
        head = re.sub(r"[^a-z0-9]+", "-", self.node.lower()).strip("-")[:8].strip("-")
        return f"p{head}-{digest}" if not head[:1].isalpha() else f"{head}-{digest}"


def assigned_port(node: str, name: str, taken: set[tuple[int, str]], protocol: str) -> int:
    """A fixed port for a listener that asked for any: the same for the same node and port
    names (so across revisions), moved on past ports already taken in the Pipeline."""
    digest = int(hashlib.sha256(f"{node}/{name}".encode()).hexdigest(), 16)
    for step in range(ASSIGNED_SPAN // 2):
        port = ASSIGNED_FIRST + ((digest // 2 + step) % (ASSIGNED_SPAN // 2)) * 2
        if (port, protocol) not in taken and (port + 1, protocol) not in taken:
            return port
    raise PipelineFailure(  # 5000 listeners on one protocol: the API's bounds forbid it
        FailureReason.InvalidSpec, Step.validate, "no free port left to assign"
    )


def _port_value(configuration: dict[str, Any], key: str | None, default: int | str) -> int | str:
    value = configuration.get(key, default) if key else default
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value if isinstance(value, int | str) else default


def _declared(node: NodeSpec) -> list[tuple[PortSpec, int | str]]:
    out = []
    for port in node.ports or []:
        value: int | str = port.port
        if port.configKey:
            value = _port_value(node.configuration, port.configKey, port.port or "auto")
        out.append((port, value))
    return out


def listeners(spec: PipelineSpec) -> list[Listener]:
    """Every port the Pipeline listens on, in node order. Raises ``InvalidSpec`` (naming
    both) for two listeners on one port and protocol, and for the worker's own port."""
    wanted: list[tuple[NodeSpec, str, int | str, str, str | None, str | None, bool]] = []
    for node in spec.nodes:
        if node.ports:
            for declared, value in _declared(node):
                wanted.append(
                    (
                        node,
                        declared.name,
                        value,
                        declared.protocol,
                        declared.hostKey,
                        declared.configKey,
                        False,
                    )
                )
            continue
        known = BUILTIN_LISTENERS.get((str(node.type), node.mark))
        if known is not None:
            value = _port_value(node.configuration, known.port_key, known.default_port)
            name = "rtp" if known.rtcp else known.protocol.lower()
            wanted.append(
                (node, name, value, known.protocol, known.host_key, known.port_key, known.rtcp)
            )
    fixed = {
        (int(v), proto) for _, _, v, proto, *_ in wanted if isinstance(v, int) and v not in AUTO
    }
    found: list[Listener] = []
    taken: dict[tuple[int, str], str] = {}
    for node, name, value, protocol, host_key, port_key, rtcp in wanted:
        if value in AUTO:
            port = assigned_port(node.name, name, fixed | set(taken), protocol)
        elif isinstance(value, int) and 0 < value <= MAX_PORT - int(rtcp):
            port = value
        else:
            raise _invalid(f'node "{node.name}": port {value!r} of "{name}" is not a port number')
        host = str(node.configuration.get(host_key, "127.0.0.1")) if host_key else "127.0.0.1"
        ports = [(name, port, port_key)] + ([("rtcp", port + 1, None)] if rtcp else [])
        assigned = value in AUTO
        for port_name, number, key in ports:
            where = f'node "{node.name}" port "{port_name}"'
            if protocol == "TCP" and number == WORKER_PORT:
                raise _invalid(
                    f"{where}: TCP {WORKER_PORT} is the pipeline pod's own (the operator "
                    "talks to the pipeline there); choose another"
                )
            other = taken.get((number, protocol))
            if other is not None:
                raise _invalid(f"{where} and {other} both listen on {protocol} {number}")
            taken[(number, protocol)] = where
            found.append(
                Listener(node.name, port_name, number, protocol, host_key, key, host, assigned)
            )
    names: dict[str, Listener] = {}
    for listener in found:
        clash = names.setdefault(listener.service_port_name, listener)
        if clash is not listener:
            raise _invalid(
                f'node "{listener.node}" port "{listener.name}" and node "{clash.node}" port '
                f'"{clash.name}" would share the Service port name "{clash.service_port_name}"; '
                "rename one"
            )
    return found


def _invalid(message: str) -> PipelineFailure:
    return PipelineFailure(FailureReason.InvalidSpec, Step.validate, message)


def bound_in_pod(config: dict[str, Any], found: list[Listener]) -> dict[str, Any]:
    """Juturna's config with each listener bound to every address of the pod, on its port:
    the keys the operator knows (built-ins) or was told (``hostKey``, ``configKey``)."""
    if not found:
        return config
    out = copy.deepcopy(config)
    nodes = {n["name"]: n for n in out["pipeline"]["nodes"]}
    for listener in found:
        configuration = nodes[listener.node].setdefault("configuration", {})
        if listener.host_key:
            configuration[listener.host_key] = BIND_ALL
        if listener.port_key:
            configuration[listener.port_key] = listener.port
    return out


def local_addresses(found: list[Listener] | tuple[Listener, ...]) -> tuple[Address, ...]:
    """Where the engines beside the operator listen: the configuration's own host and port
    (no Service there). A port left to Juturna (0, "auto") is its choice, not known here."""
    return tuple(
        Address(ln.node, ln.name, ln.protocol, ln.host, ln.port) for ln in found if not ln.assigned
    )
