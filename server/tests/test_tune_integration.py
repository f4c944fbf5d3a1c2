"""`inferencefleet tune` end to end: real tiny workers started as `inferencefleet run` starts
them, a very short budget, and a fleet.yaml fragment, JSON and plot that come out of it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fleet_local.run import taken_ports
from fleet_operator.tuning import parse_result
from fleet_spec.spec import API_VERSION, KIND, parse_fleet

pytestmark = pytest.mark.integration
SERVER_DIR = Path(__file__).resolve().parents[1]


def free_port_run(length: int) -> int:
    """The first of `length` consecutive free ports on 127.0.0.1, below Linux's ephemeral range
    (32768 and up), so that no outgoing connection takes one before the workers bind them."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000 - length)
        if not taken_ports("127.0.0.1", list(range(first, first + length))):
            return first
    raise RuntimeError("no run of free ports")


def test_tune_tiny_workers_prints_a_fragment_that_is_a_valid_fleet(tmp_path: Path) -> None:
    port = free_port_run(3)
    json_file, plot = tmp_path / "tune.json", tmp_path / "tune.png"
    result_file = tmp_path / "termination-log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SERVER_DIR), str(SERVER_DIR.parent / "operator"), os.environ.get("PYTHONPATH", "")]
    )}  # fmt: skip
    # The fleet comes from the environment, as the operator's tune Job passes it.
    env["TUNE_FLEET"] = json.dumps({"apiVersion": API_VERSION, "kind": KIND,
                                    "metadata": {"name": "cam"},
                                    "spec": {"model": {"source": "builtin:tiny"}}})  # fmt: skip
    done = subprocess.run(
        [
            sys.executable, "-m", "inferencefleet.cli", "tune", "env:TUNE_FLEET",
            "--image-size", "32", "--device", "cpu", "--port", str(port),
            "--workers", "1,2", "--batch-sizes", "1,4", "--delays-us", "0,500",
            "--first-window-s", "0.3", "--final-window-s", "0.6", "--warmup-s", "0.2",
            "--budget-s", "6", "--p99-ms", "60000",
            "--json-file", str(json_file), "--plot", str(plot), "--log-dir", str(tmp_path / "logs"),
            "--result-file", str(result_file),
        ],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(json_file.read_text())
    trials = document["trials"]
    assert trials[-1]["phase"] == "confirm"
    assert all(t["errors"] == 0 and t["frames_per_s"] > 0 for t in trials)
    assert {(t["workers"], t["maxBatchSize"]) for t in trials} <= {(1, 1), (1, 4), (2, 1), (2, 4)}
    assert document["winner"] == {k: trials[-1][k] for k in document["winner"]}
    assert plot.stat().st_size > 0
    fragment = yaml.safe_load(done.stdout[done.stdout.index("# inferencefleet tune:") :])
    assert fragment["spec"]["batching"]["maxBatchSize"] == document["winner"]["maxBatchSize"]
    assert fragment["spec"]["replicas"] == document["winner"]["workers"]
    merged = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "tuned"},
              "spec": {"model": {"source": "builtin:tiny"}, **fragment["spec"]}}  # fmt: skip
    assert parse_fleet(merged).batching.max_batch_size == document["winner"]["maxBatchSize"]
    # the one-line result the operator reads from the tune pod's termination message
    line = result_file.read_text()
    assert len(line.encode()) <= 4096
    assert line.count("\n") == 1
    result = parse_result(line)
    assert result is not None, line
    assert result["recommendation"] == fragment["spec"]
    assert result["workers"] == document["winner"]["workers"]
    assert result["framesPerSecond"] == round(document["confirmed"]["frames_per_s"], 1)
    assert result["withinBudget"] is True
    assert result["p99BudgetMs"] == 60000
    # every worker it started is gone
    assert taken_ports("127.0.0.1", [port, port + 1, port + 2]) == []


def test_tune_refuses_bad_input_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text(
        "apiVersion: inferencefleet.dev/v1alpha1\nkind: InferenceFleet\nmetadata: {name: x}\n"
        "spec: {model: {source: builtin:tiny}, replicas: -1}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "inferencefleet.cli", "tune", str(bad)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "spec.replicas" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "inferencefleet.cli", "tune", "builtin:tiny", "--budget-s", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--budget-s 1" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "inferencefleet.cli", "tune", "env:INFERENCEFLEET_NO_SUCH_VAR"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "$INFERENCEFLEET_NO_SUCH_VAR: is not set" in done.stderr
