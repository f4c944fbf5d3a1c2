"""spec.tune on the in-memory FakeKube: the tune Job as rendered, its lifecycle in status.tune
(running, the result from the pod's termination message, a failure's log tail), one run per set
of inputs, and a Job of the same name that is not the fleet's."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fleet_local.plan import LocalHost
from fleet_operator.decide import Settings
from fleet_operator.kube_fake import FakeKube
from fleet_operator.names import (
    FLEET_LABEL,
    GPU_RESOURCE,
    JOB_NAME_LABEL,
    TUNE_LABEL,
    tune_job_name,
)
from fleet_operator.reconcile import Reconciler
from fleet_operator.render.tune import FLEET_ENV, RESULT_PATH
from fleet_operator.tuning import parse_result
from fleet_spec.spec import FleetSpecError, parse_fleet
from fleet_tune.report import result_json
from fleet_tune.search import Config, Measurement, Outcome
from fleet_tune.tune import fleet_from_env
from tests.test_reconcile import ADA, NOW, PLUGIN, fleet, node

TUNE = {"p99Ms": 50, "budgetSeconds": 30}


SETTINGS = Settings(worker_image="worker:1", worker_device="cpu")  # as on the real node


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.add_node(node("ada-0"))
    return fake


@pytest.fixture
def reconciler(kube: FakeKube) -> Reconciler:
    return Reconciler(kube, SETTINGS, PLUGIN, clock=lambda: NOW, config_volume_delay=0)


def jobs(kube: FakeKube) -> dict[str, dict[str, Any]]:
    return {name: body for (kind, _, name), body in kube.objects.items() if kind == "Job"}


def tune_status(kube: FakeKube) -> dict[str, Any]:
    status: dict[str, Any] = kube.fleet("vision", "detector")["status"]["tune"]
    return status


def finish(kube: FakeKube, job: str, message: str, *, failed: bool = False, code: int = 0) -> None:
    """What the Job controller and the kubelet write when the tune pod ends."""
    kind = "Failed" if failed else "Complete"
    kube.objects[("Job", "vision", job)]["status"] = {
        "conditions": [{"type": kind, "status": "True", "reason": "BackoffLimitExceeded"}]
    }
    terminated = {"exitCode": code, "reason": "Error" if code else "Completed", "message": message}
    kube.objects[("Pod", "vision", f"{job}-abcde")] = {
        "metadata": {
            "name": f"{job}-abcde",
            "namespace": "vision",
            "labels": {TUNE_LABEL: "detector", JOB_NAME_LABEL: job},
        },
        "spec": {"nodeName": "ada-0"},
        "status": {
            "phase": "Failed" if code else "Succeeded",
            "containerStatuses": [{"name": "tune", "state": {"terminated": terminated}}],
        },
    }


def started(kube: FakeKube, reconciler: Reconciler) -> str:
    """A fleet with spec.tune, after the pass that creates its Job; the Job's name."""
    kube.add_fleet(fleet(tune=TUNE))
    reconciler.reconcile(kube.observe("vision", "detector"))
    (name,) = jobs(kube)
    return name


def a_result(p99_ms: float = 31.5) -> str:
    """A result line as `inferencefleet tune --result-file` writes it, for a GPU host."""
    outcome = Outcome(
        winner=Config(2, 8, 1000), confirmed=Measurement(412.34, p99_ms, 0, 4.0), elapsed_s=29.0
    )
    spec = parse_fleet(fleet(tune=TUNE))
    host = LocalHost(cores=16, gpus=())
    document = result_json(spec, outcome, 50.0, host)
    return json.dumps(document, separators=(",", ":")) + "\n"


def test_no_tune_no_job(kube: FakeKube, reconciler: Reconciler) -> None:
    kube.add_fleet(fleet())
    reconciler.reconcile(kube.observe("vision", "detector"))
    assert jobs(kube) == {}
    assert "tune" not in kube.fleet("vision", "detector")["status"]


