"""The ``juturna-operator`` command as a user runs it: a process of its own, its exit code
and the exact lines it prints. No cluster: where the operator would reach one, the test
gives it a kubeconfig for a loopback port where nothing listens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from operator_process import OperatorProcess
from processes import free_port

from juturna_operator.crd import CRD_FILE_NAME, render
from juturna_operator.settings import SETTINGS
from support import REPO, wait_until

COMMAND = Path(sys.executable).with_name("juturna-operator")  # the installed entry point
TONES = REPO / "tests" / "data" / "juturna" / "tones.json"
NO_CLUSTER_HINT = "set KUBECONFIG to a kubeconfig file, or run the operator in a pod"


def run(*args: str, home: Path, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """The command with only PATH, a HOME of the test's and ``env``: no kubeconfig, no
    JUTURNA_OPERATOR_* variable of the caller's; a wide terminal, so help lines stay whole."""
    return subprocess.run(
        [str(COMMAND), *args],
        env={"PATH": os.environ["PATH"], "HOME": str(home), "COLUMNS": "500", **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,  # the old operator retried for ever here
        check=False,
    )


def test_version_is_the_packages(tmp_path: Path) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    proc = run("--version", home=tmp_path)
    assert (proc.returncode, proc.stdout) == (
        0,
        f"juturna-operator {pyproject['project']['version']}\n",
    )


def help_entries(text: str) -> dict[str, str]:
    """``--help`` text as {first flag: its whole entry on one line}."""
    entries: dict[str, str] = {}
    flag = ""
    for line in text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif flag and line.startswith("   "):
            entries[flag] += line
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def test_run_help_shows_every_setting_its_default_and_variable(tmp_path: Path) -> None:
    proc = run("run", "--help", home=tmp_path)
    assert proc.returncode == 0
    entries = help_entries(proc.stdout)
    for setting in SETTINGS:
        assert setting.flag in entries, f"{setting.flag} is not in run --help"
        entry = entries[setting.flag]
        assert entry.endswith(f"(default: {setting.shown_default}; env {setting.env})"), entry


@pytest.mark.parametrize(
    ("flag", "value", "choices"),
    [
        ("--engine", "proces", "'inprocess', 'process', 'service', 'pod'"),
        ("--log-format", "xml", "'text', 'json'"),
        ("--runtime-pull-policy", "Sometimes", "'Always', 'IfNotPresent', 'Never'"),
    ],
)
def test_an_enumerated_flag_offers_its_choices(
    tmp_path: Path, flag: str, value: str, choices: str
) -> None:
    proc = run("run", flag, value, home=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        f"juturna-operator run: error: argument {flag}: invalid choice: {value!r} "
        f"(choose from {choices})"
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--health-interval", "10"],
            {},
            "--health-interval: must be at most 5 s, got 10",
        ),
        (
            [],
            {"JUTURNA_OPERATOR_HEALTH_INTERVAL": "10"},
            "JUTURNA_OPERATOR_HEALTH_INTERVAL: must be at most 5 s, got 10",
        ),
        (
            ["--engine", "service"],
            {"JUTURNA_OPERATOR_DEFAULT_RUNTIME": "gpu"},
            "JUTURNA_OPERATOR_DEFAULT_RUNTIME: engine 'service' needs the name of one of the "
            "configured runtimes (none configured), got 'gpu'",
        ),
        (
            ["--pipelines-per-process", "0"],
            {"JUTURNA_OPERATOR_PIPELINES_PER_PROCESS": "4"},
            "--pipelines-per-process: must be a whole number of at least 1, got '0'",
        ),
    ],
    ids=["flag", "variable", "variable-with-flag", "flag-over-variable"],
)
def test_a_configuration_error_names_its_flag_or_variable(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    proc = run("run", *args, home=tmp_path, **env)
    assert (proc.returncode, proc.stderr) == (
        2,
        f"juturna-operator: configuration error: {message}\n",
    )


def test_without_a_cluster_configuration_it_exits_in_one_line(tmp_path: Path) -> None:
    proc = run("run", home=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        "juturna-operator: no cluster configuration: not in a pod (KUBERNETES_SERVICE_HOST is "
        f"not set), and no kubeconfig at ~/.kube/config; {NO_CLUSTER_HINT}\n",
    )


def test_a_kubeconfig_that_is_not_there_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "config"
    proc = run("run", home=tmp_path, KUBECONFIG=str(missing))
    assert (proc.returncode, proc.stderr) == (
        2,
        "juturna-operator: no cluster configuration: not in a pod (KUBERNETES_SERVICE_HOST is "
        f"not set), and no kubeconfig at {missing} (KUBECONFIG); {NO_CLUSTER_HINT}\n",
    )


def test_in_a_pod_without_its_token_it_says_so(tmp_path: Path) -> None:
    proc = run(
        "run", home=tmp_path, KUBERNETES_SERVICE_HOST="10.0.0.1", KUBERNETES_SERVICE_PORT="443"
    )
    assert (proc.returncode, proc.stderr) == (
        2,
        "juturna-operator: no cluster configuration: in a pod, but its ServiceAccount does not "
        "load (Service token file does not exist.), and no kubeconfig at ~/.kube/config; "
        f"{NO_CLUSTER_HINT}\n",
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            "apiVersion: v1\nkind: Config\nclusters: []\n",
            "Invalid kube-config file. Expected key current-context in {path}",
        ),
        (
            "a: [\n",
            "while parsing a flow node expected the node content, but found '<stream end>' in "
            '"{path}", line 2, column 1',
        ),
    ],
    ids=["no-current-context", "not-yaml"],
)
def test_a_kubeconfig_that_does_not_load_is_named(
    tmp_path: Path, content: str, problem: str
) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(content)
    proc = run("run", home=tmp_path, KUBECONFIG=str(kubeconfig))
    assert (proc.returncode, proc.stderr) == (
        2,
        f"juturna-operator: cannot use the kubeconfig {kubeconfig} (KUBECONFIG): "
        f"{problem.format(path=kubeconfig)}\n",
    )


