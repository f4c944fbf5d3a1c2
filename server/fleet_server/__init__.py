"""The inference worker (`inferencefleet serve`): servicer, batcher, model runner."""
