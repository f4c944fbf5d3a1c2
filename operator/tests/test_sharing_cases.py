"""GPU sharing against NVIDIA's real config-manager: the right behaviour, one test per known case.

Each test states what a real cluster needs from the operator. One the operator still gets
wrong is a strict xfail whose reason names what it does wrong; the marker goes when the
operator is fixed.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from e2ecluster.handle import wait_until
from e2ecluster.nvidia import LABEL_CONFIG, DevicePlugins

pytestmark = pytest.mark.e2e

BLACKWELL = "NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition"
BW_NODE = "rtxpro6000bw-0"  # the one Blackwell node: 1 GPU
REPLICAS = "nvidia.com/gpu.replicas"
TS2_ADA = {"sharing": "timeSlicing", "workersPerGPU": 2}  # Ada nodes: 2 GPUs, 4 slots each


def blackwell(sharing: str, workers: int) -> dict[str, Any]:
    return {"product": BLACKWELL, "sharing": sharing, "workersPerGPU": workers}


def unshared(plugins: DevicePlugins, node: str, gpus: int) -> bool:
    allocatable, labels = plugins.node(node)
    return allocatable == {"nvidia.com/gpu": str(gpus)} and labels.get(REPLICAS) == "1"


def ready_on_blackwell(fleets: Any, name: str) -> None:
    """A fleet of 2 pods time-slicing the Blackwell node's one GPU two ways, Ready."""
    fleets.apply(fleets.manifest(name, replicas=2, gpu=blackwell("timeSlicing", 2)))
    fleets.wait_ready(name, timeout=180)


def node_labels(cluster: Any, node: str) -> dict[str, str]:
    got = json.loads(cluster.kubectl("get", "node", node, "-o", "json").stdout)
    labels: dict[str, str] = got["metadata"].get("labels") or {}
    return labels


def wait_observed(fleets: Any, name: str) -> None:
    """Until the operator has written status for the fleet's current generation."""

    def observed() -> bool:
        fleet = fleets.get(name) or {}
        generation = fleet.get("metadata", {}).get("generation")
        return bool((fleet.get("status") or {}).get("observedGeneration") == generation)

    wait_until(f"fleet {name}'s current generation to be observed", observed, timeout=90)


def test_case1_a_fleet_never_changes_the_sharing_of_gpus_it_does_not_use(
    device_plugins: DevicePlugins, fleets: Any
) -> None:
    device_plugins.set_configmap(None)  # the operator is the ConfigMap's first writer
    # A fresh pod, which mounts the ConfigMap once it exists. (A running one could never
    # switch: config-manager exits when the key its config file points at is gone.)
    device_plugins.restart(BW_NODE)
    fleets.apply(fleets.manifest("solo", replicas=2, gpu=blackwell("timeSlicing", 2)))
    wait_until(
        "the profile on the fleet's node",
        lambda: device_plugins.node(BW_NODE)[1].get(REPLICAS) == "2",
        timeout=240,
    )
    other = "rtx6000ada-0"  # the fleet does not use it; its plugin restarts (reboot, rollout)
    device_plugins.restart(other)
    wait_until(f"{other}'s plugin to serve", lambda: device_plugins.serving(other), timeout=90)
    # The plugin logs its config before the node shows it: give the node time to say so (a
    # profile that spread to it would stay, and fail this).
    wait_until(f"{other} to advertise no sharing", lambda: unshared(device_plugins, other, 2), 30)

    fleets.delete("solo")  # the node is given back: it must share nothing any more
    wait_until(
        "the released node to be unshared",
        lambda: unshared(device_plugins, BW_NODE, 1),
        timeout=120,
    )


def test_case2_a_profile_lands_through_a_lagging_volume_without_crash_loops(
    device_plugins: DevicePlugins, fleet_ops: Any, start_operator: Any
) -> None:
    device_plugins.restart(BW_NODE)  # a fresh pod: no back-off or log from earlier tests
    wait_until("the fresh pod to serve", lambda: device_plugins.serving(BW_NODE), timeout=90)
    device_plugins.set_lag(BW_NODE, 60)  # a kubelet refreshes ConfigMap volumes about this late
    fleets = fleet_ops
    # The operator is told the lag, with a margin (the chart's value; 90 s by default).
    with start_operator(extra=("--config-volume-delay", "65")):
        applied = time.monotonic()
        fleets.apply(fleets.manifest("lagged", replicas=2, gpu=blackwell("timeSlicing", 2)))

        def advertised() -> bool:
            allocatable, labels = device_plugins.node(BW_NODE)
            if allocatable == {"nvidia.com/gpu": "2"} and labels.get(REPLICAS) == "2":
                return True
            status = fleets.get("lagged") or {}
            placed = (status.get("status") or {}).get("placement") or []
            assert not placed, f"pods placed before the node advertises the profile: {placed}"
            return False

        wait_until("the node to advertise the profile", advertised, timeout=240, interval=1)
        print(f"kubectl apply -> slots advertised: {time.monotonic() - applied:.0f} s")
        assert "does not exist" not in device_plugins.log(BW_NODE, "sidecar")
        fleets.wait_ready("lagged", timeout=120)
        print(f"kubectl apply -> Ready: {time.monotonic() - applied:.0f} s")


