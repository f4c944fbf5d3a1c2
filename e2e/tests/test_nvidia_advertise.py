"""e2e's `advertise`: NVIDIA's own config parser says what a node would advertise, or refuses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2ecluster.cluster import ensure_built

pytestmark = pytest.mark.e2e  # needs the cluster build (e2e/build.sh), not a running cluster


@pytest.fixture(scope="module")
def advertise() -> Path:
    return ensure_built() / "bin" / "advertise"


def run(
    advertise: Path, tmp_path: Path, config: Any, *flags: str, mps_root: bool = True
) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "config.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    env = {"MPS_ROOT": "/run/nvidia/mps"} if mps_root else {}
    out = subprocess.run(
        [str(advertise), "--config-file", str(path), *flags],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )  # fmt: skip
    return out.returncode, json.loads(out.stdout.splitlines()[-1])


def sharing(strategy: str, replicas: int, **options: Any) -> dict[str, Any]:
    resources = [{"name": "nvidia.com/gpu", "replicas": replicas}]
    return {"version": "v1", "sharing": {strategy: {**options, "resources": resources}}}


def test_no_sharing(advertise: Path, tmp_path: Path) -> None:
    for config in ("", "version: v1\nflags:\n  migStrategy: none\n"):
        code, out = run(advertise, tmp_path, config)
        assert code == 0
        assert out["resource"] == "nvidia.com/gpu"
        assert (out["replicas"], out["strategy"], out["product_suffix"]) == (1, "none", "")


def test_time_slicing_and_mps(advertise: Path, tmp_path: Path) -> None:
    code, out = run(advertise, tmp_path, sharing("timeSlicing", 4))
    assert code == 0
    assert (out["replicas"], out["strategy"], out["product_suffix"]) == (
        4,
        "time-slicing",
        "-SHARED",
    )
    code, out = run(advertise, tmp_path, sharing("mps", 3))
    assert code == 0
    assert (out["resource"], out["replicas"], out["strategy"]) == ("nvidia.com/gpu", 3, "mps")


def test_rename_by_default_advertises_the_shared_resource(advertise: Path, tmp_path: Path) -> None:
    code, out = run(advertise, tmp_path, sharing("timeSlicing", 2, renameByDefault=True))
    assert code == 0
    assert (out["resource"], out["renamed"], out["product_suffix"]) == (
        "nvidia.com/gpu.shared", True, "",
    )  # fmt: skip


def test_rename_and_devices_per_resource_are_ignored(advertise: Path, tmp_path: Path) -> None:
    config = sharing("timeSlicing", 2)
    config["sharing"]["timeSlicing"]["resources"][0] |= {"rename": "gpu-shared", "devices": 1}
    code, out = run(advertise, tmp_path, config)
    assert code == 0
    assert (out["resource"], out["replicas"]) == ("nvidia.com/gpu", 2)


@pytest.mark.parametrize(
    ("config", "flags", "error"),
    [
        (sharing("timeSlicing", 1), (), "number of replicas must be >= 2"),
        ({"version": "v1", "sharing": {"timeSlicing": {}}}, (), "no resources specified"),
        ({"version": "v2"}, (), "unknown version: v2"),
        (
            {**sharing("mps", 2), "flags": {"migStrategy": "mixed"}},
            (),
            "using --mig-strategy=mixed is not supported with MPS",
        ),
        (
            {**sharing("mps", 2), "flags": {"migStrategy": "single"}},
            ("--mig-enabled",),
            "sharing using MPS is not supported for MIG devices",
        ),
        ({**sharing("mps", 2), "flags": {"migStrategy": "other"}}, (), "unknown MIG strategy"),
    ],
    ids=["one-replica", "no-resources", "version", "mps-mig-mixed", "mps-on-mig", "mig-strategy"],
)
def test_configs_the_plugin_refuses(
    advertise: Path, tmp_path: Path, config: Any, flags: tuple[str, ...], error: str
) -> None:
    code, out = run(advertise, tmp_path, config, *flags)
    assert code == 1
    assert error in out["error"]


def test_mps_needs_the_mps_root_the_chart_sets(advertise: Path, tmp_path: Path) -> None:
    code, out = run(advertise, tmp_path, sharing("mps", 2), mps_root=False)
    assert code == 1
    assert "requires --mps-root" in out["error"]


def test_mps_wins_over_time_slicing(advertise: Path, tmp_path: Path) -> None:
    config = sharing("mps", 3)
    config["sharing"]["timeSlicing"] = sharing("timeSlicing", 2)["sharing"]["timeSlicing"]
    code, out = run(advertise, tmp_path, config)
    assert code == 0
    assert (out["strategy"], out["replicas"]) == ("mps", 3)
