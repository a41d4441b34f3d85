"""Settings: sane defaults, and a clear error naming the setting for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from juturna_operator.cli import main
from juturna_operator.settings import Settings, SettingsError


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
            "plugin root '/no/such/dir' in JUTURNA_OPERATOR_PLUGIN_PATH is not a directory",
        ),
        (
            "STOP_TIMEOUT",
            "soon",
            "JUTURNA_OPERATOR_STOP_TIMEOUT must be a number of seconds, got 'soon'",
        ),
        ("STOP_TIMEOUT", "-1", "JUTURNA_OPERATOR_STOP_TIMEOUT must be positive, got '-1'"),
        ("HEALTH_INTERVAL", "30", "health interval must be at most 5 s, got 30"),
        ("GIL_SWITCH_INTERVAL", "1", "GIL switch interval must be at most 0.1 s, got 1"),
        (
            "GIL_SWITCH_INTERVAL",
            "0",
            "JUTURNA_OPERATOR_GIL_SWITCH_INTERVAL must be positive, got '0'",
        ),
        ("LOG_FORMAT", "xml", "log format must be 'text' or 'json', got 'xml'"),
        (
            "METRICS_PORT",
            "http",
            "JUTURNA_OPERATOR_METRICS_PORT must be a port number (0 turns it off), got 'http'",
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
        "juturna-operator: configuration error: JUTURNA_OPERATOR_STOP_TIMEOUT must be a number "
        "of seconds, got 'soon'\n"
    )


def test_a_watched_namespace_must_be_an_exact_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-n", "team-a", "-n", "team-*"]) == 2
    assert capsys.readouterr().err == (
        "juturna-operator: configuration error: namespace 'team-*' is not a namespace name "
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
        ({"RUNTIMES": "{nope"}, "JUTURNA_OPERATOR_RUNTIMES is not valid JSON: "),
        ({"RUNTIMES": "[1]"}, "JUTURNA_OPERATOR_RUNTIMES must be a JSON object of runtimes"),
        (
            {"RUNTIMES": '{"gpu": {"url": "ftp://x"}}'},
            "runtime 'gpu' needs an http(s) url, got 'ftp://x'",
        ),
        (
            {"ENGINE": "service"},
            "engine 'service' needs JUTURNA_OPERATOR_DEFAULT_RUNTIME to "
            "name one of the configured runtimes (none configured), got None",
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
