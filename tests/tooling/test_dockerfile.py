"""The Dockerfile: hadolint-clean, and the promises the chart relies on are in it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from support import REPO

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_is_clean() -> None:
    proc = hadolint(DOCKERFILE)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_hadolint_does_find_problems(tmp_path: Path) -> None:
    """The check above can fail: the same linter flags a careless Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install .\n")
    proc = hadolint(bad)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # the latest tag
    assert "DL3003" in proc.stdout  # cd instead of WORKDIR


def test_the_image_promises_what_the_chart_assumes() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE=python:3.12-slim\n" in text
    assert len(re.findall(r"^FROM ", text, re.M)) == 2, "multi-stage: build, then runtime"
    # The chart fixes no user (a platform may assign one) but asks for runAsNonRoot, which
    # the kubelet can check only against a numeric USER: the image's own.
    assert re.findall(r"^USER (\S+)$", text, re.M) == ["10001:10001"]
    values = yaml.safe_load((REPO / "charts/juturna-operator/values.yaml").read_text())
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    assert "runAsUser" not in values["podSecurityContext"]
    # The chart sets args only: the image's init (tini, which reaps orphans) stays PID 1.
    assert 'ENTRYPOINT ["tini", "--", "juturna-operator"]' in text
    assert re.search(r'^CMD \["run", .*"--liveness=http://0\.0\.0\.0:8080/healthz"\]$', text, re.M)
    assert "ffmpeg" in text  # Juturna's file and RTP nodes run it
