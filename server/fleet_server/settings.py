"""Batching settings: their limits, and reading them from a YAML/JSON file (the CRD's keys)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The InferenceFleet CRD's spec.batching keys, their bounds, and the dataclass field each sets.
_KEYS: dict[str, tuple[str, int, int]] = {
    "maxBatchSize": ("max_batch_size", 1, 256),
    "maxQueueDelayMicroseconds": ("max_queue_delay_us", 0, 1_000_000),
    "maxQueueSize": ("max_queue_size", 1, 65_536),
}


class SettingsError(ValueError):
    """A batching settings file or value that cannot be applied; the message names the key."""


@dataclass(frozen=True)
class BatchSettings:
    """How the dynamic batcher forms batches (see batcher.py for the exact rule)."""

    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    max_queue_size: int = 64

    def __post_init__(self) -> None:
        for key, (field, low, high) in _KEYS.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SettingsError(f"{key}: must be an integer, got {value!r}")
            if not low <= value <= high:
                raise SettingsError(f"{key}: must be between {low} and {high}, got {value}")

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_us / 1e6


def settings_from_mapping(data: Any, base: BatchSettings) -> BatchSettings:
    """Settings from a mapping with the CRD's keys; keys it lacks keep their value from `base`.

    A mapping nested under `batching:` (a whole spec fragment) is accepted too.
    """
    if isinstance(data, dict) and isinstance(data.get("batching"), dict):
        data = data["batching"]
    if data is None:
        return base
    if not isinstance(data, dict):
        raise SettingsError(f"batching settings: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise SettingsError(f"batching settings: unknown keys {unknown}; known: {sorted(_KEYS)}")
    values = {field: getattr(base, field) for field, _, _ in _KEYS.values()}
    for key, value in data.items():
        values[_KEYS[key][0]] = value
    return BatchSettings(**values)


def load_settings_file(path: Path, base: BatchSettings) -> BatchSettings:
    """Read a YAML or JSON batching settings file (JSON is YAML)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"{path}: cannot read batching settings: {exc}") from exc
    try:
        return settings_from_mapping(data, base)
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from exc
