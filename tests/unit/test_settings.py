"""Settings: sane defaults, and a clear error naming the setting for every bad value."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from juturna_operator.cli import main
from juturna_operator.settings import (
    SETTING,
    SETTINGS,
    ServiceAccount,
    Settings,
    SettingsError,
    read_service_account,
)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "PLUGIN_PATH",
        "WORKDIR",
        "ENGINE",
        "STOP_TIMEOUT",
        "HEALTH_INTERVAL",
        "GIL_SWITCH_INTERVAL",
    ):
        monkeypatch.delenv(f"JUTURNA_OPERATOR_{name}", raising=False)
    s = Settings.from_env()
    assert (s.engine, s.stop_timeout_s, s.health_interval_s, s.log_format) == (
        "process",
        10.0,
        3.0,
        "text",
    )
    assert s.plugin_roots == []
    assert s.gil_switch_interval_s == 0.02


def test_plugin_path_is_split_and_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("JUTURNA_OPERATOR_PLUGIN_PATH", f"{tmp_path}/a:{tmp_path}/b")
    assert Settings.from_env().plugin_roots == [tmp_path / "a", tmp_path / "b"]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "PLUGIN_PATH",
            "/no/such/dir",
            "JUTURNA_OPERATOR_PLUGIN_PATH: plugin root '/no/such/dir' is not a directory",
        ),
        (
            "STOP_TIMEOUT",
            "soon",
            "JUTURNA_OPERATOR_STOP_TIMEOUT: must be a number of seconds, got 'soon'",
        ),
        ("STOP_TIMEOUT", "-1", "JUTURNA_OPERATOR_STOP_TIMEOUT: must be positive, got '-1'"),
        ("HEALTH_INTERVAL", "30", "JUTURNA_OPERATOR_HEALTH_INTERVAL: must be at most 5 s, got 30"),
        (
            "GIL_SWITCH_INTERVAL",
            "1",
            "JUTURNA_OPERATOR_GIL_SWITCH_INTERVAL: must be at most 0.1 s, got 1",
        ),
        (
            "GIL_SWITCH_INTERVAL",
            "0",
            "JUTURNA_OPERATOR_GIL_SWITCH_INTERVAL: must be positive, got '0'",
        ),
        ("LOG_FORMAT", "xml", "JUTURNA_OPERATOR_LOG_FORMAT: must be one of text, json, got 'xml'"),
        (
            "ENGINE",
            "proces",
            "JUTURNA_OPERATOR_ENGINE: must be one of inprocess, process, service, pod, "
            "got 'proces'",
        ),
        (
            "MAX_CONCURRENCY",
            "0",
            "JUTURNA_OPERATOR_MAX_CONCURRENCY: must be a whole number of at least 1, got '0'",
        ),
        (
            "PIPELINES_PER_PROCESS",
            "many",
            "JUTURNA_OPERATOR_PIPELINES_PER_PROCESS: must be a whole number of at least 1, got "
            "'many'",
        ),
        (
            "ENGINE",
            "shard",
            "JUTURNA_OPERATOR_ENGINE: engine 'shard' is no more: use engine 'process' with "
            "--pipelines-per-process or JUTURNA_OPERATOR_PIPELINES_PER_PROCESS above 1 (the "
            "pipelines one worker process runs; chart value pipelinesPerProcess)",
        ),
        ("HEALTH_INTERVAL", "nan", "JUTURNA_OPERATOR_HEALTH_INTERVAL: must be positive, got 'nan'"),
        (
            "POD_WORK_SIZE_LIMIT",
            "lots",
            "JUTURNA_OPERATOR_POD_WORK_SIZE_LIMIT: must be a quantity such as 64Mi or 1Gi "
            "(empty: no limit), got 'lots'",
        ),
        (
            "POD_DEFAULT_RESOURCES",
            '{"requests": {"cpu": "fast"}}',
            "JUTURNA_OPERATOR_POD_DEFAULT_RESOURCES: requests.cpu must be a quantity such as "
            "100m or 128Mi, got 'fast'",
        ),
        (
            "POD_DEFAULT_RESOURCES",
            '{"request": {"cpu": "1"}}',
            "JUTURNA_OPERATOR_POD_DEFAULT_RESOURCES: must be a JSON object with requests and/or "
            """limits, got '{"request": {"cpu": "1"}}'""",
        ),
        (
            "WORKER_PEERS",
            "[]",
            "JUTURNA_OPERATOR_WORKER_PEERS: must be a JSON list of at least one NetworkPolicy "
            "peer (unset it for no NetworkPolicy: an empty list would let everyone in), got '[]'",
        ),
        (
            "WORKER_PEERS",
            '[{"cidr": "10.0.0.0/8"}]',
            "JUTURNA_OPERATOR_WORKER_PEERS: each peer is an object of podSelector, "
            "namespaceSelector, ipBlock, got {'cidr': '10.0.0.0/8'}",
        ),
        (
            "METRICS_PORT",
            "http",
            "JUTURNA_OPERATOR_METRICS_PORT: must be a port number (0 turns it off), got 'http'",
        ),
        (
            "ALLOWED_VOLUME_TYPES",
            "emptyDir,hostpath",
            "JUTURNA_OPERATOR_ALLOWED_VOLUME_TYPES: 'hostpath' is not a volume type of a Pod "
            "as Kubernetes spells it (e.g. hostPath, nfs)",
        ),
        (
            "ALLOWED_PRIORITY_CLASSES",
            "high,System_Critical",
            "JUTURNA_OPERATOR_ALLOWED_PRIORITY_CLASSES: 'System_Critical' is not a "
            "PriorityClass name (lowercase letters, digits, '-' and '.')",
        ),
        (
            "POD_USER",
            "juturna",
            "JUTURNA_OPERATOR_POD_USER: must be a numeric user, UID or UID:GID, and not 0 "
            "(pipeline pods never run as root); empty: the runtime image's own user; got "
            "'juturna'",
        ),
        (
            "POD_USER",
            "0:0",
            "JUTURNA_OPERATOR_POD_USER: must be a numeric user, UID or UID:GID, and not 0 "
            "(pipeline pods never run as root); empty: the runtime image's own user; got '0:0'",
        ),
        (
            "POD_IMAGE_PULL_SECRETS",
            "corp,Team_Registry",
            "JUTURNA_OPERATOR_POD_IMAGE_PULL_SECRETS: 'Team_Registry' is not a Secret name "
            "(lowercase letters, digits, '-' and '.')",
        ),
    ],
)
def test_bad_values_are_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"JUTURNA_OPERATOR_{name}", value)
    with pytest.raises(SettingsError) as err:
        Settings.from_env()
    assert str(err.value) == message


def test_the_cli_reports_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JUTURNA_OPERATOR_STOP_TIMEOUT", "soon")
    assert main(["run", "-A"]) == 2
    assert capsys.readouterr().err == (
        "juturna-operator: configuration error: JUTURNA_OPERATOR_STOP_TIMEOUT: must be a "
        "number of seconds, got 'soon'\n"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stop-timeout", "-1"], "--stop-timeout: must be positive, got '-1'"),
        (["--health-interval", "0"], "--health-interval: must be positive, got '0'"),
        (["--health-interval", "10"], "--health-interval: must be at most 5 s, got 10"),
        (
            ["--max-concurrency", "0"],
            "--max-concurrency: must be a whole number of at least 1, got '0'",
        ),
        (
            ["--metrics-port", "70000"],
            "--metrics-port: must be a port number (0 turns it off), got '70000'",
        ),
        (
            ["--plugin-path", "/no/such/plugins"],
            "--plugin-path: plugin root '/no/such/plugins' is not a directory",
        ),
    ],
)
def test_flags_get_the_same_checks_as_the_environment(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    """A bad flag stops the operator before kopf starts, with the message a bad environment
    variable gets, naming the flag."""
    assert main(["run", "-A", *flags]) == 2
    assert capsys.readouterr().err == f"juturna-operator: configuration error: {message}\n"


# A value each setting refuses, with the settings that make it wrong (given as variables).
BAD: dict[str, tuple[str, dict[str, str]]] = {
    "PLUGIN_PATH": ("/no/such/dir", {}),
    "ENGINE": ("docker", {}),
    "STOP_TIMEOUT": ("-1", {}),
    "HEALTH_INTERVAL": ("10", {}),
    "LOG_FORMAT": ("xml", {}),
    "MAX_CONCURRENCY": ("0", {}),
    "METRICS_PORT": ("http", {}),
    "PROGRESS_THRESHOLD": ("0", {}),
    "GIL_SWITCH_INTERVAL": ("1", {}),
    "SWEEP_INTERVAL": ("soon", {}),
    "RECONCILE_WORKERS": ("none", {}),
    "ALLOWED_BUILTINS": ("rm -rf", {}),
    "ALLOW_ENV_REFERENCES": ("yes", {}),
    "PIPELINES_PER_PROCESS": ("0", {}),
    "RUNTIMES": ("{nope", {}),
    "DEFAULT_RUNTIME": ("gpu", {"ENGINE": "service"}),
    "RUNTIME_IMAGE": ("", {"ENGINE": "pod"}),
    "RUNTIME_PULL_POLICY": ("Sometimes", {}),
    "ALLOW_IMAGE_OVERRIDE": ("maybe", {}),
    "ALLOWED_VOLUME_TYPES": ("hostpath", {}),
    "ALLOWED_PRIORITY_CLASSES": ("Bad_Name", {}),
    "POD_WORK_SIZE_LIMIT": ("lots", {}),
    "POD_TMP_SIZE_LIMIT": ("lots", {}),
    "POD_DEFAULT_RESOURCES": ("[]", {}),
    "POD_START_TIMEOUT": ("0", {}),
    "WORKER_PEERS": ("[]", {}),
    "POD_USER": ("0", {}),
    "POD_IMAGE_PULL_SECRETS": ("Bad_Name", {}),
}
ANY_VALUE = {"WORKDIR"}  # any folder: made at start


def test_every_setting_has_a_refused_value_here() -> None:
    assert set(BAD) | ANY_VALUE == set(SETTING)


@pytest.mark.parametrize("given", ["flag", "variable"])
@pytest.mark.parametrize("name", sorted(BAD))
def test_every_error_starts_with_the_flag_or_variable_given(
    monkeypatch: pytest.MonkeyPatch, name: str, given: str
) -> None:
    value, others = BAD[name]
    for other, raw in others.items():
        monkeypatch.setenv(f"JUTURNA_OPERATOR_{other}", raw)
    if given == "variable":
        monkeypatch.setenv(SETTING[name].env, value)
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: value} if given == "flag" else {})
    where = SETTING[name].flag if given == "flag" else SETTING[name].env
    assert str(err.value).startswith(f"{where}: "), str(err.value)


def test_a_setting_nobody_gave_is_named_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUTURNA_OPERATOR_RUNTIME_IMAGE", raising=False)
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"ENGINE": "pod"})
    assert str(err.value) == (
        "--runtime-image or JUTURNA_OPERATOR_RUNTIME_IMAGE: engine 'pod' needs the image each "
        "Pipeline's pod runs (the operator's own image holds the worker and the plugins)"
    )


def test_the_defaults_are_the_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SETTINGS`` (what --help shows) and the ``Settings`` fields agree on every default."""
    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    assert Settings.from_env() == Settings()


