"""Our Open Inference Protocol: inference.proto, its generated code, the array types."""
