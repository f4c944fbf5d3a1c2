"""Smoke tests of the test cluster: versions, GPU scheduling, NVIDIA's device-plugin config."""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2ecluster import nvidia
from e2ecluster.cluster import POD_CIDR
from e2ecluster.handle import Cluster, pinned_versions, wait_until
from e2ecluster.nvidia import CONFIG_NAME, CONFIG_NAMESPACE, LABEL_CONFIG

pytestmark = pytest.mark.e2e

ADA = "NVIDIA-RTX-6000-Ada-Generation"
BLACKWELL = "NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition"
# More nvidia.com/gpu than any node offers, shared or not (the profile has 7 physical GPUs).
TOO_MANY_GPUS = 99


def deployment(name: str, replicas: int, gpus: int, **pod_spec: Any) -> str:
    """A Deployment manifest whose pods each ask for `gpus` nvidia.com/gpu."""
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "worker",
                            "image": "registry.invalid/worker:1",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ],
                    **pod_spec,
                },
            },
        },
    }
    return json.dumps(manifest)


def ada_affinity(product: str = ADA) -> dict[str, Any]:
    term = {"key": "nvidia.com/gpu.product", "operator": "In", "values": [product]}
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [term]}]
            }
        }
    }


def get_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def pods(cluster: Cluster, namespace: str, app: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(cluster, "pods", "-n", namespace, "-l", f"app={app}")[
        "items"
    ]
    return items


def test_readyz(cluster: Cluster) -> None:
    assert cluster.get("/readyz") == (200, "ok")


def test_kubectl_reports_the_pinned_version(cluster: Cluster) -> None:
    want = pinned_versions()["KUBERNETES_VERSION"]
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert out["clientVersion"]["gitVersion"] == want
    assert out["serverVersion"]["gitVersion"] == want
    assert out["serverVersion"]["minor"] == want.split(".")[1]


def test_helm_version_and_a_kube_version_gated_install(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    want = pinned_versions()["HELM_VERSION"]
    assert cluster.helm("version", "--short").stdout.startswith(want)
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        yaml.safe_dump(
            {"apiVersion": "v2", "name": "probe", "version": "0.1.0", "kubeVersion": ">=1.30.0-0"}
        )
    )
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n"
        "data: {kube: '{{ .Capabilities.KubeVersion.Version }}'}\n"
    )
    cluster.helm("install", "probe", str(chart), "-n", namespace, "--wait", "--timeout", "60s")
    cm = get_json(cluster, "configmap", "probe", "-n", namespace)
    assert cm["data"]["kube"] == pinned_versions()["KUBERNETES_VERSION"]
    cluster.helm("uninstall", "probe", "-n", namespace, "--wait")


def test_gpu_deployment_on_rtx_6000_ada_becomes_available(cluster: Cluster, namespace: str) -> None:
    manifest = deployment("ada", replicas=3, gpus=1, affinity=ada_affinity())
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    cluster.kubectl(
        "wait", "-n", namespace, "deploy/ada", "--for=condition=Available", "--timeout=90s"
    )
    placed = pods(cluster, namespace, "ada")
    assert len(placed) == 3
    for pod in placed:
        assert pod["spec"]["nodeName"].startswith("rtx6000ada-")
        assert pod["status"]["phase"] == "Running"
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(POD_CIDR)


def test_asking_for_more_gpus_than_exist_stays_pending(cluster: Cluster, namespace: str) -> None:
    manifest = deployment("greedy", replicas=1, gpus=TOO_MANY_GPUS)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)

    def unschedulable() -> str:
        for pod in pods(cluster, namespace, "greedy"):
            for cond in pod["status"].get("conditions", []):
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return str(cond.get("message", ""))
        return ""

    message = wait_until("the scheduler to give up on the pod", unschedulable, timeout=60)
    assert "Insufficient nvidia.com/gpu" in message
    events = get_json(
        cluster, "events", "-n", namespace, "--field-selector", "reason=FailedScheduling"
    )
    assert any("Insufficient nvidia.com/gpu" in e["message"] for e in events["items"])
    assert all(p["status"]["phase"] == "Pending" for p in pods(cluster, namespace, "greedy"))


def node_gpus(cluster: Cluster, node: str) -> tuple[str, str, dict[str, str]]:
    n = get_json(cluster, "node", node)
    return (
        n["status"]["capacity"].get("nvidia.com/gpu", ""),
        n["status"]["allocatable"].get("nvidia.com/gpu", ""),
        n["metadata"]["labels"],
    )


