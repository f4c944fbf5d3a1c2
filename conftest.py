"""Repo-wide pytest fixtures: the e2e test cluster (`cluster`) and a fresh `namespace` per test.

`cluster` (session): reuses a healthy cluster that is already up (`e2e/cluster up`),
otherwise builds if needed and starts one, and stops it at the end of the session
only if it started it (INFERENCEFLEET_CLUSTER_KEEP=1 keeps it). A missing Go
toolchain or a failed build fails the tests that need the cluster; it never skips.
`namespace` (function): a new namespace whose default ServiceAccount exists; deleted,
and waited for, after the test; the cluster's components are checked before and after.
`device_plugins` (function): NVIDIA's device-plugin ConfigMap and per-node pods; what a
test changed there (keys, labels, volume lag) is put back afterwards.
Tests using either fixture are marked `e2e` automatically (mark them explicitly too).
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))

from e2ecluster import ClusterError, down, up
from e2ecluster.handle import Cluster, wait_until
from e2ecluster.nvidia import DevicePlugins

CLUSTER_FIXTURES = {"cluster", "namespace", "device_plugins"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the cluster is an e2e test, so `-m "not e2e"` never starts it."""
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    try:
        state, started = up()
    except ClusterError as e:
        pytest.fail(f"the e2e test cluster could not be brought up: {e}", pytrace=False)
    handle = Cluster(state)
    try:
        yield handle
    finally:
        handle.close()
        if started and os.environ.get("INFERENCEFLEET_CLUSTER_KEEP") != "1":
            down(state.dir)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        cluster.check()
    except ClusterError as e:
        pytest.fail(str(e), pytrace=False)
    core = client.CoreV1Api(cluster.api)
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{secrets.token_hex(3)}"
    core.create_namespace(
        {"metadata": {"name": name, "labels": {"inferencefleet.dev/e2e": "true"}}}
    )

    def exists(read: Callable[..., object], *args: str) -> bool:
        try:
            read(*args)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    wait_until(
        f"ServiceAccount default in {name}",
        lambda: exists(core.read_namespaced_service_account, "default", name),
        timeout=30,
    )
    try:
        yield name
    finally:
        core.delete_namespace(name)
        wait_until(
            f"namespace {name} to be deleted",
            lambda: not exists(core.read_namespace, name),
            timeout=90,
        )
        try:
            cluster.check()
        except ClusterError as e:
            pytest.fail(str(e), pytrace=False)


@pytest.fixture
def device_plugins(cluster: Cluster) -> Iterator[DevicePlugins]:
    plugins = DevicePlugins(cluster.state)
    try:
        yield plugins
    finally:
        restarted = plugins.restore()
        wait_until(
            f"the device plugins of {', '.join(restarted) or 'no node'} to serve again",
            lambda: all(plugins.serving(node) for node in restarted),
            timeout=60,
        )
