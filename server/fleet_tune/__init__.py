"""`inferencefleet tune`: the search for the fleet configuration that fits the hardware."""
