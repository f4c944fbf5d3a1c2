"""kubectl auth can-i as the operator's ServiceAccount: what it needs, and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

CHART = Path(__file__).resolve().parents[2] / "charts" / "inferencefleet"
RELEASE = "inferencefleet"
DEVICE_PLUGIN_NS = "nvidia-device-plugin"

# (verb, resource[/name][#subresource], where): where is "watched", "elsewhere", "kube-system",
# "device-plugin" or "cluster".
ALLOWED = [
    ("list", "inferencefleets.inferencefleet.dev", "watched"),
    ("watch", "inferencefleets.inferencefleet.dev", "watched"),
    ("patch", "inferencefleets.inferencefleet.dev", "watched"),
    ("patch", "inferencefleets.inferencefleet.dev#status", "watched"),
    ("update", "inferencefleets.inferencefleet.dev#finalizers", "watched"),
    ("list", "deployments.apps", "watched"),
    ("watch", "deployments.apps", "watched"),
    ("create", "deployments.apps", "watched"),
    ("patch", "deployments.apps", "watched"),
    ("list", "services", "watched"),
    ("watch", "services", "watched"),
    ("create", "services", "watched"),
    ("patch", "services", "watched"),
    ("list", "configmaps", "watched"),
    ("watch", "configmaps", "watched"),
    ("create", "configmaps", "watched"),
    ("patch", "configmaps", "watched"),
    ("list", "poddisruptionbudgets.policy", "watched"),
    ("watch", "poddisruptionbudgets.policy", "watched"),
    ("create", "poddisruptionbudgets.policy", "watched"),
    ("patch", "poddisruptionbudgets.policy", "watched"),
    ("list", "pods", "watched"),
    ("watch", "pods", "watched"),
    ("create", "events", "watched"),
    ("list", "nodes", "cluster"),
    ("watch", "nodes", "cluster"),
    ("patch", "nodes", "cluster"),
    ("get", "configmaps/device-plugin-config", "device-plugin"),
    ("patch", "configmaps/device-plugin-config", "device-plugin"),
    ("create", "configmaps", "device-plugin"),
]
DENIED = [
    # Secrets, anywhere.
    ("get", "secrets", "watched"),
    ("list", "secrets", "watched"),
    ("list", "secrets", "cluster"),
    ("get", "secrets", "device-plugin"),
    # Anything outside the watched namespaces, and fleets across all namespaces.
    ("list", "inferencefleets.inferencefleet.dev", "elsewhere"),
    ("list", "inferencefleets.inferencefleet.dev", "cluster"),
    ("create", "deployments.apps", "elsewhere"),
    ("patch", "deployments.apps", "kube-system"),
    ("create", "services", "kube-system"),
    ("patch", "configmaps", "elsewhere"),
    ("create", "configmaps", "kube-system"),
    ("create", "poddisruptionbudgets.policy", "kube-system"),
    ("list", "pods", "elsewhere"),
    # Verbs the operator never uses in its own namespaces (children go by garbage collection).
    ("delete", "inferencefleets.inferencefleet.dev", "watched"),
    ("update", "inferencefleets.inferencefleet.dev#scale", "watched"),
    ("delete", "deployments.apps", "watched"),
    ("get", "configmaps", "watched"),
    ("delete", "services", "watched"),
    ("create", "pods", "watched"),
    ("create", "pods#exec", "watched"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "watched"),
    # The device plugin's namespace: only its ConfigMap, only get and patch.
    ("get", "configmaps/other-config", "device-plugin"),
    ("update", "configmaps/device-plugin-config", "device-plugin"),
    ("delete", "configmaps/device-plugin-config", "device-plugin"),
    # Cluster-wide things it does not need.
    ("get", "nodes", "cluster"),
    ("delete", "nodes", "cluster"),
    ("list", "namespaces", "cluster"),
    ("create", "namespaces", "cluster"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", "cluster"),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", "cluster"),
    ("create", "clusterroles.rbac.authorization.k8s.io", "cluster"),
    ("impersonate", "serviceaccounts", "cluster"),
    ("*", "*", "cluster"),
]


def can_i(cluster: Any, who: str, verb: str, resource: str, namespace: str | None) -> bool:
    scope = ["-n", namespace] if namespace else ["--all-namespaces"]
    resource, _, sub = resource.partition("#")
    extra = [f"--subresource={sub}"] if sub else []
    out = cluster.kubectl(
        "auth", "can-i", verb, resource, *extra, f"--as={who}", *scope, check=False
    )
    answer = out.stdout.strip()
    assert answer in ("yes", "no"), out.stderr
    return answer == "yes"


def test_service_account_can_do_exactly_what_the_operator_needs(
    cluster: Any, namespace: str
) -> None:
    elsewhere = f"{namespace}-elsewhere"
    cluster.kubectl("create", "namespace", elsewhere)
    try:
        # The defaults: the release namespace is the one watched.
        cluster.helm("install", RELEASE, str(CHART), "-n", namespace)
        who = f"system:serviceaccount:{namespace}:{RELEASE}"
        where = {
            "watched": namespace,
            "elsewhere": elsewhere,
            "kube-system": "kube-system",
            "device-plugin": DEVICE_PLUGIN_NS,
            "cluster": None,
        }
        wrong = [
            f"{'denied' if allowed else 'allowed'}: {verb} {resource} in {place}"
            for rows, allowed in ((ALLOWED, True), (DENIED, False))
            for verb, resource, place in rows
            if can_i(cluster, who, verb, resource, where[place]) != allowed
        ]
        assert wrong == []
    finally:
        cluster.helm("uninstall", RELEASE, "-n", namespace, check=False)
        cluster.kubectl("delete", "namespace", elsewhere, "--wait=false", check=False)
