"""Operator chaos on the test cluster, measured, each part bounded in time:

1. kill: `inferencefleet operator` SIGKILLed while it reconciles (0-1.5 s after a burst of
   fleet creates, scales, edits and deletes), more changes made while it is down, then
   restarted. After each round: does everything converge within the deadline (each fleet's
   Deployment/Service/ConfigMap/PDB as its spec says, status.observedGeneration current and
   Ready, deleted fleets gone) with no orphan child, no duplicate child, no claim or profile
   label left on a node without its fleet; and how long from the restart until it does.
2. apiserver: kube-apiserver stopped and started under the running operator, then a fleet
   scaled: time until it is reconciled, against the operator's watch timeout.
3. node: a kwok node deleted under a running fleet: time until its pods run elsewhere, the
   status no longer names the node and agrees with the pods (the node is then put back).

The operator runs as a local process as the Helm chart runs it (--standalone), with a token
of the chart's ServiceAccount (its RBAC and admission policies, rendered with `helm template`).
Everything is checked through the API (e2e/e2ecluster/fleetchecks.py), not through the
operator's modules.

    .venv/bin/python bench/bench_operator_chaos.py [--rounds 20] [--deadline 180] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "e2e"))

from e2ecluster import State, down, nvidia, profile, up  # noqa: E402
from e2ecluster import fleetchecks as checks  # noqa: E402
from e2ecluster.cluster import restart_component  # noqa: E402
from e2ecluster.handle import Cluster  # noqa: E402
from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

GROUP, VERSION, PLURAL = "inferencefleet.dev", "v1alpha1", "inferencefleets"
ADA = "NVIDIA-RTX-6000-Ada-Generation"
CHART = REPO / "charts" / "inferencefleet"
POOL = [f"f{i}" for i in range(5)]
MAX_FLEETS, MAX_REPLICAS = 4, 4  # 4 x 4 workers fit 3 Ada nodes x 2 GPUs x 4 (timeSlicing)
WATCH_CLIENT_TIMEOUT_S = 150  # settings.watching.client_timeout in fleet_operator/main.py


def poll(what: str, fn: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Operator:
    """`inferencefleet operator` for one namespace, with the chart ServiceAccount's token."""

    def __init__(self, cluster: Cluster, namespace: str, kubeconfig: Path, logs: Path) -> None:
        self.cluster, self.namespace, self.kubeconfig, self.logs = (
            cluster, namespace, kubeconfig, logs
        )  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.live_after_s = 0.0  # from the last start until /healthz answered

    def start(self) -> float:
        """Start it with the chart's arguments (--standalone); returns the start time."""
        self.starts += 1
        port = free_port()
        argv = [
            str(REPO / ".venv" / "bin" / "inferencefleet"), "operator",
            "--namespace", self.namespace,
            "--liveness-host", "127.0.0.1", "--liveness-port", str(port),
            "--standalone", "--log-level", "info",
            "--config-volume-delay", f"{nvidia.default_lag() + 3:g}",
        ]  # fmt: skip
        log = self.logs / f"operator-{self.starts:02d}.log"
        started = time.monotonic()
        with log.open("wb") as sink:
            env = {**self.cluster.env, "KUBECONFIG": str(self.kubeconfig)}
            self.process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/healthz"

        def healthy() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited:\n{log.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        poll("the operator's liveness endpoint", healthy, timeout=300)
        self.live_after_s = time.monotonic() - started
        return started

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def chart_account(cluster: Cluster, namespace: str, path: Path) -> tuple[str, Path]:
    """Install the chart's ServiceAccount, RBAC and admission policies for `namespace`;
    returns the rendered manifest and a kubeconfig with that ServiceAccount's token."""
    manifest: str = cluster.helm(
        "template", "chaos", str(CHART), "--namespace", namespace,
        "--set", f"fullnameOverride=chaos-{namespace}",
        "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml",
        "--show-only", "templates/admission-policy.yaml",
    ).stdout  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=manifest)
    account = next(
        d["metadata"]["name"]
        for d in yaml.safe_load_all(manifest)
        if d and d.get("kind") == "ServiceAccount"
    )
    token = cluster.kubectl(
        "create", "token", account, "-n", namespace, "--duration=4h"
    ).stdout.strip()
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text(encoding="utf-8"))
    context = config["contexts"][0]["context"]
    config["users"] = [{"name": account, "user": {"token": token}}]
    config["contexts"] = [
        {"name": account, "context": {"cluster": context["cluster"], "user": account}}
    ]
    config["current-context"] = account
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return manifest, path


