"""The operator runs with exactly operator/RBAC.md's rules and the chart's admission policies."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2ecluster.handle import wait_until

pytestmark = pytest.mark.e2e

RBAC_MD = Path(__file__).resolve().parents[1] / "RBAC.md"
CHART = Path(__file__).resolve().parents[2] / "charts" / "inferencefleet"
DEVICE_PLUGIN_NAMESPACE = "nvidia-device-plugin"


def documented_rules() -> dict[str, list[dict[str, Any]]]:
    """The YAML block at the end of RBAC.md."""
    blocks = re.findall(r"```yaml\n(.*?)```", RBAC_MD.read_text(encoding="utf-8"), re.DOTALL)
    rules: dict[str, list[dict[str, Any]]] = yaml.safe_load(blocks[-1])
    return rules


def test_rbac_document_has_every_part() -> None:
    rules = documented_rules()
    assert set(rules) == {"cluster", "namespaced", "devicePlugin"}
    verbs = {verb for part in rules.values() for rule in part for verb in rule["verbs"]}
    assert "*" not in verbs
    assert not any("secrets" in rule["resources"] for part in rules.values() for rule in part)


def _rbac_objects(namespace: str) -> list[dict[str, Any]]:
    rules = documented_rules()
    name = f"inferencefleet-operator-{namespace}"
    subject = [{"kind": "ServiceAccount", "name": "fleet-operator", "namespace": namespace}]

    def binding(kind: str, ns: str | None, role_kind: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name} | ({"namespace": ns} if ns else {})
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": kind,
            "metadata": meta,
            "subjects": subject,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
        }

    def role(kind: str, ns: str | None, part: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name} | ({"namespace": ns} if ns else {})
        return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
                "rules": rules[part]}  # fmt: skip

    account = {"name": "fleet-operator", "namespace": namespace}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": account},
        role("Role", namespace, "namespaced"),
        binding("RoleBinding", namespace, "Role"),
        role("ClusterRole", None, "cluster"),
        binding("ClusterRoleBinding", None, "ClusterRole"),
        role("Role", DEVICE_PLUGIN_NAMESPACE, "devicePlugin"),
        binding("RoleBinding", DEVICE_PLUGIN_NAMESPACE, "Role"),
    ]


def _token_kubeconfig(cluster: Any, namespace: str, path: Path) -> Path:
    token = cluster.kubectl("create", "token", "fleet-operator", "-n", namespace).stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text(encoding="utf-8"))
    context = admin["contexts"][0]["context"]
    admin["users"] = [{"name": "fleet-operator", "user": {"token": token}}]
    admin["contexts"] = [
        {
            "name": "fleet-operator",
            "context": {"cluster": context["cluster"], "user": "fleet-operator"},
        }
    ]
    admin["current-context"] = "fleet-operator"
    path.write_text(yaml.safe_dump(admin), encoding="utf-8")
    return path


def _admission_policies(cluster: Any, namespace: str) -> str:
    """The chart's admission policies, for this test's ServiceAccount (RBAC.md's last part)."""
    out = cluster.helm(
        "template", "documented-rbac", str(CHART), "--namespace", namespace,
        "--show-only", "templates/admission-policy.yaml",
        "--set", "serviceAccount.name=fleet-operator", "--set", "fullnameOverride=documented-rbac",
    )  # fmt: skip
    text: str = out.stdout
    assert "system:serviceaccount:" + namespace + ":fleet-operator" in text
    return text


def test_operator_works_with_only_the_documented_rbac(
    cluster: Any, namespace: str, start_operator: Any, tmp_path: Path
) -> None:
    objects = _rbac_objects(namespace)
    manifest = yaml.safe_dump_all(objects) + "---\n" + _admission_policies(cluster, namespace)
    cluster.kubectl("apply", "-f", "-", input=manifest)
    try:
        kubeconfig = _token_kubeconfig(cluster, namespace, tmp_path / "operator.kubeconfig")
        denied = cluster.kubectl(
            "--kubeconfig", str(kubeconfig), "get", "secrets", "-n", namespace, check=False
        )
        assert denied.returncode != 0  # the token is really the restricted one
        with start_operator(kubeconfig=kubeconfig) as operator:
            fleet = {
                "apiVersion": "inferencefleet.dev/v1alpha1",
                "kind": "InferenceFleet",
                "metadata": {"name": "restricted", "namespace": namespace},
                "spec": {
                    "replicas": 2,
                    "model": {"source": "builtin:tiny"},
                    "gpu": {
                        "product": "NVIDIA-RTX-6000-Ada-Generation",
                        "sharing": "timeSlicing",
                        "workersPerGPU": 2,
                    },
                },
            }
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(fleet))

            def ready() -> bool:
                out = cluster.kubectl("get", "ifleet", "restricted", "-n", namespace, "-o", "json")
                document = json.loads(out.stdout)
                conditions = (document.get("status") or {}).get("conditions") or []
                return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

            wait_until("the fleet Ready under the restricted operator", ready, timeout=90)
            cluster.kubectl("delete", "ifleet", "restricted", "-n", namespace, "--timeout=60s")
            output = operator.output()
            assert "Forbidden" not in output, output[-5000:]
            assert "403" not in output, output[-5000:]
    finally:
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=manifest, check=False)
