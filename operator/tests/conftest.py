"""Fixtures for the operator's tests: the shared invalid fleets and (e2e) the operator process."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

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
