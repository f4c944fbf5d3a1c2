"""The example fleets parse with the CRD's schema and rules, and say what their comments say."""

from __future__ import annotations

from pathlib import Path

from fleet_local.manifest import read_fleet

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_mps_example_shares_each_gpu_through_mps() -> None:
    fleet = read_fleet(EXAMPLES / "fleet-mps.yaml")
    assert fleet.name == "detector-mps"
    assert fleet.gpu.sharing == "mps"
    assert fleet.gpu.workers_per_gpu == 4
    assert fleet.gpu.product == "NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition"
    assert fleet.model.source == "builtin:resnet18"


def test_time_slicing_example_is_the_one_the_journey_uses() -> None:
    fleet = read_fleet(EXAMPLES / "fleet.yaml")
    assert fleet.name == "detector"
    assert fleet.gpu.product == "NVIDIA-RTX-6000-Ada-Generation"
    assert (fleet.gpu.sharing, fleet.gpu.workers_per_gpu) == ("timeSlicing", 4)
    assert fleet.batching.max_batch_size == 8
