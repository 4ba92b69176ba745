"""Configuration: TOML files validated into frozen settings (torch-free and zmq-free)."""
