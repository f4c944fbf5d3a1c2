"""The chart on the real node: the operator image runs in a pod, reached through its Service."""

from __future__ import annotations

import datetime
import json
import os
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from e2ecluster import realnode
from e2ecluster.handle import Cluster, wait_until

pytestmark = pytest.mark.e2e

CHART = Path(__file__).resolve().parents[2] / "charts" / "inferencefleet"
RELEASE = "fleet-ops"


def pin_to_real_node(cluster: Cluster, namespace: str) -> None:
    """Every pod of `namespace` goes to the real node and passes Pod Security `restricted`
    (the PodNodeSelector and PodTolerationRestriction admission plugins, as an admin would
    dedicate nodes to a team)."""
    if not cluster.state.real_node:
        if os.environ.get("INFERENCEFLEET_REAL_NODE") == "1":
            pytest.fail("INFERENCEFLEET_REAL_NODE=1 but the cluster has no real node")
        pytest.skip(
            f"this cluster has no real node ({realnode.unavailable() or 'claimed elsewhere'})"
        )
    toleration = [{"key": realnode.TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}]
    cluster.kubectl(
        "annotate",
        "namespace",
        namespace,
        f"scheduler.alpha.kubernetes.io/node-selector=kubernetes.io/hostname={realnode.NODE_NAME}",
        f"scheduler.alpha.kubernetes.io/defaultTolerations={json.dumps(toleration)}",
    )
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    return json.loads(out)["items"]  # type: ignore[no-any-return]


def test_operator_image_runs_in_cluster_behind_its_service(
    cluster: Cluster, namespace: str
) -> None:
    pin_to_real_node(cluster, namespace)
    ref = realnode.ensure_image(cluster.state.dir, "operator")
    # The chart's default image, unchanged: the node has it under that name.
    values = json.loads(
        cluster.helm("show", "values", str(CHART), "-o", "json", check=False).stdout or "{}"
    )
    assert ref.startswith(
        values.get("image", {}).get("repository", "ghcr.io/inferencefleet/operator")
    )
    try:
        cluster.helm(
            "install", RELEASE, str(CHART), "-n", namespace,
            "--set", f"watchNamespaces={{{namespace}}}",
            "--wait", "--timeout", "180s",
        )  # fmt: skip
        selector = f"app.kubernetes.io/instance={RELEASE}"
        pod = _pods(cluster, namespace, selector)[0]
        assert pod["spec"]["nodeName"] == realnode.NODE_NAME
        assert pod["spec"]["containers"][0]["image"] == ref
        name = pod["metadata"]["name"]
        # /healthz through the chart's Service: kube-proxy on the node routes the ClusterIP.
        svc = json.loads(cluster.kubectl("get", "service", "-n", namespace, "-o", "json").stdout)
        spec = svc["items"][0]["spec"]
        url = f"http://{spec['clusterIP']}:{spec['ports'][0]['port']}/healthz"
        wait_until(f"/healthz 200 at {url}", lambda: _http_ok(url), timeout=180, interval=2)

        # Liveness (10 s delay, 3 x 10 s) has had its chance to restart it: it did not.
        def running_for() -> float:
            status = json.loads(
                cluster.kubectl("get", "pod", "-n", namespace, name, "-o", "json").stdout
            )["status"]["containerStatuses"][0]
            started = status["state"].get("running", {}).get("startedAt")
            assert status["restartCount"] == 0, status
            if not started:
                return 0.0
            t0 = datetime.datetime.fromisoformat(started.replace("Z", "+00:00"))
            return (datetime.datetime.now(datetime.UTC) - t0).total_seconds()

        wait_until(
            "the operator running for 45 s", lambda: running_for() > 45, timeout=120, interval=2
        )
        assert _http_ok(url)
        # `helm test`: its Job runs on the node too and asks /healthz through the Service.
        tested = cluster.helm("test", RELEASE, "-n", namespace, "--timeout", "180s", check=False)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert re.search(r"Phase:\s+Succeeded", tested.stdout), tested.stdout
        # In-cluster config: it watched the API through the `kubernetes` Service, no errors.
        log = cluster.kubectl("logs", "-n", namespace, name).stdout
        assert "Traceback" not in log, log[-2000:]
        assert "Unauthorized" not in log, log[-2000:]
    finally:
        cluster.helm("uninstall", RELEASE, "-n", namespace, "--wait", check=False)
