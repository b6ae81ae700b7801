"""``from boundguard.integrations.lightning import BoundGuard`` — the callback for ``lightning.pytorch``."""
try:
    import lightning.pytorch as _pl
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "boundguard.integrations.lightning needs Lightning: pip install 'boundguard[lightning]'"
    ) from e

from boundguard.integrations._lightning import LightningGuard
from boundguard.integrations.torch import apply_bounds, watch


class BoundGuard(LightningGuard, _pl.Callback):
    __doc__ = LightningGuard.__doc__


__all__ = ["BoundGuard", "apply_bounds", "watch"]
