"""What the pytest fixture hands to tests: kubectl/helm runners and an API client."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .cluster import State, api_get, check

T = TypeVar("T")

VERSIONS_FILE = Path(__file__).resolve().parent.parent / "versions.env"


def pinned_versions() -> dict[str, str]:
    """KEY=value pairs of e2e/versions.env."""
    out = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


class Cluster:
    """A running test cluster. `env` runs kubectl/helm/anything against it."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.kubeconfig = state.kubeconfig
        self.server = state.server
        self.bin_dir = Path(state.bin_dir)
        self.env = {**os.environ, **state.env()}
        self._api: Any = None

    def check(self) -> None:
        """Raise ClusterError naming any component that is no longer running."""
        check(self.state.dir)

    def run(
        self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a command with the cluster's PATH and KUBECONFIG; raise on failure, with output."""
        out = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {out.returncode}\n"
                f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
            )
        return out

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.bin_dir / "kubectl"), *args, **kw)

    def helm(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.bin_dir / "helm"), *args, **kw)

    def get(self, path: str) -> tuple[int, str]:
        """Raw authenticated GET against the apiserver (e.g. "/readyz")."""
        return api_get(self.state, path)

    @property
    def api(self) -> Any:
        """A kubernetes.client.ApiClient for this cluster (closed at session end)."""
        if self._api is None:
            from kubernetes import config

            self._api = config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None


def wait_until(what: str, fn: Callable[[], T], timeout: float = 60, interval: float = 0.25) -> T:
    """Poll fn until it returns something truthy; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: T = fn()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)
        last = fn()
    return last