class World:
    """What the API says: fleets, their children, nodes, pods; and what is wrong with it."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.custom = client.CustomObjectsApi(cluster.api)
        self.core = client.CoreV1Api(cluster.api)
        self.apps = client.AppsV1Api(cluster.api)
        self.policy = client.PolicyV1Api(cluster.api)

    def _items(self, listed: Any, kind: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.cluster.api.sanitize_for_serialization(listed)["items"]
        return [{**item, "kind": kind} for item in items]

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        ns = self.namespace
        children = (
            self._items(self.apps.list_namespaced_deployment(ns), "Deployment")
            + self._items(self.core.list_namespaced_service(ns), "Service")
            + self._items(self.core.list_namespaced_config_map(ns), "ConfigMap")
            + self._items(
                self.policy.list_namespaced_pod_disruption_budget(ns), "PodDisruptionBudget"
            )
        )
        fleets: list[dict[str, Any]] = self.custom.list_cluster_custom_object(
            GROUP, VERSION, PLURAL
        )["items"]
        return {
            "fleets": fleets,
            "children": children,
            "nodes": self._items(self.core.list_node(), "Node"),
            "pods": self._items(self.core.list_namespaced_pod(ns), "Pod"),
        }

    def problems(self) -> dict[str, list[str]]:
        seen = self.snapshot()
        mine = [f for f in seen["fleets"] if f["metadata"]["namespace"] == self.namespace]
        diverged = []
        for fleet in mine:
            if fleet["metadata"].get("deletionTimestamp"):
                diverged.append(f"fleet {fleet['metadata']['name']}: still being deleted")
            else:
                diverged += checks.fleet_mismatches(fleet, seen["children"])
        return {
            "diverged": diverged,
            "orphans": checks.orphans(mine, seen["children"]),
            "duplicates": checks.duplicates(seen["children"]),
            "stray": checks.stray_node_marks(seen["nodes"], seen["fleets"]),
        }

    def converge(self, deadline: float) -> tuple[bool, float, dict[str, list[str]]]:
        """Poll until nothing is wrong; (converged, seconds, the last problems)."""
        start = time.monotonic()
        while True:
            found = self.problems()
            elapsed = time.monotonic() - start
            if not any(found.values()) or elapsed > deadline:
                return not any(found.values()), elapsed, found
            time.sleep(0.5)

    def fleet(self, name: str) -> dict[str, Any] | None:
        try:
            fleet: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
            return fleet
        except ApiException as error:
            if error.status == 404:
                return None
            raise


class Changes:
    """Random fleet creates, scales, edits and deletes through kubectl (seeded)."""

    def __init__(self, cluster: Cluster, namespace: str, rng: random.Random) -> None:
        self.cluster, self.namespace, self.rng = cluster, namespace, rng

    def kubectl(self, *args: str) -> None:
        self.cluster.kubectl(*args, "-n", self.namespace)

    def existing(self, deleting: bool = False) -> list[str]:
        """Fleet names in the namespace (with `deleting`, also those being deleted)."""
        out = self.cluster.kubectl("get", PLURAL, "-n", self.namespace, "-o", "json").stdout
        return [
            f["metadata"]["name"]
            for f in json.loads(out)["items"]
            if deleting or not f["metadata"].get("deletionTimestamp")
        ]

    def manifest(self, name: str, replicas: int) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferenceFleet",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "replicas": replicas,
                "model": {"source": "builtin:tiny"},
                "gpu": {"product": ADA, "sharing": "timeSlicing", "workersPerGPU": 4},
            },
        }

    def one(self) -> str:
        live = self.existing()
        free = [n for n in POOL if n not in self.existing(deleting=True)]
        kinds = ["scale", "edit", "delete"] if live else []
        if len(live) < MAX_FLEETS and free:
            kinds.append("create")
        if not kinds:  # every name is a fleet still being deleted
            return "none"
        kind = self.rng.choice(kinds)
        if kind == "create":
            name = self.rng.choice(free)
            manifest = self.manifest(name, self.rng.randint(1, MAX_REPLICAS))
            self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        elif kind == "scale":
            name = self.rng.choice(live)
            self.kubectl("scale", f"{PLURAL}/{name}", f"--replicas={self.rng.randint(1, 4)}")
        elif kind == "edit":
            name = self.rng.choice(live)
            batching = {"maxBatchSize": self.rng.choice([4, 8, 16])}
            patch: dict[str, Any] = {"spec": {"batching": batching}}
            if self.rng.random() < 0.5:
                patch["spec"]["image"] = f"worker:{self.rng.randint(1, 9)}"
            self.kubectl("patch", PLURAL, name, "--type=merge", "-p", json.dumps(patch))
        else:
            name = self.rng.choice(live)
            self.kubectl("delete", PLURAL, name, "--wait=false")
        return f"{kind} {name}"


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "max": None}
    return {"p50": round(statistics.median(values), 2), "max": round(max(values), 2)}


def kill_rounds(
    operator: Operator, world: World, changes: Changes, rounds: int, deadline: float
) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    for number in range(1, rounds + 1):
        before = [changes.one() for _ in range(changes.rng.randint(2, 3))]
        delay = changes.rng.uniform(0.0, 1.5)
        time.sleep(delay)
        operator.kill()
        while_down = [changes.one() for _ in range(changes.rng.randint(1, 2))]
        started = operator.start()
        converged, _, found = world.converge(deadline)
        seconds = time.monotonic() - started
        results.append(
            {
                "round": number,
                "changes_before_kill": before,
                "kill_after_s": round(delay, 2),
                "changes_while_down": while_down,
                "converged": converged,
                "restart_to_converged_s": round(seconds, 2),
                "restart_to_live_s": round(operator.live_after_s, 2),
                "problems": {k: v for k, v in found.items() if v},
            }
        )
        print(
            f"round {number:2d}: {'converged' if converged else 'NOT converged'} "
            f"{seconds:6.1f} s after the restart (live after {operator.live_after_s:.1f} s); "
            f"killed {delay:.2f} s after {before}, "
            f"then {while_down}" + ("" if converged else f"; left: {results[-1]['problems']}"),
            flush=True,
        )
    ok = [r for r in results if r["converged"]]
    return {
        "rounds": rounds,
        "converged": len(ok),
        "orphans": sum(len(r["problems"].get("orphans", [])) for r in results),
        "duplicates": sum(len(r["problems"].get("duplicates", [])) for r in results),
        "stray_node_marks": sum(len(r["problems"].get("stray", [])) for r in results),
        "restart_to_converged_s": summary([r["restart_to_converged_s"] for r in ok]),
        "restart_to_live_s": summary([r["restart_to_live_s"] for r in results]),
        "deadline_s": deadline,
        "details": results,
    }


def apiserver_restart(
    state: State, operator: Operator, world: World, changes: Changes, deadline: float
) -> dict[str, Any]:
    name = "watched"
    changes.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(changes.manifest(name, 2)))
    converged, _, found = world.converge(deadline)
    if not converged:
        raise RuntimeError(f"the fleet did not converge before the apiserver restart: {found}")
    t0 = time.monotonic()
    restart_component(state, "kube-apiserver")
    down_s = time.monotonic() - t0
    t1 = time.monotonic()
    changes.kubectl("scale", f"{PLURAL}/{name}", "--replicas=3")
    converged, _, found = world.converge(WATCH_CLIENT_TIMEOUT_S + deadline)
    seconds = time.monotonic() - t1
    changes.kubectl("delete", PLURAL, name, "--timeout=120s")
    return {
        "apiserver_restart_s": round(down_s, 2),
        "change_to_converged_s": round(seconds, 2),
        "converged": converged,
        "within_watch_timeout": converged and seconds <= WATCH_CLIENT_TIMEOUT_S,
        "watch_client_timeout_s": WATCH_CLIENT_TIMEOUT_S,
        "operator_survived": operator.alive(),
        "problems": {k: v for k, v in found.items() if v},
    }


def node_deletion(state: State, world: World, changes: Changes, deadline: float) -> dict[str, Any]:
    name = "survivor"
    changes.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(changes.manifest(name, 4)))
    converged, _, found = world.converge(deadline)
    if not converged:
        raise RuntimeError(f"the fleet did not converge before the node deletion: {found}")
    pods = world.snapshot()["pods"]
    on_node = {p["spec"].get("nodeName") for p in pods if p["spec"].get("nodeName")}
    victim = sorted(on_node)[0]
    moved = sum(1 for p in pods if p["spec"].get("nodeName") == victim)
    t0 = time.monotonic()
    changes.cluster.kubectl("delete", "node", victim, "--wait=false")

    def honest() -> list[str]:
        seen = world.snapshot()
        fleet = world.fleet(name) or {}
        nodes = {n["metadata"]["name"] for n in seen["nodes"]}
        mine = [p for p in seen["pods"] if not p["metadata"].get("deletionTimestamp")]
        found: list[str] = checks.status_mismatches(fleet, nodes, mine)
        found += checks.fleet_mismatches(fleet, seen["children"])
        if any(p["spec"].get("nodeName") == victim for p in seen["pods"]):
            found.append(f"a pod is still bound to {victim}")
        if victim in ((fleet.get("status") or {}).get("gpu") or {}).get("nodes", []):
            found.append(f"status.gpu.nodes still holds {victim}")
        return found

    problems = honest()
    while problems and time.monotonic() - t0 < deadline:
        time.sleep(0.5)
        problems = honest()
    seconds = time.monotonic() - t0
    result = {
        "node": victim,
        "pods_on_it": moved,
        "converged": not problems,
        "delete_to_replaced_and_honest_s": round(seconds, 2),
        "problems": problems,
    }
    changes.kubectl("delete", PLURAL, name, "--timeout=120s")
    restore_node(state, victim)
    return result


def restore_node(state: State, node: str) -> None:
    """Create the node again from the cluster's node profile and restart its device plugin."""
    body = next(n for n in profile.load() if n["metadata"]["name"] == node)
    cluster = Cluster(state)
    try:
        poll(f"node {node} to be gone", lambda: cluster.kubectl(
            "get", "node", node, check=False).returncode != 0, timeout=120)  # fmt: skip
        cluster.kubectl("create", "-f", "-", input=json.dumps(body))
        nvidia.restart_pod(state, node)
        poll(f"node {node} to advertise its GPUs", lambda: nvidia.advertising(state, [body]), 120)
    finally:
        cluster.close()


