"""Fuzzing: random Pipeline manifests, valid and invalid, applied to the real API server.

Every manifest ends one of three ways: refused at admission with a message (a 4xx), its
desired state reached (Ready, or Stopped when asked), or Failed with a documented reason
and a message. No traceback in the operator's log; no instance, folder or finalizer left.

``FUZZ_CASES`` sets the number of manifests (default 200, the short form in ``make test``).
Hypothesis runs derandomized (the same cases every run) and keeps no example database.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kubernetes import client
from processes import rss_kib

from juturna_operator.reasons import FailureReason
from support import GROUP, PLURAL, UNSAFE_NAMES, VERSION, Operator, Pipelines, only_on

CASES = int(os.environ.get("FUZZ_CASES", "200"))

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.reliability,
    pytest.mark.usefixtures("crd"),
    pytest.mark.timeout(max(300, CASES)),  # about 0.1 s a manifest here; 1 s is the bound
]
BATCH = 10  # manifests applied at once, per Hypothesis example
SETTLE_S = 60.0
DOCUMENTED = set(FailureReason.__members__)
RSS_SLACK_MIB = 64  # allocator fragmentation; a leak of 200 pipelines is far more

# -- strategies -------------------------------------------------------------------------------

NASTY = [*UNSAFE_NAMES, "-dash"]
SAFE_NAME = st.from_regex(r"[a-z][a-z0-9_-]{0,7}", fullmatch=True)
NODE_NAME = st.one_of(SAFE_NAME, SAFE_NAME, st.sampled_from(NASTY), st.text(max_size=12))

LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),  # past int64 too
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"d": value}
    return value


BIG = st.one_of(
    st.sampled_from([10_000, 300_000, 1_400_000, 3_200_000]).map(lambda n: "x" * n),
    st.integers(50, 400).map(_nested),
)
# The tones plugins' own keys, with sane, wrong-typed and out-of-range values. The ticker's
# rate stays small or non-numeric: a huge rate is a busy source, not an operator question.
KNOWN = {
    "ticker": {"rate": st.one_of(st.floats(0, 5), st.sampled_from([0, -1, "fast", None, []]))},
    "scale": {"factor": st.one_of(st.integers(-9, 9), JSON), "label": st.one_of(st.text(), JSON)},
    "jsonl": {"file": st.one_of(st.sampled_from(["out.jsonl", "../x", "/etc/passwd", ""]), JSON)},
}
MARK = {"source": "ticker", "proc": "scale", "sink": "jsonl"}


@st.composite
def configuration(draw: st.DrawFn, mark: str) -> Any:
    known = KNOWN.get(mark, {})
    config = {key: draw(value) for key, value in known.items() if draw(st.booleans())}
    if draw(st.integers(0, 9)) == 0:
        config[draw(st.text(max_size=8))] = draw(st.one_of(JSON, BIG))
    if draw(st.integers(0, 19)) == 0:
        return draw(JSON)  # not an object at all
    return config


@st.composite
def node(draw: st.DrawFn) -> Any:
    kind = draw(st.one_of(st.sampled_from(list(MARK)), st.text(max_size=8)))
    mark = draw(
        st.one_of(
            st.just(MARK.get(kind, "ticker")),
            st.sampled_from(["ticker", "scale", "jsonl", "nope", "boom"]),
            st.text(max_size=10),
        )
    )
    body: dict[str, Any] = {
        "name": draw(NODE_NAME),
        "type": kind,
        "mark": mark,
        "configuration": draw(configuration(mark)),
    }
    if draw(st.integers(0, 14)) == 0:  # a wrong type, or a missing or unknown field
        field = draw(st.sampled_from(["name", "type", "mark", "configuration", "extra"]))
        body[field] = draw(JSON)
    if draw(st.integers(0, 19)) == 0:
        del body[draw(st.sampled_from(["name", "type", "mark"]))]
    if draw(st.integers(0, 24)) == 0:
        return draw(JSON)  # not a node at all
    return body


@st.composite
def spec(draw: st.DrawFn) -> dict[str, Any]:
    nodes = draw(st.lists(node(), max_size=6))
    names = [n["name"] for n in nodes if isinstance(n, dict) and isinstance(n.get("name"), str)]
    endpoint = st.one_of(st.sampled_from(names), NODE_NAME) if names else NODE_NAME
    links = draw(st.lists(st.fixed_dictionaries({"from": endpoint, "to": endpoint}), max_size=8))
    if names and draw(st.booleans()):
        links = [{"from": a, "to": b} for a, b in itertools.pairwise(names)]  # a chain
        if draw(st.integers(0, 4)) == 0 and len(names) > 1:
            links.append({"from": names[-1], "to": names[0]})  # a cycle
    body: dict[str, Any] = {
        "state": draw(
            st.one_of(
                st.sampled_from(["Running", "Standby", "Stopped", "Ready"]), st.text(max_size=8)
            )
        ),
        "plugins": draw(
            st.lists(
                st.one_of(
                    st.sampled_from(["tones", "tones", "faulty", "missing", "escape", "../x"]),
                    st.sampled_from(NASTY),
                ),
                max_size=3,
            )
        ),
        "nodes": nodes,
        "links": links,
        "restartPolicy": {"maxRestarts": 0},
    }
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.sampled_from(["nodes", "links", "plugins", "state", "restartPolicy"]))] = draw(
            JSON
        )
    if draw(st.integers(0, 19)) == 0:
        body[draw(st.text(max_size=10))] = draw(JSON)  # an unknown field
    return body


@st.composite
def sane_spec(draw: st.DrawFn) -> dict[str, Any]:
    """A tones chain with safe names: it passes admission, then the values decide."""
    names = draw(st.lists(SAFE_NAME, min_size=3, max_size=3, unique=True))
    nodes = [
        {"name": name, "type": kind, "mark": mark, "configuration": draw(configuration(mark))}
        for name, (kind, mark) in zip(names, MARK.items(), strict=True)
    ]
    return {
        "state": draw(st.sampled_from(["Running", "Standby", "Stopped", "Ready"])),
        "plugins": draw(st.sampled_from([["tones"], ["tones"], ["tones", "missing"], ["faulty"]])),
        "nodes": nodes,
        "links": [{"from": a, "to": b} for a, b in itertools.pairwise(names)],
        "restartPolicy": {"maxRestarts": 0},
    }


SPEC = st.one_of(spec(), sane_spec(), sane_spec())
OBJECT_NAME = st.one_of(
    *[st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True)] * 4,
    st.sampled_from(["", "UPPER", "a_b", "-x", "x" * 300, "ü", "a..b"]),
)

# -- outcomes ---------------------------------------------------------------------------------


def outcome_of(body: dict[str, Any]) -> str | None:
    """How a created Pipeline ended, or None while it has not settled."""
    status = body.get("status") or {}
    if status.get("observedGeneration") != body["metadata"]["generation"]:
        return None
    failure = status.get("failure") or {}
    if status.get("phase") == "Failed":
        assert failure.get("reason") in DOCUMENTED, f"undocumented reason: {status}"
        assert failure.get("message"), f"a failure without a message: {status}"
        return "Failed"
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    if ready:
        return "Ready"
    if status.get("phase") == "Stopped" and body["spec"].get("state") == "Stopped":
        return "Stopped"
    return None


def test_random_manifests_are_refused_reached_or_failed_with_a_reason(
    operator: Operator,
    objects: client.CustomObjectsApi,
    pipelines: Pipelines,
    namespace: str,
    fault_log: Any,
) -> None:
    only_on(operator, "inprocess", "one engine is enough to fuzz the API and the lifecycle")
    started = time.monotonic()
    assert operator.proc is not None
    log_from = len(operator.log_text())
    rss_before = rss_kib(operator.proc.pid) / 1024
    assert rss_before > 0
    outcomes: Counter[str] = Counter()
    serial = iter(range(10**9))
    pool = concurrent.futures.ThreadPoolExecutor(BATCH)

    def apply(name: str, body_spec: dict[str, Any]) -> tuple[str, bool]:
        """Create one; True if the API server took it, else check how it refused."""
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Pipeline"}
        body |= {"metadata": {"name": name}, "spec": body_spec}
        refusal: client.ApiException | None = None
        try:
            objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        except client.ApiException as err:
            refusal = err
        if refusal is None:
            return name, True
        status, text = refusal.status, str(refusal.body)
        assert 400 <= status < 500, f"{status} for {name!r}: {text[:2000]}"
        assert json.loads(text).get("message"), f"a refusal without a message: {text[:2000]}"
        return name, False

    @settings(
        max_examples=max(1, CASES // BATCH),
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],  # no shrinking: a failing batch is reported as drawn
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(st.tuples(OBJECT_NAME, SPEC), min_size=BATCH, max_size=BATCH))
    def batch(cases: list[tuple[str, dict[str, Any]]]) -> None:
        # Valid-looking names get a serial number, so that no two cases collide.
        named = [
            (f"{n}-{next(serial)}" if n.isalnum() and n.islower() and len(n) <= 10 else n, s)
            for n, s in cases
        ]
        created = []
        for name, taken in pool.map(lambda case: apply(*case), named):
            if taken:
                created.append(name)
            else:
                outcomes["refused"] += 1
        deadline = time.monotonic() + SETTLE_S
        pending = set(created)
        while pending:
            for name in sorted(pending):
                result = outcome_of(pipelines.get(name))
                if result is not None:
                    outcomes[result] += 1
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                stuck = {n: pipelines.get(n).get("status") for n in pending}
                pytest.fail(f"not settled in {SETTLE_S} s: {json.dumps(stuck)[:4000]}")
            time.sleep(0.1)
        for name in created:
            pipelines.delete(name)
        for name in created:
            pipelines.wait_gone(name, timeout=30)

    try:
        batch()
    finally:
        pool.shutdown()
    print(f"fuzz outcomes over {sum(outcomes.values())} manifests: {dict(outcomes)}")
    assert sum(outcomes.values()) >= CASES
    # The fuzzer reaches every ending; otherwise it tests less than it claims.
    assert {"refused", "Ready", "Failed"} <= set(outcomes), outcomes

    log = operator.log_text()[log_from:]
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
    time.sleep(2)
    assert not list(operator.workdir.glob(f"{namespace}__*")), "pipeline folders left behind"
    rss_after = rss_kib(operator.proc.pid) / 1024
    print(f"operator RSS before {rss_before:.0f} MiB, after {rss_after:.0f} MiB")
    assert rss_after < rss_before + RSS_SLACK_MIB, (rss_before, rss_after)
    ends = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
    fault_log.record(
        f"fuzzed manifests ({sum(outcomes.values())})",
        operator.engine,
        f"{ends}; no traceback; RSS {rss_before:.0f} -> {rss_after:.0f} MiB",
        time.monotonic() - started,
    )
