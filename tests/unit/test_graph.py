"""Graph validation: cycles, plugin roots, marks and unknown configuration keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from juturna_operator.api import PipelineSpec
from juturna_operator.domain import PipelineKey
from juturna_operator.graph import find_cycle, validate
from juturna_operator.reasons import FailureReason, PipelineFailure
from juturna_operator.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plugins"


def spec(**overrides: Any) -> PipelineSpec:
    body: dict[str, Any] = {
        "plugins": ["tones"],
        "nodes": [
            {"name": "src", "type": "source", "mark": "ticker", "configuration": {"rate": 5}},
            {"name": "amp", "type": "proc", "mark": "scale", "configuration": {"factor": 2}},
            {"name": "out", "type": "sink", "mark": "jsonl"},
        ],
        "links": [{"from": "src", "to": "amp"}, {"from": "amp", "to": "out"}],
    }
    body.update(overrides)
    return PipelineSpec.model_validate(body)


def failure_of(s: PipelineSpec, roots: list[Path] | None = None) -> PipelineFailure:
    with pytest.raises(PipelineFailure) as err:
        validate(s, [EXAMPLES] if roots is None else roots)
    return err.value


def test_the_example_pipeline_is_valid() -> None:
    result = validate(spec(), [EXAMPLES])
    assert set(result.impls) == {"src", "amp", "out"}
    assert result.warnings == []


def test_a_builtin_mark_needs_no_plugin() -> None:
    s = spec(plugins=[], nodes=[{"name": "in", "type": "source", "mark": "json_http"}], links=[])
    assert "in" in validate(s, []).impls


@pytest.mark.parametrize(
    ("nodes", "edges", "cycle"),
    [
        (["a", "b"], [("a", "b")], None),
        (["a", "b"], [("a", "b"), ("b", "a")], ["a", "b", "a"]),
        (["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "b")], ["b", "c", "b"]),
        (["a", "b", "c", "d"], [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")], None),
    ],
)
def test_find_cycle(
    nodes: list[str], edges: list[tuple[str, str]], cycle: list[str] | None
) -> None:
    assert find_cycle(nodes, edges) == cycle


def test_a_cycle_is_invalid_graph() -> None:
    links = [
        {"from": "src", "to": "amp"},
        {"from": "amp", "to": "out"},
        {"from": "out", "to": "amp"},
    ]
    f = failure_of(spec(links=links))
    assert f.reason is FailureReason.InvalidGraph
    assert f.reason.code == 422
    assert f.message == (
        "links form a cycle: amp -> out -> amp; Juturna would never run these nodes"
    )


def test_an_unknown_mark_names_node_mark_plugins_and_known_marks() -> None:
    nodes = [
        {"name": "src", "type": "source", "mark": "tickr"},
        {"name": "out", "type": "sink", "mark": "jsonl"},
    ]
    f = failure_of(spec(nodes=nodes, links=[{"from": "src", "to": "out"}]))
    assert f.reason is FailureReason.PluginNotFound
    assert f.message.startswith(
        'node "src": no plugin "tickr" of type source in plugins ["tones"] (known: '
    )
    assert "ticker" in f.message
    assert "json_http" in f.message  # built-ins are listed too


def test_a_mark_of_the_wrong_type_is_not_found() -> None:
    nodes = [{"name": "src", "type": "sink", "mark": "ticker"}]
    f = failure_of(spec(nodes=nodes, links=[]))
    assert f.reason is FailureReason.PluginNotFound
    assert 'no plugin "ticker" of type sink' in f.message


@pytest.mark.parametrize("entry", ["/etc", "../tones", "tones/../../x"])
def test_plugin_paths_that_escape_are_not_allowed(entry: str) -> None:
    f = failure_of(spec(plugins=[entry]))
    assert f.reason is FailureReason.PluginPathNotAllowed
    assert f.reason.code == 403
    assert f'plugin folder "{entry}" must be relative to a plugin root' in f.message


@pytest.mark.parametrize("entry", ["a\\b", "..\\tones"])
def test_a_backslash_is_no_way_out_either(entry: str) -> None:
    """A backslash is no separator here: the folder is one odd name, which Juturna cannot
    import."""
    f = failure_of(spec(plugins=[entry]))
    assert f.reason is FailureReason.PluginPathNotAllowed
    assert f'plugin folder "{entry}" cannot be imported by Juturna' in f.message


def test_a_symlink_out_of_the_root_is_not_allowed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "tones").symlink_to(EXAMPLES / "tones")
    f = failure_of(spec(), [root])
    assert f.reason is FailureReason.PluginPathNotAllowed
    assert "outside the plugin root" in f.message


def test_a_plugin_not_under_any_root(tmp_path: Path) -> None:
    f = failure_of(spec(plugins=["nothere"]), [tmp_path])
    assert f.reason is FailureReason.PluginNotFound
    assert f.message == f'plugin folder "nothere" not found under any plugin root ({tmp_path})'


def test_no_roots_configured() -> None:
    f = failure_of(spec(), [])
    assert f.reason is FailureReason.PluginPathNotAllowed
    assert "no plugin roots configured (JUTURNA_OPERATOR_PLUGIN_PATH)" in f.message


def test_a_plugin_folder_that_is_not_importable(tmp_path: Path) -> None:
    (tmp_path / "my-plugins").mkdir()
    f = failure_of(spec(plugins=["my-plugins"]), [tmp_path])
    assert f.reason is FailureReason.PluginPathNotAllowed
    assert "each part of the path must be a Python identifier" in f.message


def test_a_plugin_without_arguments_table(tmp_path: Path) -> None:
    node = tmp_path / "p" / "nodes" / "sink" / "_bare"
    node.mkdir(parents=True)
    (node / "bare.py").write_text("")
    (node / "config.toml").write_text("[meta]\n")
    s = spec(plugins=["p"], nodes=[{"name": "x", "type": "sink", "mark": "bare"}], links=[])
    f = failure_of(s, [tmp_path])
    assert f.reason is FailureReason.PluginNotFound
    assert 'node "x": plugin "bare" has no config.toml with an [arguments] table' in f.message


def test_unknown_configuration_keys_are_warnings() -> None:
    nodes = [
        {"name": "src", "type": "source", "mark": "ticker", "configuration": {"rat": 5}},
        {"name": "out", "type": "sink", "mark": "jsonl"},
    ]
    result = validate(spec(nodes=nodes, links=[{"from": "src", "to": "out"}]), [EXAMPLES])
    assert result.warnings == ['node "src": unknown configuration key "rat" (known: rate, start)']


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"nodes": [{"name": "a", "type": "source", "mark": "ticker"}] * 2, "links": []},
            'spec: node names must be unique: "a" appears more than once',
        ),
        ({"links": [{"from": "src", "to": "sinkk"}]}, "link 0: 'to' names no node (got \"sinkk\")"),
        (
            {"links": [{"from": "src", "to": "src"}]},
            'spec.links[0]: link from "src" to itself is not allowed',
        ),
        (
            {"nodes": [{"name": "..", "type": "source", "mark": "ticker"}], "links": []},
            'node name ".." is not a safe folder name',
        ),
    ],
)
def test_structural_rules_are_checked_again(overrides: dict[str, Any], message: str) -> None:
    f = failure_of(spec(**overrides))
    assert f.reason is FailureReason.InvalidSpec
    assert message in f.message


def test_an_unknown_runtime() -> None:
    f = failure_of(spec(runtime="gpu"))
    assert f.reason is FailureReason.UnknownRuntime
    assert f.message == (
        'spec.runtime "gpu" names no configured runtime (configured: none); leave it empty '
        "for the operator's default engine"
    )
    assert (
        "x"
        in validate(
            spec(
                nodes=[{"name": "x", "type": "source", "mark": "ticker"}], links=[], runtime="gpu"
            ),
            [EXAMPLES],
            ["gpu"],
        ).impls
    )


def test_a_configuration_nested_too_deeply_is_invalid_spec() -> None:
    # Found by the fuzzer: the API server stored it, and pydantic failed to hash it for the
    # revision on every pass, so the Pipeline never got a status.
    from juturna_operator.reconciler import Resource, _spec_or_failure

    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(40):
        deep = {"d": deep}
    body = spec().model_dump(mode="json", by_alias=True)
    body["nodes"][1]["configuration"] = deep
    key = PipelineKey("ns", "deep", "uid")
    failure = _spec_or_failure(Resource(key, 1, body, {}))
    assert isinstance(failure, PipelineFailure)
    assert failure.reason is FailureReason.InvalidSpec
    assert failure.message == "spec.nodes.1.configuration: Value error, nests deeper than 32 levels"
    body["nodes"][1]["configuration"] = deep["d"]["d"]["d"]["d"]["d"]["d"]["d"]["d"]  # 33 levels
    assert isinstance(_spec_or_failure(Resource(key, 1, body, {})), PipelineFailure)
    body["nodes"][1]["configuration"] = deep["d"]["d"]["d"]["d"]["d"]["d"]["d"]["d"]["d"]
    assert isinstance(_spec_or_failure(Resource(key, 1, body, {})), PipelineSpec)


@pytest.mark.parametrize(
    ("namespace", "name"),
    [
        ("ns", ".."),
        ("ns", "../../etc"),
        ("ns", "/abs"),
        ("..", "p"),
        ("ns", ""),
        ("ns", "a/b"),
        ("ns", "\uff41\uff4d\uff50"),  # fullwidth lookalike
        ("ns", "amp\u2215x"),  # division slash
        ("ns", "UPPER"),
        ("ns", "x" * 254),
    ],
)
def test_the_engine_layer_refuses_names_that_are_not_object_names(
    namespace: str, name: str
) -> None:
    with pytest.raises(ValueError, match="is not a Kubernetes object name"):
        PipelineKey(namespace, name, "0123456789")


def test_an_object_name_is_a_safe_folder_name() -> None:
    key = PipelineKey("team-a", "my.pipe", "0123456789abcdef")
    assert key.juturna_name == "team-a__my.pipe__01234567"
    assert "/" not in key.juturna_name


NOTIFIER = spec(
    nodes=[
        {"name": "src", "type": "source", "mark": "ticker"},
        {"name": "out", "type": "sink", "mark": "notifier_http"},
    ],
    links=[{"from": "src", "to": "out"}],
)


@pytest.mark.parametrize(
    ("settings", "runtime", "allowed"),
    [
        (Settings(engine="process"), None, False),  # beside the operator: none by default
        (Settings(engine="inprocess"), None, False),
        (Settings(engine="pod", runtime_image="x"), None, True),  # the tenant's own pod
        (Settings(engine="pod", runtime_image="x"), "gpu", False),  # a shared runtime
        (Settings(engine="process", allowed_builtins=("sink/notifier_http",)), None, True),
        (Settings(engine="process", allowed_builtins=("sink/notifier_udp",)), None, False),
        (Settings(engine="process", allowed_builtins=("*",)), None, True),
        (Settings(engine="pod", runtime_image="x", allowed_builtins=()), None, False),
    ],
)
def test_builtins_run_only_where_the_administrator_allows(
    settings: Settings, runtime: str | None, allowed: bool
) -> None:
    policy = settings.code_policy(runtime)
    if allowed:
        assert "out" in validate(NOTIFIER, [EXAMPLES], policy=policy).impls
        return
    with pytest.raises(PipelineFailure) as err:
        validate(NOTIFIER, [EXAMPLES], policy=policy)
    assert err.value.reason is FailureReason.BuiltinNotAllowed
    assert "JUTURNA_OPERATOR_ALLOWED_BUILTINS" in err.value.message


def test_a_plugin_that_shadows_a_builtin_is_the_administrators_code(tmp_path: Path) -> None:
    """Juturna takes the last match: a plugin's own sink/_notifier_http is not the built-in."""
    folder = tmp_path / "mine" / "nodes" / "sink" / "_notifier_http"
    folder.mkdir(parents=True)
    (folder / "notifier_http.py").write_text("")
    (folder / "config.toml").write_text("[arguments]\n")
    shadowed = NOTIFIER.model_copy(update={"plugins": ["tones", "mine"]})
    policy = Settings(engine="process").code_policy(None)
    assert "out" in validate(shadowed, [EXAMPLES, tmp_path], policy=policy).impls


