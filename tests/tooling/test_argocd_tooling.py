"""Argo CD's tooling says why it cannot run, and `make argocd` then succeeds (the test skips)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import argocd
import pytest
from argocd import ArgoCDUnavailable, ensure_argocd, redis_server

from support import minimal_path

HACK = Path(argocd.__file__).parent


def test_no_go_toolchain_means_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", minimal_path(tmp_path, "bash", "dirname", "basename", "python3"))
    monkeypatch.setenv("JUTURNA_OPERATOR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ArgoCDUnavailable, match="cannot be built here: no Go toolchain on PATH"):
        ensure_argocd()


def test_no_module_proxy_means_unavailable(tmp_path: Path) -> None:
    """An empty module cache and no proxy: neither Go 1.27 nor Argo CD can be had."""
    env = {
        **os.environ,
        "JUTURNA_OPERATOR_CACHE": str(tmp_path / "cache"),
        "GOMODCACHE": str(tmp_path / "modcache"),
        "GOPROXY": "off",
    }
    proc = subprocess.run(
        ["bash", str(HACK / "build-argocd.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    # Go writes its module cache read-only; make it removable for tmp_path's cleanup.
    subprocess.run(["chmod", "-R", "u+w", str(tmp_path / "modcache")], check=False)
    assert proc.returncode == 3, proc.stderr
    assert "cannot be built here: the Go module proxy did not serve" in proc.stderr


def test_make_argocd_succeeds_with_a_note_where_it_cannot_build(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": minimal_path(tmp_path, "dirname", "basename", "python3", "bash"),
        "JUTURNA_OPERATOR_CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        [sys.executable, str(HACK / "argocd.py"), "build"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cannot be built here: no Go toolchain on PATH" in proc.stderr
    assert "the GitOps test will skip" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_redis_server_means_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", minimal_path(tmp_path, "python3"))
    with pytest.raises(ArgoCDUnavailable, match="no redis-server on PATH"):
        redis_server()
