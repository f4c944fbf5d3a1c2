"""The chart's admission policies and view/edit/admin roles, enforced by the real apiserver."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml
from e2ecluster.handle import wait_until
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.e2e

CHART = Path(__file__).resolve().parents[2] / "charts" / "inferencefleet"
EXAMPLE = CHART.parents[1] / "examples" / "fleet.yaml"
RELEASE = "inferencefleet"
DEVICE_PLUGIN_NS = "nvidia-device-plugin"
DEVICE_PLUGIN_CONFIGMAP = "device-plugin-config"

NOT_MANAGED = "the InferenceFleet operator may write only objects it manages"
ONLY_TUNE_JOBS = "may run only `inferencefleet tune` in a Job"
NOT_THE_DEVICE_PLUGIN_CONFIGMAP = (
    f"the InferenceFleet operator may write only the ConfigMap {DEVICE_PLUGIN_CONFIGMAP} "
    f"in namespace {DEVICE_PLUGIN_NS}"
)
NODE_LABELS = "the InferenceFleet operator may change only the node labels inferencefleet.dev/*"
NODE_ANNOTATIONS = "may change only the node annotations inferencefleet.dev/*"
NODE_SPEC = "the InferenceFleet operator may not change a node's spec"


@pytest.fixture
def installed(cluster: Any, namespace: str) -> Iterator[str]:
    """The chart with its defaults in `namespace`; yields the operator's user name."""
    cluster.helm("install", RELEASE, str(CHART), "-n", namespace)
    try:
        yield f"system:serviceaccount:{namespace}:{RELEASE}"
    finally:
        cluster.helm("uninstall", RELEASE, "-n", namespace, "--wait", check=False)


def test_policies_compile_without_type_warnings(cluster: Any, installed: str) -> None:
    """The apiserver type-checks each expression against the matched kinds' schemas."""

    def checked() -> list[dict[str, Any]] | None:
        out = cluster.kubectl(
            "get", "validatingadmissionpolicies", "-l", f"app.kubernetes.io/instance={RELEASE}",
            "-o", "json",
        )  # fmt: skip
        items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
        done = [
            p for p in items
            if p.get("status", {}).get("observedGeneration") == p["metadata"]["generation"]
        ]  # fmt: skip
        return items if len(items) == 2 and len(done) == 2 else None

    policies = wait_until("both policies type-checked", checked, timeout=60)
    warnings = {
        p["metadata"]["name"]: p["status"].get("typeChecking", {}).get("expressionWarnings")
        for p in policies
    }
    assert warnings == {f"{RELEASE}-workloads": None, f"{RELEASE}-nodes": None}


