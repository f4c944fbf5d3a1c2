"""Fault handling of e2e/cluster: busy port, missing binary, a component that dies, stale state."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2ecluster.cluster import BINARIES, ClusterError, Proc, State, check, ensure_built

pytestmark = pytest.mark.e2e

E2E = Path(__file__).resolve().parents[1]
# A second cluster next to the session's one: its own ports and state directory.
PORT_BASE = int(os.environ.get("INFERENCEFLEET_FAULT_PORT_BASE", "16543"))


@pytest.fixture(scope="module")
def build_dir() -> Path:
    try:
        return ensure_built()
    except ClusterError as e:
        pytest.fail(f"the cluster binaries could not be built: {e}", pytrace=False)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "cluster"
    yield d
    # Whatever a test left behind is stopped here, so no process outlives the run.
    cli(d, "down")
    assert not d.exists()


def cli(state_dir: Path, *args: str, build: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "INFERENCEFLEET_CLUSTER_DIR": str(state_dir),
        "INFERENCEFLEET_CLUSTER_PORT_BASE": str(PORT_BASE),
        # The machine's one real node belongs to the session's cluster, never to these.
        "INFERENCEFLEET_REAL_NODE": "0",
    }
    if build is not None:
        env["INFERENCEFLEET_CLUSTER_BUILD_DIR"] = str(build)
    return subprocess.run(
        [str(E2E / "cluster"), *args], capture_output=True, text=True, env=env, timeout=300
    )


def processes(state_dir: Path) -> list[Proc]:
    data = json.loads((state_dir / "state.json").read_text())
    return [Proc(**p) for p in data["processes"]]


def fake_build(build_dir: Path, tmp_path: Path, replace: dict[str, str | None]) -> Path:
    """A build dir linking the real binaries, with some left out (None) or replaced by scripts."""
    fake = tmp_path / "build"
    (fake / "bin").mkdir(parents=True)
    (fake / "stages").symlink_to(build_dir / "stages")
    for b in BINARIES:
        if b not in replace:
            (fake / "bin" / b).symlink_to(build_dir / "bin" / b)
        elif (script := replace[b]) is not None:
            (fake / "bin" / b).write_text(script)
            (fake / "bin" / b).chmod(0o755)
    return fake


def test_port_in_use_is_named(build_dir: Path, state_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", PORT_BASE))
        s.listen()
        out = cli(state_dir, "up")
    assert out.returncode == 1
    assert f"{PORT_BASE} (kube-apiserver)" in out.stderr
    assert "INFERENCEFLEET_CLUSTER_PORT_BASE" in out.stderr
    assert not state_dir.exists()


def test_missing_binary_is_named(build_dir: Path, state_dir: Path, tmp_path: Path) -> None:
    out = cli(state_dir, "up", build=fake_build(build_dir, tmp_path, {"kube-scheduler": None}))
    assert out.returncode == 1
    assert "missing binaries" in out.stderr
    assert "kube-scheduler" in out.stderr


def test_component_dying_during_up_is_named_and_nothing_is_left(
    build_dir: Path, state_dir: Path, tmp_path: Path
) -> None:
    crashing = "#!/bin/sh\necho 'scheduler: simulated crash' >&2\nsleep 0.5\nexit 3\n"
    out = cli(state_dir, "up", build=fake_build(build_dir, tmp_path, {"kube-scheduler": crashing}))
    assert out.returncode == 1
    assert "kube-scheduler" in out.stderr
    assert "died" in out.stderr
    assert "simulated crash" in out.stderr
    started = processes(state_dir)
    assert {p.name for p in started} >= {"etcd", "kube-apiserver", "kube-scheduler"}
    assert not [p for p in started if p.alive()]
    assert cli(state_dir, "status").returncode == 1
    assert cli(state_dir, "down").returncode == 0
    assert not state_dir.exists()


def test_component_that_dies_is_reported_and_a_stale_cluster_is_replaced(
    build_dir: Path, state_dir: Path
) -> None:
    first = cli(state_dir, "up")
    assert first.returncode == 0, first.stderr
    assert cli(state_dir, "status").returncode == 0
    old = processes(state_dir)
    scheduler = next(p for p in old if p.name == "kube-scheduler")
    os.kill(scheduler.pid, signal.SIGKILL)

    status = cli(state_dir, "status")
    assert status.returncode == 1
    assert "kube-scheduler" in status.stdout
    assert "NOT RUNNING" in status.stdout
    with pytest.raises(ClusterError, match="kube-scheduler"):
        check(state_dir)

    again = cli(state_dir, "up")
    assert again.returncode == 0, again.stderr
    assert "stale cluster" in again.stderr
    assert not [p for p in old if p.alive()]
    new = processes(state_dir)
    assert all(p.alive() for p in new)
    state = State.load(state_dir)
    assert state is not None
    assert check(state_dir).server == f"https://127.0.0.1:{PORT_BASE}"

    assert cli(state_dir, "down").returncode == 0
    assert not [p for p in new if p.alive()]
    assert not state_dir.exists()


def test_env_prints_path_and_kubeconfig_only_when_up(state_dir: Path) -> None:
    out = cli(state_dir, "env")
    assert out.returncode == 1
    assert "no cluster is up" in out.stderr