def test_a_boolean_flag_turns_its_variable_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from juturna_operator.cli import _parser, settings_from

    monkeypatch.setenv("JUTURNA_OPERATOR_ALLOW_IMAGE_OVERRIDE", "true")
    parse = _parser().parse_args
    assert settings_from(parse(["run"])).allow_image_override is True
    assert settings_from(parse(["run", "--no-allow-image-override"])).allow_image_override is False
    assert settings_from(parse(["run", "--allow-env-references"])).allow_env_references is True


def test_a_flag_wins_over_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from juturna_operator.cli import _parser, settings_from

    monkeypatch.setenv("JUTURNA_OPERATOR_STOP_TIMEOUT", "soon")  # a flag replaces it unread
    monkeypatch.setenv("JUTURNA_OPERATOR_MAX_CONCURRENCY", "2")
    args = _parser().parse_args(
        ["run", "-n", "a", "--stop-timeout", "2.5", "--engine", "inprocess"]
    )
    settings = settings_from(args)
    assert (settings.stop_timeout_s, settings.engine, settings.max_concurrency) == (
        2.5,
        "inprocess",
        2,
    )
    assert (settings.namespaces, settings.all_namespaces) == (["a"], False)


def test_a_watched_namespace_must_be_an_exact_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-n", "team-a", "-n", "team-*"]) == 2
    assert capsys.readouterr().err == (
        "juturna-operator: configuration error: --namespace: 'team-*' is not a namespace name "
        "(lowercase letters, digits and '-', at most 63); name each watched namespace exactly\n"
    )


