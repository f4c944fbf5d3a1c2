"""The InferenceFleet control plane: fleet spec, kopf operator, GPU sharing and the local runtime."""
