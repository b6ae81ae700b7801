"""Model inspection: every use of Keras internals lives here.

- :func:`find_head`: the output layer of a Sequential or functional model (through trailing
  parameter-free layers, an Operation or a nested model at the output); subclassed models: found while
  the step is traced.
- :func:`loss_info`: the compiled loss's name and ``from_logits``; :func:`loss_ignore`: its ``ignore_class``.
- :func:`flat_layers`, :func:`activation_attr`, :func:`attr_of`, :func:`locate`: finding layers again.
- :func:`tap_compute_loss`: the instance-attribute wrapper of ``model.compute_loss``.
- :func:`classify`: which activation a chain of callables applies (run on a grid).

Keras internals used (and nowhere else in the adapter): ``Layer._flatten_layers``, ``Functional._outputs``,
``KerasTensor._keras_history``, ``Operation._inbound_nodes``, ``keras.src.models.functional.Functional``,
``LossFunctionWrapper._fn_kwargs``, ``Trainer._compute_loss_has_training_arg`` and, on the torch backend,
``Module._modules``. The device buffer's own needs on JAX (``Layer._metrics`` and the JAX trainer's
state sync) are in :mod:`.buffer`; TensorFlow's graph internals (the op copies the statistics read) in
:mod:`.fusion`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import keras
import numpy as np
from keras import ops

from boundguard.model_facts import classify_loss, infer_activation

__all__ = ["Head", "find_head", "loss_info", "loss_ignore", "flat_layers", "activation_attr", "layer_name", "attr_of",
           "locate", "classify", "units", "tap_compute_loss", "is_compute_loss_tap", "SHAPE_ONLY"]

#: Parameter-free layers that only move values around: a bound can go on the layer before them.
SHAPE_ONLY = ("Reshape", "Flatten", "Dropout", "Identity", "ActivityRegularization", "SpatialDropout1D",
              "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "AlphaDropout", "Permute")
_MAX_DEPTH = 8  # nested models followed at the output
_MAX_CHAIN = 64  # trailing operations followed back from a functional output


def activation_attr(layer: Any) -> Optional[Callable]:
    """The layer's own ``activation`` applied to its output, or None (RNN cells and properties excluded)."""
    try:
        act = vars(layer).get("activation")
    except TypeError:
        return None
    if act is None or not callable(act) or hasattr(layer, "state_size"):
        return None
    return act


def _weights(op: Any) -> list:
    try:
        return list(getattr(op, "weights", []) or [])
    except Exception:
        return []


def layer_name(op: Any) -> str:
    return str(getattr(op, "name", None) or type(op).__name__)


def flat_layers(model: Any) -> list:
    """Every layer inside ``model``, nested ones included."""
    try:
        return list(model._flatten_layers(include_self=False, recursive=True))
    except Exception:
        return list(getattr(model, "layers", []))


class Head:
    """Where the prediction comes from: the layer whose activation is watched (``owner``) and the
    parameter-free operations after it (``trailing``). ``static``: found from the model's graph (False for
    a subclassed model, whose head is found while the step is traced)."""

    def __init__(self, owner: Any = None, trailing: Optional[list] = None, out_name: Optional[str] = None,
                 static: bool = True) -> None:
        self.owner = owner
        self.trailing = list(trailing or [])
        self.out_name = out_name
        self.static = static

    @property
    def shape_only_after(self) -> bool:
        return all(type(op).__name__ in SHAPE_ONLY for op in self.trailing)


def output_names(model: Any) -> list[str]:
    """The names of the model's outputs, in order (empty when Keras does not know them yet)."""
    try:
        return [str(n) for n in (getattr(model, "output_names", None) or [])]
    except Exception:
        return []


def output_index(model: Any, key: Any) -> Optional[int]:
    """The position of the output ``key`` names (an index or an output name) among the model's outputs;
    0 for ``None``; None when ``key`` names no output."""
    if key is None:
        return 0
    names = output_names(model)
    if isinstance(key, str):
        return names.index(key) if key in names else None
    n = len(names) or 1
    return key if 0 <= key < n else None


