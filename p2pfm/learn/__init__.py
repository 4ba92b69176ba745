"""What a node trains: the ``Learner`` interface, LoRA adapters, data, checkpoints (torch lives here).

Importing this package imports nothing heavy: the numpy-only modules
(``learner``, ``data``) load without torch.
"""
