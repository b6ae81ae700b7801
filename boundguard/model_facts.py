"""What an adapter learned about the model: the activation on the output and the loss.

Framework-free: adapters name the loss (``"mse_loss"``, ``"binary_crossentropy"``...) and hand over
the activation they found, or two numpy arrays for :func:`infer_activation` to compare.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

__all__ = ["ModelFacts", "LossInfo", "classify_loss", "infer_activation", "activation_range", "ACTIVATIONS"]

#: Activation names the core understands.
ACTIVATIONS = (
    "identity", "sigmoid", "tanh", "softmax", "log_softmax", "clamp", "relu",
    "scaled_sigmoid", "scaled_tanh", "unknown",
)


@dataclass(frozen=True)
class LossInfo:
    """``family``: regression | probability | logits | log_probs | other."""

    name: str
    family: str
    multiclass: bool = False
    link: Optional[str] = None  # sigmoid/softmax for logits losses

    @property
    def consumes_logits(self) -> bool:
        return self.family == "logits"

    @property
    def link_applied(self) -> bool:
        """The loss applies a link to its input (logits → sigmoid/softmax, log-probabilities → exp), so
        the predictions a user gets are link(raw) and raw values outside the bounds are no violation."""
        return self.family in ("logits", "log_probs", "log_rate")


_LOSSES = {
    # PyTorch (torch.nn.functional names)
    "mse_loss": ("regression", False, None),
    "l1_loss": ("regression", False, None),
    "smooth_l1_loss": ("regression", False, None),
    "huber_loss": ("regression", False, None),
    "binary_cross_entropy": ("probability", False, None),
    "binary_cross_entropy_with_logits": ("logits", False, "sigmoid"),
    "multilabel_soft_margin_loss": ("logits", False, "sigmoid"),
    "cross_entropy": ("logits", True, "softmax"),
    "nll_loss": ("log_probs", True, "exp"),
    "kl_div": ("log_probs", True, "exp"),
    # a log-rate: the loss exponentiates its input (PoissonNLLLoss(log_input=True), the default); with
    # log_input=False the input is the rate itself and the adapter reports the loss as another family
    "poisson_nll_loss": ("log_rate", False, "exp"),
    # Keras (canonical names; from_logits handled in classify_loss)
    "mean_squared_error": ("regression", False, None),
    "mean_absolute_error": ("regression", False, None),
    "huber": ("regression", False, None),
    "log_cosh": ("regression", False, None),
    "binary_crossentropy": ("probability", False, None),
    "binary_focal_crossentropy": ("probability", False, None),
    "categorical_crossentropy": ("probability", True, None),
    "sparse_categorical_crossentropy": ("probability", True, None),
    "categorical_focal_crossentropy": ("probability", True, None),
    "kl_divergence": ("probability", True, None),
}
_ALIASES = {
    "mse": "mean_squared_error", "mae": "mean_absolute_error", "kld": "kl_divergence",
    "kullback_leibler_divergence": "kl_divergence", "meansquarederror": "mean_squared_error",
    "meanabsoluteerror": "mean_absolute_error", "binarycrossentropy": "binary_crossentropy",
    "categoricalcrossentropy": "categorical_crossentropy",
    "sparsecategoricalcrossentropy": "sparse_categorical_crossentropy",
    "binaryfocalcrossentropy": "binary_focal_crossentropy", "kldivergence": "kl_divergence",
    "huberloss": "huber", "logcosh": "log_cosh",
}


def classify_loss(name: Optional[str], from_logits: bool = False) -> Optional[LossInfo]:
    """The family of a loss by name; Keras probability losses with ``from_logits=True`` are logits losses."""
    if not name:
        return None
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _LOSSES:
        return LossInfo(name, "other")
    family, multiclass, link = _LOSSES[key]
    if from_logits and family == "probability":
        family, link = "logits", ("softmax" if multiclass else "sigmoid")
    return LossInfo(key, family, multiclass, link)


def activation_range(name: str, params: Optional[dict] = None) -> Optional[tuple[float, float]]:
    """The closed range an activation's outputs can take (None when unbounded or unknown)."""
    p = params or {}
    if name in ("sigmoid", "softmax"):
        return (0.0, 1.0)
    if name == "tanh":
        return (-1.0, 1.0)
    if name in ("clamp", "scaled_sigmoid", "scaled_tanh"):
        lo, hi = p.get("lo", -math.inf), p.get("hi", math.inf)
        if lo is None:
            lo = -math.inf
        if hi is None:
            hi = math.inf
        return (float(lo), float(hi))
    if name == "relu":
        return (0.0, math.inf)
    if name == "log_softmax":
        return (-math.inf, 0.0)
    return None


