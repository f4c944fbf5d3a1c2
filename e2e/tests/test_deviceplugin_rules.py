"""Unit tests of the device-plugin stand-in's rules: config -> advertised GPUs and labels."""

from __future__ import annotations

from typing import Any

import pytest
from e2ecluster.deviceplugin import (
    LABEL_CONFIG,
    NO_SHARING,
    ConfigError,
    Sharing,
    desired_state,
    node_patches,
    parse_sharing,
)

ADA = "NVIDIA-RTX-6000-Ada-Generation"

TS4 = """
version: v1
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/gpu
        replicas: 4
"""


def test_time_slicing_multiplies_gpus_and_marks_the_product_shared() -> None:
    state = desired_state(2, ADA, parse_sharing(TS4))
    assert state.resources == {"nvidia.com/gpu": 8}
    assert state.labels == {
        "nvidia.com/gpu.product": f"{ADA}-SHARED",
        "nvidia.com/gpu.replicas": "4",
        "nvidia.com/gpu.sharing-strategy": "time-slicing",
    }


def test_mps_is_its_own_strategy() -> None:
    resources = '[{"name": "nvidia.com/gpu", "replicas": 3}]'
    cfg = f'{{"version": "v1", "sharing": {{"mps": {{"resources": {resources}}}}}}}'
    state = desired_state(1, ADA, parse_sharing(cfg))
    assert state.resources == {"nvidia.com/gpu": 3}
    assert state.labels["nvidia.com/gpu.sharing-strategy"] == "mps"
    assert state.labels["nvidia.com/gpu.product"] == f"{ADA}-SHARED"


def test_no_sharing_is_the_default_and_strips_a_stale_suffix() -> None:
    state = desired_state(2, f"{ADA}-SHARED", NO_SHARING)
    assert state.resources == {"nvidia.com/gpu": 2}
    assert state.labels == {
        "nvidia.com/gpu.product": ADA,
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
    }


def test_rename_by_default_advertises_gpu_shared_without_suffix() -> None:
    cfg = TS4.replace("timeSlicing:\n", "timeSlicing:\n    renameByDefault: true\n")
    sharing = parse_sharing(cfg)
    assert sharing.rename == "nvidia.com/gpu.shared"
    state = desired_state(2, ADA, sharing)
    assert state.resources == {"nvidia.com/gpu": 0, "nvidia.com/gpu.shared": 8}
    assert state.labels["nvidia.com/gpu.product"] == ADA


def test_replicating_some_devices_only() -> None:
    state = desired_state(2, ADA, Sharing("time-slicing", 4, None, devices=1))
    assert state.resources == {"nvidia.com/gpu": 5}


def test_one_replica_is_not_sharing() -> None:
    sharing = parse_sharing(TS4.replace("replicas: 4", "replicas: 1"))
    assert desired_state(2, ADA, sharing).labels["nvidia.com/gpu.sharing-strategy"] == "none"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: v2\n", "unknown version"),
        ("[1, 2]", "not a mapping"),
        (TS4.replace("replicas: 4", "replicas: 0"), "replicas must be a positive"),
        (TS4.replace("        replicas: 4\n", ""), "no replicas"),
        ("version: v1\nsharing: {timeSlicing: {resources: []}}\n", "no resources"),
        (
            "version: v1\nsharing:\n"
            "  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}]}\n"
            "  mps: {resources: [{name: nvidia.com/gpu, replicas: 2}]}\n",
            "exclusive",
        ),
    ],
)
def test_configs_the_plugin_would_refuse(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_sharing(text)


def _node(labels: dict[str, str], gpus: str = "2", **extra: str) -> dict[str, Any]:
    base = {"nvidia.com/gpu.product": ADA, "nvidia.com/gpu.count": "2"}
    resources = {"cpu": "64", "nvidia.com/gpu": gpus, **extra}
    return {
        "metadata": {"name": "n", "labels": base | labels},
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


def test_node_patches_apply_the_labelled_profile() -> None:
    meta, status = node_patches(_node({LABEL_CONFIG: "ts4"}), {"ts4": TS4})
    assert status == {
        "status": {"capacity": {"nvidia.com/gpu": "8"}, "allocatable": {"nvidia.com/gpu": "8"}}
    }
    assert meta is not None
    assert meta["metadata"]["labels"]["nvidia.com/gpu.replicas"] == "4"


def test_node_in_line_needs_no_patch() -> None:
    labels = {
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
    }
    assert node_patches(_node(labels), None) == (None, None)


def test_unknown_key_or_bad_config_changes_nothing() -> None:
    assert node_patches(_node({LABEL_CONFIG: "nope"}), {"ts4": TS4}) == (None, None)
    assert node_patches(_node({LABEL_CONFIG: "bad"}), {"bad": "version: v9"}) == (None, None)


def test_removing_the_label_restores_the_default_and_drops_a_renamed_resource() -> None:
    node = _node(
        {"nvidia.com/gpu.replicas": "4", "nvidia.com/gpu.sharing-strategy": "time-slicing"},
        gpus="0",
        **{"nvidia.com/gpu.shared": "8"},
    )
    meta, status = node_patches(node, {"ts4": TS4})
    assert status is not None
    assert status["status"]["capacity"] == {"nvidia.com/gpu": "2", "nvidia.com/gpu.shared": None}
    assert meta is not None
    assert meta["metadata"]["labels"]["nvidia.com/gpu.sharing-strategy"] == "none"


def test_cpu_node_is_left_alone() -> None:
    node = {"metadata": {"name": "cpu-0", "labels": {LABEL_CONFIG: "ts4"}}, "status": {}}
    assert node_patches(node, {"ts4": TS4}) == (None, None)
