"""The activations boundguard puts on a Keras model, and bound surgery on a model.

- :class:`BoundActivation`: the bounding activation ``on_violation="bound"`` inserts. It is registered
  as serializable under ``boundguard>BoundActivation`` (its name and config are stable: models saved by
  earlier versions load), so ``keras.models.load_model`` needs no ``custom_objects``.
- :class:`WatchedActivation`: the wrapper on the output layer's ``activation`` while ``fit`` runs.
- :func:`apply_bounds`: replay recorded bounds on a model (rebuilt from code, resumed).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import keras
from keras import ops

from boundguard.integrations.keras.graph import activation_attr, flat_layers, layer_name, locate
from boundguard.sinks import warn_user
from boundguard.surgery import BOUND_KINDS, BoundRecord

__all__ = ["BoundActivation", "WatchedActivation", "apply_bounds", "set_activation", "unwrap", "softcap_of",
           "logits_view", "retrace_step", "remove_leftovers", "watch_activation", "unwatch_activation"]


@keras.saving.register_keras_serializable(package="boundguard", name="BoundActivation")
class BoundActivation:
    """The bounding activation boundguard inserts; serializable, so saved models load without ``custom_objects``.

    ``kind``: ``"sigmoid"`` (0, 1) | ``"tanh"`` (-1, 1) | ``"scaled_sigmoid"`` ``lo + (hi - lo) * sigmoid(z)``
    | ``"softmax"`` over ``axis`` (a distribution) | ``"softcap"`` ``hi * tanh(z / hi)`` with ``lo = -hi``
    (logits kept within ``(-hi, hi)`` for a loss that applies its own softmax: ``from_logits=True`` stays).

    Example:
        >>> act = BoundActivation("scaled_sigmoid", lo=-3.0, hi=3.0)
        >>> float(keras.ops.convert_to_numpy(act(keras.ops.zeros((1,)))[0]))
        0.0
        >>> cap = BoundActivation("softcap", lo=-30.0, hi=30.0)
        >>> round(float(keras.ops.convert_to_numpy(cap(keras.ops.full((1,), 1e4)))[0]), 3)
        30.0
    """

    def __init__(self, kind: str = "sigmoid", lo: float = 0.0, hi: float = 1.0, axis: int = -1) -> None:
        if kind not in BOUND_KINDS:
            raise ValueError(f"BoundActivation kind must be one of {', '.join(BOUND_KINDS)}, got {kind!r}")
        self.kind, self.lo, self.hi, self.axis = kind, float(lo), float(hi), int(axis)
        if kind == "softcap" and not (math.isfinite(self.hi) and self.hi > 0):
            raise ValueError(f"a softcap BoundActivation needs a positive, finite hi (the cap), got {hi!r}")
        self.__name__ = f"boundguard_{kind}"

    @classmethod
    def of(cls, record: BoundRecord) -> "BoundActivation":
        """The activation a bound record describes."""
        return cls(record.kind, record.lo, record.hi, record.dim)

    def __call__(self, z: Any) -> Any:
        if self.kind == "sigmoid":
            return ops.sigmoid(z)
        if self.kind == "tanh":
            return ops.tanh(z)
        if self.kind == "softmax":
            return ops.softmax(z, axis=self.axis)
        if self.kind == "softcap":  # logits within (-hi, hi); the loss applies its own softmax
            return self.hi * ops.tanh(z / self.hi)
        return self.lo + (self.hi - self.lo) * ops.sigmoid(z)

    def get_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "lo": self.lo, "hi": self.hi, "axis": self.axis}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BoundActivation":
        return cls(**config)

    def __repr__(self) -> str:
        return f"BoundActivation({self.kind!r}, lo={self.lo:g}, hi={self.hi:g})"


@keras.saving.register_keras_serializable(package="boundguard", name="WatchedActivation")
class WatchedActivation:
    """The wrapper put on a watched layer's ``activation`` while ``fit`` runs.

    It computes the wrapped activation and hands ``(layer, z, output)`` to ``seen`` (a Python side effect
    at trace time, no op in the graph). Should a run end without ``on_train_end`` (an exception in
    ``fit``) and the model be saved, it serializes as the activation it wraps.
    """

    def __init__(self, inner: Callable, seen: Optional[Callable[[Any, Any, Any], None]] = None,
                 layer: Any = None) -> None:
        self.inner = inner
        self._seen = seen
        self._layer = layer
        self.__name__ = getattr(inner, "__name__", "activation")

    def __call__(self, z: Any, *args: Any, **kwargs: Any) -> Any:
        p = self.inner(z, *args, **kwargs)
        if self._seen is not None:
            self._seen(self._layer, z, p)
        return p

    def get_config(self) -> dict[str, Any]:
        return {"activation": keras.activations.serialize(self.inner)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Callable:
        return keras.activations.get(config["activation"])


def unwrap(act: Callable) -> Callable:
    """The activation under any boundguard wrappers."""
    while isinstance(act, WatchedActivation):
        act = act.inner
    return act


def softcap_of(act: Any) -> Optional[float]:
    """The cap of a soft cap :class:`BoundActivation` (under any boundguard wrappers); None for any other."""
    act = unwrap(act) if act is not None else None
    return act.hi if isinstance(act, BoundActivation) and act.kind == "softcap" else None


def logits_view(act: Callable) -> Callable:
    """The activation as the facts see it: a soft cap leaves logits logits (``identity``; the cap is
    :attr:`~boundguard.model_facts.ModelFacts.logit_cap`), any other is itself."""
    return keras.activations.linear if softcap_of(act) is not None else act


def set_activation(layer: Any, act: Callable) -> Callable:
    """Make ``act`` the layer's activation (under the watch wrapper, if there is one); returns the previous one."""
    cur = layer.activation
    if isinstance(cur, WatchedActivation):
        prev, cur.inner = cur.inner, act
        return prev
    layer.activation = act
    return cur


