"""How many CPUs this process may use: its affinity mask and its cgroup's CPU quota (v1 and v2).

A container limited to 2 CPUs on a 64-core node sees 64 cores in os.cpu_count(); sizing torch's
threads from that oversubscribes the quota and every forward pass gets throttled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _v2_limit(root: Path, path: str) -> float | None:
    """cpu.max ("QUOTA PERIOD" or "max PERIOD") of the cgroup and every parent: the smallest."""
    limits = []
    directory = root / path.lstrip("/")
    while True:
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            quota = period = "max"
        if quota != "max" and int(period) > 0:
            limits.append(int(quota) / int(period))
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    return min(limits) if limits else None


def _v1_limit(root: Path, controllers: str, path: str) -> float | None:
    """cpu.cfs_quota_us / cpu.cfs_period_us (quota -1: no limit). Inside a container the cgroup
    is mounted at the controller's root, so the process's own path is tried, then the root."""
    for name in (controllers, "cpu", "cpu,cpuacct"):
        mount = root / name
        for directory in (mount / path.lstrip("/"), mount):
            try:
                quota = int((directory / "cpu.cfs_quota_us").read_text())
                period = int((directory / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            return quota / period if quota > 0 and period > 0 else None
    return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5 = one and a half), None if unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2; on a hybrid host the v1 cpu controller rules
            unified = path
        elif "cpu" in controllers.split(","):
            return _v1_limit(root, controllers, path)
    return _v2_limit(root, unified) if unified is not None else None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """Whole CPUs this process may keep busy: its affinity, capped by its cgroup's quota
    (rounded down, at least 1: threads beyond the quota are throttled, not faster)."""
    cores = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)