def find_head(model: Any, depth: int = 0, index: int = 0) -> Head:
    """The output layer of a Sequential or functional model (``static``); subclassed models: found at trace.
    ``index``: which output of a multi-output model."""
    if depth > _MAX_DEPTH:
        return Head(static=False)
    if isinstance(model, keras.Sequential):
        return _sequential_head(model, depth)
    outputs = getattr(model, "_outputs", None) if _is_functional(model) else None
    if outputs:
        flat = keras.tree.flatten(outputs)
        return _functional_head(flat[index if index < len(flat) else 0], depth)
    return Head(static=False)


def _sequential_head(model: Any, depth: int) -> Head:
    layers = list(model.layers)
    out_name = layer_name(layers[-1]) if layers else None
    trailing: list = []
    for layer in reversed(layers):
        if activation_attr(layer) is not None:
            return Head(layer, trailing, out_name)
        if isinstance(layer, keras.Model):
            sub = find_head(layer, depth + 1)
            if sub.owner is not None or not sub.static:
                sub.trailing += trailing
                sub.out_name = out_name
                return sub
            return Head(None, trailing, out_name)
        if _weights(layer):
            return Head(None, trailing, out_name)
        trailing.insert(0, layer)
    return Head(None, trailing, out_name)


def _functional_head(t: Any, depth: int) -> Head:
    trailing: list = []
    out_name = None
    for _ in range(_MAX_CHAIN):
        hist = getattr(t, "_keras_history", None)
        if hist is None:
            break
        op = hist[0]
        out_name = out_name or layer_name(op)
        if activation_attr(op) is not None:
            return Head(op, trailing, out_name)
        if isinstance(op, keras.Model):
            sub = find_head(op, depth + 1)
            sub.trailing += trailing
            sub.out_name = out_name
            return sub
        if _weights(op) or type(op).__name__ == "InputLayer":
            break
        try:
            ins = list(op._inbound_nodes[hist[1]].input_tensors)
        except Exception:
            break
        if len(ins) != 1:
            break
        trailing.insert(0, op)
        t = ins[0]
    return Head(None, trailing, out_name)


def _is_functional(model: Any) -> bool:
    try:
        from keras.src.models.functional import Functional
    except Exception:  # pragma: no cover - keras internals moved
        return bool(getattr(model, "_outputs", None))
    return isinstance(model, Functional)


def classify(chain: list, n_units: int) -> tuple[str, dict]:
    """Which activation the chain of callables applies, by running it on a grid of pre-activations."""
    g = np.linspace(-20.0, 20.0, 401, dtype=np.float32)
    n_units = max(1, int(n_units or 1))
    z = g[:, None] if n_units == 1 else np.stack([np.roll(g, 37 * k) for k in range(n_units)], axis=1)
    out: Any = ops.convert_to_tensor(z)
    for f in chain:
        out = f(out)
    p = np.asarray(ops.convert_to_numpy(out), dtype=np.float64)
    name, params = infer_activation(z.astype(np.float64), p)
    if name in ("softmax", "log_softmax"):
        params = {"dim": -1}
    return name, params


def units(model: Any, owner: Any) -> int:
    """The width of the output (for :func:`classify`)."""
    for get in (lambda: keras.tree.flatten(model.outputs)[0].shape[-1],
                lambda: owner.units, lambda: owner.filters):
        try:
            v = get()
            if isinstance(v, int) and v > 0:
                return v
        except Exception:
            continue
    return 1


