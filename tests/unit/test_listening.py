"""Which ports a Pipeline listens on, the ports the operator assigns, and the Service names."""

from __future__ import annotations

import re
from typing import Any

import pytest

from juturna_operator.api import PipelineSpec
from juturna_operator.domain import PipelineKey
from juturna_operator.engines.pod import service_body, service_name
from juturna_operator.listening import (
    Listener,
    bound_in_pod,
    listeners,
    local_addresses,
)
from juturna_operator.reasons import FailureReason, PipelineFailure

IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])*")


def spec(*nodes: dict[str, Any]) -> PipelineSpec:
    return PipelineSpec.model_validate({"nodes": list(nodes), "links": []})


def node(name: str, kind: str, mark: str, **configuration: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "mark": mark, "configuration": configuration}


def test_a_pipeline_that_does_not_listen_has_no_listener() -> None:
    assert listeners(spec(node("src", "source", "ticker"), node("out", "sink", "jsonl"))) == []


def test_builtin_sources_are_known_without_a_declaration() -> None:
    found = listeners(
        spec(
            node("web", "source", "json_http", port=9000),
            node("ws", "source", "json_websocket"),
            node("av", "source", "audio_rtp_av", port=7000),
        )
    )
    assert [(ln.node, ln.name, ln.port, ln.protocol) for ln in found] == [
        ("web", "tcp", 9000, "TCP"),
        ("ws", "tcp", 1237, "TCP"),  # its config.toml's default
        ("av", "rtp", 7000, "UDP"),
        ("av", "rtcp", 7001, "UDP"),  # the RTP receiver binds RTP + 1 too
    ]
    assert (found[0].host_key, found[0].port_key) == ("host", "port")


def test_any_port_gets_a_fixed_one_that_stays_across_revisions() -> None:
    first = listeners(spec(node("mic", "source", "audio_rtp", block_size=1)))
    rtp, rtcp = first
    assert rtp.assigned
    assert rtp.port % 2 == 0
    assert 20000 <= rtp.port < 30000
    assert rtcp.port == rtp.port + 1
    # Another revision: more nodes, other configuration; the same node keeps its port.
    later = listeners(
        spec(
            node("mic", "source", "audio_rtp", block_size=3, rec_port="0"),
            node("cam", "source", "video_rtp"),
        )
    )
    assert later[0].port == rtp.port
    assert len({(ln.port, ln.protocol) for ln in later}) == 4


def test_in_a_pod_the_host_key_binds_every_address_and_the_assigned_port_is_written() -> None:
    pipeline = spec(node("mic", "source", "audio_rtp", rec_host="127.0.0.1", block_size=1))
    found = listeners(pipeline)
    config = pipeline.to_juturna_config("x")
    bound = bound_in_pod(config, found)
    assert bound["pipeline"]["nodes"][0]["configuration"] == {
        "rec_host": "0.0.0.0",
        "rec_port": found[0].port,
        "block_size": 1,
    }
    assert config["pipeline"]["nodes"][0]["configuration"]["rec_host"] == "127.0.0.1"  # a copy