def test_an_api_server_that_does_not_answer_is_retried(tmp_path: Path) -> None:
    """An unreachable API server is an outage, not a configuration error: the operator starts
    and retries, as it does when the API server goes away later."""
    kubeconfig = tmp_path / "config"
    server = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": str(kubeconfig)}
    env.update(
        JUTURNA_OPERATOR_ENGINE="inprocess",
        JUTURNA_OPERATOR_METRICS_PORT="0",
        JUTURNA_OPERATOR_WORKDIR=str(tmp_path / "work"),
    )
    operator = OperatorProcess(tmp_path / "operator.log", env, ["-A"])
    operator.start()  # returns once kopf has authenticated
    try:
        wait_until(lambda: "failed; will retry" in operator.log_text(), 30, "a retry logged")
        assert operator.alive(), operator.log_text()[-2000:]
    finally:
        operator.stop()
    assert "no cluster configuration" not in operator.log_text()


def test_convert_reads_standard_input(tmp_path: Path) -> None:
    from_file = run("convert", str(TONES), home=tmp_path)
    from_stdin = run("convert", "-", home=tmp_path, stdin=TONES.read_text())
    assert (from_stdin.returncode, from_stdin.stderr) == (0, "")
    assert from_stdin.stdout == from_file.stdout
    assert yaml.safe_load(from_stdin.stdout)["metadata"]["name"] == "tones-demo"
    back = run("convert", "-", home=tmp_path, stdin=from_stdin.stdout)
    assert json.loads(back.stdout) == json.loads(TONES.read_text())


def tones_with(**change: object) -> str:
    config = json.loads(TONES.read_text())
    for node in config["pipeline"]["nodes"]:
        if node["name"] in change:
            node["name"] = change[node["name"]]
    return json.dumps(config)


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (
            ["--name", "Bad_Name", str(TONES)],
            "",
            f'{TONES}: metadata.name: "Bad_Name" is not a Kubernetes object name: lowercase '
            "letters, digits, '-' and '.', starting and ending with a letter or digit, at most "
            "253 characters",
        ),
        (
            ["-"],
            tones_with(amp="a b"),
            '<stdin>: spec.nodes[1]: node name "a b" is not a safe folder name: use only '
            'letters, digits, "_" and "-"',
        ),
        (
            ["-"],
            tones_with(out="sink"),  # the links still name "out"
            "<stdin>: spec: link 1: 'to' names no node (got \"out\")",
        ),
        (["-"], "[1, 2]", "<stdin>: expected an object at the top"),
        (
            ["/no/such/pipeline.json"],
            "",
            "cannot read /no/such/pipeline.json: No such file or directory",
        ),
        ([str(COMMAND.parent / "python")], "", f"{COMMAND.parent / 'python'}: not UTF-8 text"),
    ],
    ids=[
        "bad-name",
        "node-name-with-space",
        "link-to-no-node",
        "not-an-object",
        "no-file",
        "a-binary",
    ],
)
def test_convert_refuses_what_the_api_server_would_naming_it(
    tmp_path: Path, args: list[str], stdin: str, message: str
) -> None:
    proc = run("convert", *args, home=tmp_path, stdin=stdin)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        f"juturna-operator convert: {message}\n",
    )


def test_crd_refuses_a_missing_directory_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "deploy" / "crds"
    proc = run("crd", str(target), home=tmp_path)
    assert (proc.returncode, proc.stderr) == (
        2,
        f"juturna-operator crd: no directory {target} (create it, or pass --mkdir)\n",
    )
    assert not (tmp_path / "deploy").exists()
    proc = run("crd", "--mkdir", str(target), home=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert (target / CRD_FILE_NAME).read_text() == render()


def test_crd_refuses_a_file_for_a_directory(tmp_path: Path) -> None:
    (tmp_path / "crds").write_text("")
    proc = run("crd", "--mkdir", str(tmp_path / "crds"), home=tmp_path)
    assert (proc.returncode, proc.stderr) == (
        2,
        f"juturna-operator crd: {tmp_path / 'crds'} is not a directory\n",
    )
