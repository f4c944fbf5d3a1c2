"""The operator SIGKILLed while it reconciles, fleets changed meanwhile: after a restart every
fleet converges to its spec, with no orphan or duplicate child and no claim left on a node."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
import yaml
from e2ecluster import fleetchecks as checks
from e2ecluster.handle import wait_until

pytestmark = pytest.mark.e2e

ROUNDS = 3
MODEL = {"source": "builtin:tiny"}
# 5 steps against 4 changes a round: the kills land after different kinds of change, and
# fleets are left at the end (2 of every 5 steps create, 1 deletes).
ROTATION = ("create", "scale", "edit", "create", "delete")
KINDS = "deployments,services,configmaps,poddisruptionbudgets"
GPU = {"product": "NVIDIA-RTX-6000-Ada-Generation", "sharing": "timeSlicing", "workersPerGPU": 4}


def _items(cluster: Any, *args: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)[
        "items"
    ]
    return items


def _problems(cluster: Any, namespace: str) -> dict[str, list[str]]:
    fleets = _items(cluster, "inferencefleets", "-n", namespace)
    children = _items(cluster, KINDS, "-n", namespace)
    nodes = _items(cluster, "nodes")
    diverged = [
        line
        for fleet in fleets
        for line in (
            [f"fleet {fleet['metadata']['name']} is being deleted"]
            if fleet["metadata"].get("deletionTimestamp")
            else checks.fleet_mismatches(fleet, children)
        )
    ]
    return {
        "diverged": diverged,
        "orphans": checks.orphans(fleets, children),
        "duplicates": checks.duplicates(children),
        "stray": checks.stray_node_marks(nodes, fleets, namespace=namespace),
    }


def _converged(cluster: Any, namespace: str) -> None:
    last: dict[str, list[str]] = {}

    def clean() -> bool:
        nonlocal last
        last = _problems(cluster, namespace)
        return not any(last.values())

    try:
        wait_until("every fleet to converge", clean, timeout=180, interval=0.5)
    except AssertionError as error:
        raise AssertionError(f"{error}; still wrong: {last}") from None


def _change(cluster: Any, namespace: str, rng: random.Random, step: int, live: set[str]) -> None:
    """One of create, scale, edit the batching, delete (in ROTATION, random values); `live`
    follows the fleets that should exist."""
    kind = ROTATION[step % len(ROTATION)] if live else "create"
    if kind == "create":
        name = f"c{step}"
        fleet = {
            "apiVersion": "inferencefleet.dev/v1alpha1",
            "kind": "InferenceFleet",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": rng.randint(1, 2), "model": MODEL, "gpu": GPU},
        }
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(fleet))
        live.add(name)
        return
    name = rng.choice(sorted(live))
    if kind == "scale":
        args = ("scale", f"inferencefleets/{name}", f"--replicas={rng.randint(1, 2)}")
    elif kind == "edit":
        patch = {"spec": {"batching": {"maxBatchSize": rng.choice([4, 8, 16])}}}
        args = ("patch", "inferencefleets", name, "--type=merge", "-p", json.dumps(patch))
    else:
        args = ("delete", "inferencefleets", name, "--wait=false")
        live.discard(name)
    cluster.kubectl(*args, "-n", namespace)


def test_operator_killed_mid_reconcile_converges_without_orphans(
    cluster: Any, namespace: str, killable_operator: Any
) -> None:
    rng = random.Random(7)
    step, live = 0, set[str]()
    for round_ in range(ROUNDS):
        operator = killable_operator(f"killed-{round_}.log", 100 + round_)
        _converged(cluster, namespace)
        for _ in range(3):
            _change(cluster, namespace, rng, step, live)
            step += 1
        time.sleep(rng.uniform(0.0, 1.0))  # where in the reconcile the kill lands
        operator.process.kill()
        operator.process.wait(timeout=10)
        _change(cluster, namespace, rng, step, live)  # a change no operator saw
        step += 1
    killable_operator("final.log", 1000)  # the fixture deletes the fleets through it
    _converged(cluster, namespace)
    fleets = _items(cluster, "inferencefleets", "-n", namespace)
    assert {f["metadata"]["name"] for f in fleets} == live
    assert live, "no fleet left to check"