def as_user(
    cluster: Any, who: str, *args: str, manifest: dict[str, Any] | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl as `who`, changing nothing (server-side dry run: admission runs, storage not)."""
    stdin = yaml.safe_dump(manifest) if manifest is not None else None
    return cluster.kubectl(f"--as={who}", *args, "--dry-run=server", input=stdin, check=False)


def refused(out: subprocess.CompletedProcess[str], message: str) -> bool:
    return out.returncode != 0 and message in out.stderr


def workload(kind: str, name: str, namespace: str, *, managed: bool, owned: bool) -> dict[str, Any]:
    """A child object as the operator renders one, or a stranger's (no label, no owner)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if managed:
        meta["labels"] = {"app.kubernetes.io/managed-by": "inferencefleet-operator"}
    if owned:
        meta["ownerReferences"] = [
            {
                "apiVersion": "inferencefleet.dev/v1alpha1",
                "kind": "InferenceFleet",
                "name": name,
                "uid": "00000000-0000-4000-8000-000000000001",
                "controller": True,
            }
        ]
    if kind == "ConfigMap":
        return {"apiVersion": "v1", "kind": kind, "metadata": meta, "data": {"k": "v"}}
    selector = {"matchLabels": {"inferencefleet.dev/fleet": name}}
    template = {
        "metadata": {"labels": {"inferencefleet.dev/fleet": name}},
        "spec": {"containers": [{"name": "worker", "image": "registry.example/worker:1"}]},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": meta,
        "spec": {"replicas": 1, "selector": selector, "template": template},
    }


def tune_job(deployment_like: dict[str, Any]) -> dict[str, Any]:
    """workload()'s object as a Job running `inferencefleet tune` (as the operator renders)."""
    template = deployment_like["spec"]["template"]
    template["spec"]["restartPolicy"] = "Never"
    template["spec"]["containers"][0]["command"] = ["inferencefleet", "tune"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": deployment_like["metadata"],
        "spec": {"backoffLimit": 0, "template": template},
    }


def apply(cluster: Any, who: str, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return as_user(
        cluster, who, "apply", "--server-side", "--field-manager=inferencefleet-operator",
        "-f", "-", manifest=manifest,
    )  # fmt: skip


def test_policy_refuses_the_operator_what_it_does_not_manage(
    cluster: Any, namespace: str, installed: str
) -> None:
    who, ns = installed, namespace
    stranger = workload("Deployment", "stranger", ns, managed=False, owned=False)
    # The policy takes effect a moment after it is created; RBAC alone would allow this.
    wait_until(
        "the admission policy refuses an unmanaged Deployment",
        lambda: refused(apply(cluster, who, stranger), NOT_MANAGED),
        timeout=60,
    )
    for name, managed, owned in (("unowned", True, False), ("unlabelled", False, True)):
        out = apply(cluster, who, workload("ConfigMap", name, ns, managed=managed, owned=owned))
        assert refused(out, NOT_MANAGED), (name, out.stderr)
    # What the operator renders passes: its label, and an InferenceFleet as controlling owner.
    for kind in ("Deployment", "ConfigMap"):
        out = apply(cluster, who, workload(kind, "mine", ns, managed=True, owned=True))
        assert out.returncode == 0, out.stderr

    # A Job: only `inferencefleet tune` (spec.tune), managed and owned like any child.
    for command, allowed in ((["inferencefleet", "tune"], True), (["sh", "-c", "id"], False)):
        job = tune_job(workload("Job", f"job-{allowed}".lower(), ns, managed=True, owned=True))
        job["spec"]["template"]["spec"]["containers"][0]["command"] = command
        out = apply(cluster, who, job)
        if allowed:
            assert out.returncode == 0, out.stderr
        else:
            assert refused(out, ONLY_TUNE_JOBS), out.stderr
    out = apply(cluster, who, tune_job(workload("Job", "bare", ns, managed=False, owned=False)))
    assert refused(out, NOT_MANAGED), out.stderr

    # Someone else's ConfigMap of the same name is not adopted by labelling it.
    cluster.kubectl("create", "configmap", "theirs", "-n", ns, "--from-literal=k=v")
    out = apply(cluster, who, workload("ConfigMap", "theirs", ns, managed=True, owned=True))
    assert refused(out, NOT_MANAGED), out.stderr

    # In the device plugin's namespace: its sharing ConfigMap, and nothing else (RBAC lets
    # the operator create ConfigMaps there, since create cannot be limited by name).
    other = workload("ConfigMap", "other-config", DEVICE_PLUGIN_NS, managed=True, owned=True)
    out = as_user(cluster, who, "create", "-f", "-", manifest=other)
    assert refused(out, NOT_THE_DEVICE_PLUGIN_CONFIGMAP), out.stderr
    sharing = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": DEVICE_PLUGIN_CONFIGMAP, "namespace": DEVICE_PLUGIN_NS},
        "data": {"admission-probe": "version: v1\n"},
    }
    out = apply(cluster, who, sharing)
    assert out.returncode == 0, out.stderr


def gpu_node(cluster: Any) -> str:
    out = cluster.kubectl("get", "nodes", "-l", "nvidia.com/gpu.product", "-o", "name")
    return str(out.stdout.split()[0])


def test_policy_lets_the_operator_change_only_its_own_node_keys(
    cluster: Any, installed: str
) -> None:
    who, node = installed, gpu_node(cluster)

    def patch(body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        # A merge patch sent straight to the API as `who` (server-side dry run): kubectl patch
        # reads the node first, and the operator's RBAC has list and watch on nodes, not get.
        client = kubernetes.client.ApiClient(cluster.api.configuration)
        client.set_default_header("Impersonate-User", who)
        try:
            kubernetes.client.CoreV1Api(client).patch_node(
                node.removeprefix("node/"),
                body,
                dry_run="All",
                _content_type="application/merge-patch+json",
            )
        except ApiException as error:
            return subprocess.CompletedProcess([], 1, "", str(error.body))
        finally:
            client.close()
        return subprocess.CompletedProcess([], 0, "", "")

    product = {"metadata": {"labels": {"nvidia.com/gpu.product": "NVIDIA-H100"}}}
    wait_until(
        "the admission policy refuses another node label",
        lambda: refused(patch(product), NODE_LABELS),
        timeout=60,
    )
    removal = {"metadata": {"labels": {"nvidia.com/gpu.count": None}}}
    assert refused(patch(removal), NODE_LABELS)
    foreign = {"metadata": {"annotations": {"example.com/owner": "me"}}}
    assert refused(patch(foreign), NODE_ANNOTATIONS)
    assert refused(patch({"spec": {"unschedulable": True}}), NODE_SPEC)
    taint = {"spec": {"taints": [{"key": "x", "value": "y", "effect": "NoSchedule"}]}}
    assert refused(patch(taint), NODE_SPEC)
    # The operator's own claim: profile label, the device plugin's switch, claims annotation.
    claim = {
        "metadata": {
            "labels": {
                "inferencefleet.dev/gpu-profile": "timeslicing-4",
                "nvidia.com/device-plugin.config": "timeslicing-4",
            },
            "annotations": {"inferencefleet.dev/claimed-by": "vision/detector"},
        }
    }
    out = patch(claim)
    assert out.returncode == 0, out.stderr


def test_watching_every_namespace_still_keeps_the_operator_to_its_own_objects(
    cluster: Any, namespace: str, installed: str
) -> None:
    """Cluster-wide RBAC would let it write Deployments in kube-system; the policy does not."""
    cluster.helm(
        "upgrade", RELEASE, str(CHART), "-n", namespace, "--reuse-values",
        "--set", "watchAllNamespaces=true",
    )  # fmt: skip
    who = installed
    wait_until(  # RBAC grants it (once the apiserver's authorizer has the new binding) ...
        "RBAC to grant Deployments in kube-system",
        lambda: can_i(cluster, who, "create", "deployments.apps", "kube-system"),
        timeout=30,
    )
    stranger = workload("Deployment", "stranger", "kube-system", managed=False, owned=False)
    wait_until(  # ... and the policy refuses it
        "the admission policy refuses a Deployment in kube-system",
        lambda: refused(apply(cluster, who, stranger), NOT_MANAGED),
        timeout=60,
    )


def can_i(cluster: Any, who: str, verb: str, resource: str, namespace: str, sub: str = "") -> bool:
    extra = [f"--subresource={sub}"] if sub else []
    out = cluster.kubectl(
        "auth", "can-i", verb, resource, *extra, f"--as={who}", "-n", namespace, check=False
    )
    answer = out.stdout.strip()
    assert answer in ("yes", "no"), out.stderr
    return answer == "yes"


def test_view_edit_and_admin_users_get_fleet_rights_by_aggregation(
    cluster: Any, namespace: str, installed: str
) -> None:
    ns = namespace
    users = {"viewer": "view", "editor": "edit", "owner": "admin"}
    for user, role in users.items():
        cluster.kubectl(
            "create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}", f"--user={user}",
            "-n", ns,
        )  # fmt: skip
    fleets = "inferencefleets.inferencefleet.dev"
    # The clusterrole-aggregation controller copies the rules in a moment after install.
    wait_until(
        "edit and admin aggregate the fleet rules",
        lambda: (
            can_i(cluster, "editor", "create", fleets, ns)
            and can_i(cluster, "owner", "create", fleets, ns)
        ),
        timeout=60,
    )
    assert can_i(cluster, "viewer", "get", fleets, ns)
    assert can_i(cluster, "viewer", "watch", fleets, ns)
    assert not can_i(cluster, "viewer", "create", fleets, ns)
    assert can_i(cluster, "viewer", "get", fleets, ns, sub="scale")
    assert not can_i(cluster, "viewer", "patch", fleets, ns, sub="scale")
    assert can_i(cluster, "editor", "patch", fleets, ns, sub="scale")
    assert not can_i(cluster, "editor", "patch", fleets, ns, sub="status")
    assert not can_i(cluster, "owner", "patch", fleets, ns, sub="status")
    assert can_i(cluster, "owner", "delete", fleets, ns)

    # The real requests, not only the authorizer's answer.
    cluster.kubectl("apply", "-n", ns, "-f", str(EXAMPLE))
    assert "detector" in cluster.kubectl("--as=viewer", "get", "ifleet", "-n", ns).stdout
    denied = cluster.kubectl(
        "--as=viewer", "scale", "ifleet/detector", "--replicas=3", "-n", ns, check=False
    )
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr
    fleet = yaml.safe_load(EXAMPLE.read_text())
    fleet["metadata"] = {"name": "by-editor", "namespace": ns}
    cluster.kubectl("--as=editor", "apply", "-f", "-", input=yaml.safe_dump(fleet))
    cluster.kubectl("--as=editor", "scale", "ifleet/by-editor", "--replicas=3", "-n", ns)
    cluster.kubectl("--as=owner", "delete", "ifleet", "--all", "-n", ns, "--wait=false")
