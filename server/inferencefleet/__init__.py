"""The `inferencefleet` command line: one entry point for every runtime."""