def test_an_unknown_engine_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from juturna_operator.engines import make_engine

    with pytest.raises(
        ValueError,
        match="unknown engine 'docker': JUTURNA_OPERATOR_ENGINE must be one of "
        "inprocess, process, service, pod",
    ):
        make_engine(Settings(engine="docker"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RUNTIMES": "{nope"}, "JUTURNA_OPERATOR_RUNTIMES: not valid JSON: "),
        ({"RUNTIMES": "[1]"}, "JUTURNA_OPERATOR_RUNTIMES: must be a JSON object of runtimes"),
        (
            {"RUNTIMES": '{"gpu": {"url": "ftp://x"}}'},
            "JUTURNA_OPERATOR_RUNTIMES: runtime 'gpu' needs an http(s) url, got 'ftp://x'",
        ),
        (
            {"ENGINE": "service"},
            "--default-runtime or JUTURNA_OPERATOR_DEFAULT_RUNTIME: engine 'service' needs "
            "the name of one of the configured runtimes (none configured), got ''",
        ),
    ],
)
def test_bad_runtimes_are_explained(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(f"JUTURNA_OPERATOR_{name}", value)
    with pytest.raises(SettingsError) as err:
        Settings.from_env()
    assert str(err.value).startswith(message)


def test_runtimes_and_their_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    monkeypatch.setenv(
        "JUTURNA_OPERATOR_RUNTIMES",
        f'{{"gpu": {{"url": "http://gpu:8080", "tokenFile": "{token}"}}}}',
    )
    monkeypatch.setenv("JUTURNA_OPERATOR_ENGINE", "service")
    monkeypatch.setenv("JUTURNA_OPERATOR_DEFAULT_RUNTIME", "gpu")
    runtime = Settings.from_env().runtimes["gpu"]
    assert (runtime.url, runtime.token()) == ("http://gpu:8080", "s3cret")


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("", ()),
        ("*", ("*",)),
        (" sink/notifier_http, source/audio_rtp ", ("sink/notifier_http", "source/audio_rtp")),
    ],
)
def test_allowed_builtins(
    monkeypatch: pytest.MonkeyPatch, raw: str, parsed: tuple[str, ...]
) -> None:
    monkeypatch.setenv("JUTURNA_OPERATOR_ALLOWED_BUILTINS", raw)
    assert Settings.from_env().allowed_builtins == parsed


