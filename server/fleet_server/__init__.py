"""The InferenceFleet worker: protocol, batcher, model runner, client and load generator."""
