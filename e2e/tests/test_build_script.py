"""e2e/build.sh fails loudly: no Go, an old Go, a failing compile (a stand-in `go`, no network)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BUILD_SH = Path(__file__).resolve().parents[1] / "build.sh"

FAKE_GO = """#!/bin/sh
case "$1" in
  env) echo "{version}" ;;
  mod) printf '{{\n\t"Info": "{info}",\n}}\n' ;;
  build) echo "pkg/fake/thing.go:1: undefined: Nothing" >&2; exit 2 ;;
  *) exit 0 ;;
esac
"""


def run_build(tmp_path: Path, go: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GO": str(go), "INFERENCEFLEET_CLUSTER_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [str(BUILD_SH)], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def fake_go(tmp_path: Path, version: str) -> Path:
    info = tmp_path / "k8s.info"
    info.write_text('{"Version":"v1.36.3","Time":"2026-07-22T18:07:38Z"}')
    go = tmp_path / "go"
    go.write_text(FAKE_GO.format(version=version, info=info))
    go.chmod(0o755)
    return go


def test_missing_go_is_a_clear_failure(tmp_path: Path) -> None:
    out = run_build(tmp_path, tmp_path / "no-such-go")
    assert out.returncode == 1
    assert "Go toolchain not found" in out.stderr
    assert "no-such-go is not executable" in out.stderr


def test_too_old_go_is_refused(tmp_path: Path) -> None:
    out = run_build(tmp_path, fake_go(tmp_path, "go1.22.5"))
    assert out.returncode == 1
    assert "go1.22.5" in out.stderr
    assert "needs go >= 1.26" in out.stderr


def test_failed_compile_stops_the_build_with_its_output(tmp_path: Path) -> None:
    out = run_build(tmp_path, fake_go(tmp_path, "go1.26.8"))
    assert out.returncode == 1
    assert "undefined: Nothing" in out.stderr
    assert "failed" in out.stderr
    # Nothing half-built is left where a later run would take it as complete.
    assert not list((tmp_path / "cache").glob("*/bin/.complete"))