def wait_for_sharing(
    cluster: Cluster, node: str, gpus: int, replicas: int, strategy: str, product: str
) -> None:
    """Wait until the node advertises `gpus` with `replicas` in its label (the count and the
    labels are written apart), then check the other sharing labels."""

    def reached() -> dict[str, str] | None:
        capacity, allocatable, labels = node_gpus(cluster, node)
        ok = (capacity, allocatable) == (str(gpus), str(gpus))
        return labels if ok and labels.get("nvidia.com/gpu.replicas") == str(replicas) else None

    labels: dict[str, str] = wait_until(
        f"{node} to advertise {gpus} GPUs, {replicas} replicas each",
        reached,
        timeout=90,  # a label set before the volume has its key: config-manager's back-off
    )
    assert labels["nvidia.com/gpu.sharing-strategy"] == strategy
    assert labels["nvidia.com/gpu.product"] == product
    assert labels["nvidia.com/gpu.count"] == "2"  # the physical GPUs, always (2 on Ada)


def heartbeat(cluster: Cluster, node: str) -> str:
    n = get_json(cluster, "node", node)
    return next(c["lastHeartbeatTime"] for c in n["status"]["conditions"] if c["type"] == "Ready")


def sharing_config(strategy: str, replicas: int, **options: Any) -> dict[str, Any]:
    resources = [{"name": "nvidia.com/gpu", "replicas": replicas}]
    return {"version": "v1", "sharing": {strategy: {**options, "resources": resources}}}


@pytest.fixture
def add_profile(cluster: Cluster) -> Iterator[Callable[[dict[str, Any]], str]]:
    """add_profile(config) -> a new key of the device plugin's ConfigMap; removed after."""
    where = ("-n", CONFIG_NAMESPACE, f"configmap/{CONFIG_NAME}")
    created = cluster.kubectl(
        "create", "configmap", CONFIG_NAME, "-n", CONFIG_NAMESPACE, check=False
    )
    assert created.returncode == 0 or "already exists" in created.stderr, created.stderr
    keys: list[str] = []

    def add(config: dict[str, Any]) -> str:
        keys.append(f"profile-{secrets.token_hex(3)}")
        patch = {"data": {keys[-1]: yaml.safe_dump(config)}}
        cluster.kubectl("patch", *where, "--type=merge", "-p", json.dumps(patch))
        return keys[-1]

    yield add
    patch = {"data": dict.fromkeys(keys)}
    cluster.kubectl("patch", *where, "--type=merge", "-p", json.dumps(patch))


def test_time_slicing_label_multiplies_gpus_and_removing_it_undoes_it(
    cluster: Cluster, namespace: str, add_profile: Callable[[dict[str, Any]], str]
) -> None:
    node = "rtx6000ada-2"
    assert node_gpus(cluster, node)[:2] == ("2", "2")
    key = add_profile(sharing_config("timeSlicing", 4))
    try:
        cluster.kubectl("label", "node", node, f"{LABEL_CONFIG}={key}")
        wait_for_sharing(cluster, node, 8, 4, "time-slicing", f"{ADA}-SHARED")

        # 8 one-GPU pods fit on that node only thanks to the sharing profile.
        pinned = {"nodeSelector": {"kubernetes.io/hostname": node}}
        cluster.kubectl(
            "apply", "-n", namespace, "-f", "-", input=deployment("shared", 8, 1, **pinned)
        )

        def all_eight_placed() -> set[str]:  # Available holds from 6 of 8 (maxUnavailable 25%)
            found = pods(cluster, namespace, "shared")
            nodes = {p["spec"].get("nodeName") for p in found}
            return nodes if len(found) == 8 and None not in nodes else set()

        assert wait_until("8 pods scheduled", all_eight_placed, timeout=90) == {node}

        # kwok's node heartbeat rewrites node status every 20-45 s: the capacity must stay.
        before = heartbeat(cluster, node)
        wait_until("a kwok heartbeat", lambda: heartbeat(cluster, node) != before, timeout=90)
        assert node_gpus(cluster, node)[:2] == ("8", "8")

        cluster.kubectl("scale", "-n", namespace, "deploy/shared", "--replicas=0")
        wait_until("the pods to go", lambda: not pods(cluster, namespace, "shared"), timeout=60)
    finally:
        cluster.kubectl("label", "node", node, f"{LABEL_CONFIG}-")
    wait_for_sharing(cluster, node, 2, 1, "none", ADA)


