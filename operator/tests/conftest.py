"""Fixtures for the operator's tests: the shared invalid fleets and (e2e) the operator process."""

from __future__ import annotations

import contextlib
import copy
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2ecluster.handle import wait_until
from e2ecluster.nvidia import default_lag

INVALID_FLEETS_FILE = Path(__file__).with_name("invalid_fleets.yaml")


@dataclass(frozen=True)
class InvalidFleet:
    id: str
    field: str  # the field the error message must name
    manifest: dict[str, Any]


def _edit(document: dict[str, Any], dotted: str, value: Any, delete: bool) -> None:
    *parents, leaf = dotted.split(".")
    node = document
    for part in parents:
        node = node.setdefault(part, {})
    if delete:
        del node[leaf]
    else:
        node[leaf] = value


def load_invalid_fleets() -> list[InvalidFleet]:
    data = yaml.safe_load(INVALID_FLEETS_FILE.read_text(encoding="utf-8"))
    fleets = []
    for entry in data["invalid"]:
        manifest = copy.deepcopy(data["base"])
        for dotted, value in entry.get("set", {}).items():
            _edit(manifest, dotted, value, delete=False)
        for dotted in entry.get("delete", []):
            _edit(manifest, dotted, None, delete=True)
        fleets.append(InvalidFleet(entry["id"], entry["field"], manifest))
    return fleets


@pytest.fixture
def valid_fleet() -> dict[str, Any]:
    """The valid base fleet the invalid ones are derived from."""
    base: dict[str, Any] = yaml.safe_load(INVALID_FLEETS_FILE.read_text(encoding="utf-8"))["base"]
    return base


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize each test that asks for `invalid_fleet` with every entry of the list."""
    if "invalid_fleet" in metafunc.fixturenames:
        fleets = load_invalid_fleets()
        metafunc.parametrize("invalid_fleet", fleets, ids=[f.id for f in fleets])


# --- e2e: the CRDs, the operator as a process, and fleet helpers -------------------------

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = [REPO / "crds" / "inferencefleet.yaml", REPO / "crds" / "kopf-peering.yaml"]
OPERATOR_BIN = REPO / ".venv" / "bin" / "inferencefleet"
GROUP, VERSION, PLURAL = "inferencefleet.dev", "v1alpha1", "inferencefleets"


@pytest.fixture(scope="session")
def crds(cluster: Any) -> None:
    """Install (or update) the CRDs from crds/ and wait until the apiserver serves them."""
    for path in CRD_FILES:
        cluster.kubectl("apply", "-f", str(path))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/inferencefleets.inferencefleet.dev",
        "crd/kopfpeerings.kopf.dev",
        "crd/clusterkopfpeerings.kopf.dev",
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass
class OperatorProcess:
    process: subprocess.Popen[bytes]
    log: Path
    liveness: str

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _condition(fleet: dict[str, Any], kind: str) -> dict[str, Any]:
    for condition in (fleet.get("status") or {}).get("conditions") or []:
        if condition["type"] == kind:
            return dict(condition)
    return {}


class Fleets:
    """Fleet operations for e2e tests, in one namespace, through kubectl and the API."""

    def __init__(self, cluster: Any, namespace: str) -> None:
        from kubernetes import client

        self.cluster, self.namespace = cluster, namespace
        self.custom = client.CustomObjectsApi(cluster.api)
        self.core = client.CoreV1Api(cluster.api)
        self.apps = client.AppsV1Api(cluster.api)

    def manifest(self, name: str, **spec: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "replicas": 2,
            "model": {"source": "builtin:tiny"},
            "gpu": {"product": ADA_PRODUCT, "sharing": "timeSlicing", "workersPerGPU": 4},
        }
        body.update(spec)
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferenceFleet",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": body,
        }

    def apply(self, manifest: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def kubectl(self, *args: str) -> str:
        out: str = self.cluster.kubectl(*args, "-n", self.namespace).stdout
        return out

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            fleet: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return fleet

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        return _condition(self.get(name) or {}, kind)

    def wait_ready(self, name: str, timeout: float = 90) -> dict[str, Any]:
        """Until status says Ready for the current generation; returns that same read of the
        fleet (a second read could be older or newer than the one that said Ready)."""

        def ready() -> dict[str, Any] | None:
            fleet = self.get(name) or {}
            status = fleet.get("status") or {}
            current = status.get("observedGeneration") == fleet.get("metadata", {}).get(
                "generation"
            )
            ok = _condition(fleet, "Ready").get("status") == "True"
            return fleet if current and ok else None

        fleet: dict[str, Any] = wait_until(f"fleet {name} Ready", ready, timeout=timeout)
        return fleet

    def wait_condition(
        self, name: str, kind: str, status: str, reason: str, timeout: float = 90
    ) -> dict[str, Any]:
        def matches() -> dict[str, Any] | None:
            found = self.condition(name, kind)
            return found if (found.get("status"), found.get("reason")) == (status, reason) else None

        found: dict[str, Any] = wait_until(
            f"fleet {name} condition {kind}={status} ({reason})", matches, timeout=timeout
        )
        return found

    def deployment(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            deployment = self.apps.read_namespaced_deployment(name, self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        result: dict[str, Any] = self.cluster.api.sanitize_for_serialization(deployment)
        return result

    def pods(self, name: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"inferencefleet.dev/fleet={name}"
        )
        items: list[dict[str, Any]] = self.cluster.api.sanitize_for_serialization(pods)["items"]
        return items

    def events(self, name: str) -> list[dict[str, Any]]:
        events = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        items: list[dict[str, Any]] = self.cluster.api.sanitize_for_serialization(events)["items"]
        return items

    def delete(self, name: str, timeout: float = 60) -> None:
        self.kubectl("delete", "inferencefleet", name, "--wait=false", "--ignore-not-found")
        wait_until(f"fleet {name} to be deleted", lambda: self.get(name) is None, timeout=timeout)


ADA_PRODUCT = "NVIDIA-RTX-6000-Ada-Generation"
BLACKWELL_PRODUCT = "NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition"


def _release_leftover_claims(cluster: Any, namespace: str) -> None:
    """Safety net: drop claims of this namespace's fleets that a failed test left on nodes."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api)
    for node in core.list_node().items:
        annotations = node.metadata.annotations or {}
        claims = [c for c in annotations.get(CLAIMS, "").split(",") if c]
        reserved = [r for r in annotations.get(RESERVED, "").split(",") if r]
        mine = [c for c in claims if c.startswith(f"{namespace}/")]
        if not mine:
            continue
        rest = [c for c in claims if c not in mine]
        kept = [r for r in reserved if not r.startswith(f"{namespace}/")]
        patch: dict[str, Any] = {
            "metadata": {
                "annotations": {CLAIMS: ",".join(rest) or None, RESERVED: ",".join(kept) or None}
            }
        }
        if not rest:
            patch["metadata"]["labels"] = {
                "inferencefleet.dev/gpu-profile": None,
                "nvidia.com/device-plugin.config": None,
            }
        core.patch_node(node.metadata.name, patch)


