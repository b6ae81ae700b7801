"""Framework adapters. Import the one you use; each imports its framework on import:

- ``boundguard.integrations.lightning`` / ``.pytorch_lightning``: ``BoundGuard`` Lightning callback
- ``boundguard.integrations.keras``: ``BoundGuard`` Keras 3 callback
- ``boundguard.integrations.torch``: ``watch(model)`` for plain PyTorch loops
"""
__all__: list = []