def test_case3_status_reports_a_node_pending_until_it_advertises_the_profile(
    device_plugins: DevicePlugins, fleets: Any
) -> None:
    device_plugins.set_lag(BW_NODE, 3600)  # the profile cannot reach the node in this test
    fleets.apply(fleets.manifest("pending", replicas=1, gpu=blackwell("timeSlicing", 2)))

    def says_pending() -> bool:
        status = json.dumps((fleets.get("pending") or {}).get("status") or {}).lower()
        return BW_NODE in status and "pending" in status

    wait_until("status to report the node pending", says_pending, timeout=90)
    assert fleets.condition("pending", "GPUSharing").get("status") != "True"
    assert device_plugins.node(BW_NODE)[1][REPLICAS] == "1"


def test_case4_two_fleets_of_one_profile_each_get_their_slots(
    device_plugins: DevicePlugins, fleets: Any
) -> None:
    fleets.apply(fleets.manifest("first", replicas=4, gpu=TS2_ADA))
    fleets.wait_ready("first", timeout=180)
    fleets.apply(fleets.manifest("second", replicas=4, gpu=TS2_ADA))

    def all_scheduled() -> bool:
        pods = fleets.pods("second")
        return len(pods) == 4 and all(p["spec"].get("nodeName") for p in pods)

    wait_until("the second fleet's 4 pods to be scheduled", all_scheduled, timeout=180)
    fleets.wait_ready("second", timeout=180)


def test_case5_a_cordoned_node_keeps_its_profile_under_running_pods(
    cluster: Any, device_plugins: DevicePlugins, fleets: Any
) -> None:
    ready_on_blackwell(fleets, "steady")
    cluster.kubectl("cordon", BW_NODE)
    try:
        batching = '{"spec":{"batching":{"maxBatchSize":16}}}'  # a new generation to reconcile
        fleets.kubectl("patch", "ifleet", "steady", "--type=merge", "-p", batching)
        wait_observed(fleets, "steady")
        assert node_labels(cluster, BW_NODE).get(LABEL_CONFIG) == "timeslicing-2"
        assert {p["spec"].get("nodeName") for p in fleets.pods("steady")} == {BW_NODE}
    finally:
        cluster.kubectl("uncordon", BW_NODE)


def test_case6_scaling_to_zero_gives_the_nodes_back(
    device_plugins: DevicePlugins, fleets: Any
) -> None:
    fleets.apply(fleets.manifest("shrink", replicas=6, gpu=TS2_ADA))  # 2 Ada nodes
    fleets.wait_ready("shrink", timeout=180)
    used = {p["spec"]["nodeName"] for p in fleets.pods("shrink")}
    assert len(used) == 2
    fleets.kubectl("scale", "ifleet/shrink", "--replicas=0")
    wait_until("the pods to go", lambda: not fleets.pods("shrink"), timeout=90)
    wait_observed(fleets, "shrink")
    for node in sorted(used):
        wait_until(f"{node} to be given back", lambda n=node: unshared(device_plugins, n, 2), 120)


def test_case7_a_profile_change_waits_for_the_old_pods_to_leave(
    cluster: Any, device_plugins: DevicePlugins, fleets: Any
) -> None:
    ready_on_blackwell(fleets, "switch")
    old = [p["metadata"]["name"] for p in fleets.pods("switch")]
    hold = '{"metadata":{"finalizers":["e2e.inferencefleet.dev/hold"]}}'
    for pod in old:  # the old pods keep running (Terminating) until the test lets them go
        fleets.kubectl("patch", "pod", pod, "--type=merge", "-p", hold)
    try:
        fleets.kubectl(
            "patch", "ifleet", "switch", "--type=merge", "-p", '{"spec":{"gpu":{"sharing":"mps"}}}'
        )
        wait_observed(fleets, "switch")
        assert node_labels(cluster, BW_NODE).get(LABEL_CONFIG) == "timeslicing-2"
    finally:
        for pod in old:
            fleets.kubectl(
                "patch", "pod", pod, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'
            )
    wait_until(
        "the new profile once the old pods left",
        lambda: device_plugins.node(BW_NODE)[1].get("nvidia.com/gpu.sharing-strategy") == "mps",
        timeout=150,
    )


def test_case8_mps_on_a_gpu_in_mig_mode_is_refused_with_a_clear_message(
    cluster: Any, device_plugins: DevicePlugins, fleets: Any
) -> None:
    mig = {
        "nvidia.com/mig.strategy": "single",  # feature discovery, MIG mode on
        "nvidia.com/mig.config": "all-1g.24gb",  # NVIDIA's MIG manager
        "nvidia.com/mig.config.state": "success",
    }
    cluster.kubectl("label", "node", BW_NODE, *(f"{k}={v}" for k, v in mig.items()))
    try:
        fleets.apply(fleets.manifest("migmps", replicas=2, gpu=blackwell("mps", 2)))

        def refused() -> dict[str, Any] | None:
            fleet = fleets.get("migmps") or {}
            for condition in (fleet.get("status") or {}).get("conditions") or []:
                if condition["status"] == "False" and "MIG" in condition.get("message", ""):
                    return dict(condition)
            return None

        wait_until("a condition that names MIG", refused, timeout=90)
        assert LABEL_CONFIG not in node_labels(cluster, BW_NODE)
    finally:
        cluster.kubectl("label", "node", BW_NODE, *(f"{k}-" for k in mig))
