"""p2pfm: serverless peer-to-peer co-training of foundation models.

Each node fine-tunes LoRA adapters locally and gossips signed, msgpack-encoded
updates to its neighbours, which mix them towards the network-wide average.
See docs/architecture.md for the layers and docs/protocol.md for the wire.
"""

__version__ = "0.1.0"
