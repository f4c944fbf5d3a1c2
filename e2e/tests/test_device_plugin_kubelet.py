"""Unit tests of the kubelet's part of the device-plugin pods: node status, lagging volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e2ecluster.devicepluginpod import ConfigVolume, node_patches

ADA = "NVIDIA-RTX-6000-Ada-Generation"


def node(labels: dict[str, str], gpus: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"labels": labels},
        "status": {"capacity": {"cpu": "64", **gpus}, "allocatable": {"cpu": "64", **gpus}},
    }


UNSHARED = {
    "nvidia.com/gpu.product": ADA,
    "nvidia.com/gpu.replicas": "1",
    "nvidia.com/gpu.sharing-strategy": "none",
}
TS4 = {
    "resource": "nvidia.com/gpu",
    "replicas": 4,
    "strategy": "time-slicing",
    "renamed": False,
    "product_suffix": "-SHARED",
}


def test_a_shared_config_multiplies_the_gpus_and_relabels() -> None:
    labels, status = node_patches(node(UNSHARED, {"nvidia.com/gpu": "2"}), 2, ADA, TS4)
    assert labels == {
        "nvidia.com/gpu.product": f"{ADA}-SHARED",
        "nvidia.com/gpu.replicas": "4",
        "nvidia.com/gpu.sharing-strategy": "time-slicing",
    }
    assert status == {"capacity": {"nvidia.com/gpu": "8"}, "allocatable": {"nvidia.com/gpu": "8"}}


def test_a_renamed_resource_leaves_nvidia_gpu_at_zero() -> None:
    report = {**TS4, "resource": "nvidia.com/gpu.shared", "renamed": True, "product_suffix": ""}
    labels, status = node_patches(node(UNSHARED, {"nvidia.com/gpu": "2"}), 2, ADA, report)
    assert "nvidia.com/gpu.product" not in labels  # renamed: no -SHARED
    assert status["allocatable"] == {"nvidia.com/gpu": "0", "nvidia.com/gpu.shared": "8"}


def test_no_plugin_means_nothing_to_allocate_and_labels_stay() -> None:
    before = node(UNSHARED, {"nvidia.com/gpu": "2", "nvidia.com/gpu.shared": "4"})
    labels, status = node_patches(before, 2, ADA, None)
    assert labels == {}
    assert status["allocatable"] == {"nvidia.com/gpu": "0", "nvidia.com/gpu.shared": "0"}


def test_a_node_in_line_needs_no_patch() -> None:
    report = {**TS4, "replicas": 1, "strategy": "none", "product_suffix": ""}
    assert node_patches(node(UNSHARED, {"nvidia.com/gpu": "2"}), 2, ADA, report) == ({}, {})


class FakeApi:
    def __init__(self) -> None:
        self.data: dict[str, str] | None = None

    def get(self, path: str) -> dict[str, Any] | None:
        return None if self.data is None else {"data": dict(self.data)}


def volume(tmp_path: Path, lag: float) -> tuple[FakeApi, ConfigVolume]:
    api = FakeApi()
    (tmp_path / "lag").write_text(str(lag))
    return api, ConfigVolume(api, "ns", "cm", tmp_path / "vol", tmp_path / "lag")  # type: ignore[arg-type]


def keys(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir() if not p.name.startswith("..")}


def test_the_volume_mounts_at_once_then_lags_the_api(tmp_path: Path) -> None:
    api, vol = volume(tmp_path, lag=3600)
    vol.refresh()
    assert vol.written is None  # no ConfigMap: nothing to mount
    api.data = {"default": "version: v1\n"}
    vol.refresh()
    assert keys(tmp_path / "vol") == {"default": "version: v1\n"}
    assert (tmp_path / "vol" / "default").readlink() == Path("..data/default")
    api.data = {"default": "version: v1\n", "ts-2": "x"}
    vol.refresh()
    assert set(keys(tmp_path / "vol")) == {"default"}  # an hour behind the API
    (tmp_path / "lag").write_text("0")
    vol.refresh()
    assert set(keys(tmp_path / "vol")) == {"default", "ts-2"}
    api.data = {"ts-2": "x"}
    vol.refresh()
    assert set(keys(tmp_path / "vol")) == {"ts-2"}
    dirs = [p for p in (tmp_path / "vol").iterdir() if p.name.startswith("..") and p.is_dir()]
    assert len(dirs) == 2  # ..data and the one timestamped folder it points at


def test_a_deleted_configmap_keeps_the_last_contents(tmp_path: Path) -> None:
    api, vol = volume(tmp_path, lag=0)
    api.data = {"default": "v"}
    vol.refresh()
    api.data = None
    vol.refresh()
    assert keys(tmp_path / "vol") == {"default": "v"}
