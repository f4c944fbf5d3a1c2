"""Unit tests of the capacity rule: slots needed vs offered, and GPU memory per GPU."""

from __future__ import annotations

from dataclasses import replace

from fleet_spec.capacity import (
    GpuHost,
    check_capacity,
    memory_needed_per_gpu_mib,
    processes_per_gpu,
    slots_per_gpu,
)
from fleet_spec.spec import FleetSpec, GpuSpec, ModelSpec

ADA = [GpuHost(f"ada-{i}", gpus=2, memory_mib=49140) for i in range(3)]
BLACKWELL = GpuHost("blackwell-0", gpus=1, memory_mib=97887)


def _fleet(
    replicas: int, sharing: str = "timeSlicing", workers: int = 4, mib: int = 2048
) -> FleetSpec:
    return FleetSpec(
        name="f",
        namespace="ns",
        model=ModelSpec(source="builtin:tiny"),
        replicas=replicas,
        gpu=GpuSpec(
            product="x", sharing=sharing, workers_per_gpu=workers, memory_per_worker_mib=mib
        ),
    )


def test_time_sliced_fleet_fits_on_three_ada_nodes() -> None:
    result = check_capacity(_fleet(24), ADA)
    assert (result.slots_needed, result.slots_available) == (24, 24)
    assert result.fits
    assert result.reason == "Fits"
    assert result.memory_needed_mib == 4 * 2048
    assert result.summary() == "24/24"


def test_one_pod_too_many_is_short_by_one() -> None:
    result = check_capacity(_fleet(25), ADA)
    assert not result.fits
    assert result.shortfall == 1
    assert result.reason == "InsufficientGPUSlots"
    assert "needs 25 GPU slots" in result.message()
    assert "24 slots available on 3 of 3 hosts" in result.message()


def test_without_sharing_each_pod_takes_a_whole_gpu() -> None:
    fleet = _fleet(8, sharing="none", workers=1)
    assert slots_per_gpu(fleet) == 1
    result = check_capacity(fleet, [*ADA, BLACKWELL])
    assert result.slots_available == 7
    assert result.shortfall == 1


def test_memory_per_gpu_counts_every_process_on_it() -> None:
    fleet = replace(_fleet(4, workers=8, mib=8192), processes_per_pod=2)
    assert processes_per_gpu(fleet) == 16
    assert memory_needed_per_gpu_mib(fleet) == 16 * 8192


def test_gpus_with_too_little_memory_offer_nothing() -> None:
    fleet = _fleet(2, workers=16, mib=4096)  # 65536 MiB per GPU: only the Blackwell holds it
    result = check_capacity(fleet, [*ADA, BLACKWELL])
    assert result.slots_available == 16
    assert result.hosts_too_small == ("ada-0", "ada-1", "ada-2")
    assert result.smallest_memory_mib == 49140
    assert "49140 MiB < 65536 MiB" in result.message()
    assert result.fits


def test_memory_shortfall_everywhere_is_named_as_such() -> None:
    result = check_capacity(_fleet(1, workers=64, mib=2048), [*ADA, BLACKWELL])
    assert result.slots_available == 0
    assert result.reason == "InsufficientGPUMemory"


def test_no_hosts_at_all() -> None:
    result = check_capacity(_fleet(3), [])
    assert result.reason == "InsufficientGPUSlots"
    assert "0 slots available on 0 of 0 hosts" in result.message()


def test_unknown_memory_is_not_held_against_the_fleet() -> None:
    result = check_capacity(_fleet(2, workers=64), [GpuHost("local", gpus=1, memory_mib=None)])
    assert result.slots_available == 64
    assert result.fits


def test_zero_replicas_always_fit() -> None:
    assert check_capacity(_fleet(0), []).fits