def test_mps_and_a_renamed_resource(
    cluster: Cluster, add_profile: Callable[[dict[str, Any]], str]
) -> None:
    ada, blackwell = "rtx6000ada-0", "rtxpro6000bw-0"
    mps = add_profile(sharing_config("mps", 3))
    renamed = add_profile(sharing_config("timeSlicing", 2, renameByDefault=True))
    try:
        cluster.kubectl("label", "node", ada, f"{LABEL_CONFIG}={mps}")
        cluster.kubectl("label", "node", blackwell, f"{LABEL_CONFIG}={renamed}")
        wait_for_sharing(cluster, ada, 6, 3, "mps", f"{ADA}-SHARED")

        def shared_gpus() -> tuple[dict[str, str], dict[str, str]]:
            """The Blackwell node's allocatable nvidia.com/gpu*, and its labels (one read)."""
            found = get_json(cluster, "node", blackwell)
            allocatable: dict[str, str] = found["status"]["allocatable"]
            gpus = {k: v for k, v in allocatable.items() if k.startswith("nvidia.com/gpu")}
            return gpus, found["metadata"]["labels"]

        want = {"nvidia.com/gpu": "0", "nvidia.com/gpu.shared": "2"}

        def shared_and_labelled() -> dict[str, str] | None:  # status and labels: two patches
            gpus, labels = shared_gpus()
            shared = labels.get("nvidia.com/gpu.sharing-strategy") == "time-slicing"
            return labels if gpus == want and shared else None

        labels = wait_until("nvidia.com/gpu.shared on the Blackwell node", shared_and_labelled, 90)
        assert labels["nvidia.com/gpu.product"] == BLACKWELL  # renamed: no -SHARED
    finally:
        cluster.kubectl("label", "node", ada, blackwell, f"{LABEL_CONFIG}-")
    wait_for_sharing(cluster, ada, 2, 1, "none", ADA)
    # As a kubelet does, the resource whose plugin went away stays in the status at 0.
    unshared = {"nvidia.com/gpu": "1", "nvidia.com/gpu.shared": "0"}
    wait_until("the renamed resource to drop to 0", lambda: shared_gpus()[0] == unshared, 90)


def test_unknown_profile_key_changes_nothing(cluster: Cluster) -> None:
    node = "rtx6000ada-1"
    sidecar = nvidia.pod_dir(cluster.state, node) / "logs" / "sidecar.log"
    try:
        cluster.kubectl("label", "node", node, f"{LABEL_CONFIG}=no-such-profile")
        # config-manager exits; the plugin keeps its config: capacity and labels stay.
        wait_until(
            "config-manager to refuse the label",
            lambda: "specified config no-such-profile does not exist" in sidecar.read_text(),
            timeout=30,
        )
        capacity, _, labels = node_gpus(cluster, node)
        assert capacity == "2"
        assert labels["nvidia.com/gpu.sharing-strategy"] == "none"
    finally:
        cluster.kubectl("label", "node", node, f"{LABEL_CONFIG}-")


def test_scale_to_zero_and_namespace_deletion_clean_up(cluster: Cluster) -> None:
    ns = f"scale-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", ns)
    try:
        wait_until(
            "the default ServiceAccount",
            lambda: cluster.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0,
            timeout=30,
        )
        cluster.kubectl(
            "apply", "-n", ns, "-f", "-", input=deployment("scaled", 3, 1, affinity=ada_affinity())
        )
        cluster.kubectl(
            "wait", "-n", ns, "deploy/scaled", "--for=condition=Available", "--timeout=90s"
        )
        assert len(pods(cluster, ns, "scaled")) == 3
        cluster.kubectl("scale", "-n", ns, "deploy/scaled", "--replicas=0")
        wait_until("scale to 0 to remove the pods", lambda: not pods(cluster, ns, "scaled"), 60)
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=deployment("again", 2, 1))
        cluster.kubectl(
            "wait", "-n", ns, "deploy/again", "--for=condition=Available", "--timeout=90s"
        )
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=90s")
    gone = cluster.kubectl("get", "namespace", ns, check=False)
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr
    leftover = get_json(cluster, "pods", "-A", "--field-selector", f"metadata.namespace={ns}")
    assert leftover["items"] == []
