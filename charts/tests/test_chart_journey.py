"""The README's Kubernetes journey on the test cluster: install, apply, scale, edit, uninstall."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2ecluster.nvidia import default_lag

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "inferencefleet"
EXAMPLE = ROOT / "examples" / "fleet.yaml"
RELEASE = "inferencefleet"

ADA = "NVIDIA-RTX-6000-Ada-Generation"
# Feature discovery appends -SHARED to the product label of a node whose GPUs are shared.
ADA_LABELS = (ADA, f"{ADA}-SHARED")
CRD_NAME = "inferencefleets.inferencefleet.dev"
CLAIMS_ANNOTATION = "inferencefleet.dev/claimed-by"  # the fleets ("ns/name,...") holding a node


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return dict(cond)
    return {}


def is_ready(obj: dict[str, Any], replicas: int) -> bool:
    status = obj.get("status", {})
    return (
        condition(obj, "Ready").get("status") == "True"
        and status.get("observedGeneration") == obj["metadata"]["generation"]
        and status.get("replicas") == replicas
        and status.get("readyReplicas") == replicas
    )


def test_lint_and_server_side_dry_run(cluster: Any, namespace: str) -> None:
    """Step 1: the chart lints strictly and every rendered object passes the real apiserver."""
    lint = cluster.helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in lint.stdout
    rendered = cluster.helm(
        "template", RELEASE, str(CHART), "--namespace", namespace, "--include-crds"
    ).stdout
    # No -n: every namespaced object names its namespace (the device plugin's Role lives in
    # nvidia-device-plugin, the rest in the release namespace).
    applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    lines = applied.stdout.splitlines()
    assert any(line.startswith("deployment.apps/inferencefleet ") for line in lines), lines
    assert any(f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME}" in ln for ln in lines)
    assert any(
        line.startswith("role.rbac.authorization.k8s.io/inferencefleet-device-plugin ")
        for line in lines
    ), lines
    assert all("(server dry run)" in line for line in lines), lines


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("logLevel=3", "at '/logLevel': got number, want string"),
        ("replicas=2", "additional properties 'replicas' not allowed"),
    ],
)
def test_install_with_bad_values_fails_with_the_schema_message(
    cluster: Any, namespace: str, flag: str, message: str
) -> None:
    out = cluster.helm("install", RELEASE, str(CHART), "-n", namespace, "--set", flag, check=False)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr
    assert message in out.stderr
    assert cluster.helm("list", "-n", namespace, "-q").stdout.strip() == ""


def test_journey(journey: Any, namespace: str, tmp_path: Path) -> None:
    """Steps 2-6, in order, as a user would run them (the README's Kubernetes section)."""
    j, ns = journey, namespace
    cluster = j.cluster
    cluster.kubectl(
        "label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted", "--overwrite"
    )
    with j.extra_namespace(f"{ns}-elsewhere") as elsewhere:
        try:
            # 2. install (it watches its own namespace by default), run the operator with the
            # chart's ServiceAccount (so its RBAC and admission policies apply), helm test.
            # The test cluster's ConfigMap volumes lag the API by seconds, not a minute.
            install = cluster.helm(
                "install", RELEASE, str(CHART), "-n", ns, "--wait", "--timeout", "120s",
                "--set", f"devicePlugin.configVolumeDelaySeconds={default_lag() + 3:g}",
            )  # fmt: skip
            notes = install.stdout.split("NOTES:", 1)[1]
            assert f"kubectl apply -n {ns} -f examples/fleet.yaml" in notes
            assert f"helm test {RELEASE} -n {ns}" in notes
            args = j.operator_args(ns, RELEASE)
            assert f"--namespace={ns}" in args
            assert "--all-namespaces" not in args
            with j.local_operator(ns, RELEASE, args, tmp_path / "op1") as operator:
                test = cluster.helm("test", RELEASE, "-n", ns, "--timeout", "120s")
                assert "Phase:          Succeeded" in test.stdout
                assert operator.healthy()

                # A fleet where the operator does not look: applied first, so that by the time
                # the watched fleet is Ready, this one has had every chance to be (wrongly) seen.
                cluster.kubectl("apply", "-n", elsewhere, "-f", str(EXAMPLE))

                # 3. apply the example fleet in the restricted namespace.
                cluster.kubectl("apply", "-n", ns, "-f", str(EXAMPLE))
                j.wait_until("detector Ready with 2", lambda: is_ready(j.fleet(ns), 2), timeout=180)
                # The nodes advertise the time-slicing profile a little after they are labelled.
                j.wait_until(
                    "detector's profile advertised (GPUSharing True)",
                    lambda: condition(j.fleet(ns), "GPUSharing").get("status") == "True",
                    timeout=180,
                )
                check_placement(j, ns, replicas=2)
                check_printer_columns(j, ns)
                check_left_alone(j, elsewhere)
                check_mps_example(j, ns)

                # 4. scale up, down, and past capacity.
                for replicas in (6, 1):
                    cluster.kubectl("scale", "-n", ns, "ifleet/detector", f"--replicas={replicas}")
                    j.wait_until(
                        f"detector Ready with {replicas}",
                        lambda r=replicas: is_ready(j.fleet(ns), r),
                        timeout=180,
                    )
                    assert len(j.fleet_pods(ns)) == replicas
                check_past_capacity(j, ns)
                cluster.kubectl("scale", "-n", ns, "ifleet/detector", "--replicas=2")
                j.wait_until("back to 2", lambda: is_ready(j.fleet(ns), 2), timeout=180)

                # 5. batching edits restart nothing; an image edit rolls out.
                check_batching_edit_keeps_pods(j, ns)
                check_image_edit_rolls_out(j, ns)

            # 6. upgrade with changed values; the operator comes back with the new flags.
            cluster.helm(
                "upgrade", RELEASE, str(CHART), "-n", ns, "--reuse-values",
                "--set", "logLevel=debug", "--set", "resources.limits.memory=384Mi",
                "--wait", "--timeout", "120s",
            )  # fmt: skip
            args = j.operator_args(ns, RELEASE)
            assert "--log-level=debug" in args
            deployment = json.loads(
                cluster.kubectl("get", "deployment", RELEASE, "-n", ns, "-o", "json").stdout
            )
            limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert limits["memory"] == "384Mi"
            history = json.loads(cluster.helm("history", RELEASE, "-n", ns, "-o", "json").stdout)
            assert [(h["revision"], h["status"]) for h in history][-1] == (2, "deployed")
            with j.local_operator(ns, RELEASE, args, tmp_path / "op2"):
                cluster.kubectl("patch", "-n", ns, "ifleet/detector", "--type=merge",
                                "-p", '{"spec":{"replicas":3}}')  # fmt: skip
                j.wait_until(
                    "upgraded operator reconciles", lambda: is_ready(j.fleet(ns), 3), timeout=180
                )
                # Fleets go before the operator: it removes their finalizers and gives nodes back.
                cluster.kubectl(
                    "delete", "-n", ns, "-f", str(EXAMPLE), "--wait=true", "--timeout=120s"
                )
                assert not claimed_nodes(j, f"{ns}/detector"), "nodes not given back"
            check_uninstall(j, ns)
            check_left_alone(j, elsewhere)
        finally:
            j.clean_up(ns, RELEASE, ns, elsewhere)


def claimed_nodes(j: Any, fleet_id: str) -> list[str]:
    """Nodes whose claims annotation names the fleet (namespace/name)."""
    nodes = json.loads(j.cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    return [
        n["metadata"]["name"]
        for n in nodes
        if fleet_id
        in (n["metadata"].get("annotations") or {}).get(CLAIMS_ANNOTATION, "").split(",")
    ]


def check_placement(j: Any, ns: str, replicas: int) -> None:
    """Worker pods run on RTX 6000 Ada nodes that advertise 4 slots per physical GPU."""
    pods = j.fleet_pods(ns)
    assert len(pods) == replicas
    nodes = {
        n["metadata"]["name"]: n
        for n in json.loads(j.cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    }
    for pod in pods:
        assert pod["status"]["phase"] == "Running", pod["metadata"]["name"]
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        node = nodes[pod["spec"]["nodeName"]]
        labels = node["metadata"]["labels"]
        assert labels["nvidia.com/gpu.product"] in ADA_LABELS
        assert labels["nvidia.com/gpu.replicas"] == "4"
        assert labels["nvidia.com/gpu.sharing-strategy"] == "time-slicing"
        gpus = int(labels["nvidia.com/gpu.count"])
        assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) == 4 * gpus
    status = j.fleet(ns)["status"]
    assert sum(p["pods"] for p in status["placement"]) == replicas
    held = claimed_nodes(j, f"{ns}/detector")
    assert {p["spec"]["nodeName"] for p in pods} <= set(held), held


def check_printer_columns(j: Any, ns: str) -> None:
    """`kubectl get ifleet` shows the CRD's printer columns; -o wide adds the priority-1 ones."""
    crd = yaml.safe_load((ROOT / "crds" / "inferencefleet.yaml").read_text())
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    table = j.cluster.kubectl("get", "ifleet", "-n", ns).stdout.splitlines()
    assert table[0].split() == ["NAME"] + [
        c["name"].upper() for c in columns if not c.get("priority")
    ]
    assert table[0].split()[:7] == [
        "NAME", "REPLICAS", "READY", "PRODUCT", "SHARING", "WORKERS/GPU", "MAXBATCH",
    ]  # fmt: skip
    assert table[1].split()[:7] == ["detector", "2", "2", ADA, "timeSlicing", "4", "8"]
    wide = j.cluster.kubectl("get", "ifleet", "-n", ns, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME"] + [c["name"].upper() for c in columns]
    assert "builtin:resnet18" in wide[1].split()
    assert "AllWorkersReady" in wide[1].split()


def check_mps_example(j: Any, ns: str) -> None:
    """examples/fleet-mps.yaml: Ready on the Blackwell node, its GPU shared through MPS."""
    mps = ROOT / "examples" / "fleet-mps.yaml"
    j.cluster.kubectl("apply", "-n", ns, "-f", str(mps))
    j.wait_until(
        "detector-mps Ready with 4", lambda: is_ready(j.fleet(ns, "detector-mps"), 4), timeout=180
    )
    for pod in j.fleet_pods(ns, "detector-mps"):
        node = json.loads(
            j.cluster.kubectl("get", "node", pod["spec"]["nodeName"], "-o", "json").stdout
        )
        labels = node["metadata"]["labels"]
        assert labels["nvidia.com/gpu.product"].startswith("NVIDIA-RTX-PRO-6000-Blackwell")
        assert labels["nvidia.com/gpu.sharing-strategy"] == "mps"
        assert labels["nvidia.com/gpu.replicas"] == "4"
    j.cluster.kubectl("delete", "-n", ns, "-f", str(mps), "--wait=true", "--timeout=120s")


def check_left_alone(j: Any, elsewhere: str) -> None:
    """The fleet outside the watched namespaces has no status, finalizer or workers."""
    other = j.fleet(elsewhere)
    assert "status" not in other or not other["status"], other.get("status")
    assert not other["metadata"].get("finalizers"), other["metadata"].get("finalizers")
    owned = j.cluster.kubectl(
        "get", "deployments,services,configmaps", "-n", elsewhere, "-o", "json"
    )
    names = [o["metadata"]["name"] for o in json.loads(owned.stdout)["items"]]
    assert names == ["kube-root-ca.crt"], names


def check_past_capacity(j: Any, ns: str) -> None:
    """More replicas than the Ada nodes' slots: a capacity condition that gives the numbers."""
    nodes = json.loads(
        j.cluster.kubectl(
            "get",
            "nodes",
            "-l",
            f"nvidia.com/gpu.product in ({','.join(ADA_LABELS)})",
            "-o",
            "json",
        ).stdout
    )["items"]

    def open_to_fleets(node: dict[str, Any]) -> bool:  # the real node's taint keeps fleets off
        taints = node.get("spec", {}).get("taints") or []
        return not any(
            t.get("effect") in ("NoSchedule", "NoExecute") and t.get("key") != "nvidia.com/gpu"
            for t in taints
        )

    offered = sum(
        4 * int(n["metadata"]["labels"]["nvidia.com/gpu.count"]) for n in nodes if open_to_fleets(n)
    )
    wanted = offered + 1
    j.cluster.kubectl("scale", "-n", ns, "ifleet/detector", f"--replicas={wanted}")

    def short() -> dict[str, Any] | None:
        obj = j.fleet(ns)
        gpu = obj.get("status", {}).get("gpu", {})
        if (
            gpu.get("slotsNeeded") == wanted
            and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
        ):
            return obj
        return None

    obj = j.wait_until("capacity shortfall in status", short, timeout=120)
    assert obj["status"]["gpu"]["slotsAvailable"] == offered
    capacity = condition(obj, "GPUCapacity")
    assert (capacity["status"], capacity["reason"]) == ("False", "InsufficientGPUSlots")
    assert f"needs {wanted} GPU slots" in capacity["message"], capacity["message"]
    assert f"{offered} slots available" in capacity["message"], capacity["message"]
    assert condition(obj, "Ready")["status"] == "False"


def check_batching_edit_keeps_pods(j: Any, ns: str) -> None:
    before = sorted(p["metadata"]["uid"] for p in j.fleet_pods(ns))
    j.cluster.kubectl("patch", "-n", ns, "ifleet/detector", "--type=merge",
                    "-p", '{"spec":{"batching":{"maxBatchSize":16}}}')  # fmt: skip

    def applied() -> bool:
        out = j.cluster.kubectl(
            "get", "configmap", "detector-batching", "-n", ns,
            "-o", "jsonpath={.data.batching\\.json}",
        )  # fmt: skip
        return bool(json.loads(out.stdout)["maxBatchSize"] == 16) and is_ready(j.fleet(ns), 2)

    j.wait_until("maxBatchSize 16 in the fleet's ConfigMap", applied, timeout=120)
    after = sorted(p["metadata"]["uid"] for p in j.fleet_pods(ns))
    assert after == before, "a batching edit restarted worker pods"


def check_image_edit_rolls_out(j: Any, ns: str) -> None:
    image = "registry.example/inferencefleet-worker:rollout"
    before = {p["metadata"]["uid"] for p in j.fleet_pods(ns)}
    j.cluster.kubectl("patch", "-n", ns, "ifleet/detector", "--type=merge",
                    "-p", json.dumps({"spec": {"image": image}}))  # fmt: skip

    def rolled() -> bool:
        pods = j.fleet_pods(ns)
        return (
            len(pods) == 2
            and all(p["spec"]["containers"][0]["image"] == image for p in pods)
            and not before & {p["metadata"]["uid"] for p in pods}
            and is_ready(j.fleet(ns), 2)
        )

    j.wait_until(f"rollout to {image}", rolled, timeout=180)


def check_uninstall(j: Any, ns: str) -> None:
    j.cluster.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s")
    gone = {
        "deployment": ns,
        "serviceaccount": ns,
        "service": ns,
        "clusterrole": None,
        "clusterrolebinding": None,
        "validatingadmissionpolicy": None,
        "validatingadmissionpolicybinding": None,
    }
    for kind, where in gone.items():
        scope = ["-n", where] if where else []
        out = j.cluster.kubectl(
            "get", kind, *scope, "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name"
        ).stdout.strip()
        left = [line for line in out.splitlines() if RELEASE in line]
        assert left == [], f"{kind} left after uninstall: {left}"
    for namespaced in ("rolebinding", "role"):
        out = j.cluster.kubectl(
            "get", namespaced, "-A", "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name"
        ).stdout.strip()
        assert out == "", f"{namespaced} left after uninstall: {out}"
    # Helm never deletes a chart's crds/ on uninstall: the API and every fleet stay.
    assert j.cluster.kubectl("get", "crd", CRD_NAME, "-o", "name").stdout.strip()
