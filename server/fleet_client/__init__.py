"""The client side: OIP client, load generator, `inferencefleet bench` (no torch)."""
