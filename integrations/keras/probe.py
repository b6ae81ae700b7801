"""What the traced step shows: which tensors are the prediction, the pre-activation, the targets and the
inputs (:func:`pick`), and, at the first check, the facts and the notes about what was not found.

The output layer's watched activation reports ``(layer, z, output)`` during the forward pass (the *stash*);
the ``compute_loss`` wrapper then sees ``x``, ``y``, ``y_pred`` and the loss. For a Sequential or
functional model the head is known from the graph; for a subclassed model it is the layer whose
activation output *is* ``y_pred`` (or, when the activation is applied outside any layer, the last layer
called, with the activation inferred from a few rows of data).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import keras
import numpy as np

from boundguard.integrations.keras.activations import logits_view, unwrap
from boundguard.integrations.keras.buffer import StepTensors
from boundguard.integrations.keras.graph import Head, classify, layer_name
from boundguard.model_facts import LossInfo, ModelFacts, infer_activation

__all__ = ["Trace", "pick", "resolve_head", "model_facts", "notes"]

#: ``(order, layer, z, output)`` recorded by a watched activation in the current step
Entry = tuple[int, Any, Any, Any]


@dataclass
class Trace:
    """What the last traced (or eager) step showed."""

    loss_called: bool = False
    owner: Any = None  # the layer whose activation fed the prediction
    direct: bool = False  # its output is y_pred itself
    multi: bool = False  # the model has several outputs
    watched_output: str = "the first"  # which one is watched
    pred_shape: Optional[tuple] = None
    target_dtype: Optional[str] = None
    input_dtype: Optional[str] = None
    input_index: Optional[int] = None  # which entry of x is the (float) input watched
    n_inputs: int = 0
    pre_dtype: Optional[str] = None
    probe_shape: Optional[tuple] = None  # rows of (z, y_pred) kept to infer the activation


def select(struct: Any, index: int, name: Optional[str]) -> Any:
    """Output ``index`` (named ``name``) of a model's predictions or targets: by name in a dict (a
    flattened dict is in key order, not the model's), by position in a list or tuple."""
    if struct is None:
        return None
    if isinstance(struct, dict):
        if name is not None and name in struct:
            return struct[name]
        values = list(struct.values())
        return values[index] if index < len(values) else None
    if isinstance(struct, (list, tuple)):
        flat = [t for t in struct if t is not None]
        return flat[index] if index < len(flat) else None
    return struct if index == 0 else None


def pick(head: Head, stash: dict[int, Entry], x: Any, y: Any, y_pred: Any, loss: Any, trace: Trace,
         logits: bool, index: int = 0, name: Optional[str] = None) -> tuple[StepTensors, Any]:
    """The step's tensors; updates ``trace``. Returns the tensors and, when the activation must be
    identified from data (applied outside any layer), the prediction to probe against the pre-activation.
    ``index`` / ``name``: which output of a multi-output model is watched (its own targets with it)."""
    preds = [t for t in keras.tree.flatten(y_pred) if t is not None] if y_pred is not None else []
    yp = select(y_pred, index, name)
    yt = select(y, index, name)
    xs = [(i, t) for i, t in enumerate(keras.tree.flatten(x)) if t is not None and hasattr(t, "dtype")] \
        if x is not None else []
    xf = next(((i, t) for i, t in xs if _is_float(t)), None)
    if head.static:
        entry = stash.get(id(head.owner)) if head.owner is not None else None
        direct = entry is not None and not head.trailing and entry[3] is yp
    else:
        entry = next((e for e in stash.values() if e[3] is yp), None)
        direct = entry is not None
        if entry is None and stash:
            entry = max(stash.values(), key=lambda e: e[0])
    trace.loss_called = True
    trace.owner = entry[1] if entry is not None else None
    trace.direct, trace.multi = direct, len(preds) > 1
    trace.pred_shape = tuple(yp.shape) if yp is not None else None
    trace.target_dtype = dtype_of(yt) if yt is not None else None
    trace.input_dtype = dtype_of(xs[0][1]) if xs else None
    trace.input_index = xf[0] if xf else None
    trace.n_inputs = len(xs)
    trace.pre_dtype = dtype_of(entry[2]) if entry is not None else None
    tensors = StepTensors(pred=None if logits else yp, pre=entry[2] if entry is not None else None, target=yt,
                          input=xf[1] if xf is not None else None, loss=loss)
    probe = yp if entry is not None and not direct and not head.static else None
    return tensors, probe


