"""The e2e test cluster: a real control plane from pinned upstream builds, kwok GPU nodes."""

from .cluster import ClusterError, State, check, down, up

__all__ = ["ClusterError", "State", "check", "down", "up"]
