"""Configuration: TOML files decoded by one msgspec schema (torch-free and zmq-free)."""