def test_allowed_builtins_unset_is_the_engines_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUTURNA_OPERATOR_ALLOWED_BUILTINS", raising=False)
    assert Settings.from_env().allowed_builtins is None


def test_a_bad_builtin_entry_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUTURNA_OPERATOR_ALLOWED_BUILTINS", "sink/notifier_http,rm -rf")
    with pytest.raises(SettingsError) as err:
        Settings.from_env()
    assert str(err.value) == (
        "JUTURNA_OPERATOR_ALLOWED_BUILTINS: 'rm -rf' is not a built-in as type/mark (e.g. "
        "sink/notifier_http), or * for all of them"
    )


def test_what_templates_may_add_is_listed_by_the_administrator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JUTURNA_OPERATOR_ALLOWED_VOLUME_TYPES", raising=False)
    monkeypatch.delenv("JUTURNA_OPERATOR_ALLOWED_PRIORITY_CLASSES", raising=False)
    s = Settings.from_env()
    assert (s.allowed_volume_types, s.allowed_priority_classes) == ((), ())
    monkeypatch.setenv("JUTURNA_OPERATOR_ALLOWED_VOLUME_TYPES", " hostPath, nfs ")
    monkeypatch.setenv("JUTURNA_OPERATOR_ALLOWED_PRIORITY_CLASSES", "media-high")
    s = Settings.from_env()
    assert (s.allowed_volume_types, s.allowed_priority_classes) == (
        ("hostPath", "nfs"),
        ("media-high",),
    )