CLAIMS = "inferencefleet.dev/claimed-by"
RESERVED = "inferencefleet.dev/reserved-slots"


def _strip_finalizers(cluster: Any, namespace: str) -> None:
    names = cluster.kubectl("get", "inferencefleets", "-n", namespace, "-o", "name").stdout.split()
    for name in names:
        cluster.kubectl(
            "patch", name, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'
        )


@contextlib.contextmanager
def run_operator(
    cluster: Any,
    namespace: str,
    log: Path,
    kubeconfig: Path | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[OperatorProcess]:
    """`inferencefleet operator` for one namespace, as a process (admin kubeconfig by default).

    At the end every fleet is deleted while the operator still runs (its finalizer gives the
    nodes back), then the process is stopped."""
    port = _free_port()
    argv = [
        str(OPERATOR_BIN), "operator",
        "--namespace", namespace,
        "--liveness-host", "127.0.0.1",
        "--liveness-port", str(port),
        "--log-level", "info",
        # The test cluster's ConfigMap volumes lag the API by seconds (see e2ecluster.nvidia).
        "--config-volume-delay", f"{default_lag() + 3:g}",
        *extra,
    ]  # fmt: skip
    env = dict(cluster.env)
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
    handle = OperatorProcess(process, log, f"http://127.0.0.1:{port}/healthz")
    try:
        wait_until(
            "the operator's liveness endpoint",
            lambda: process.poll() is not None or _healthy(handle.liveness),
            timeout=240,  # importing kopf and the Kubernetes client is slow on a busy machine
        )
        assert process.poll() is None, f"operator exited:\n{handle.output()}"
        yield handle
    finally:
        deleted = process.poll() is None and (
            cluster.kubectl(
                "delete", "inferencefleets", "--all", "-n", namespace, "--timeout=60s", check=False
            ).returncode
            == 0
        )
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if not deleted:  # the operator could not finish: do its cleanup so the namespace goes
            _strip_finalizers(cluster, namespace)
            _release_leftover_claims(cluster, namespace)
        print(handle.output()[-20000:])  # shown by pytest when the test failed


@pytest.fixture
def operator(cluster: Any, namespace: str, crds: None, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator for this test's namespace, with the admin kubeconfig."""
    with run_operator(cluster, namespace, tmp_path / "operator.log") as handle:
        yield handle


@pytest.fixture
def start_operator(
    cluster: Any, namespace: str, crds: None, tmp_path: Path
) -> Callable[..., contextlib.AbstractContextManager[OperatorProcess]]:
    """For tests that start operators themselves: start_operator(log, kubeconfig=, extra=)."""

    def start(
        log: str = "operator.log", kubeconfig: Path | None = None, extra: tuple[str, ...] = ()
    ) -> contextlib.AbstractContextManager[OperatorProcess]:
        return run_operator(cluster, namespace, tmp_path / log, kubeconfig, extra)

    return start


@pytest.fixture
def fleets(cluster: Any, namespace: str, operator: OperatorProcess) -> Fleets:
    return Fleets(cluster, namespace)


@pytest.fixture
def fleet_ops(cluster: Any, namespace: str) -> Fleets:
    """Fleet operations for tests that start their own operator (start_operator)."""
    return Fleets(cluster, namespace)
