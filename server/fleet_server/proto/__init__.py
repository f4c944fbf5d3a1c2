"""Generated Open Inference Protocol code (see inference.proto; regenerate with `make proto`)."""
