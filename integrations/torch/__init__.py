"""PyTorch adapter: ``watch(model)`` for plain loops, and the engine the Lightning callbacks share.

Between checks nothing is read back to the host: every watched tensor is reduced on its device into
one row of a preallocated fp32 buffer; at a check the rows travel to the host in one transfer and
the framework-free core judges them.

Modules: :mod:`.paths` (tensors in nested batches and outputs), :mod:`.probe` (what the first step
shows), :mod:`.facts` (what the probe showed of the output layer and the loss, the output layer's
parameters, the batch's targets and inputs), :mod:`.hooks` (hooks that copies of a model carry inert,
what counts as a training forward, what cannot be read), the reducer's layers (:mod:`.layout`,
:mod:`.kernels`, :mod:`.mirror`, :mod:`.staging`, :mod:`.reducer`, :mod:`.sync`: on-device statistics),
:mod:`.bounding` (bound surgery, ``apply_bounds``), :mod:`.engine` (the adapter the integrations drive),
:mod:`.watch` (the plain loop, one process or several).
"""
try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "boundguard.integrations.torch needs PyTorch: pip install 'boundguard[torch]' "
        "(or 'boundguard[lightning]' for the Lightning callback)"
    ) from e

from boundguard.integrations.torch.bounding import BoundHook, apply_bounds, bound_records
from boundguard.integrations.torch.engine import TorchEngine
from boundguard.integrations.torch.reducer import Reducer
from boundguard.integrations.torch.watch import Guard, watch
from boundguard.session import DEFAULT_ALERTS_PATH

__all__ = ["watch", "Guard", "TorchEngine", "Reducer", "BoundHook", "apply_bounds", "bound_records",
           "DEFAULT_ALERTS_PATH"]