def test_pipeline_pods_user_and_pull_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUTURNA_OPERATOR_POD_USER", raising=False)
    monkeypatch.delenv("JUTURNA_OPERATOR_POD_IMAGE_PULL_SECRETS", raising=False)
    s = Settings.from_env()
    assert (s.pod_user, s.pod_image_pull_secrets) == (None, ())  # the image's user; none
    for raw, user in (("10001", (10001, None)), ("1000680000:0", (1000680000, 0)), ("", None)):
        monkeypatch.setenv("JUTURNA_OPERATOR_POD_USER", raw)
        assert Settings.from_env().pod_user == user, raw
    monkeypatch.setenv("JUTURNA_OPERATOR_POD_IMAGE_PULL_SECRETS", "corp, mirror.io")
    assert Settings.from_env().pod_image_pull_secrets == ("corp", "mirror.io")


def jwt(claims: dict[str, object]) -> str:
    """A token shaped as the API server issues them: header.payload.signature, base64url
    without padding (the signature is not checked)."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    header = part(json.dumps({"alg": "RS256", "kid": "k"}).encode())
    return f"{header}.{part(json.dumps(claims).encode())}.{part(b'signature')}"


def test_the_operators_own_service_account_is_read_from_its_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    assert read_service_account(token) is None  # outside a pod: nothing to refuse
    token.write_text(jwt({"sub": "system:serviceaccount:juturna-system:jo", "aud": ["x"]}))
    assert read_service_account(token) == ServiceAccount("juturna-system", "jo")


@pytest.mark.parametrize(
    "content",
    ["", "not-a-jwt", "a.%%%.c", jwt({"sub": "admin"}), jwt({"aud": "x"}), "a.bnVsbA.c"],
    ids=["empty", "no-dots", "not-base64", "a-user", "no-subject", "json-null"],
)
def test_a_token_that_names_no_service_account_stops_the_operator(
    tmp_path: Path, content: str
) -> None:
    token = tmp_path / "token"
    token.write_text(content)
    with pytest.raises(SettingsError) as err:
        read_service_account(token)
    assert str(err.value) == (
        f"the ServiceAccount token {token} names no ServiceAccount (a JWT whose subject is "
        "system:serviceaccount:<namespace>:<name>); the operator cannot tell which account "
        "it runs as"
    )


def test_an_unreadable_token_stops_the_operator_saying_so(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        read_service_account(tmp_path)  # a folder where the token should be
    assert str(err.value) == (
        f"cannot read the ServiceAccount token {tmp_path}: [Errno 21] Is a directory: '{tmp_path}'"
    )