def table(kill: dict[str, Any], api: dict[str, Any], node: dict[str, Any]) -> str:
    t = kill["restart_to_converged_s"]
    rows = [
        ("part", "rounds", "converged", "orphans", "duplicates", "stray labels", "p50 s", "max s"),
        ("operator SIGKILL", kill["rounds"], kill["converged"], kill["orphans"],
         kill["duplicates"], kill["stray_node_marks"], t["p50"], t["max"]),
        ("apiserver restart", 1, int(api["converged"]), len(api["problems"].get("orphans", [])),
         len(api["problems"].get("duplicates", [])), len(api["problems"].get("stray", [])),
         api["change_to_converged_s"], api["change_to_converged_s"]),
        ("kwok node deleted", 1, int(node["converged"]), "-", "-", "-",
         node["delete_to_replaced_and_honest_s"], node["delete_to_replaced_and_honest_s"]),
    ]  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=180, help="seconds to converge")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    state, started = up()
    cluster = Cluster(state)
    namespace = f"chaos-{secrets.token_hex(3)}"
    core = client.CoreV1Api(cluster.api)
    logs = Path(tempfile.mkdtemp(prefix="bench-operator-chaos-"))
    manifest = ""
    operator = None
    try:
        for crd in ("inferencefleet.yaml", "kopf-peering.yaml"):
            cluster.kubectl("apply", "-f", str(REPO / "crds" / crd))
        cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s",
            "crd/inferencefleets.inferencefleet.dev",
        )  # fmt: skip
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        manifest, kubeconfig = chart_account(cluster, namespace, logs / "operator.kubeconfig")
        world = World(cluster, namespace)
        changes = Changes(cluster, namespace, random.Random(args.seed))
        operator = Operator(cluster, namespace, kubeconfig, logs)
        operator.start()
        kill = kill_rounds(operator, world, changes, args.rounds, args.deadline)
        if args.json:  # the longest part is kept even if a later one fails
            args.json.write_text(json.dumps({"kill": kill}, indent=2) + "\n")
        for name in changes.existing():
            changes.kubectl("delete", PLURAL, name, "--timeout=120s")
        api = apiserver_restart(state, operator, world, changes, args.deadline)
        node = node_deletion(state, world, changes, args.deadline)
    finally:
        if operator is not None:  # deleting fleets needs an operator (finalizers, node claims)
            if not operator.alive():
                operator.start()
            cluster.kubectl("delete", PLURAL, "--all", "-n", namespace, "--timeout=120s",
                            check=False)  # fmt: skip
            operator.stop()
        core.delete_namespace(namespace)
        if manifest:
            cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=manifest, check=False)
        cluster.close()
        if started:
            down(state.dir)
    figures = {"kill": kill, "apiserver_restart": api, "node_deleted": node}
    print(table(kill, api, node))
    print(f"operator logs: {logs}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
