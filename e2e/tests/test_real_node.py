"""The test cluster's real node: a kubelet on containerd that runs pods and allocates GPUs."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from e2ecluster import nvidia, realnode
from e2ecluster.cluster import KWOK_NODE_IP, POD_CIDR, SERVICE_CIDR
from e2ecluster.handle import Cluster, pinned_versions, wait_until

pytestmark = pytest.mark.e2e

PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]


@pytest.fixture
def node(cluster: Cluster) -> str:
    """The real node's name; skips (naming why) where this cluster has none."""
    if not cluster.state.real_node:
        if os.environ.get("INFERENCEFLEET_REAL_NODE") == "1":
            pytest.fail("INFERENCEFLEET_REAL_NODE=1 but the cluster has no real node")
        pytest.skip(
            f"this cluster has no real node ({realnode.unavailable() or 'claimed elsewhere'})"
        )
    return realnode.NODE_NAME


def _node(cluster: Cluster, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", "node", name, "-o", "json").stdout)  # type: ignore[no-any-return]


def _pod(name: str, node: str, resources: dict[str, Any] | None = None) -> dict[str, Any]:
    """A pod that passes Pod Security `restricted`, pinned to the real node."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [{"key": realnode.TAINT["key"], "operator": "Exists"}],
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "main",
                    "image": realnode.PAUSE_IMAGE,
                    "imagePullPolicy": "Never",
                    "resources": resources or {},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def _apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _pod_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "pod", "-n", namespace, name, "-o", "json")
    return json.loads(out.stdout)["status"]  # type: ignore[no-any-return]


def test_address_ranges_stay_out_of_private_networks() -> None:
    ranges = [SERVICE_CIDR, POD_CIDR, realnode.POD_SUBNET, f"{KWOK_NODE_IP}/32"]
    for r in ranges:
        net = ipaddress.ip_network(r)
        assert not any(net.overlaps(p) for p in PRIVATE), r
    assert not ipaddress.ip_network(POD_CIDR).overlaps(ipaddress.ip_network(realnode.POD_SUBNET))
    assert not ipaddress.ip_network(SERVICE_CIDR).overlaps(ipaddress.ip_network(POD_CIDR))


def test_real_node_registers_as_a_tainted_gpu_node(cluster: Cluster, node: str) -> None:
    n = _node(cluster, node)
    labels = n["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"].startswith(realnode.GPU["product"])
    assert labels["nvidia.com/gpu.count"] == str(realnode.GPUS)
    assert "kwok.x-k8s.io/node" not in n["metadata"].get("annotations", {})
    assert {"key": realnode.TAINT["key"], "value": "true", "effect": "NoSchedule"} in n["spec"][
        "taints"
    ]
    info = n["status"]["nodeInfo"]
    assert info["kubeletVersion"] == pinned_versions()["KUBERNETES_VERSION"]
    assert info["containerRuntimeVersion"].startswith("containerd://1.")
    addresses = {a["type"]: a["address"] for a in n["status"]["addresses"]}
    assert addresses["InternalIP"] == realnode.NODE_IP
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])


def test_pod_runs_on_the_real_node_with_a_bridge_address(
    cluster: Cluster, namespace: str, node: str
) -> None:
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    _apply(cluster, namespace, _pod("sleeper", node))
    status = wait_until(
        "pod sleeper Running",
        lambda: (s := _pod_status(cluster, namespace, "sleeper")).get("phase") == "Running" and s,
        timeout=120,
    )
    assert ipaddress.ip_address(status["podIP"]) in ipaddress.ip_network(realnode.POD_SUBNET)
    assert status["containerStatuses"][0]["ready"] is True
    assert status["containerStatuses"][0]["restartCount"] == 0


TIME_SLICING_4 = """\
version: v1
flags:
  migStrategy: none
sharing:
  timeSlicing:
    renameByDefault: false
    failRequestsGreaterThanOne: true
    resources:
    - name: nvidia.com/gpu
      replicas: 4
"""


@pytest.fixture
def shared_devices(cluster: Cluster, node: str) -> Iterator[int]:
    """The real node time-sliced four ways the way a user's cluster does it: a key in the
    device plugin's ConfigMap, then the node's config label; NVIDIA's config-manager selects
    it, and the node's device plugin serves what the parsed config gives (1 GPU x 4). Back to
    no sharing after (label first: config-manager exits when the key it uses goes)."""
    key, where = "e2e-timeslicing-4", ("-n", nvidia.CONFIG_NAMESPACE)
    patch = json.dumps({"data": {key: TIME_SLICING_4}})
    cluster.kubectl("patch", "configmap", nvidia.CONFIG_NAME, *where, "--type=merge", "-p", patch)
    volume = nvidia.pod_dir(cluster.state, node) / "available-configs" / key
    wait_until(f"{key} in the device plugin's ConfigMap volume", volume.exists, timeout=60)
    cluster.kubectl("label", "node", node, f"{nvidia.LABEL_CONFIG}={key}", "--overwrite")
    try:
        yield 4
    finally:
        cluster.kubectl("label", "node", node, f"{nvidia.LABEL_CONFIG}-")
        wait_until(
            "the real node back at one GPU",
            lambda: (
                _node(cluster, node)["status"]["allocatable"].get("nvidia.com/gpu")
                == str(realnode.GPUS)
            ),
            timeout=90,
        )
        gone = json.dumps({"data": {key: None}})
        cluster.kubectl(
            "patch", "configmap", nvidia.CONFIG_NAME, *where, "--type=merge", "-p", gone
        )


def test_kubelet_advertises_and_allocates_the_shared_gpus(
    cluster: Cluster, namespace: str, node: str, shared_devices: int
) -> None:
    wait_until(
        "allocatable nvidia.com/gpu=4 on the real node (config-manager, plugin, kubelet)",
        lambda: _node(cluster, node)["status"]["allocatable"].get("nvidia.com/gpu") == "4",
        timeout=90,
    )
    gpu = {"limits": {"nvidia.com/gpu": "1"}}
    for i in range(5):
        _apply(cluster, namespace, _pod(f"gpu-{i}", node, gpu))

    def phases() -> dict[str, str]:
        out = cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout
        return {
            p["metadata"]["name"]: p["status"].get("phase", "") for p in json.loads(out)["items"]
        }

    wait_until(
        "four GPU pods Running",
        lambda: sorted(phases().values()).count("Running") == 4,
        timeout=120,
    )
    assert sorted(phases().values()) == ["Pending", "Running", "Running", "Running", "Running"]
    # The kubelet handed out four distinct devices (the plugin logged each Allocate).
    log = (cluster.state.dir / "logs" / "gpu-device-plugin.log").read_text()
    allocated = [line.split("allocate ")[1] for line in log.splitlines() if " allocate [" in line]
    assert len(set(allocated[-4:])) == 4, allocated
