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
            "ClusterRole",  # nodes
            "ClusterRoleBinding",
            "Role",  # fleets and their workloads, in the release namespace
            "RoleBinding",
            "Role",  # the device plugin's ConfigMap
            "RoleBinding",
            "ClusterRole",  # aggregated into view
            "ClusterRole",  # aggregated into edit and admin
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
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
        "--namespace=ops",
        "--device-plugin-configmap=device-plugin-config",
        "--device-plugin-namespace=nvidia-device-plugin",
        "--config-volume-delay=90",
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
            "devicePlugin.configVolumeDelaySeconds=75",
            "--set",
            "workerDevice=cpu",
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
        "--config-volume-delay=75",
        "--worker-image=registry.example/worker:1.2.3",
        "--worker-device=cpu",
        "--liveness-port=9090",
        "--standalone",
        "--log-level=debug",
    ]


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def is_user_role(doc: dict[str, Any]) -> bool:
    """The ClusterRoles aggregated into view/edit/admin: for people, not the operator."""
    return any(key.startswith(AGGREGATE) for key in doc["metadata"].get("labels", {}))


def operator_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("ClusterRole", "Role") and not is_user_role(d)]


def rules_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for d in operator_roles(docs) for rule in d["rules"]]


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


def fleet_roles(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Roles with the fleet rights, by namespace."""
    return {
        d["metadata"]["namespace"]: d
        for d in only(docs, "Role")
        if d["metadata"]["name"] == "inferencefleet-fleets"
    }


def test_by_default_only_the_release_namespace_is_watched_through_a_role(render: Render) -> None:
    docs = render()
    assert set(fleet_roles(docs)) == {"ops"}
    bindings = {
        (b["metadata"]["namespace"], b["roleRef"]["kind"]) for b in only(docs, "RoleBinding")
    }
    assert ("ops", "Role") in bindings
    (cluster_role,) = operator_roles(only(docs, "ClusterRole"))
    assert cluster_role["metadata"]["name"] == "inferencefleet-cluster"
    assert grants(cluster_role["rules"]) == {
        ("", "nodes", verb, "") for verb in ("list", "watch", "patch")
    }
    cluster_bindings = [b["roleRef"]["name"] for b in only(docs, "ClusterRoleBinding")]
    assert cluster_bindings == ["inferencefleet-cluster"], "fleet rights must not be cluster-wide"


def test_watched_namespaces_get_roles_instead_of_a_cluster_binding(render: Render) -> None:
    docs = render("--set", "watchNamespaces={vision,video}")
    assert set(fleet_roles(docs)) == {"vision", "video"}
    role_ref = {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "inferencefleet-fleets",
    }
    bindings = {
        b["metadata"]["namespace"] for b in only(docs, "RoleBinding") if b["roleRef"] == role_ref
    }
    assert bindings == {"vision", "video"}
    cluster_bindings = [b["roleRef"]["name"] for b in only(docs, "ClusterRoleBinding")]
    assert cluster_bindings == ["inferencefleet-cluster"], "fleet rights must not be cluster-wide"


def test_watch_all_namespaces_is_an_explicit_choice(render: Render) -> None:
    docs = render("--set", "watchAllNamespaces=true", "--set", "watchNamespaces={vision}")
    assert operator_args(docs)[0] == "--all-namespaces"
    assert not [a for a in operator_args(docs) if a.startswith("--namespace")]
    assert not fleet_roles(docs)
    cluster_bindings = sorted(b["roleRef"]["name"] for b in only(docs, "ClusterRoleBinding"))
    assert cluster_bindings == ["inferencefleet-cluster", "inferencefleet-fleets"]


def test_device_plugin_role_is_scoped_to_its_configmap(render: Render) -> None:
    docs = render("--set", "devicePlugin.namespace=gpu-system")
    (role,) = [d for d in only(docs, "Role") if d["metadata"]["name"].endswith("-device-plugin")]
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
    docs = render(
        "--set", "rbac.create=false", "--set", "rbac.aggregateToDefaultRoles=false",
        "--set", "serviceAccount.create=false",
    )  # fmt: skip
    assert not only(docs, "Role")
    assert not only(docs, "ClusterRole")
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
    assert container["command"][-3:] == ["inferencefleet", "ops", "8080"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_helm_test_reaches_healthz_through_the_service_address_without_dns(
    render: Render,
) -> None:
    """The hook's script, run here: the address comes from the service-link variable the
    kubelet sets (no cluster DNS needed); a 200 passes, anything else fails."""
    import http.server
    import subprocess
    import sys
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        command = one(render(), "Job")["spec"]["template"]["spec"]["containers"][0]["command"]
        script = command[2]
        port = str(server.server_address[1])
        env = {"INFERENCEFLEET_SERVICE_HOST": "127.0.0.1"}
        ok = subprocess.run(
            [sys.executable, "-c", script, "inferencefleet", "ops", port],
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == f"http://127.0.0.1:{port}/healthz 200"
        elsewhere = subprocess.run(
            [sys.executable, "-c", script, "inferencefleet", "ops", "1"],
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert elsewhere.returncode != 0
    finally:
        server.shutdown()
        server.server_close()


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
    roles = {(d["kind"], d["metadata"]["name"]): d["rules"] for d in operator_roles(docs)}
    assert set(roles) == {
        ("ClusterRole", "inferencefleet-cluster"),
        ("Role", "inferencefleet-fleets"),
        ("Role", "inferencefleet-device-plugin"),
    }
    cluster = roles["ClusterRole", "inferencefleet-cluster"]
    assert grants(cluster) == without_peering(listed["cluster"])
    assert grants(roles["Role", "inferencefleet-fleets"]) == without_peering(listed["namespaced"])
    device_plugin = roles["Role", "inferencefleet-device-plugin"]
    assert grants(device_plugin) == without_peering(listed["devicePlugin"])
    assert "--standalone" in operator_args(docs)
    everywhere = render("--set", "watchAllNamespaces=true")
    cluster_wide = {d["metadata"]["name"]: d["rules"] for d in only(everywhere, "ClusterRole")}
    assert grants(cluster_wide["inferencefleet-fleets"]) == without_peering(listed["namespaced"])


def policies_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"] for d in only(docs, "ValidatingAdmissionPolicy")}


def test_admission_policies_bind_the_operator_service_account_only(render: Render) -> None:
    docs = render("--set", "serviceAccount.name=fleet-operator")
    policies = policies_of(docs)
    assert set(policies) == {"inferencefleet-workloads", "inferencefleet-nodes"}
    bindings = {
        b["spec"]["policyName"]: b["spec"]["validationActions"]
        for b in only(docs, "ValidatingAdmissionPolicyBinding")
    }
    assert bindings == {name: ["Deny"] for name in policies}
    for spec in policies.values():
        assert spec["failurePolicy"] == "Fail"
        assert spec["matchConditions"] == [
            {
                "name": "is-the-operator",
                "expression": "request.userInfo.username == "
                "'system:serviceaccount:ops:fleet-operator'",
            }
        ]
    assert not policies_of(render("--set", "admissionPolicy.enabled=false"))


def test_admission_policies_use_the_names_the_operator_gives_things(render: Render) -> None:
    """The label, annotation and owner names in the policies are fleet_operator.names' own."""
    from fleet_operator import names
    from fleet_spec.spec import GROUP, KIND

    policies = policies_of(render("--set", "devicePlugin.configMapName=sharing"))
    workloads = json.dumps(policies["inferencefleet-workloads"])
    assert f"[?'{names.MANAGED_BY}'].orValue('') == '{names.MANAGED_BY_VALUE}'" in workloads
    assert f"r.apiVersion.startsWith('{GROUP}/') && r.kind == '{KIND}'" in workloads
    assert names.owner_reference({"name": "f", "uid": "u"})["controller"] is True
    assert "object.metadata.name == 'sharing'" in workloads
    nodes = json.dumps(policies["inferencefleet-nodes"])
    for key in (names.PROFILE_LABEL, names.CLAIMS_ANNOTATION):
        assert key.startswith(f"{GROUP}/"), key
    assert nodes.count(f"k.startsWith('{GROUP}/')") == 4  # labels and annotations, both ways
    assert nodes.count(f"k == '{names.DEVICE_PLUGIN_LABEL}'") == 2  # labels only


def test_the_device_plugin_namespace_cannot_be_watched(offline_helm: Helm) -> None:
    out = offline_helm(
        "template", "inferencefleet", str(CHART),
        "--set", "watchNamespaces={vision,nvidia-device-plugin}", check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "devicePlugin.namespace nvidia-device-plugin must not be a watched namespace" in (
        out.stderr
    )


def test_user_roles_aggregate_into_view_edit_and_admin(render: Render) -> None:
    roles = {d["metadata"]["name"]: d for d in only(render(), "ClusterRole") if is_user_role(d)}
    assert set(roles) == {"inferencefleet-view", "inferencefleet-edit"}

    def aggregates(name: str) -> set[str]:
        labels = roles[name]["metadata"]["labels"]
        return {k.removeprefix(AGGREGATE) for k, v in labels.items() if k.startswith(AGGREGATE)}

    assert aggregates("inferencefleet-view") == {"view", "edit", "admin"}
    assert aggregates("inferencefleet-edit") == {"edit", "admin"}
    view = grants(roles["inferencefleet-view"]["rules"])
    assert {verb for _, _, verb, _ in view} == {"get", "list", "watch"}
    edit = grants(roles["inferencefleet-edit"]["rules"])
    assert ("inferencefleet.dev", "inferencefleets", "create", "") in edit
    assert ("inferencefleet.dev", "inferencefleets/scale", "update", "") in edit
    assert not [g for g in edit if g[1] in ("inferencefleets/status", "inferencefleets/finalizers")]
    assert not [d for d in render("--set", "rbac.aggregateToDefaultRoles=false") if is_user_role(d)]


def test_the_device_plugin_configmap_is_made_only_when_asked_with_its_default_key(
    render: Render,
) -> None:
    assert only(render(), "ConfigMap") == []
    made = one(
        render(
            "--set",
            "devicePlugin.createConfigMap=true",
            "--set",
            "devicePlugin.configMapName=sharing",
            "--set",
            "devicePlugin.namespace=gpu-operator",
        ),
        "ConfigMap",
    )
    assert (made["metadata"]["name"], made["metadata"]["namespace"]) == ("sharing", "gpu-operator")
    assert made["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    default = yaml.safe_load(made["data"]["default"])
    assert default == {"version": "v1", "flags": {"migStrategy": "none"}}  # shares nothing
