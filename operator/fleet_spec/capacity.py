"""The capacity rule: GPU slots a fleet needs against those offered, and GPU memory per GPU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleet_spec.spec import FleetSpec


@dataclass(frozen=True)
class GpuHost:
    """A machine (a node, or the local host) with `gpus` physical GPUs of `memory_mib` MiB each."""

    name: str
    gpus: int
    memory_mib: (
        int | None
    )  # None: unknown (no nvidia.com/gpu.memory label); not held against the fleet


def slots_per_gpu(spec: FleetSpec) -> int:
    """Worker pods one physical GPU takes: workersPerGPU when shared, else 1."""
    return spec.gpu.workers_per_gpu if spec.gpu.shared else 1


def processes_per_gpu(spec: FleetSpec) -> int:
    """Worker processes on one physical GPU: pods per GPU x processes per pod."""
    return slots_per_gpu(spec) * spec.processes_per_pod


def memory_needed_per_gpu_mib(spec: FleetSpec) -> int:
    """GPU memory one fully used GPU needs: processes per GPU x memoryPerWorkerMiB."""
    return processes_per_gpu(spec) * spec.gpu.memory_per_worker_mib


@dataclass(frozen=True)
class Capacity:
    """The outcome of the capacity rule, with the numbers a status condition or a log line shows."""

    slots_needed: int
    slots_available: int
    memory_needed_mib: int  # per GPU
    hosts: int  # hosts offered
    hosts_too_small: tuple[str, ...]  # hosts whose GPUs have less memory than one GPU needs
    smallest_memory_mib: int | None

    @property
    def fits(self) -> bool:
        return self.slots_available >= self.slots_needed

    @property
    def shortfall(self) -> int:
        return max(0, self.slots_needed - self.slots_available)

    @property
    def reason(self) -> str:
        """CamelCase reason for a condition: Fits, InsufficientGPUMemory or InsufficientGPUSlots."""
        if self.fits:
            return "Fits"
        if self.hosts and len(self.hosts_too_small) == self.hosts:
            return "InsufficientGPUMemory"
        return "InsufficientGPUSlots"

    def summary(self) -> str:
        """Short form for a printer column, needed/available: '8/24'."""
        return f"{self.slots_needed}/{self.slots_available}"

    def message(self) -> str:
        """One sentence with every number that matters."""
        text = (
            f"needs {self.slots_needed} GPU slots and {self.memory_needed_mib} MiB per GPU; "
            f"{self.slots_available} slots available on "
            f"{self.hosts - len(self.hosts_too_small)} of {self.hosts} hosts"
        )
        if self.hosts_too_small:
            text += (
                f"; {len(self.hosts_too_small)} hosts have too little GPU memory "
                f"({self.smallest_memory_mib} MiB < {self.memory_needed_mib} MiB: "
                f"{', '.join(self.hosts_too_small)})"
            )
        if not self.fits:
            text += f"; short by {self.shortfall} slots"
        return text


def host_slots(spec: FleetSpec, host: GpuHost) -> int:
    """Worker pods this host can take: 0 if one GPU's memory cannot hold its processes."""
    if host.memory_mib is not None and host.memory_mib < memory_needed_per_gpu_mib(spec):
        return 0
    return host.gpus * slots_per_gpu(spec)


def check_capacity(spec: FleetSpec, hosts: Sequence[GpuHost]) -> Capacity:
    """Compare spec.replicas (one GPU slot per pod) with the slots and memory the hosts offer."""
    needed_mib = memory_needed_per_gpu_mib(spec)
    small = [h for h in hosts if h.memory_mib is not None and h.memory_mib < needed_mib]
    return Capacity(
        slots_needed=spec.replicas,
        slots_available=sum(host_slots(spec, h) for h in hosts),
        memory_needed_mib=needed_mib,
        hosts=len(hosts),
        hosts_too_small=tuple(sorted(h.name for h in small)),
        smallest_memory_mib=min(
            (h.memory_mib for h in small if h.memory_mib is not None), default=None
        ),
    )
