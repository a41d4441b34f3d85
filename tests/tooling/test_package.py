"""`make package` (hack/package.py): the chart's .tgz and the wheel carry one version, and a
version that differs anywhere stops it before anything is built. (The image, the third
artifact, is built by podman, as the container tests build theirs.)"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import package
import yaml

from support import CHART, REPO

SCRIPT = Path(package.__file__)
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )


def test_the_chart_and_the_wheel_of_one_version(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    proc = run("--no-image", "--out", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    chart = out / f"juturna-operator-{VERSION}.tgz"
    with tarfile.open(chart) as tgz:
        names = tgz.getnames()
        chart_yaml = tgz.extractfile("juturna-operator/Chart.yaml")
        assert chart_yaml is not None
        meta = yaml.safe_load(chart_yaml.read())
    assert (meta["version"], meta["appVersion"]) == (VERSION, VERSION)
    for shipped in ("README.md", "values.schema.json", "files/helm-test.py", "crds"):
        assert any(n.startswith(f"juturna-operator/{shipped}") for n in names), shipped
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    wheel = out / f"juturna_operator-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as whl:
        metadata = whl.read(f"juturna_operator-{VERSION}.dist-info/METADATA").decode()
        licensed = [n for n in whl.namelist() if n.endswith("/LICENSE")]
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "\nLicense-Expression: MIT\n" in metadata
    assert licensed, "the LICENSE file ships in the wheel"


def fake_repo(tmp_path: Path, project: str, chart: str, changelog: str) -> Path:
    """A repository with only the three files whose versions must agree."""
    root = tmp_path / "repo"
    (root / "charts" / "juturna-operator").mkdir(parents=True)
    (root / "pyproject.toml").write_text(f'[project]\nname = "x"\nversion = "{project}"\n')
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    meta["version"] = meta["appVersion"] = chart
    (root / "charts" / "juturna-operator" / "Chart.yaml").write_text(yaml.safe_dump(meta))
    (root / "CHANGELOG.md").write_text(changelog)
    return root


def test_a_chart_of_another_version_stops_it(tmp_path: Path) -> None:
    root = fake_repo(tmp_path, "0.2.0", "0.1.0", "## [0.2.0] - 2027-01-01\n")
    out = tmp_path / "dist"
    proc = run("--root", str(root), "--out", str(out), "--no-image")
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: charts/juturna-operator/Chart.yaml version is '0.1.0' but pyproject.toml's "
        "version is '0.2.0': the chart, the wheel and the image have one version; set both to "
        "the same\n"
    )
    assert not out.exists(), "nothing is built"


def test_a_version_the_changelog_does_not_describe_stops_it(tmp_path: Path) -> None:
    root = fake_repo(tmp_path, "0.2.0", "0.2.0", "## [0.1.0] - 2026-12-07\n")
    proc = run("--root", str(root), "--check")
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: CHANGELOG.md has no section for 0.2.0 (a heading `## [0.2.0] - <date>`): say "
        "what changed before packaging it\n"
    )


def test_the_repository_s_versions_agree() -> None:
    proc = run("--check")
    assert (proc.returncode, proc.stdout.strip()) == (0, VERSION)
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")


def test_make_package_passes_the_container_tool_and_base_image() -> None:
    """The Makefile's target runs this script with CONTAINER and BASE_IMAGE, as `make image`
    does; a dry run of make shows the command."""
    proc = subprocess.run(
        ["make", "-n", "package", "CONTAINER=podman --runtime runc", "BASE_IMAGE=local/base:1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        '.venv/bin/python hack/package.py --container "podman --runtime runc" '
        '--base-image "local/base:1"'
    ) in proc.stdout