def test_env_references_are_refused_in_process_only_unless_allowed() -> None:
    s = spec(
        nodes=[
            {"name": "src", "type": "source", "mark": "ticker"},
            {
                "name": "amp",
                "type": "proc",
                "mark": "scale",
                "configuration": {"label": "$JT_ENV_HOME"},
            },
            {"name": "out", "type": "sink", "mark": "jsonl"},
        ]
    )
    with pytest.raises(PipelineFailure) as err:
        validate(s, [EXAMPLES], policy=Settings(engine="inprocess").code_policy(None))
    assert err.value.reason is FailureReason.EnvironmentNotAllowed
    allowed = Settings(engine="inprocess", allow_env_references=True).code_policy(None)
    for policy in (allowed, Settings(engine="process").code_policy(None)):
        assert "amp" in validate(s, [EXAMPLES], policy=policy).impls


def warped(warp_configuration: dict[str, Any]) -> PipelineSpec:
    """The example, its scaler warped: Juturna runs it as the built-in proc/warp."""
    nodes = [dict(n) for n in spec().model_dump(by_alias=True, exclude_none=True)["nodes"]]
    nodes[1] |= {"warped": True, "warp_configuration": warp_configuration}
    return spec(nodes=nodes)


def test_a_warped_node_is_the_builtin_warp_for_the_allow_list() -> None:
    """Round 3, item 5: warped: true bypassed the built-ins allow-list (the node's own mark,
    a plugin, was checked; Juturna builds proc/warp, gRPC to any host, in its place)."""
    policy = Settings(engine="process").code_policy(None)  # no built-in allowed
    with pytest.raises(PipelineFailure) as err:
        validate(warped({"grpc_host": "10.1.2.3"}), [EXAMPLES], policy=policy)
    assert err.value.reason is FailureReason.BuiltinNotAllowed
    assert err.value.message.startswith(
        'node "amp": Juturna\'s built-in proc/warp (warped: true runs the node as proc/warp) '
        "is not allowed on engine 'process'"
    )
    allowed = Settings(engine="process", allowed_builtins=("proc/warp",)).code_policy(None)
    result = validate(warped({"grpc_host": "10.1.2.3"}), [EXAMPLES], policy=allowed)
    assert result.impls["amp"].folder.name == "_warp"
    assert result.warnings == []  # grpc_host and remote_config are warp's own arguments


