"""Simulate gossip from your own tests: the ``p2pfm`` pytest plugin and its helpers (docs/testing.md).

``pytest_plugin`` is registered through the ``pytest11`` entry point, so any
project that installs p2pfm gets its fixtures (``gossip_network``,
``p2pfm_seed``, ``tiny_model``). ``tiny`` builds a tiny random BERT
classifier and toy data for real LoRA adapters in the simulator (it loads
torch when used). Importing this package loads neither.
"""
