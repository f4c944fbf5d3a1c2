"""`inferencefleet run` refuses what cannot work: a taken port, a model file that does not load."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fleet_local.run import main as run_main

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml"


def _one_replica(tmp_path: Path) -> Path:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["replicas"] = 1
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_taken_port_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = run_main([str(EXAMPLE), "--port", str(port), "--metrics-port", "0"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"refused: port(s) {port}" in err  # the first worker's port, maybe more after it
    assert "on 127.0.0.1 already in use" in err


def test_model_file_that_does_not_load_stops_with_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"this is not a TorchScript archive")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [
        sys.executable, "-m", "inferencefleet.cli", "run", str(_one_replica(tmp_path)),
        "--model", str(broken), "--threads", "1", "--port", str(port), "--metrics-port", "0",
        "--log-dir", str(tmp_path / "logs"), "--no-table", "--backoff-s", "0.1",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "w0 failed 3 times without becoming ready" in done.stdout
    assert "broken.pt" in done.stdout.split("without becoming ready", 1)[1]  # the log tail
    assert "stopped: no worker left running" in done.stdout
