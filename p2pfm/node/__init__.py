"""The node runtime: build a node from its config, then run its rounds (train, exchange, mix, record)."""
