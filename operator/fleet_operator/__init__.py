"""The InferenceFleet control plane: fleet spec, kopf operator, GPU sharing, local runtime."""
