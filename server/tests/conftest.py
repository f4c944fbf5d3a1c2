"""Fixtures for the worker's tests: real `inferencefleet serve` processes on 127.0.0.1 (killed at
the end), an in-process reference runner, and test frames."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from fleet_server.models import load_model
from fleet_server.runner import ModelRunner

SERVER_DIR = Path(__file__).resolve().parents[1]
PYTHONPATH = f"{SERVER_DIR}:{SERVER_DIR.parent / 'operator'}"  # the worker imports fleet_spec
IMAGE = 32  # small frames keep every forward pass short on a shared 2-core machine
LISTENING = re.compile(r"listening on \S*:(\d+)")
SERVING = re.compile(r"SERVING model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_frames(count: int, seed: int, size: int = IMAGE) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


Frames = Callable[..., npt.NDArray[np.uint8]]


@pytest.fixture(scope="session")
def frames() -> Frames:
    """frames(count, seed, size=32): reproducible random uint8 frames [count, size, size, 3]."""
    return random_frames


@dataclass
class WorkerProcess:
    """A running `inferencefleet serve`; `log` collects its stderr lines as they come."""

    proc: subprocess.Popen[str]
    metrics_port: int
    log: list[str] = field(default_factory=list)
    port: int = 0
    _closed: bool = False
    pump: threading.Thread | None = None
    _seen: threading.Condition = field(default_factory=threading.Condition)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        try:
            for line in self.proc.stderr:
                with self._seen:
                    self.log.append(line.rstrip())
                    self._seen.notify_all()
        except ValueError:  # the pipe was closed when the test ended
            pass
        with self._seen:
            self._closed = True
            self._seen.notify_all()

    def wait_for(self, pattern: re.Pattern[str], within_s: float = 300.0) -> re.Match[str]:
        """The first log line matching `pattern`; fails if the process exits or time runs out."""
        deadline = time.monotonic() + within_s
        with self._seen:
            while True:
                for line in self.log:
                    if match := pattern.search(line):
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise AssertionError(f"no {pattern.pattern!r} in worker log:\n" + self.text())
                self._seen.wait(min(left, 0.5))

    def text(self) -> str:
        return "\n".join(self.log)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


StartWorker = Callable[..., WorkerProcess]


class Launcher:
    """Starts workers and kills whatever is left of them at close()."""

    def __init__(self) -> None:
        self.started: list[WorkerProcess] = []

    def start(self, *flags: str, wait: bool = True, metrics: bool = True) -> WorkerProcess:
        """`inferencefleet serve` with extra flags; waits for SERVING unless wait=False."""
        metrics_port = free_port() if metrics else 0
        argv = [sys.executable, "-m", "fleet_server.serve", "--host", "127.0.0.1"]
        argv += ["--metrics-port", str(metrics_port), "--threads", "1"]
        port = 0
        if "--port" not in flags:  # several workers share one fixed port
            port = free_port() if "--workers" in flags else 0
            argv += ["--port", str(port)]
        if "--image-size" not in flags:
            argv += ["--image-size", str(IMAGE)]
        env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [*argv, *flags], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        worker = WorkerProcess(proc, metrics_port, port=port)
        self.started.append(worker)
        worker.pump = threading.Thread(target=worker._pump, name=f"pump-{proc.pid}", daemon=True)
        worker.pump.start()
        if "--workers" not in flags:
            worker.port = int(worker.wait_for(LISTENING).group(1))
        if wait:
            worker.wait_for(SERVING)
        return worker

    def close(self) -> None:
        for worker in self.started:
            if worker.proc.poll() is None:
                worker.proc.kill()
            worker.proc.wait()
            if worker.pump is not None:
                worker.pump.join(timeout=30)
            if worker.proc.stderr is not None:
                worker.proc.stderr.close()


@pytest.fixture
def start_worker() -> Iterator[StartWorker]:
    """A function that starts a worker for this test (killed at the end of it)."""
    launcher = Launcher()
    yield launcher.start
    launcher.close()


@pytest.fixture(scope="session")
def tiny_worker() -> Iterator[WorkerProcess]:
    """One tiny worker (32x32 frames, batch 4, queue 16, 1 MiB messages) shared by the tests."""
    launcher = Launcher()
    yield launcher.start(
        "--model", "builtin:tiny", "--max-batch-size", "4", "--max-queue-size", "16",
        "--max-message-bytes", str(1024 * 1024),
    )  # fmt: skip
    launcher.close()


@pytest.fixture(scope="session")
def tiny_reference() -> ModelRunner:
    """The tiny builtin in this process: the same seeded weights the workers load."""
    torch.set_num_threads(1)
    runner = ModelRunner(
        load_model("builtin:tiny"),
        device=torch.device("cpu"),
        dtype=torch.float32,
        image_size=IMAGE,
    )
    runner.warm_up(1)
    return runner
