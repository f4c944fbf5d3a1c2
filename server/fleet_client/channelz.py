"""Per-target call counts of this process's gRPC channels, read from gRPC's channelz registry.

round_robin hides which backend served a call; channelz (the same registry that the
grpcio-channelz service exposes) counts calls per subchannel, and a subchannel is one
backend address. This reads it in-process through the functions that service wraps.
"""

from __future__ import annotations

import importlib
import json
from typing import Any


def _cygrpc() -> Any | None:
    try:
        return importlib.import_module("grpc._cython.cygrpc")
    except ImportError:
        return None


def _top_channels(cygrpc: Any) -> list[dict[str, Any]]:
    channels: list[dict[str, Any]] = []
    start = 0
    while True:
        page = json.loads(cygrpc.channelz_get_top_channels(start))
        batch = page.get("channel", [])
        channels.extend(batch)
        if page.get("end", True) or not batch:
            return channels
        start = max(int(c["ref"]["channelId"]) for c in batch) + 1


def _address(target: str) -> str:
    """'ipv4:127.0.0.1:8001' -> '127.0.0.1:8001'."""
    for prefix in ("ipv4:", "ipv6:", "unix:"):
        if target.startswith(prefix):
            return target[len(prefix) :]
    return target


def subchannel_calls(channel_target: str) -> dict[str, tuple[int, int]]:
    """backend address -> (calls started, calls succeeded), summed over every channel of this
    process whose target is `channel_target`. Empty when channelz is not available."""
    cygrpc = _cygrpc()
    if cygrpc is None:
        return {}
    counts: dict[str, tuple[int, int]] = {}
    for channel in _top_channels(cygrpc):
        if channel.get("data", {}).get("target") != channel_target:
            continue
        for ref in channel.get("subchannelRef", []):
            sub = json.loads(cygrpc.channelz_get_subchannel(int(ref["subchannelId"])))
            data = sub.get("subchannel", {}).get("data", {})
            address = _address(str(data.get("target", "?")))
            started, succeeded = counts.get(address, (0, 0))
            counts[address] = (
                started + int(data.get("callsStarted", 0)),
                succeeded + int(data.get("callsSucceeded", 0)),
            )
    return counts


def calls_delta(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], *, succeeded: bool
) -> dict[str, int]:
    """Calls started (or succeeded) per address between two snapshots; zero counts dropped."""
    index = 1 if succeeded else 0
    delta = {}
    for address, now in after.items():
        count = now[index] - before.get(address, (0, 0))[index]
        if count > 0:
            delta[address] = count
    return delta
