"""Fixtures for the chart's tests: the pinned helm binary and `helm template` rendering."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2ecluster.handle import wait_until

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "inferencefleet"

Helm = Callable[..., "subprocess.CompletedProcess[str]"]
Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """helm from the test cluster's build cache (`make cluster-build`), or $INFERENCEFLEET_HELM."""
    override = os.environ.get("INFERENCEFLEET_HELM")
    if override:
        return Path(override)
    out = subprocess.run(
        [str(ROOT / "e2e" / "build.sh"), "--print-dir"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    helm = Path(out.stdout.strip().splitlines()[-1]) / "bin" / "helm"
    if not helm.is_file():
        pytest.fail(f"{helm} is missing: run `make cluster-build` (it builds the pinned helm)")
    return helm


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm offline (no kubeconfig) with a private cache and config."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "KUBECONFIG": "/dev/null",
    }
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, check=check, env=env, timeout=120
    )


@pytest.fixture
def offline_helm(helm_bin: Path) -> Helm:
    """offline_helm(*args, check=True): helm without any cluster."""

    def _helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_helm(helm_bin, *args, check=check)

    return _helm


@pytest.fixture
def render(helm_bin: Path) -> Render:
    """render(*helm_template_args) -> the documents `helm template` prints, parsed."""

    def _render(*args: str) -> list[dict[str, Any]]:
        out = run_helm(
            helm_bin, "template", "inferencefleet", str(CHART), "--namespace", "ops", *args
        )
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]

    return _render


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalOperator:
    """`inferencefleet operator` as a local process, authenticated as the chart's ServiceAccount.

    The kubeconfig carries a token from the TokenRequest API (`kubectl create token`), so every
    call the operator makes is checked against the chart's RBAC. The health endpoint is moved
    to a free loopback port.
    """

    def __init__(self, cluster: Any, namespace: str, service_account: str, args: list[str],
                 workdir: Path) -> None:  # fmt: skip
        self.cluster = cluster
        self.workdir = workdir
        self.port = free_loopback_port()
        self.args = [a for a in args if not a.startswith("--liveness-port")]
        self.args += [f"--liveness-port={self.port}", "--liveness-host=127.0.0.1"]
        token = cluster.kubectl(
            "create", "token", service_account, "-n", namespace, "--duration=3600s"
        ).stdout.strip()
        self.kubeconfig = workdir / "kubeconfig"
        self.log = workdir / "operator.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._write_kubeconfig(token)

    def _write_kubeconfig(self, token: str) -> None:
        """The README's commands: the admin kubeconfig's cluster, the ServiceAccount's token."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig.write_text(
            self.cluster.kubectl("config", "view", "--raw", "--minify").stdout
        )
        self.kubeconfig.chmod(0o600)
        mine = f"--kubeconfig={self.kubeconfig}"
        self.cluster.kubectl(mine, "config", "set-credentials", "operator", f"--token={token}")
        self.cluster.kubectl(mine, "config", "set-context", "--current", "--user=operator")
        whoami = self.cluster.kubectl(
            mine, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"
        )
        assert whoami.stdout.startswith("system:serviceaccount:"), whoami.stdout

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def __enter__(self) -> LocalOperator:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env |= {"KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(ROOT / ".venv" / "bin" / "inferencefleet"), "operator", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        # Importing kopf and the client takes a minute on a loaded 2-core machine.
        wait_until(f"operator health on 127.0.0.1:{self.port}", self._up, timeout=180)
        return self

    def _up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"operator exited {self.process.returncode}:\n{self.log.read_text()}")
        return self.healthy()

    def __exit__(self, *_: object) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class Journey:
    """What the journey's steps read from the cluster, through the cluster fixture's kubectl."""

    wait_until = staticmethod(wait_until)

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def local_operator(
        self, namespace: str, service_account: str, args: list[str], workdir: Path
    ) -> LocalOperator:
        return LocalOperator(self.cluster, namespace, service_account, args, workdir)

    def fleet(self, namespace: str, name: str = "detector") -> dict[str, Any]:
        out = self.cluster.kubectl("get", "ifleet", name, "-n", namespace, "-o", "json")
        obj: dict[str, Any] = json.loads(out.stdout)
        return obj

    def fleet_pods(self, namespace: str, name: str = "detector") -> list[dict[str, Any]]:
        """The live (not terminating) pods the fleet's status.selector selects."""
        selector = self.fleet(namespace, name).get("status", {}).get("selector")
        assert selector, f"fleet {namespace}/{name} has no status.selector"
        out = self.cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
        pods = json.loads(out.stdout)["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def operator_args(self, namespace: str, release: str) -> list[str]:
        """The arguments the installed chart gives the operator container."""
        out = self.cluster.kubectl(
            "get", "deployment", release, "-n", namespace,
            "-o", "jsonpath={.spec.template.spec.containers[0].args}",
        )  # fmt: skip
        args: list[str] = json.loads(out.stdout)
        return args

    def clean_up(self, namespace: str, release: str, *fleet_namespaces: str) -> None:
        """After a failure: uninstall, and drop finalizers no operator will remove any more."""
        self.cluster.helm("uninstall", release, "-n", namespace, "--wait", check=False)
        for where in fleet_namespaces:
            names = self.cluster.kubectl("get", "ifleet", "-n", where, "-o", "name", check=False)
            for name in names.stdout.split():
                self.cluster.kubectl(
                    "patch", name, "-n", where, "--type=merge",
                    "-p", '{"metadata":{"finalizers":null}}', check=False,
                )  # fmt: skip

    @contextlib.contextmanager
    def extra_namespace(self, name: str) -> Iterator[str]:
        self.cluster.kubectl("create", "namespace", name)
        self.cluster.kubectl("label", "namespace", name, "inferencefleet.dev/e2e=true")
        try:
            yield name
        finally:
            self.cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def journey(cluster: Any) -> Journey:
    return Journey(cluster)
