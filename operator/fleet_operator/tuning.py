"""The pure half of spec.tune: which tune Job should exist, and what status.tune says.

One run per set of inputs (model, image, device, spec.tune; see render.tune.tune_inputs). A
finished run is remembered in status.tune with its inputs, so the operator never runs the same
tune twice, even after its Job is gone (finished Jobs expire). The result comes from the tune
pod's termination message, one line of JSON written by `inferencefleet tune --result-file`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet_spec.spec import FleetSpec

from fleet_operator.names import JOB_NAME_LABEL, tune_job_name
from fleet_operator.observe import owns
from fleet_operator.render.common import Owner
from fleet_operator.render.tune import render_tune_job, tune_inputs

RUNNING, SUCCEEDED, FAILED = "Running", "Succeeded", "Failed"
MESSAGE_LIMIT = 400  # characters of a failed run's log tail kept in status


@dataclass(frozen=True)
class TunePlan:
    """A Job to create (or None), status.tune (None: the fleet has none), an event to post."""

    job: Mapping[str, Any] | None
    status: Mapping[str, Any] | None
    event: tuple[str, str, str] | None = None  # (type, reason, message)
    force: bool = False  # apply the Job over one that may exist (this operator made it)


def _end(job: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The Job controller's Complete or Failed condition once it has one, else None."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return dict(condition)
    return None


def _pod_of(job_name: str, pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The Job's pod, preferring one whose container has ended (backoffLimit 0: one pod)."""
    mine = [p for p in pods if (p["metadata"].get("labels") or {}).get(JOB_NAME_LABEL) == job_name]
    ended = [p for p in mine if (p.get("status") or {}).get("terminated")]
    found = ended or mine
    return found[0] if found else None


def parse_result(message: str) -> dict[str, Any] | None:
    """tune's result line from a termination message, or None if it holds something else (a log
    tail, nothing)."""
    try:
        document = json.loads(message.strip().splitlines()[-1]) if message.strip() else None
    except ValueError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("recommendation"), dict):
        return None
    return document


def summary(result: Mapping[str, Any]) -> str:
    """One line for `kubectl get ifleet`: the recommendation and what it measured."""
    rec = result["recommendation"]
    batching = rec.get("batching") or {}
    gpu = rec.get("gpu") or {}
    workers = gpu.get("workersPerGPU", result.get("workers", 1))
    where = "/GPU" if gpu else ""
    text = (
        f"{workers} worker(s){where}, batch {batching.get('maxBatchSize')}, "
        f"{batching.get('maxQueueDelayMicroseconds')}us: {result.get('framesPerSecond')} frames/s, "
        f"p99 {result.get('p99Ms')} ms"
    )
    return text if result.get("withinBudget") else f"{text} (over budget)"


def _ended(
    base: dict[str, Any], end: Mapping[str, Any], pod: Mapping[str, Any] | None, now: str
) -> TunePlan:
    pod = pod or {}
    terminated = list((pod.get("status") or {}).get("terminated") or [])
    message = str(terminated[0].get("message", "")) if terminated else ""
    result = parse_result(message)
    base = {**base, "finishedAt": now}
    node = (pod.get("spec") or {}).get("nodeName")
    if node:
        base["node"] = node
    if result is not None:
        status = {
            **base,
            "state": SUCCEEDED,
            "recommendation": result["recommendation"],
            "framesPerSecond": result.get("framesPerSecond"),
            "p99Ms": result.get("p99Ms"),
            "withinBudget": bool(result.get("withinBudget")),
            "summary": summary(result),
            "message": f"{result.get('measurements')} measurements in {result.get('seconds')} s "
            f"on {result.get('device')}",
        }
        kind = "Normal" if status["withinBudget"] else "Warning"
        return TunePlan(None, status, (kind, "TuneSucceeded", status["summary"]))
    exit_code = terminated[0].get("exitCode") if terminated else None
    job_says = f"{end.get('reason', '')}: {end.get('message', '')}".strip(": ")
    why = message.strip()[-MESSAGE_LIMIT:] or (job_says if end.get("type") == "Failed" else "")
    text = f"the tune pod ended without a result (exit code {exit_code})"
    if why:
        text = f"{text}: {why}"
    status = {**base, "state": FAILED, "summary": "failed", "message": text}
    return TunePlan(None, status, ("Warning", "TuneFailed", text))


def plan_tune(
    spec: FleetSpec,
    fleet: Mapping[str, Any],
    jobs: Mapping[str, Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    *,
    owner: Owner,
    image: str,
    device: str,
    now: str,
) -> TunePlan:
    """The tune Job this pass should create, and status.tune."""
    previous = (fleet.get("status") or {}).get("tune")
    if spec.tune is None:
        return TunePlan(None, previous)  # the last recommendation stays; no new run
    inputs = tune_inputs(spec, image, device)
    name = tune_job_name(spec.name, inputs)
    if previous and previous.get("inputs") == inputs and previous.get("state") != RUNNING:
        return TunePlan(None, previous)  # this run is over; its answer stands
    base: dict[str, Any] = {"inputs": inputs, "job": name, "p99BudgetMs": spec.tune.p99_ms}
    job = jobs.get(name)
    if job is None:
        # Created by an earlier pass if status says so: the watch may not have shown it yet, or
        # it expired unseen; applying it again is harmless either way (a Job already there is
        # left as it is, a missing one runs again).
        again = bool(previous and previous.get("inputs") == inputs)
        manifest = render_tune_job(
            spec, owner, fleet["spec"], inputs=inputs, image=image, device=device
        )
        text = (
            f"Job {name} runs inferencefleet tune (p99 budget {spec.tune.p99_ms:g} ms, "
            f"{spec.tune.budget_s} s of measuring)"
        )
        status = {**base, "state": RUNNING, "summary": "running", "message": text}
        if again:
            return TunePlan(manifest, previous, force=True)
        return TunePlan(manifest, status, ("Normal", "TuneStarted", text))
    if not owns(fleet, job):
        text = f"Job {spec.namespace}/{name} exists and is not this fleet's"
        status = {**base, "state": FAILED, "summary": "failed", "message": text}
        return TunePlan(None, status, ("Warning", "TuneFailed", text))
    pod = _pod_of(name, pods)
    end = _end(job)
    if end is not None:
        if pod is None or (pod.get("status") or {}).get("terminated"):
            return _ended(base, end, pod, now)
        # The Job's watch ran ahead of the pod's: the result is in the container's end, which
        # the pod's next event brings (or its deletion, which ends the wait).
        text = f"Job {name} ended ({end['type']}); reading its pod's result"
        return TunePlan(None, {**base, "state": RUNNING, "summary": "finishing", "message": text})
    node = (pod or {}).get("spec", {}).get("nodeName")
    status = {
        **base,
        "state": RUNNING,
        "summary": f"running on {node}" if node else "running",
        "message": f"Job {name} runs inferencefleet tune"
        + (f" on {node}" if node else ", waiting for a node with a free GPU slot"),
    }
    if node:
        status["node"] = node
    return TunePlan(None, status)