def test_tune_job_is_the_worker_image_running_tune_restricted_and_no_worker(
    kube: FakeKube, reconciler: Reconciler, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = fleet(tune=TUNE, tolerations=[{"key": "dedicated", "operator": "Exists"}])
    kube.add_fleet(body)
    reconciler.reconcile(kube.observe("vision", "detector"))
    (name, job), = jobs(kube).items()  # fmt: skip
    assert name.startswith("detector-tune-")
    assert len(name) == len("detector-tune-") + 7
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-detector"
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 30
    template = spec["template"]
    # not a worker: neither the Deployment nor the Service selects it
    assert FLEET_LABEL not in template["metadata"]["labels"]
    assert template["metadata"]["labels"][TUNE_LABEL] == "detector"
    pod = template["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"]
    assert {"key": "dedicated", "operator": "Exists"} in pod["tolerations"]
    required = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (expression,) = required["nodeSelectorTerms"][0]["matchExpressions"]
    assert expression["key"] == "nvidia.com/gpu.product"
    assert ADA in expression["values"]
    (container,) = pod["containers"]
    assert container["image"] == "worker:1"
    assert container["command"] == ["inferencefleet", "tune"]
    assert container["args"][:1] == [f"env:{FLEET_ENV}"]
    assert container["args"][container["args"].index("--device") + 1] == "cpu"
    assert container["args"][container["args"].index("--p99-ms") + 1] == "50"
    assert container["args"][-2:] == ["--result-file", RESULT_PATH]
    assert container["terminationMessagePath"] == RESULT_PATH
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["resources"]["limits"][GPU_RESOURCE] == 1
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    # the fleet travels in the environment, and tune reads it back as the same fleet
    env = {e["name"]: e["value"] for e in container["env"]}
    monkeypatch.setenv("TEST_TUNE_FLEET", env[FLEET_ENV])
    seen = fleet_from_env("TEST_TUNE_FLEET")
    assert seen == parse_fleet({**body, "metadata": {"name": "detector", "namespace": "vision"}})


def test_a_run_goes_from_running_to_its_recommendation_once(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    name = started(kube, reconciler)
    status = tune_status(kube)
    assert status["state"] == "Running"
    assert status["job"] == name
    assert ("vision/detector", "Normal", "TuneStarted") in [e[:3] for e in kube.events]
    reconciler.reconcile(kube.observe("vision", "detector"))
    assert "waiting for a node" in tune_status(kube)["message"]
    writes = len(kube.writes)
    reconciler.reconcile(kube.observe("vision", "detector"))
    assert kube.writes[writes:] == []  # at rest while it runs

    finish(kube, name, a_result())
    reconciler.reconcile(kube.observe("vision", "detector"))
    status = tune_status(kube)
    assert status["state"] == "Succeeded"
    assert status["withinBudget"] is True
    assert status["recommendation"]["batching"]["maxBatchSize"] == 8
    assert status["recommendation"]["batching"]["maxQueueDelayMicroseconds"] == 1000
    assert status["framesPerSecond"] == 412.3
    assert status["node"] == "ada-0"
    assert "412.3 frames/s" in status["summary"]
    assert "over budget" not in status["summary"]
    assert status["finishedAt"] == NOW
    # the recommendation never goes into the spec
    assert "batching" not in kube.fleet("vision", "detector")["spec"]

    # the Job expires: the answer stands and no second run starts
    for key in [k for k in kube.objects if k[0] in ("Job", "Pod")]:
        del kube.objects[key]
    reconciler.reconcile(kube.observe("vision", "detector"))
    assert jobs(kube) == {}
    assert tune_status(kube)["state"] == "Succeeded"


def test_a_new_budget_is_a_new_run(kube: FakeKube, reconciler: Reconciler) -> None:
    kube.add_fleet(fleet(tune=TUNE))
    reconciler.reconcile(kube.observe("vision", "detector"))
    (first,) = jobs(kube)
    finish(kube, first, a_result())
    reconciler.reconcile(kube.observe("vision", "detector"))
    kube.fleet("vision", "detector")["spec"]["tune"] = {"p99Ms": 20, "budgetSeconds": 30}
    reconciler.reconcile(kube.observe("vision", "detector"))
    second = set(jobs(kube)) - {first}
    assert len(second) == 1
    status = tune_status(kube)
    assert status["state"] == "Running"
    assert status["job"] in second
    assert status["p99BudgetMs"] == 20


def test_over_budget_is_said_so(kube: FakeKube, reconciler: Reconciler) -> None:
    name = started(kube, reconciler)
    finish(kube, name, a_result(p99_ms=75.0), failed=True, code=1)
    reconciler.reconcile(kube.observe("vision", "detector"))
    status = tune_status(kube)
    assert status["state"] == "Succeeded"
    assert status["withinBudget"] is False
    assert status["summary"].endswith("(over budget)")
    assert ("vision/detector", "Warning", "TuneSucceeded") in [e[:3] for e in kube.events]


def test_a_failed_run_keeps_its_log_tail(kube: FakeKube, reconciler: Reconciler) -> None:
    name = started(kube, reconciler)
    tail = "loading\ninferencefleet tune: no worker became ready: CUDA error\n"
    finish(kube, name, tail, failed=True, code=1)
    reconciler.reconcile(kube.observe("vision", "detector"))
    status = tune_status(kube)
    assert status["state"] == "Failed"
    assert "exit code 1" in status["message"]
    assert "no worker became ready: CUDA error" in status["message"]
    assert ("vision/detector", "Warning", "TuneFailed") in [e[:3] for e in kube.events]


def test_a_job_that_ended_without_a_result_is_a_failure(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    name = started(kube, reconciler)
    finish(kube, name, "")
    reconciler.reconcile(kube.observe("vision", "detector"))
    status = tune_status(kube)
    assert status["state"] == "Failed"
    assert status["message"] == "the tune pod ended without a result (exit code 0)"


def test_a_job_seen_ended_before_its_pod_waits_for_the_pods_result(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    name = started(kube, reconciler)
    finish(kube, name, a_result())
    pod = kube.objects[("Pod", "vision", f"{name}-abcde")]
    ended = pod["status"]
    pod["status"] = {"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]}
    reconciler.reconcile(kube.observe("vision", "detector"))
    status = tune_status(kube)
    assert status["state"] == "Running"
    assert "reading its pod's result" in status["message"]

    pod["status"] = ended  # the pod's watch catches up
    reconciler.reconcile(kube.observe("vision", "detector"))
    assert tune_status(kube)["state"] == "Succeeded"


def test_a_job_of_that_name_that_is_not_ours_is_not_taken(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    name = started(kube, reconciler)
    job = kube.objects[("Job", "vision", name)]
    job["metadata"]["ownerReferences"] = [{"uid": "someone", "controller": True}]
    kube.fleet("vision", "detector")["status"].pop("tune")
    writes = len(kube.writes)
    reconciler.reconcile(kube.observe("vision", "detector"))
    assert not [w for w in kube.writes[writes:] if w.startswith("apply Job")]
    status = tune_status(kube)
    assert status["state"] == "Failed"
    assert "is not this fleet's" in status["message"]


@pytest.mark.parametrize(
    "message", ["", "Traceback (most recent call last):", '{"workers": 2}', "[1, 2]"]
)
def test_parse_result_takes_only_a_result_line(message: str) -> None:
    assert parse_result(message) is None
    assert parse_result(a_result()) is not None


def test_fleet_names_of_50_characters_give_job_names_within_63() -> None:
    assert len(tune_job_name("a" * 50, "0123456789abcdef")) == 63


def test_spec_tune_is_checked_naming_the_field() -> None:
    with pytest.raises(FleetSpecError, match=r"spec\.tune\.p99Ms"):
        parse_fleet(fleet(tune={"p99Ms": 0}))
    with pytest.raises(FleetSpecError, match=r"spec\.tune\.budgetSeconds"):
        parse_fleet(fleet(tune={"p99Ms": 5, "budgetSeconds": 5}))
