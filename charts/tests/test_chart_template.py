"""What `helm template` and `helm lint` make of the chart, offline (no cluster)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "inferencefleet"
Render = Callable[..., list[dict[str, Any]]]
Helm = Callable[..., Any]

pytestmark = pytest.mark.integration

# Every verb the operator may be granted: no delete (children go by garbage collection), and
# nothing like escalate, bind, impersonate or *.
ALLOWED_VERBS = {"get", "list", "watch", "create", "patch", "update"}


def only(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = only(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_args(docs: list[dict[str, Any]]) -> list[str]:
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args: list[str] = container["args"]
    return args


def test_lint_strict_passes(offline_helm: Helm) -> None:
    out = offline_helm("lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_default_render_has_the_operator_and_its_rbac(render: Render) -> None:
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
            "Job",
        ]
    )
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["name"] == "inferencefleet"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "inferencefleet",
        "app.kubernetes.io/instance": "inferencefleet",
        "app.kubernetes.io/component": "operator",
    }


def test_operator_pod_meets_pod_security_restricted(render: Render) -> None:
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["serviceAccountName"] == "inferencefleet"
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    probe = container["livenessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz", "health")
    assert container["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]


def test_operator_flags_follow_the_values(render: Render) -> None:
    assert operator_args(render()) == [
        "--all-namespaces",
        "--device-plugin-configmap=device-plugin-config",
        "--device-plugin-namespace=nvidia-device-plugin",
        "--worker-image=ghcr.io/inferencefleet/worker:0.1.0",
        "--liveness-port=8080",
        "--standalone",
        "--log-level=info",
    ]
    args = operator_args(
        render(
            "--set",
            "watchNamespaces={vision,video}",
            "--set",
            "devicePlugin.configMapName=sharing",
            "--set",
            "devicePlugin.namespace=gpu-system",
            "--set",
            "workerImage.repository=registry.example/worker",
            "--set",
            "workerImage.tag=1.2.3",
            "--set",
            "logLevel=debug",
            "--set",
            "healthPort=9090",
        )
    )
    assert args == [
        "--namespace=vision",
        "--namespace=video",
        "--device-plugin-configmap=sharing",
        "--device-plugin-namespace=gpu-system",
        "--worker-image=registry.example/worker:1.2.3",
        "--liveness-port=9090",
        "--standalone",
        "--log-level=debug",
    ]


def rules_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for d in docs if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]]


def test_rbac_has_no_wildcards_no_secrets_and_only_known_verbs(render: Render) -> None:
    rules = rules_of(render())
    assert rules, "no RBAC rules rendered"
    for rule in rules:
        fields = rule["apiGroups"] + rule["resources"] + rule["verbs"]
        assert "*" not in fields, rule
        assert "secrets" not in rule["resources"], rule
        assert set(rule["verbs"]) <= ALLOWED_VERBS, rule
        if "update" in rule["verbs"]:
            assert rule["resources"] == ["inferencefleets/finalizers"], rule


def test_watched_namespaces_get_role_bindings_instead_of_a_cluster_binding(render: Render) -> None:
    docs = render("--set", "watchNamespaces={vision,video}")
    bindings = only(docs, "RoleBinding")
    fleet_bindings = {
        b["metadata"]["namespace"] for b in bindings if b["roleRef"]["kind"] == "ClusterRole"
    }
    assert fleet_bindings == {"vision", "video"}
    cluster_bindings = [b["roleRef"]["name"] for b in only(docs, "ClusterRoleBinding")]
    assert cluster_bindings == ["inferencefleet-cluster"], "fleet rights must not be cluster-wide"


def test_device_plugin_role_is_scoped_to_its_configmap(render: Render) -> None:
    role = one(render("--set", "devicePlugin.namespace=gpu-system"), "Role")
    assert role["metadata"]["namespace"] == "gpu-system"
    named = [r for r in role["rules"] if "resourceNames" in r]
    assert named == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["device-plugin-config"],
            "verbs": ["get", "patch"],
        }
    ]


def test_rbac_can_be_left_to_the_cluster_admin(render: Render) -> None:
    docs = render("--set", "rbac.create=false", "--set", "serviceAccount.create=false")
    assert not rules_of(docs)
    assert not only(docs, "ServiceAccount")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "default"


def test_monitoring_is_off_by_default_and_needs_the_prometheus_operator_api(
    render: Render,
) -> None:
    monitoring_kinds = {"PodMonitor", "ServiceMonitor"}
    assert not [d for d in render() if d["kind"] in monitoring_kinds]
    without_api = render("--set", "monitoring.enabled=true")
    assert not [d for d in without_api if d["kind"] in monitoring_kinds]
    with_api = render(
        "--set", "monitoring.enabled=true", "--api-versions", "monitoring.coreos.com/v1"
    )
    monitor = one(with_api, "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    assert {"targetLabel": "fleet"}.items() <= endpoint["relabelings"][0].items()


def test_dashboard_configmap_carries_the_dashboard_for_the_grafana_sidecar(
    render: Render,
) -> None:
    assert not [d for d in render() if d["kind"] == "ConfigMap"]
    config_map = one(render("--set", "monitoring.dashboard.enabled=true"), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["inferencefleet.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "inferencefleet.json").read_text())


def test_helm_test_hook_is_a_job_that_calls_healthz(render: Render) -> None:
    job = one(render(), "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "http://inferencefleet.ops.svc:8080/healthz"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("logLevel=3", "logLevel"),
        ("healthPort=high", "healthPort"),
        ("replicas=2", "replicas"),
        ("image.tagg=1", "tagg"),
    ],
)
def test_schema_errors_stop_helm_before_rendering(
    offline_helm: Helm, flag: str, expected: str
) -> None:
    out = offline_helm("template", "inferencefleet", str(CHART), "--set", flag, check=False)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr
    assert expected in out.stderr


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    """(apiGroup, resource, verb, resourceName) for every combination a rule list allows."""
    return {
        (group, resource, verb, name)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames", [""])
    }


def test_rbac_is_what_operator_rbac_md_lists_for_a_standalone_operator(render: Render) -> None:
    """The chart runs the operator --standalone: RBAC.md's rules minus kopf's peering rows."""
    text = (CHART.parents[1] / "operator" / "RBAC.md").read_text()
    block = text.split("## The rules, in machine form", 1)[1].split("```yaml", 1)[1]
    listed = yaml.safe_load(block.split("```", 1)[0])

    def without_peering(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
        return {g for g in grants(rules) if g[0] != "kopf.dev"}

    docs = render()
    roles = {d["metadata"]["name"]: d["rules"] for d in only(docs, "ClusterRole")}
    assert grants(roles["inferencefleet-cluster"]) == without_peering(listed["cluster"])
    assert grants(roles["inferencefleet-fleets"]) == without_peering(listed["namespaced"])
    device_plugin = one(docs, "Role")["rules"]
    assert grants(device_plugin) == without_peering(listed["devicePlugin"])
    assert "--standalone" in operator_args(docs)
