"""The device-plugin pods on NVIDIA's real config-manager: fallbacks, exits, the lagging volume."""

from __future__ import annotations

import pytest
import yaml
from e2ecluster.handle import wait_until
from e2ecluster.nvidia import DevicePlugins

pytestmark = pytest.mark.e2e

NODE = "rtx6000ada-2"  # 2 GPUs
ADA = "NVIDIA-RTX-6000-Ada-Generation"


def sharing(strategy: str, replicas: int) -> str:
    resources = [{"name": "nvidia.com/gpu", "replicas": replicas}]
    return yaml.safe_dump({"version": "v1", "sharing": {strategy: {"resources": resources}}})


def wait_gpus(
    plugins: DevicePlugins,
    node: str,
    want: dict[str, str],
    labels: dict[str, str] | None = None,
    timeout: float = 60,
) -> dict[str, str]:
    """Wait until the node advertises `want` and carries `labels`; return its nvidia.com/gpu.*
    labels. The allocatable count and feature discovery's labels are written apart, so a test
    that checks both waits for both."""

    def reached() -> dict[str, str] | None:
        gpus, have = plugins.node(node)
        ok = gpus == want and all(have.get(k) == v for k, v in (labels or {}).items())
        return have if ok else None

    found: dict[str, str] = wait_until(
        f"{node} to advertise {want} with labels {labels or {}}", reached, timeout
    )
    return found


def test_the_default_key_serves_unlabelled_nodes(device_plugins: DevicePlugins) -> None:
    labels = wait_gpus(
        device_plugins, NODE, {"nvidia.com/gpu": "2"}, {"nvidia.com/gpu.replicas": "1"}
    )
    assert labels["nvidia.com/gpu.sharing-strategy"] == "none"
    assert "Attempting to find config named: default" in device_plugins.log(NODE, "init")


def test_an_unlabelled_node_takes_the_only_key(device_plugins: DevicePlugins) -> None:
    device_plugins.set_configmap({"ts-2": sharing("timeSlicing", 2)})
    device_plugins.restart(NODE)
    labels = wait_gpus(
        device_plugins, NODE, {"nvidia.com/gpu": "4"}, {"nvidia.com/gpu.replicas": "2"}
    )
    assert labels["nvidia.com/gpu.sharing-strategy"] == "time-slicing"
    assert labels["nvidia.com/gpu.product"] == f"{ADA}-SHARED"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (
            {"ts-2": sharing("timeSlicing", 2), "mps-2": sharing("mps", 2)},
            "no config was set, no default was provided, and all fallbacks failed",
        ),
        ({}, "no configuration files available"),
    ],
    ids=["two-keys-no-default", "empty"],
)
def test_no_config_to_fall_back_on_leaves_the_node_without_gpus(
    device_plugins: DevicePlugins, data: dict[str, str], error: str
) -> None:
    device_plugins.set_configmap(data)
    device_plugins.restart(NODE)
    wait_until(
        "config-manager to exit", lambda: error in device_plugins.log(NODE, "init"), timeout=60
    )
    wait_gpus(device_plugins, NODE, {"nvidia.com/gpu": "0"})
    assert device_plugins.log(NODE, "plugin") == ""  # the init container never succeeded


def test_a_key_the_volume_lacks_crash_loops_the_sidecar_until_it_appears(
    device_plugins: DevicePlugins,
) -> None:
    device_plugins.set_lag(NODE, 20)
    device_plugins.set_configmap({**device_plugins.saved, "ts-3": sharing("timeSlicing", 3)})
    device_plugins.label(NODE, "ts-3")
    missing = "specified config ts-3 does not exist"
    wait_until(
        "the sidecar to exit", lambda: missing in device_plugins.log(NODE, "sidecar"), timeout=30
    )
    assert device_plugins.node(NODE)[0] == {"nvidia.com/gpu": "2"}  # the plugin keeps what it had
    wait_gpus(
        device_plugins,
        NODE,
        {"nvidia.com/gpu": "6"},
        {"nvidia.com/gpu.replicas": "3"},
        timeout=150,
    )
    assert device_plugins.in_volume(NODE, "ts-3")
    assert (
        device_plugins.log(NODE, "sidecar").count(missing) >= 2
    )  # it failed again while it lagged


def test_a_config_the_plugin_refuses_leaves_the_node_without_gpus(
    device_plugins: DevicePlugins,
) -> None:
    device_plugins.set_configmap({**device_plugins.saved, "one": sharing("timeSlicing", 1)})
    wait_until("the key in the volume", lambda: device_plugins.in_volume(NODE, "one"), timeout=30)
    device_plugins.label(NODE, "one")
    wait_gpus(device_plugins, NODE, {"nvidia.com/gpu": "0"})
    assert "number of replicas must be >= 2" in device_plugins.log(NODE, "plugin")
