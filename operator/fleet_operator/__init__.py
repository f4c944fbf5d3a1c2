"""The Kubernetes operator for InferenceFleet: observe, decide, act (kopf)."""