def watch_activation(layer: Any, seen: Callable[[Any, Any, Any], None]) -> WatchedActivation:
    """Wrap the layer's activation so each call reports ``(layer, z, output)`` to ``seen``."""
    w = WatchedActivation(unwrap(layer.activation), seen, layer)
    layer.activation = w
    return w


def unwatch_activation(layer: Any, w: WatchedActivation) -> None:
    """Undo :func:`watch_activation` (an activation set since then under the wrapper stays)."""
    if vars(layer).get("activation") is w:
        layer.activation = unwrap(w)


def remove_leftovers(model: Any) -> None:
    """Remove watch wrappers left on the layers by a run that ended in an exception."""
    for layer in flat_layers(model):
        act = vars(layer).get("activation") if hasattr(layer, "__dict__") else None
        if isinstance(act, WatchedActivation):
            layer.activation = unwrap(act)


def retrace_step(model: Any, *, train: bool = True) -> None:
    """Drop the traced step functions so the next call traces the model as it is now.

    The train function is rebuilt now (``train=True``; an error propagates); the test and predict
    functions are dropped and rebuilt by Keras on their next use."""
    if train:
        model.make_train_function(force=True)
    for name in ("test_function", "predict_function"):
        if hasattr(model, name):
            setattr(model, name, None)


def apply_bounds(model: Any, source: Any, *, retrace: bool = True) -> list[dict]:
    """Set the bounding activations boundguard recorded on ``model`` (e.g. a model rebuilt from code).

    ``source`` is a :class:`~boundguard.integrations.keras.BoundGuard`, its ``state_dict()``, or a list of
    records (dicts, as ``bounds_inserted`` gives them, or :class:`~boundguard.surgery.BoundRecord`). A model
    saved with ``model.save`` after training already carries its bound; this is for models rebuilt from
    code and given the weights. Idempotent. Returns the records applied, as dicts.

    Raises:
        TypeError: ``source`` holds no bound records.
        ValueError: the model has no layer a record names (nor an output layer with an activation).
    """
    if hasattr(source, "bounds_inserted"):
        raw = list(source.bounds_inserted)
    elif isinstance(source, dict):
        raw = list((source.get("monitor") or source).get("inserted", []))
    elif isinstance(source, (list, tuple)):
        raw = list(source)
    else:
        raise TypeError(f"apply_bounds: cannot read bound records from {type(source).__name__}")
    records = [BoundRecord.from_dict(r) for r in raw]
    layers = {layer_name(layer): layer for layer in flat_layers(model)}
    for rec in records:
        layer = locate(model, rec.module, rec.attr, rec.output, layers)
        if layer is None or activation_attr(layer) is None:
            raise ValueError(f"apply_bounds: the model has no layer named {rec.module!r} with an activation "
                             f"(nor an output layer with one)")
        set_activation(layer, BoundActivation.of(rec))
    if records and retrace:
        try:
            retrace_step(model, train=bool(getattr(model, "compiled", False)))
        except Exception as err:  # the next fit() traces again anyway; inference functions are dropped
            warn_user(f"apply_bounds: the bound is set, but retracing the train step failed "
                      f"({type(err).__name__}: {err}); the next fit() traces it again.")
    return [r.to_dict() for r in records]
