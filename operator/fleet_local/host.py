"""What this machine offers a local fleet: its NVIDIA GPUs (from nvidia-smi) and CPU cores."""

from __future__ import annotations

import shutil
import subprocess

from fleet_spec.cpus import available_cpus

from fleet_local.plan import LocalGpu, LocalHost

_QUERY = ["--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]


def parse_nvidia_smi(text: str) -> tuple[LocalGpu, ...]:
    """Lines like '0, NVIDIA RTX 6000 Ada Generation, 49140' -> GPUs."""
    gpus = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        memory = int(parts[2]) if parts[2].isdigit() else None
        gpus.append(LocalGpu(int(parts[0]), parts[1], memory))
    return tuple(gpus)


def local_gpus() -> tuple[LocalGpu, ...]:
    """The GPUs nvidia-smi lists; none when there is no driver or no nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        done = subprocess.run(
            [smi, *_QUERY], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return parse_nvidia_smi(done.stdout) if done.returncode == 0 else ()


def discover() -> LocalHost:
    """This machine's GPUs and the CPUs this process may use (affinity and cgroup quota)."""
    return LocalHost(cores=available_cpus(), gpus=local_gpus())