def test_a_warped_nodes_warp_configuration_may_not_read_the_environment() -> None:
    """Round 3, item 5: a $JT_ENV_ value in warp_configuration reached the environment of the
    process that runs the pipeline, past the check of the node's own configuration."""
    policy = Settings(engine="inprocess", allowed_builtins=("*",)).code_policy(None)
    with pytest.raises(PipelineFailure) as err:
        validate(warped({"grpc_host": "$JT_ENV_SECRET"}), [EXAMPLES], policy=policy)
    assert err.value.reason is FailureReason.EnvironmentNotAllowed
    assert err.value.message.startswith(
        'node "amp": configuration key "grpc_host" reads an environment variable ("$JT_ENV_SECRET")'
    )


def test_plugins_checked_where_they_are_are_not_checked_here(tmp_path: Path) -> None:
    """Item 15: on engine pod the operator's plugin roots say nothing about the pod's image:
    the checks that read plugin files are left to the pod (``check_plugins``, through the
    worker), with the same reasons and messages; the rest is checked here still."""
    from juturna_operator.graph import check_plugins

    elsewhere = spec(plugins=["nothere"])
    assert validate(elsewhere, [tmp_path], plugins_here=False).impls == {}
    here = failure_of(elsewhere, [tmp_path])
    with pytest.raises(PipelineFailure) as there:
        check_plugins(elsewhere, [tmp_path])
    assert (there.value.reason, there.value.message) == (here.reason, here.message)
    cyclic = spec(links=[{"from": "src", "to": "amp"}, {"from": "amp", "to": "src"}])
    with pytest.raises(PipelineFailure) as err:
        validate(cyclic, [tmp_path], plugins_here=False)
    assert err.value.reason is FailureReason.InvalidGraph
