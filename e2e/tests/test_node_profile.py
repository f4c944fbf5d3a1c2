"""Unit tests of the node profile: e2e/nodes.yaml -> the Node objects the cluster creates."""

from __future__ import annotations

import pytest
from e2ecluster import profile


def _by_name() -> dict[str, dict]:  # type: ignore[type-arg]
    return {n["metadata"]["name"]: n for n in profile.load()}


def test_default_profile_has_the_promised_nodes() -> None:
    nodes = _by_name()
    assert sorted(nodes) == [
        "cpu-0",
        "rtx6000ada-0",
        "rtx6000ada-1",
        "rtx6000ada-2",
        "rtxpro6000bw-0",
    ]
    ada = nodes["rtx6000ada-1"]
    labels = ada["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-RTX-6000-Ada-Generation"
    assert labels["nvidia.com/gpu.memory"] == "49140"
    assert labels["nvidia.com/gpu.count"] == "2"
    assert labels["nvidia.com/gpu.family"] == "ada-lovelace"
    assert labels["nvidia.com/mps.capable"] == "true"
    assert ada["status"]["capacity"]["nvidia.com/gpu"] == "2"
    assert ada["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    assert ada["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"

    bw = nodes["rtxpro6000bw-0"]["metadata"]["labels"]
    assert bw["nvidia.com/gpu.memory"] == "97887"
    assert bw["nvidia.com/gpu.count"] == "1"

    cpu = nodes["cpu-0"]
    assert "nvidia.com/gpu" not in cpu["status"]["capacity"]
    assert not any(k.startswith("nvidia.com/") for k in cpu["metadata"]["labels"])


def test_every_node_has_its_own_address() -> None:
    ips = [n["status"]["addresses"][0]["address"] for n in profile.load()]
    assert len(set(ips)) == len(ips)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([], "non-empty"),
        ([{"namePrefix": "g", "gpus": 2}], "both"),
        ([{"namePrefix": "a"}, {"namePrefix": "a"}], "duplicate"),
        ([{"namePrefix": "g", "gpus": 1, "gpu": {"product": "X"}}], "lacks"),
    ],
)
def test_malformed_profiles_are_refused(groups: list[dict], message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(profile.ProfileError, match=message):
        profile.node_manifests({"groups": groups})


def test_a_group_can_taint_its_nodes() -> None:
    taint = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
    nodes = profile.node_manifests({"groups": [{"namePrefix": "t", "count": 2, "taints": [taint]}]})
    assert [n["spec"]["taints"] for n in nodes] == [[taint], [taint]]
    assert profile.load()[0]["spec"] == {}
