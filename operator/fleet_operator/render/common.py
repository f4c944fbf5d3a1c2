"""What every rendered child shares: the owning fleet and its object metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleet_operator.names import labels, owner_reference


@dataclass(frozen=True)
class Owner:
    """The fleet object the children belong to (from its metadata)."""

    name: str
    namespace: str
    uid: str
    generation: int = 1


def metadata(owner: Owner, name: str, **extra: Any) -> dict[str, Any]:
    """A child's metadata: name, namespace, the fleet's labels, the controlling owner."""
    meta = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner.name),
        "ownerReferences": [owner_reference({"name": owner.name, "uid": owner.uid})],
    }
    meta.update(extra)
    return meta
