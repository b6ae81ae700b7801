"""Framework adapters. Import the one you use; each imports its framework on import:

- ``boundguard.integrations.lightning`` / ``.pytorch_lightning``: ``BoundGuard`` Lightning callback
- ``boundguard.integrations.keras``: ``BoundGuard`` Keras 3 callback
- ``boundguard.integrations.torch``: ``watch(model)`` for plain PyTorch loops
- ``boundguard.integrations.fabric``: ``watch(fabric, model)`` for Lightning Fabric loops (ranks decide together)
- ``boundguard.integrations.transformers``: ``BoundGuardCallback`` for the Hugging Face ``transformers.Trainer``
"""
__all__: list = []
