"""The local runtime (`inferencefleet run`): a fleet.yaml as supervised local workers."""
