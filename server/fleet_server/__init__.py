"""The InferenceFleet inference worker: protocol, batcher, model runner, client and load generator."""
