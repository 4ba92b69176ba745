"""The protocol core: identity, wire format, fingerprint, protocol state machine, consensus, topology.

Sans-I/O and model-free: numpy, pynacl, msgpack, blake3 and networkx only
(never torch, zmq, peft or transformers; import-linter checks it).
"""
