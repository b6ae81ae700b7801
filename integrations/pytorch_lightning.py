"""``from boundguard.integrations.pytorch_lightning import BoundGuard`` — the callback for ``pytorch_lightning``."""
try:
    import pytorch_lightning as _pl
except ImportError as e:  # pragma: no cover - exercised only without pytorch_lightning
    raise ImportError(
        "boundguard.integrations.pytorch_lightning needs pytorch-lightning: "
        "pip install 'boundguard[lightning]' pytorch-lightning"
    ) from e

from boundguard.integrations._lightning import LightningGuard
from boundguard.integrations.torch import apply_bounds, watch


class BoundGuard(LightningGuard, _pl.Callback):
    __doc__ = LightningGuard.__doc__


__all__ = ["BoundGuard", "apply_bounds", "watch"]
