"""Reading fleet.yaml for a local run (with command-line overrides), and noticing edits to it."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from fleet_spec.spec import FleetSpec, FleetSpecError, parse_fleet


def read_fleet(path: Path, model_override: str | None = None) -> FleetSpec:
    """Parse and validate the manifest with the CRD's schema and defaults (FleetSpecError names
    the field). `model_override` replaces spec.model.source before validation."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetSpecError([("<file>", f"cannot read {path}: {exc.strerror}")]) from exc
    return fleet_from_text(text, str(path), model_override)


def fleet_from_text(text: str, where: str, model_override: str | None = None) -> FleetSpec:
    """A fleet from YAML (or JSON) text; `where` names its origin in errors."""
    try:
        manifest = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FleetSpecError([("<file>", f"{where} is not valid YAML: {exc}")]) from exc
    if not isinstance(manifest, dict):
        raise FleetSpecError([("<root>", f"{where} does not hold one YAML mapping")])
    return parse_fleet(with_model(manifest, model_override))


def with_model(manifest: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    document = copy.deepcopy(dict(manifest))
    if source is not None:
        spec = document.setdefault("spec", {})
        if isinstance(spec, dict):
            model = spec.setdefault("model", {})
            if isinstance(model, dict):
                model["source"] = source
    return document


def check_model_file(spec: FleetSpec) -> None:
    """A file model must exist here (on a cluster it comes from a volume; locally it is a path)."""
    if not spec.model.is_builtin and not Path(spec.model.source).is_file():
        raise FleetSpecError([("spec.model.source", f"{spec.model.source}: no such file")])


async def watch_file(
    path: Path,
    on_change: Callable[[], Awaitable[None]],
    period_s: float = 1.0,
) -> None:
    """Call `on_change` whenever the file's content changes (polled: works for editors that
    replace the file, and for files on any filesystem)."""
    last = _content(path)
    while True:
        await asyncio.sleep(period_s)
        now = _content(path)
        if now is not None and now != last:
            last = now
            await on_change()


def _content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