@dataclass
class ModelFacts:
    """What the probe found. Every field may be unknown (None / ``"unknown"``)."""

    pred_where: Optional[str] = None
    pre_where: Optional[str] = None
    activation: str = "unknown"
    activation_params: dict = field(default_factory=dict)
    loss: Optional[LossInfo] = None
    loss_where: Optional[str] = None
    target_where: Optional[str] = None
    input_where: Optional[str] = None
    target_integer: bool = False
    input_integer: bool = False
    #: a layer at the model's input that scales what the first weighted layer sees (an adapted
    #: ``Normalization``, ``Rescaling(1/255)``, a normalisation layer): the raw inputs' scale is not judged
    input_scaled_by: Optional[str] = None
    #: the training loss is that loss alone, averaged over the batch (no auxiliary terms, no sum
    #: reduction): its value can be compared with a constant predictor's loss
    loss_plain: bool = False
    #: the target value the loss ignores (``ignore_index`` of a class-index loss: -100 by default, 255 for
    #: the void label of segmentation data): left out of the target statistics
    target_ignore: Optional[float] = None
    #: the parameters whose gradients are watched (the output layer), and whether a loss scaler (fp16
    #: ``GradScaler``) may make a step's gradients overflow on purpose (it then skips that step)
    grad_where: Optional[str] = None
    grad_scaled: bool = False
    classes: Optional[int] = None  # size of the class dimension of the prediction, when > 1
    #: a soft cap ``cap * tanh(z / cap)`` inserted on logits (``logits_growing`` with ``bound``): its ``cap``
    logit_cap: Optional[float] = None
    pre_dtype: Optional[str] = None  # e.g. "float16" under fp16 autocast
    notes: list = field(default_factory=list)  # (what could not be located, option that fixes it)

    @property
    def output_range(self) -> Optional[tuple[float, float]]:
        return activation_range(self.activation, self.activation_params)

    @property
    def output_bounded(self) -> bool:
        r = self.output_range
        return r is not None and math.isfinite(r[0]) and math.isfinite(r[1])

    def describe(self, bounds: Any = None) -> str:
        """What is watched, in words (one line), so a wrong guess of the probe is visible at once.

        Example:
            >>> f = ModelFacts(pred_where="fc", activation="identity", loss=classify_loss("mse_loss"),
            ...                loss_where="mse_loss", target_where="batch[1]", input_where="batch[0]")
            >>> f.describe()
            'boundguard watches: prediction fc (activation identity), loss mse_loss (regression), targets batch[1], inputs batch[0], bounds none'
        """
        act = self.activation + (f" {self.activation_params}" if self.activation_params else "")
        loss = f"{self.loss_where or self.loss.name} ({self.loss.family})" if self.loss is not None else "not found"
        if bounds is None:
            b = "none"
        else:
            b = bounds.describe() if hasattr(bounds, "describe") else str(bounds)
        return (f"boundguard watches: prediction {self.pred_where or 'not found'} (activation {act}), loss {loss}, "
                f"targets {self.target_where or 'not found'}, inputs {self.input_where or 'not found'}"
                + (f" (scaled inside the model by {self.input_scaled_by})" if self.input_scaled_by else "")
                + f", bounds {b}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loss"] = asdict(self.loss) if self.loss else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelFacts":
        d = dict(d)
        if d.get("loss"):
            d["loss"] = LossInfo(**d["loss"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def infer_activation(z: np.ndarray, p: np.ndarray, *, atol: float = 1e-4) -> tuple[str, dict]:
    """Which activation maps pre-activation ``z`` to prediction ``p``, by comparing the two tensors.

    Recognises identity, sigmoid, tanh, softmax / log_softmax (any axis), clamp / relu and the affine
    rescalings ``a + b * sigmoid(z)`` and ``a + b * tanh(z)``. Returns ``("unknown", {})`` otherwise.

    Example:
        >>> z = np.linspace(-3, 3, 13)
        >>> infer_activation(z, np.clip(z, -1, 1))
        ('clamp', {'lo': -1.0, 'hi': 1.0})
    """
    z = np.asarray(z, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if z.size == 0 or z.size != p.size:
        return "unknown", {}
    if z.shape != p.shape:
        z, p = z.reshape(-1), p.reshape(-1)
    ok = np.isfinite(z) & np.isfinite(p)
    if not ok.all():
        if ok.sum() < 2 or z.ndim > 1:
            return "unknown", {}
        z, p = z[ok], p[ok]

    def close(a: np.ndarray) -> bool:
        return bool(np.allclose(a, p, rtol=1e-4, atol=atol))

    if close(z):
        return "identity", {}
    zf, pf = z.reshape(-1), p.reshape(-1)
    if zf.std() > 1e-8:
        b = float(np.cov(zf, pf, bias=True)[0, 1] / zf.var())
        a = float(pf.mean() - b * zf.mean())
        if abs(b) > 1e-8 and close((a + b * zf).reshape(p.shape)):
            return "identity", {"scale": round(b, 6), "shift": round(a, 6)}  # affine: still unbounded
    for name, f in (("sigmoid", _sigmoid), ("tanh", np.tanh)):
        if close(f(z)):
            return name, {}
    if z.ndim >= 1 and z.shape[-1] > 1 or z.ndim > 1:
        for axis in range(z.ndim - 1, -1, -1) if z.ndim > 1 else [0]:
            if z.shape[axis] < 2:
                continue
            s = _softmax(z, axis)
            if close(s):
                return "softmax", {"dim": axis}
            if close(np.log(np.maximum(s, 1e-300))):
                return "log_softmax", {"dim": axis}
    # clamp: p equals z inside (lo, hi) and lo / hi outside
    lo, hi = float(p.min()), float(p.max())
    if close(np.clip(z, lo, hi)):
        hit_lo, hit_hi = bool((z < lo - atol).any()), bool((z > hi + atol).any())
        if hit_lo and lo == 0.0 and not hit_hi:
            return "relu", {}
        return "clamp", {"lo": lo if hit_lo else None, "hi": hi if hit_hi else None}
    for name, f in (("scaled_sigmoid", _sigmoid), ("scaled_tanh", np.tanh)):
        s = f(z).reshape(-1)
        if s.std() < 1e-6:
            continue
        b = float(np.cov(s, p.reshape(-1), bias=True)[0, 1] / s.var())
        a = float(p.mean() - b * s.mean())
        if abs(b) > 1e-8 and close((a + b * s).reshape(p.shape)):
            if name == "scaled_sigmoid":
                lo_, hi_ = sorted((a, a + b))
            else:
                lo_, hi_ = sorted((a - b, a + b))
            return name, {"lo": round(lo_, 6), "hi": round(hi_, 6)}
    return "unknown", {}
