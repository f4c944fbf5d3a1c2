"""The fleet spec and capacity rules from the CRD (no Kubernetes client, no torch)."""
