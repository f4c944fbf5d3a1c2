"""The CRD's tighter value rules still take what the Deployment API takes (both validators)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleet_spec.spec import parse_fleet

CRD = Path(__file__).resolve().parents[2] / "charts" / "inferencefleet" / "crds"
BASE: dict[str, Any] = {
    "apiVersion": "inferencefleet.dev/v1alpha1",
    "kind": "InferenceFleet",
    "metadata": {"name": "edge"},
    "spec": {"model": {"source": "builtin:tiny"}},
}
# Each is valid in a Deployment's pod template, at the edge of what the CRD's rules allow.
EDGE_CASES: dict[str, dict[str, Any]] = {
    "quantities": {
        "resources": {
            "limits": {"cpu": "1500m", "memory": "4Gi", "ephemeral-storage": "1e9"},
            "requests": {"cpu": 0, "memory": "+.5Gi", "hugepages-2Mi": "64Mi"},
        }
    },
    "extended-resource": {"resources": {"limits": {"example.com/fpga": 1}}},
    "node-selector": {
        "nodeSelector": {
            "kubernetes.io/hostname": "gpu-1",
            "topology.kubernetes.io/zone": "",
            "pool": "A_b.c-9",
            "a" * 63: "b" * 63,
        }
    },
    "tolerations": {
        "tolerations": [
            {"operator": "Exists"},
            {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
            {
                "key": "example.com/maintenance",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 30,
            },
            {"key": "pool", "value": ""},
        ]
    },
    "image": {"image": "registry.example:5000/team/worker@sha256:" + "0" * 64},
}


def fleet(case: str, namespace: str = "default") -> dict[str, Any]:
    manifest = copy.deepcopy(BASE)
    manifest["metadata"] = {"name": f"edge-{case}", "namespace": namespace}
    manifest["spec"].update(copy.deepcopy(EDGE_CASES[case]))
    return manifest


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_parse_fleet_accepts(case: str) -> None:
    parse_fleet(fleet(case))


@pytest.mark.e2e
def test_apiserver_accepts(cluster: Any, namespace: str) -> None:
    cluster.kubectl("apply", "-f", str(CRD / "inferencefleet.yaml"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/inferencefleets.inferencefleet.dev",
    )  # fmt: skip
    documents = [fleet(case, namespace) for case in sorted(EDGE_CASES)]
    out = cluster.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(documents), check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(server dry run)") == len(EDGE_CASES), out.stdout
