"""`inferencefleet serve`: command-line flags, per-process thread sizing, and `--workers N`
(N processes on one port via SO_REUSEPORT, supervised here, metrics summed on one port)."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from fleet_spec.contract import BUILTIN_PREFIX, WorkerSettings
from fleet_spec.cpus import available_cpus

log = logging.getLogger("fleet_server.serve")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Set by `serve --workers N` for its processes: the supervisor's pid, the folder where each
# process says whether it serves, and how many share the port (see worker.SiblingHealth).
SUPERVISOR_ENV = "INFERENCEFLEET_SUPERVISOR_PID"
HEALTH_DIR_ENV = "INFERENCEFLEET_HEALTH_DIR"
WORKERS_ENV = "INFERENCEFLEET_WORKERS"


def main(argv: list[str]) -> int:
    settings = WorkerSettings.from_argv(argv)
    if not settings.model.startswith(BUILTIN_PREFIX) and not Path(settings.model).is_file():
        print(f"inferencefleet serve: --model {settings.model!r}: no such file", file=sys.stderr)
        return 2
    if settings.reuse_port and not _die_with_parent():  # before torch loads (it takes seconds)
        return 0
    threads = settings.threads or max(1, available_cpus() // settings.workers)
    if settings.workers > 1:
        return _supervise(settings, threads)
    return _serve_one(dataclasses.replace(settings, threads=threads, host=bind_host(settings.host)))


def bind_host(host: str) -> str:
    """The address to bind: `::` (every address, IPv6 and IPv4) falls back to 0.0.0.0 on a
    machine without IPv6; any other address is kept."""
    if host.strip("[]") != "::":
        return host
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return "0.0.0.0"
    return "::"


def _die_with_parent() -> bool:
    """A supervised worker gets SIGTERM (and drains) if its supervisor dies (Linux only). Set
    first thing, before torch loads: a supervisor killed during those seconds must not leave
    its workers behind. False if the supervisor is gone already (before prctl took effect)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("cannot ask to be stopped with the supervisor (no prctl)")
    supervisor = os.environ.get(SUPERVISOR_ENV)
    return supervisor is None or os.getppid() == int(supervisor)


def _serve_one(settings: WorkerSettings) -> int:
    # Idle OpenMP threads sleep instead of spinning: the gRPC and event-loop threads share the
    # cores with torch. Must be set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from fleet_server import metrics
    from fleet_server.models import ModelLoadError
    from fleet_server.worker import run_worker

    assert settings.threads is not None
    torch.set_num_threads(settings.threads)
    torch.set_num_interop_threads(1)
    if settings.metrics_port:
        metrics.serve_metrics(settings.host, settings.metrics_port)
    try:
        return run_worker(settings)
    except (ModelLoadError, ValueError) as exc:
        print(f"inferencefleet serve: {exc}", file=sys.stderr)
        return 2


def _child_argv(settings: WorkerSettings, index: int, threads: int) -> list[str]:
    child = dataclasses.replace(
        settings, workers=1, metrics_port=0, threads=threads, worker_index=index, reuse_port=True
    )
    return [sys.executable, "-m", "fleet_server.serve", *child.to_argv()]


def _supervise(settings: WorkerSettings, threads: int) -> int:
    """Start N worker processes on one port; forward SIGTERM; exit 0 if all drained cleanly."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve %(levelname)s %(message)s")
    metrics_dir = tempfile.mkdtemp(prefix="inferencefleet-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[SUPERVISOR_ENV] = str(os.getpid())
    health_dir = Path(metrics_dir, "health")
    health_dir.mkdir()
    os.environ[HEALTH_DIR_ENV] = str(health_dir)
    os.environ[WORKERS_ENV] = str(settings.workers)
    from fleet_server import metrics  # after PROMETHEUS_MULTIPROC_DIR: multiprocess mode

    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        if settings.metrics_port:
            metrics.serve_metrics(bind_host(settings.host), settings.metrics_port)
        for index in range(settings.workers):
            child = subprocess.Popen(_child_argv(settings, index, threads))
            children[child.pid] = child
        log.info(
            "%d workers on port %d, %d torch threads each", settings.workers, settings.port, threads
        )
        failed = False
        while any(child.poll() is None for child in children.values()):
            pid, status = os.wait()
            if pid not in children:
                continue
            code = os.waitstatus_to_exitcode(status)
            children[pid].returncode = code
            metrics.mark_process_dead(pid)
            if code != 0 or not stopping:
                log.error("worker pid %d exited with %d; stopping the others", pid, code)
                failed = True
                forward(signal.SIGTERM, None)
        return 1 if failed else 0
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
