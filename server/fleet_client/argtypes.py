"""argparse value types shared by the `inferencefleet` subcommands."""

from __future__ import annotations

import argparse


def at_least_one(text: str) -> int:
    """An integer count that must be >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """A duration that must be > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_seconds(text: str) -> float:
    """A duration that may be 0."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated integers, at least one."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("needs at least one value")
    return values