def resolve_head(head: Head, trace: Trace, act: tuple[str, dict],
                 probe_values: Callable[[], np.ndarray]) -> tuple[Any, tuple[str, dict]]:
    """The output layer and its activation, once a step was traced. A static head keeps what was found
    at install; a subclassed model's is the layer the trace found, its activation classified (the layer's
    own) or inferred from the probe rows (applied outside any layer)."""
    if head.static:
        return head.owner, act
    owner = trace.owner if trace.loss_called else None
    if owner is None:
        return None, ("unknown", {})
    if trace.direct:
        try:
            return owner, classify([logits_view(unwrap(owner.activation))], (trace.pred_shape or (1,))[-1] or 1)
        except Exception:
            return owner, ("unknown", {})
    if not trace.probe_shape:
        return owner, ("unknown", {})
    probe, shape = probe_values(), trace.probe_shape
    size = int(np.prod(shape))
    z, p = probe[0, :size].reshape(shape), probe[1, :size].reshape(shape)
    keep = np.all(np.isfinite(z.reshape(shape[0], -1)), axis=1)
    name, params = infer_activation(z[keep], p[keep]) if keep.any() else ("unknown", {})
    if name in ("softmax", "log_softmax"):
        params = {"dim": -1}
    return owner, (name, params)


def model_facts(head: Head, trace: Trace, owner: Any, act: tuple[str, dict], loss: Optional[LossInfo],
                loss_name: Optional[str]) -> ModelFacts:
    """What the core needs to know about the model, from the head, the trace and the loss."""
    pred_name = (head.out_name if head.static and head.out_name else None) or \
        (layer_name(owner) if owner is not None else "model output")
    target_integer = bool(trace.target_dtype and not _float_dtype(trace.target_dtype)) or bool(
        loss_name and str(loss_name).lower().startswith(("sparse", "sparsecategorical")))
    shape = trace.pred_shape
    idx = trace.input_index
    return ModelFacts(
        pred_where=f"{pred_name} output",
        pre_where=f"{layer_name(owner)} pre-activation" if owner is not None else None,
        activation=act[0], activation_params=dict(act[1]),
        loss=loss, loss_where=loss_name,
        target_where="y" if trace.target_dtype else None,
        input_where=("x" if trace.n_inputs <= 1 else f"x[{idx}]") if idx is not None else None,
        target_integer=target_integer,
        input_integer=bool(trace.input_dtype and not _float_dtype(trace.input_dtype)) and idx is None,
        classes=int(shape[-1]) if shape and len(shape) >= 2 and shape[-1] and shape[-1] > 1 else None,
        pre_dtype=trace.pre_dtype,
    )


#: Layers that, first in a model, scale the inputs before any weighted layer sees them.
_SCALERS = ("Normalization", "Rescaling", "BatchNormalization", "LayerNormalization", "GroupNormalization",
            "UnitNormalization")


def input_scaler(model: Any) -> Optional[str]:
    """The name of the layer that scales the model's inputs (an adapted ``Normalization``, ``Rescaling``,
    a normalisation layer) when one comes first, before any layer with weights; else None."""
    layers = list(getattr(model, "layers", []) or [])
    while layers and type(layers[0]).__name__ in ("Sequential", "Functional") and len(layers) == 1:
        layers = list(layers[0].layers)
    for layer in layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            continue
        if kind in _SCALERS:
            return str(layer.name)
        if kind in ("Sequential", "Functional"):  # a sub-model first: look inside it
            return input_scaler(layer)
        if getattr(layer, "weights", None) or getattr(layer, "trainable_weights", None):
            return None  # a weighted layer sees the raw inputs
    return None


def notes(trace: Trace, owner: Any, activation: str, counts: dict[str, int]) -> list[tuple[str, str, str]]:
    """``(key, message, fix)`` for each thing the first check could not see."""
    if not trace.loss_called:
        return [("loss", "the train step never called model.compute_loss, so predictions, targets, inputs and "
                 "the batch loss are not watched (a custom train_step computes its loss another way).",
                 "Call self.compute_loss(x=x, y=y, y_pred=y_pred) in the custom train_step.")]
    out = []
    if owner is None:
        out.append(("pre-activation", "the output layer's activation could not be located (the output is not a "
                    "Dense/Conv/Activation layer with an activation), so pre-activation and activation checks "
                    "are off.", "Make the output layer a Dense(..., activation=...) or add an Activation layer "
                    "at the end."))
    elif activation == "unknown":
        out.append(("activation", "the output activation could not be identified, so activation checks are off.",
                    "Apply the output activation as activation= of the output layer."))
    if trace.multi:
        out.append(("outputs", f"the model has several outputs; only {trace.watched_output} is watched (with "
                    "its own targets and loss).",
                    "Name the output to watch with output_key= (its name or index)."))
    if not counts.get("target") and trace.target_dtype is None:
        out.append(("targets", "fit() got no targets, so target checks and bounds inference are off.",
                    "Pass y to fit(), or bounds= explicitly."))
    return out


def dtype_of(t: Any) -> Optional[str]:
    try:
        return keras.backend.standardize_dtype(t.dtype)
    except Exception:
        return None


def _float_dtype(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "half", "double"))


def _is_float(t: Any) -> bool:
    d = dtype_of(t)
    return d is not None and _float_dtype(d)
