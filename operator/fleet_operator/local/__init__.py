"""The local runtime: a fleet.yaml as supervised worker processes on one machine."""