def test_a_plugin_declares_its_ports_and_only_a_named_key_is_rewritten() -> None:
    pipeline = spec(
        {
            **node("feed", "source", "udpfeed", listen=6000, bind="127.0.0.1"),
            "ports": [
                {"name": "data", "port": 0, "protocol": "UDP", "configKey": "listen"},
                {"name": "admin", "port": 6100, "hostKey": "bind"},
            ],
        }
    )
    found = listeners(pipeline)
    assert [(ln.name, ln.port, ln.protocol) for ln in found] == [
        ("data", 6000, "UDP"),  # the configuration's value wins over the declared 0
        ("admin", 6100, "TCP"),
    ]
    configuration = bound_in_pod(pipeline.to_juturna_config("x"), found)["pipeline"]["nodes"][0]
    assert configuration["configuration"] == {"listen": 6000, "bind": "0.0.0.0"}
    assert "ports" not in configuration  # Juturna never sees the operator's field


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (
            [
                node("a", "source", "json_http", port=9000),
                node("b", "source", "json_websocket", rtx_port=9000),
            ],
            'node "b" port "tcp" and node "a" port "tcp" both listen on TCP 9000',
        ),
        (
            [
                node("a", "source", "audio_rtp_av", port=5004),
                node("b", "source", "audio_rtp_av", port=5005),
            ],
            'node "b" port "rtp" and node "a" port "rtcp" both listen on UDP 5005',
        ),
        (
            [node("a", "source", "json_http", port=8080)],
            'node "a" port "tcp": TCP 8080 is the pipeline pod\'s own (the operator talks to '
            "the pipeline there); choose another",
        ),
        (
            [node("a", "source", "json_http", port="eighty")],
            'node "a": port \'eighty\' of "tcp" is not a port number',
        ),
        (
            [node("a", "source", "audio_rtp_av", port=65535)],
            'node "a": port 65535 of "rtp" is not a port number',
        ),
    ],
)
def test_two_listeners_on_one_port_or_the_workers_port_is_invalid_spec(
    nodes: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(PipelineFailure) as failed:
        listeners(spec(*nodes))
    assert failed.value.reason is FailureReason.InvalidSpec
    assert failed.value.message == message


def test_the_same_number_over_tcp_and_udp_is_allowed() -> None:
    found = listeners(
        spec(
            node("web", "source", "json_http", port=5004),
            node("av", "source", "audio_rtp_av", port=5004),
        )
    )
    assert [(ln.port, ln.protocol) for ln in found] == [(5004, "TCP"), (5004, "UDP"), (5005, "UDP")]


def test_service_port_names_fit_the_rules() -> None:
    plain = Listener("mic", "rtp", 5004, "UDP")
    assert plain.service_port_name == "mic-rtp"
    for odd in (
        Listener("Audio_In", "rtp", 5004, "UDP"),
        Listener("a-very-long-node-name", "rtcp", 5005, "UDP"),
        Listener("9lives", "x", 1, "TCP"),
        Listener("__", "rtp", 1, "UDP"),
    ):
        # An IANA service name, as the API server checks a Service port's name.
        name = odd.service_port_name
        assert IANA_SVC_NAME.fullmatch(name), name
        assert len(name) <= 15, name
        assert any(c.isalpha() for c in name), name
        assert "--" not in name, name


def test_local_engines_report_what_the_configuration_binds() -> None:
    found = listeners(
        spec(
            node("web", "source", "json_http", host="0.0.0.0", port=9000),
            node("mic", "source", "audio_rtp"),  # port left to Juturna: not known here
        )
    )
    assert [(a.host, a.port, a.protocol) for a in local_addresses(found)] == [
        ("0.0.0.0", 9000, "TCP")
    ]


KEY = PipelineKey("team-a", "live-audio", "40ffacf7-0000-4000-8000-000000000000")


def test_the_service_is_named_after_the_pipeline_within_a_services_rules() -> None:
    assert service_name(KEY) == "live-audio"
    for name in ("9-lives", "a.b", "x" * 70, "a" * 63 + ".b"):
        made = service_name(PipelineKey("team-a", name, KEY.uid))
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", made), made  # DNS-1035
        assert made.endswith("-40ffacf7"), made
    assert service_name(PipelineKey("team-a", "a.b", KEY.uid)) != service_name(
        PipelineKey("team-a", "a-b", KEY.uid)
    )


def test_the_service_selects_one_pod_by_its_instance_and_is_owned_by_the_pipeline() -> None:
    found = tuple(listeners(spec(node("mic", "source", "audio_rtp_av", port=5004))))
    body = service_body(KEY, found, "ab12cd34")
    assert body["metadata"]["ownerReferences"][0]["uid"] == KEY.uid
    assert body["spec"]["selector"] == {
        "juturna.io/pipeline-uid": KEY.uid,
        "juturna.io/instance": "ab12cd34",
    }
    assert body["spec"]["ports"] == [
        {"name": "mic-rtp", "port": 5004, "targetPort": 5004, "protocol": "UDP"},
        {"name": "mic-rtcp", "port": 5005, "targetPort": 5005, "protocol": "UDP"},
    ]


@pytest.mark.parametrize(
    ("example", "listening"),
    [
        ("live-audio.yaml", [("mic", "rtp", "UDP"), ("mic", "rtcp", "UDP")]),
        ("json-events.yaml", [("web", "tcp", "TCP")]),
    ],
)
def test_the_live_examples_validate_and_listen(example: str, listening: list[tuple]) -> None:
    from pathlib import Path

    import yaml

    from juturna_operator.graph import validate

    repo = Path(__file__).resolve().parents[2]
    manifest = yaml.safe_load((repo / "examples" / example).read_text())
    validated = validate(PipelineSpec.model_validate(manifest["spec"]), [repo / "examples/plugins"])
    assert [(ln.node, ln.name, ln.protocol) for ln in validated.listeners] == listening
    assert validated.warnings == []