def _compiled_loss(model: Any, index: int = 0) -> Any:
    """The loss ``compile`` was given for output ``index`` (as given: a name, a function, a Loss)."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, dict):
        names = output_names(model)
        name = names[index] if index < len(names) else None
        loss = loss.get(name) if name in loss else next(iter(loss.values()), None)
    if isinstance(loss, (list, tuple)):
        loss = loss[index] if index < len(loss) else (loss[0] if loss else None)
    return loss


def loss_ignore(model: Any, index: int = 0) -> Optional[float]:
    """The target value the compiled loss of output ``index`` ignores: ``ignore_class`` of
    ``SparseCategoricalCrossentropy(ignore_class=...)``, of a ``LossFunctionWrapper`` or a
    ``functools.partial`` of ``sparse_categorical_crossentropy``; None when it ignores none."""
    loss = _compiled_loss(model, index)
    if isinstance(loss, functools.partial):
        value = loss.keywords.get("ignore_class")
    elif isinstance(loss, keras.losses.Loss):
        value = getattr(loss, "ignore_class", None)
        if value is None:
            value = (getattr(loss, "_fn_kwargs", None) or {}).get("ignore_class")
    else:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def loss_info(model: Any, index: int = 0) -> tuple[Optional[str], bool]:
    """The compiled loss's name and ``from_logits`` (for a multi-output model: output ``index``'s loss)."""
    loss = _compiled_loss(model, index)
    if loss is None:
        return None, False
    if isinstance(loss, str):
        try:
            resolved = keras.losses.get(loss)
        except Exception:
            return loss, False
        loss = resolved if resolved is not None else loss
        if isinstance(loss, str):
            return loss, False
    if isinstance(loss, keras.losses.Loss):
        return _loss_object_info(loss)
    name = getattr(loss, "__name__", None) or type(loss).__name__
    if isinstance(loss, functools.partial):
        return getattr(loss.func, "__name__", name), bool(loss.keywords.get("from_logits", False))
    return name, False


def _loss_object_info(loss: Any) -> tuple[Optional[str], bool]:
    fl = getattr(loss, "from_logits", None)
    kwargs = getattr(loss, "_fn_kwargs", None) or {}
    from_logits = bool(fl if fl is not None else kwargs.get("from_logits", False))
    fn = getattr(loss, "fn", None)
    fn_name = getattr(fn, "__name__", "") if fn is not None else ""
    if type(loss).__name__ == "LossFunctionWrapper" and fn is not None:
        return fn_name or None, from_logits
    info = classify_loss(fn_name) if fn_name else None
    if info is not None and info.family != "other":
        return fn_name, from_logits
    return type(loss).__name__, from_logits


def attr_of(model: Any, layer: Any) -> Optional[str]:
    """The model attribute that holds ``layer`` (subclassed models), so a rebuilt model finds it again."""
    try:
        attrs = dict(vars(model))
    except TypeError:
        return None
    attrs.update(attrs.get("_modules") or {})  # torch backend: sub-layers live in the Module's _modules
    return next((k for k, v in attrs.items() if v is layer and not k.startswith("_")), None)


def locate(model: Any, module: str, attr: Optional[str], output: bool, layers: dict) -> Any:
    """The layer a bound record names: by name, by attribute, or (a rebuilt model, other auto-names) the output."""
    for cand in (layers.get(module), getattr(model, attr, None) if attr else None):
        if cand is not None and activation_attr(cand) is not None:
            return cand
    if output:
        head = find_head(model)
        if head.static and head.owner is not None and head.shape_only_after:
            return head.owner
    return None


# ------------------------------------------------------------------------------ compute_loss
_TAP = "_boundguard"  # marks our compute_loss wrapper


def is_compute_loss_tap(fn: Any) -> bool:
    return fn is not None and getattr(fn, _TAP, False)


def tap_compute_loss(model: Any, after: Callable[..., None]) -> Callable[[], None]:
    """Wrap ``model.compute_loss`` by an instance attribute (a user override keeps working underneath):
    each call computes the loss, then ``after(x, y, y_pred, loss, training)``. Keras' own ``train_step``
    calls it with ``training=True``; eval steps reach it with ``training=False``. Returns the function
    that restores the model."""
    prior = vars(model).get("compute_loss")
    orig = model.compute_loss
    try:
        has_training = "training" in inspect.signature(orig).parameters
    except (TypeError, ValueError):
        has_training = False

    def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if has_training:
            loss = orig(x, y, y_pred, sample_weight, training=training)
        else:
            loss = orig(x, y, y_pred, sample_weight)
        after(x, y, y_pred, loss, training)
        return loss

    setattr(compute_loss, _TAP, True)
    model.compute_loss = compute_loss
    flag = getattr(model, "_compute_loss_has_training_arg", None)
    if flag is not None:
        model._compute_loss_has_training_arg = True  # so eval steps reach the wrapper with training=False

    def restore() -> None:
        if is_compute_loss_tap(vars(model).get("compute_loss")):
            del model.compute_loss
            if prior is not None:
                model.compute_loss = prior
        if flag is not None:
            model._compute_loss_has_training_arg = flag

    return restore


def drop_compute_loss_tap(model: Any) -> None:
    """Remove a wrapper left on the model by a run that ended in an exception."""
    if is_compute_loss_tap(vars(model).get("compute_loss")):
        del model.compute_loss
