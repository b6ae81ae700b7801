"""Keras 3 adapter: ``BoundGuard``, a ``keras.callbacks.Callback`` that watches ``model.fit`` from inside the step.

How it sees the compiled step, with no change to the user's code:

- **Prediction and pre-activation.** At ``on_train_begin`` the output layer's ``activation``
  attribute (``Dense(activation=...)``, a trailing ``Activation`` layer, a custom function such as
  ``tf.clip_by_value``) is wrapped so that each call hands its input ``z`` and output to the callback.
  The train function traces lazily, so the wrapper is part of the traced step.
- **Targets, inputs and the batch loss.** ``model.compute_loss`` is wrapped by an instance attribute
  (a user override of ``compute_loss`` keeps working underneath). Keras' own ``train_step`` calls it
  with ``x``, ``y``, ``y_pred`` and ``training=True``; there the statistics of the step are reduced
  with ``keras.ops`` into one row of a callback-owned, non-trainable ``(rows, columns)``
  ``keras.Variable`` (a row counter lives in a second variable). Nothing is read back between checks.
- **Checks.** At the first step and every ``check_every_n_steps`` (and at each epoch end, so the
  epoch's statistics reach ``logs``) the buffer comes to the host in one transfer and the framework-free
  core judges it; ``halt`` sets ``model.stop_training``, ``raise`` raises :class:`~boundguard.BoundGuardError`,
  ``bound`` swaps the output activation for :class:`BoundActivation` and forces a retrace.
- **Clean model.** ``on_train_end`` removes both wrappers and drops the traced train function; an
  inserted bound stays and is saved by ``model.save`` (it is registered as serializable, so
  ``keras.models.load_model`` works after ``import boundguard.integrations.keras``).

Model shapes: Sequential and functional models (the output layer found from the graph, through trailing
parameter-free layers such as ``Softmax``/``Activation``/``Reshape``/``Dropout``, also through a nested
model at the output) and subclassed models (the layer whose activation output *is* ``y_pred`` is found
while the step is traced; an activation applied outside any layer is inferred from the first batch).
Models with several outputs are watched on their first output. Backends: TensorFlow (graph and eager,
``steps_per_execution`` > 1 included) and torch (eager, and ``jit_compile=True``, where the callback's
Python side runs outside the compiled graph: one graph break per step instead of a recompile). JAX is
not supported: its stateless train step drops writes to callback-owned variables; the callback warns once
and does nothing there. A custom ``train_step`` that does not call ``self.compute_loss`` gets activation
facts only (the callback says so in a ``probe_incomplete`` note).

Known limits: with ``bounds="auto"`` the targets are first seen at the first check, so the out-of-range
*counts* of step 1 are taken against the bounds the loss implies (``(0, 1)`` / a distribution for
probability losses, none for regression losses); min/max of step 1 are exact and the inferred bounds
apply from step 2. Like any callback with a batch-end hook, this one turns off Keras' asynchronous
callback dispatch (torch/JAX backends), so Keras converts each batch's ``logs`` on the main thread.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

try:
    import keras
    from keras import ops
except ImportError as e:  # pragma: no cover - exercised only without keras
    raise ImportError(
        "boundguard.integrations.keras needs Keras 3: pip install 'boundguard[keras]' "
        "(or 'boundguard[tensorflow]' for Keras with TensorFlow)"
    ) from e

if not str(getattr(keras, "__version__", "0")).split(".")[0].isdigit() or int(keras.__version__.split(".")[0]) < 3:
    raise ImportError(
        f"boundguard.integrations.keras needs Keras 3, found keras {getattr(keras, '__version__', '?')}: "
        "pip install 'boundguard[keras]'"
    )

import numpy as np

from boundguard.alerts import Alert, BoundGuardError, BoundGuardWarning
from boundguard.bounds import Bounds
from boundguard.config import Config
from boundguard.model_facts import LossInfo, ModelFacts, classify_loss, infer_activation
from boundguard.monitor import Decision, Monitor
from boundguard.rules import TAIL_THRESHOLD
from boundguard.stats import COLUMNS, KINDS, LOSS_COLUMN, STATS, Snapshot, neutral_row

__all__ = ["BoundGuard", "BoundActivation", "apply_bounds", "DEFAULT_ALERTS_PATH"]

DEFAULT_ALERTS_PATH = Path("boundguard") / "alerts.jsonl"
_log = logging.getLogger("boundguard")

# Extra columns after the core's COLUMNS, written on the device: elements seen per kind, whether the
# step's loss was recorded, and whether the step's targets were one-hot rows.
_EXTRA = tuple(f"{k}.n" for k in KINDS) + ("loss.seen", "target.onehot")
_W0 = len(COLUMNS)
_W = _W0 + len(_EXTRA)
_N_COL = {k: _W0 + i for i, k in enumerate(KINDS)}
_SEEN_COL = _W0 + len(KINDS)
_ONEHOT_COL = _SEEN_COL + 1
_COL = {name: i for i, name in enumerate(COLUMNS)}
# Settings the device reads every step (written by the host only when they change).
_S_LO, _S_HI, _S_PIN_LO, _S_PIN_HI, _S_TAIL, _S_DIST = range(6)
_PROBE_K = 512  # elements of z / y_pred kept from a step when the activation must be inferred from data
_SHAPE_ONLY = ("Reshape", "Flatten", "Dropout", "Identity", "ActivityRegularization", "SpatialDropout1D",
               "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "AlphaDropout", "Permute")


# ----------------------------------------------------------------------------------------- activations
@keras.saving.register_keras_serializable(package="boundguard", name="BoundActivation")
class BoundActivation:
    """The bounding activation boundguard inserts; serializable, so saved models load without ``custom_objects``.

    ``kind``: ``"sigmoid"`` (0, 1) | ``"tanh"`` (-1, 1) | ``"scaled_sigmoid"`` ``lo + (hi - lo) * sigmoid(z)``
    | ``"softmax"`` over ``axis`` (a distribution).

    Example:
        >>> act = BoundActivation("scaled_sigmoid", lo=-3.0, hi=3.0)
        >>> float(keras.ops.convert_to_numpy(act(keras.ops.zeros((1,)))[0]))
        0.0
    """

    def __init__(self, kind: str = "sigmoid", lo: float = 0.0, hi: float = 1.0, axis: int = -1) -> None:
        if kind not in ("sigmoid", "tanh", "scaled_sigmoid", "softmax"):
            raise ValueError(f"BoundActivation kind must be sigmoid, tanh, scaled_sigmoid or softmax, got {kind!r}")
        self.kind, self.lo, self.hi, self.axis = kind, float(lo), float(hi), int(axis)
        self.__name__ = f"boundguard_{kind}"

    def __call__(self, z: Any) -> Any:
        if self.kind == "sigmoid":
            return ops.sigmoid(z)
        if self.kind == "tanh":
            return ops.tanh(z)
        if self.kind == "softmax":
            return ops.softmax(z, axis=self.axis)
        return self.lo + (self.hi - self.lo) * ops.sigmoid(z)

    def get_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "lo": self.lo, "hi": self.hi, "axis": self.axis}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BoundActivation":
        return cls(**config)

    def __repr__(self) -> str:
        return f"BoundActivation({self.kind!r}, lo={self.lo:g}, hi={self.hi:g})"


@keras.saving.register_keras_serializable(package="boundguard", name="WatchedActivation")
class _WatchedActivation:
    """The wrapper put on a watched layer's ``activation`` while ``fit`` runs.

    It computes the wrapped activation and hands ``(z, output)`` to the callback (a Python side effect
    at trace time, no op in the graph). Should a run end without ``on_train_end`` (an exception in
    ``fit``) and the model be saved, it serializes as the activation it wraps.
    """

    def __init__(self, inner: Callable, guard: Any = None, layer: Any = None) -> None:
        self.inner = inner
        self._guard = guard
        self._layer = layer
        self.__name__ = getattr(inner, "__name__", "activation")

    def __call__(self, z: Any, *args: Any, **kwargs: Any) -> Any:
        p = self.inner(z, *args, **kwargs)
        g = self._guard
        if g is not None:
            g._seen_activation(self._layer, z, p)
        return p

    def get_config(self) -> dict[str, Any]:
        return {"activation": keras.activations.serialize(self.inner)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Callable:
        return keras.activations.get(config["activation"])


def _activation_attr(layer: Any) -> Optional[Callable]:
    """The layer's own ``activation`` applied to its output, or None (RNN cells and properties excluded)."""
    try:
        act = vars(layer).get("activation")
    except TypeError:
        return None
    if act is None or not callable(act) or hasattr(layer, "state_size"):
        return None
    return act


def _inner(act: Callable) -> Callable:
    while isinstance(act, _WatchedActivation):
        act = act.inner
    return act


def _weights(op: Any) -> list:
    try:
        return list(getattr(op, "weights", []) or [])
    except Exception:
        return []


def _name(op: Any) -> str:
    return str(getattr(op, "name", None) or type(op).__name__)


def _flat_layers(model: Any) -> list:
    try:
        return list(model._flatten_layers(include_self=False, recursive=True))
    except Exception:
        return list(getattr(model, "layers", []))


# ----------------------------------------------------------------------------------------- model structure
class _Head:
    """Where the prediction comes from: the layer whose activation is watched and what follows it."""

    def __init__(self, owner: Any = None, trailing: Optional[list] = None, out_name: Optional[str] = None,
                 static: bool = True) -> None:
        self.owner = owner
        self.trailing = list(trailing or [])
        self.out_name = out_name
        self.static = static

    @property
    def shape_only_after(self) -> bool:
        return all(type(op).__name__ in _SHAPE_ONLY for op in self.trailing)


def _find_head(model: Any, depth: int = 0) -> _Head:
    """The output layer of a Sequential or functional model (``static``); subclassed models: found at trace."""
    if depth > 8:
        return _Head(static=False)
    if isinstance(model, keras.Sequential):
        trailing: list = []
        for layer in reversed(list(model.layers)):
            if _activation_attr(layer) is not None:
                return _Head(layer, trailing, _name(model.layers[-1]))
            if isinstance(layer, keras.Model):
                sub = _find_head(layer, depth + 1)
                if sub.owner is not None or not sub.static:
                    sub.trailing += trailing
                    sub.out_name = _name(model.layers[-1])
                    return sub
                return _Head(None, trailing, _name(model.layers[-1]))
            if _weights(layer):
                return _Head(None, trailing, _name(model.layers[-1]))
            trailing.insert(0, layer)
        return _Head(None, trailing, _name(model.layers[-1]) if model.layers else None)
    outputs = getattr(model, "_outputs", None) if _is_functional(model) else None
    if outputs:
        t = keras.tree.flatten(outputs)[0]
        trailing = []
        out_name = None
        for _ in range(64):
            hist = getattr(t, "_keras_history", None)
            if hist is None:
                break
            op = hist[0]
            out_name = out_name or _name(op)
            if _activation_attr(op) is not None:
                return _Head(op, trailing, out_name)
            if isinstance(op, keras.Model):
                sub = _find_head(op, depth + 1)
                sub.trailing += trailing
                sub.out_name = out_name
                return sub
            if _weights(op) or type(op).__name__ == "InputLayer":
                break
            try:
                node = op._inbound_nodes[hist[1]]
                ins = list(node.input_tensors)
            except Exception:
                break
            if len(ins) != 1:
                break
            trailing.insert(0, op)
            t = ins[0]
        return _Head(None, trailing, out_name)
    return _Head(static=False)


def _is_functional(model: Any) -> bool:
    try:
        from keras.src.models.functional import Functional
    except Exception:  # pragma: no cover - keras internals moved
        return bool(getattr(model, "_outputs", None))
    return isinstance(model, Functional)


def _classify(chain: list, units: int) -> tuple[str, dict]:
    """Which activation the chain of callables applies, by running it on a grid of pre-activations."""
    g = np.linspace(-20.0, 20.0, 401, dtype=np.float32)
    units = max(1, int(units or 1))
    z = g[:, None] if units == 1 else np.stack([np.roll(g, 37 * k) for k in range(units)], axis=1)
    out: Any = ops.convert_to_tensor(z)
    for f in chain:
        out = f(out)
    p = np.asarray(ops.convert_to_numpy(out), dtype=np.float64)
    name, params = infer_activation(z.astype(np.float64), p)
    if name in ("softmax", "log_softmax"):
        params = {"dim": -1}
    return name, params


def _loss_info(model: Any) -> tuple[Optional[str], bool]:
    """The compiled loss's name and ``from_logits`` (first output's loss for multi-output models)."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, dict):
        names = list(getattr(model, "output_names", None) or [])
        loss = loss.get(names[0]) if names and names[0] in loss else next(iter(loss.values()), None)
    if isinstance(loss, (list, tuple)):
        loss = loss[0] if loss else None
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
    from_logits = False
    name: Optional[str] = None
    if isinstance(loss, keras.losses.Loss):
        fl = getattr(loss, "from_logits", None)
        kwargs = getattr(loss, "_fn_kwargs", None) or {}
        from_logits = bool(fl if fl is not None else kwargs.get("from_logits", False))
        fn = getattr(loss, "fn", None)
        if type(loss).__name__ == "LossFunctionWrapper" and fn is not None:
            name = getattr(fn, "__name__", None)
        elif fn is not None and classify_loss(getattr(fn, "__name__", "")) is not None and \
                classify_loss(getattr(fn, "__name__", "")).family != "other":
            name = fn.__name__
        else:
            name = type(loss).__name__
    else:
        name = getattr(loss, "__name__", None) or type(loss).__name__
        if isinstance(loss, functools.partial):
            from_logits = bool(loss.keywords.get("from_logits", False))
            name = getattr(loss.func, "__name__", name)
    return name, from_logits


# ----------------------------------------------------------------------------------------- callback
def _safe(fn: Callable) -> Callable:
    """An internal error never kills the user's training: one warning, then the callback switches off."""

    @functools.wraps(fn)
    def wrapper(self: "BoundGuard", *args: Any, **kwargs: Any) -> Any:
        if self._disabled:
            if self._installed:
                self._teardown_quietly()
            return None
        try:
            return fn(self, *args, **kwargs)
        except BoundGuardError:
            raise
        except Exception as err:
            if self._config.strict:
                raise
            self._disable(err)
            return None

    return wrapper


class BoundGuard(keras.callbacks.Callback):
    """Watch a Keras model's predictions, output pre-activations, targets, inputs and batch loss during ``fit``.

    One line: ``model.fit(x, y, callbacks=[BoundGuard()])``. Statistics are reduced on the device inside
    the compiled train step and read back once per check (the first step, every
    ``check_every_n_steps``, and each epoch end); alerts carry a code, numbers and a fix.

    Args:
        bounds: ``"auto"`` (infer from targets and loss), ``None`` (no range checks), ``(lo, hi)``,
            a :class:`boundguard.Bounds`, or ``"probability"`` / ``"symmetric"`` / ``"distribution"``.
        on_violation: ``"log"`` | ``"warn"`` | ``"halt"`` | ``"raise"`` | ``"bound"``: what an alert of
            severity warning or above does.
        actions: per-code override of ``on_violation``, e.g. ``{"nonfinite_loss": "halt"}``.
        check_every_n_steps: how often statistics are read back and judged.
        alerts_path: the JSON-lines alerts file (``stats.jsonl`` goes beside it); ``None``:
            ``./boundguard/alerts.jsonl``.
        thresholds: per-code rule thresholds, e.g. ``{"loss_spike": {"factor": 6}}``.
        strict: re-raise internal errors instead of switching the callback off (for tests).

    Raises:
        ValueError, TypeError: an invalid option (the message names it, what was expected and what was given).

    How it hooks in (details in the module docstring of ``boundguard.integrations.keras``): the output
    layer's ``activation`` attribute is wrapped to see the pre-activation, and ``model.compute_loss`` to see
    ``x``, ``y``, ``y_pred`` and the batch loss; both are removed at ``on_train_end``. Covered: Sequential,
    functional (also with trailing ``Softmax``/``Activation``/``Reshape`` layers, Operations or a nested model
    at the output) and subclassed models, on the TensorFlow and torch backends.

    Keys added to the epoch's ``logs`` (so ``History``, ``CSVLogger`` and ``TensorBoard`` listed after this
    callback record them): ``boundguard/output_min``, ``boundguard/output_max``,
    ``boundguard/out_of_bounds_share``, ``boundguard/preact_absmax``, ``boundguard/preact_rms``,
    ``boundguard/input_rms``, ``boundguard/loss_mean`` (over the epoch's steps) and ``boundguard/alerts``.

    Example:
        >>> from boundguard.integrations.keras import BoundGuard
        >>> guard = BoundGuard(bounds=(0, 1), on_violation="bound")
        >>> # model.fit(x, y, callbacks=[guard]); guard.alerts; model.save("m.keras")
    """

    def __init__(
        self,
        bounds: Any = "auto",
        on_violation: str = "warn",
        actions: Optional[dict] = None,
        check_every_n_steps: int = 50,
        alerts_path: Any = None,
        *,
        thresholds: Optional[dict] = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self._config = Config(bounds=bounds, on_violation=on_violation, actions=actions,
                              check_every_n_steps=check_every_n_steps, alerts_path=alerts_path,
                              thresholds=thresholds, strict=strict)
        self.monitor = Monitor(self._config)
        self.step = 0
        self._interval_start = 1
        self._epoch: Optional[int] = None
        self._last_batch = -1
        self._disabled = False
        self._warned_error = False
        self._installed = False
        self._in_loss = False
        self._wmodel: Any = None
        self._head: Optional[_Head] = None
        self._owner: Any = None
        self._wrapped: list[tuple[Any, _WatchedActivation]] = []
        self._stash: dict[int, tuple[int, Any, Any, Any]] = {}
        self._stash_order = 0
        self._trace: dict[str, Any] = {}
        self._facts_ready = False
        self._logits = False
        self._act: tuple[str, dict] = ("unknown", {})
        self._loss: Optional[LossInfo] = None
        self._loss_name: Optional[str] = None
        self._from_logits = False
        self._settings_now: Optional[tuple] = None
        self._saved_training_flag: Any = None
        self._prior_compute_loss: Any = None
        self._vars_ready = False
        self._rows = 0
        self._epoch_rows: list[np.ndarray] = []
        self._epoch_counts = {k: 0 for k in KINDS}
        self._epoch_loss = [0.0, 0]
        self._epoch_first: Optional[int] = None
        self._log_keys: set[str] = set()
        self.last_snapshot: Optional[Snapshot] = None

    # -------------------------------------------------------------- public
    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, oldest first."""
        return self.monitor.alerts

    @property
    def bounds_inserted(self) -> list[dict]:
        """Records of the bounding activations inserted (replayed on resume; see :func:`apply_bounds`)."""
        return [dict(r) for r in self.monitor.inserted]

    @property
    def alerts_path(self) -> Optional[Path]:
        """The alerts file in use (known once training has started)."""
        return self.monitor.alerts_path

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "step": self.step, "config": self._config.describe()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict needs the dict from state_dict(), got {type(state).__name__}")
        self.monitor.load_state_dict(state.get("monitor", {}))
        self.step = int(state.get("step", 0))
        self._interval_start = self.step + 1
        self._facts_ready = False
        if self._wmodel is not None and self.monitor.inserted:
            apply_bounds(self._wmodel, self.monitor.inserted)

    def close(self) -> None:
        """Remove the wrappers and close the files now (``fit`` does this itself at its end)."""
        self._teardown_quietly()
        self.monitor.finish()

    # -------------------------------------------------------------- hooks
    @_safe
    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        model = self.model
        self._wmodel = model
        if self.monitor.alerts_path is None:
            self.monitor.open_files(Path(self._config.alerts_path) if self._config.alerts_path else DEFAULT_ALERTS_PATH)
        backend = keras.backend.backend()
        if backend not in ("tensorflow", "torch"):
            self._disabled = True
            warnings.warn(BoundGuardWarning(
                f"boundguard's Keras callback supports the tensorflow and torch backends, not {backend!r}: "
                "training goes on unmonitored."), stacklevel=2)
            return
        if self.monitor.inserted:
            apply_bounds(model, self.monitor.inserted, retrace=False)
        self._install(model)

    @_safe
    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch = int(epoch)
        self._last_batch = -1
        self._epoch_rows, self._epoch_counts, self._epoch_loss = [], {k: 0 for k in KINDS}, [0.0, 0]
        self._epoch_first = self.step + 1

    @_safe
    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        if not self._installed:
            return
        batch = int(batch)
        steps = (self.params or {}).get("steps")
        if isinstance(steps, int) and steps > 0:
            batch = min(batch, steps - 1)  # Keras reports a full last execution with steps_per_execution > 1
        done = batch - self._last_batch
        self._last_batch = batch
        prev = self.step
        self.step += max(1, done)
        n = self._config.check_every_n_steps
        if prev == 0 or not self._facts_ready or self.step // n > prev // n:  # first step of a fit, every n
            self._check()

    @_safe
    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if not self._installed:
            return
        if self.step >= self._interval_start:
            self._check()
        if logs is not None and self._epoch_rows:
            metrics = self._epoch_snapshot().metrics()
            metrics["boundguard/alerts"] = float(len(self.alerts))
            self._log_keys.update(metrics)
            logs.update({k: metrics.get(k, math.nan) for k in sorted(self._log_keys)})  # same keys every epoch

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        self._teardown_quietly()
        self.monitor.finish()

    # -------------------------------------------------------------- install / remove
    def _install(self, model: Any) -> None:
        self._remove_leftovers(model)
        self._loss_name, self._from_logits = _loss_info(model)
        loss = classify_loss(self._loss_name, self._from_logits)
        self._loss = loss
        self._logits = bool(loss and getattr(loss, "link_applied", loss.consumes_logits))
        head = _find_head(model)
        self._head = head
        self._owner = head.owner if head.static else None
        self._trace = {}
        self._facts_ready = False
        self._setup_variables(model)
        targets = [head.owner] if head.static and head.owner is not None else (
            [] if head.static else [l for l in _flat_layers(model) if _activation_attr(l) is not None])
        self._wrapped = []
        for layer in targets:
            w = _WatchedActivation(_inner(layer.activation), self, layer)
            layer.activation = w
            self._wrapped.append((layer, w))
        if head.static and head.owner is not None:
            chain = [_inner(head.owner.activation)] + list(head.trailing)
            try:
                self._act = _classify(chain, _units(model, head.owner))
            except Exception:
                self._act = ("unknown", {})
        else:
            self._act = ("unknown", {})
        self._install_compute_loss(model)
        self._eager_under_torch_compile(model)
        self._installed = True
        self._sync_settings()
        model.make_train_function(force=True)

    def _install_compute_loss(self, model: Any) -> None:
        prior = vars(model).get("compute_loss")
        self._prior_compute_loss = prior
        orig = model.compute_loss
        try:
            has_training = "training" in inspect.signature(orig).parameters
        except (TypeError, ValueError):
            has_training = False
        guard = self

        def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):
            if has_training:
                loss = orig(x, y, y_pred, sample_weight, training=training)
            else:
                loss = orig(x, y, y_pred, sample_weight)
            guard._after_loss(x, y, y_pred, loss, training)
            return loss

        compute_loss._boundguard = True  # type: ignore[attr-defined]
        model.compute_loss = compute_loss
        if hasattr(model, "_compute_loss_has_training_arg"):
            self._saved_training_flag = model._compute_loss_has_training_arg
            model._compute_loss_has_training_arg = True  # so eval steps reach the wrapper with training=False

    def _eager_under_torch_compile(self, model: Any) -> None:
        """torch backend with ``jit_compile=True``: the callback's Python side runs outside the compiled graph.

        Its side effects (remembering the activation's tensors, writing the row) would otherwise make
        ``torch.compile`` recompile at every step; run eagerly they cost a graph break each instead.
        """
        for name in ("_seen_activation", "_after_loss"):
            self.__dict__.pop(name, None)
        if keras.backend.backend() == "torch" and getattr(model, "jit_compile", False):
            import torch

            for name in ("_seen_activation", "_after_loss"):
                setattr(self, name, torch.compiler.disable(getattr(type(self), name).__get__(self)))

    def _remove_leftovers(self, model: Any) -> None:
        """Wrappers left on the model by a run that ended in an exception."""
        for layer in _flat_layers(model):
            act = vars(layer).get("activation") if hasattr(layer, "__dict__") else None
            if isinstance(act, _WatchedActivation):
                layer.activation = _inner(act)
        cl = vars(model).get("compute_loss")
        if cl is not None and getattr(cl, "_boundguard", False):
            del model.compute_loss

    def _uninstall(self) -> None:
        model = self._wmodel
        for layer, w in self._wrapped:
            if vars(layer).get("activation") is w:
                layer.activation = _inner(w)
        self._wrapped = []
        if model is not None:
            cl = vars(model).get("compute_loss")
            if cl is not None and getattr(cl, "_boundguard", False):
                del model.compute_loss
                if self._prior_compute_loss is not None:
                    model.compute_loss = self._prior_compute_loss
            if self._saved_training_flag is not None:
                model._compute_loss_has_training_arg = self._saved_training_flag
                self._saved_training_flag = None
            self._stash.clear()
            self._installed = False
            model.make_train_function(force=True)  # drop the traced step that writes statistics
        self._installed = False

    def _teardown_quietly(self) -> None:
        try:
            if self._installed:
                self._uninstall()
        except Exception as err:  # never break the user's run while cleaning up
            self._installed = False
            if self._config.strict:
                raise
            self._warn_error(err)

    def _disable(self, err: BaseException) -> None:
        self._disabled = True
        self._warn_error(err)
        if not self._in_loss:
            self._teardown_quietly()

    def _warn_error(self, err: BaseException) -> None:
        if not self._warned_error:
            self._warned_error = True
            warnings.warn(BoundGuardWarning(
                f"boundguard hit an internal error and switched itself off; training goes on unmonitored: "
                f"{type(err).__name__}: {err}"), stacklevel=3)

    # -------------------------------------------------------------- device state
    def _setup_variables(self, model: Any) -> None:
        spe = getattr(model, "steps_per_execution", 1)
        spe = spe if isinstance(spe, int) and spe > 0 else 1
        rows = self._config.check_every_n_steps + spe
        if self._vars_ready and rows == self._rows:
            self._reset_buffer()
            return
        self._rows = rows
        neutral = np.concatenate([neutral_row(), np.zeros(len(_EXTRA))]).astype(np.float32)
        init = np.tile(neutral, (rows, 1))
        self._buf = keras.Variable(init, trainable=False, dtype="float32", autocast=False, name="boundguard_rows")
        self._row = keras.Variable(np.zeros((), np.int32), trainable=False, dtype="int32", autocast=False,
                                   name="boundguard_row")
        self._settings = keras.Variable(np.array([-np.inf, np.inf, np.nan, np.nan, np.inf, 0], np.float32),
                                        trainable=False, dtype="float32", autocast=False, name="boundguard_settings")
        self._probe = keras.Variable(np.full((2, _PROBE_K), np.nan, np.float32), trainable=False, dtype="float32",
                                     autocast=False, name="boundguard_probe")
        self._settings_now = None
        # Constants made once on the device, so an eager step (torch) never turns a Python number into a
        # tensor (a host→device copy); a traced step (tensorflow) gets them as graph constants instead.
        self._cv = {"nan": np.float32(np.nan), "zero": np.float32(0.0), "one": np.float32(1.0),
                    "ninf": np.float32(-np.inf), "last": np.int32(rows - 1), "zero_i": np.int32(0),
                    "nan_k": np.full(_PROBE_K, np.nan, np.float32), "arange": np.arange(rows, dtype=np.int32)}
        self._cv.update({f"neutral{i}": np.float32(v) for i, v in enumerate(neutral)})
        self._c = {k: ops.convert_to_tensor(v) for k, v in self._cv.items()}
        self._neutral_rows = ops.convert_to_tensor(init)
        self._vars_ready = True

    def _consts(self) -> dict:
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            if not tf.executing_eagerly():
                return {k: tf.constant(v) for k, v in self._cv.items()}
        return self._c

    def _reset_buffer(self) -> None:
        self._buf.assign(self._neutral_rows)
        self._row.assign(self._c["zero_i"])  # (host side, eager)

    def _read(self) -> np.ndarray:
        """The one device→host transfer of a check; resets the rows for the next interval."""
        rows = np.asarray(ops.convert_to_numpy(self._buf.value), dtype=np.float64)
        self._reset_buffer()
        return rows

    def _sync_settings(self) -> None:
        b = self.monitor.bounds  # declared, or inferred so far ("auto")
        if self._config.bounds == "auto" and b is None and not self._facts_ready:
            b = self._provisional_bounds()
        lo, hi, dist = -math.inf, math.inf, 0.0
        if b is not None:
            lo, hi, dist = b.lo, b.hi, 1.0 if b.kind == "distribution" else 0.0
        name, params = self.monitor.facts.activation, self.monitor.facts.activation_params
        if not self._facts_ready:
            name, params = self._act
        pin_lo = pin_hi = math.nan
        if name == "clamp":
            pin_lo = params.get("lo") if params.get("lo") is not None else math.nan
            pin_hi = params.get("hi") if params.get("hi") is not None else math.nan
        tail = TAIL_THRESHOLD.get(name, math.inf)
        s = (lo, hi, pin_lo, pin_hi, tail, dist)
        if s != self._settings_now:
            self._settings.assign(np.array(s, np.float32))
            self._settings_now = s

    def _provisional_bounds(self) -> Optional[Bounds]:
        """Before the first targets are seen: the bounds ``"auto"`` will most likely infer from the loss."""
        loss = self._loss
        if loss is None or loss.family not in ("probability", "logits"):
            return None
        return Bounds.distribution() if loss.multiclass else Bounds.probability()

    # -------------------------------------------------------------- inside the step
    def _seen_activation(self, layer: Any, z: Any, p: Any) -> None:
        if not self._installed or self._disabled:
            return
        self._stash_order += 1
        self._stash[id(layer)] = (self._stash_order, layer, z, p)

    def _after_loss(self, x: Any, y: Any, y_pred: Any, loss: Any, training: Any) -> None:
        stash, self._stash = self._stash, {}
        if not self._installed or self._disabled or training is False:
            return
        self._in_loss = True
        try:
            self._write_row(x, y, y_pred, loss, stash)
        except Exception as err:
            if self._config.strict:
                raise
            self._disable(err)
        finally:
            self._in_loss = False

    def _write_row(self, x: Any, y: Any, y_pred: Any, loss: Any, stash: dict) -> None:
        c = self._consts()
        s = ops.unstack(self._settings.value)
        # statistics that cannot be non-neutral for this model are not computed (decided at trace time;
        # a bound insertion retraces the step)
        static_act = self._act[0] if self._head is not None and self._head.static else None
        want_pin = static_act in (None, "clamp", "unknown")
        want_tail = static_act is None or static_act in TAIL_THRESHOLD
        want_range = self._config.bounds is not None
        preds = [t for t in keras.tree.flatten(y_pred) if t is not None] if y_pred is not None else []
        yp = preds[0] if preds else None
        yt = None
        if y is not None:
            ys = [t for t in keras.tree.flatten(y) if t is not None]
            yt = ys[0] if ys else None
        xs = [(i, t) for i, t in enumerate(keras.tree.flatten(x)) if t is not None and hasattr(t, "dtype")] \
            if x is not None else []
        xf = next(((i, t) for i, t in xs if _is_float(t)), None)
        # which layer's activation produced the prediction
        entry = None
        if self._head is not None and self._head.static:
            if self._head.owner is not None:
                entry = stash.get(id(self._head.owner))
            direct = entry is not None and not self._head.trailing and entry[3] is yp
        else:
            entry = next((e for e in stash.values() if e[3] is yp), None)
            direct = entry is not None
            if entry is None and stash:
                entry = max(stash.values(), key=lambda e: e[0])
        tr = self._trace
        tr.update(owner=entry[1] if entry is not None else None, direct=direct, multi=len(preds) > 1,
                  pred_shape=tuple(yp.shape) if yp is not None else None,
                  target_dtype=_dtype(yt) if yt is not None else None,
                  target_shape=tuple(yt.shape) if yt is not None else None,
                  input_dtype=_dtype(xs[0][1]) if xs else None, input_index=xf[0] if xf else None,
                  pre_dtype=_dtype(entry[2]) if entry is not None else None,
                  n_inputs=len(xs), loss_called=True)
        cols: list = [None] * _W0
        extra = [c["zero"]] * len(_EXTRA)

        def put(kind: str, vals: list, n: Any) -> None:
            for name, v in zip(_fields(kind), vals):
                cols[_COL[f"{kind}.{name}"]] = v
            extra[KINDS.index(kind)] = n

        if yp is not None and not self._logits and _nonempty(yp):
            p = _f32(yp)
            f = ops.reshape(p, (-1,))
            mn, mx, fin, n = self._basic(f, c)
            below = above = pinned = c["zero"]
            if want_range:
                below = _count(ops.less(f, s[_S_LO]))
                above = _count(ops.greater(f, s[_S_HI]))
            if want_pin:
                pinned = _count(ops.logical_or(ops.equal(f, s[_S_PIN_LO]), ops.equal(f, s[_S_PIN_HI])))
            rowsum = c["ninf"]
            if want_range and len(p.shape) >= 2 and p.shape[-1] != 1:
                err = ops.max(ops.abs(ops.subtract(ops.sum(p, axis=-1), c["one"])))
                rowsum = ops.where(ops.greater(s[_S_DIST], c["zero"]), err, c["ninf"])
            put("pred", [mn, mx, fin, below, above, pinned, rowsum], n)
        if entry is not None and _nonempty(entry[2]):
            f = ops.reshape(_f32(entry[2]), (-1,))
            mn, mx, fin, n = self._basic(f, c)
            sumsq = ops.sum(ops.multiply(f, f))
            tail = _count(ops.greater(ops.abs(f), s[_S_TAIL])) if want_tail else c["zero"]
            put("pre", [mn, mx, fin, sumsq, tail], n)
            if not direct and not (self._head is not None and self._head.static) and yp is not None:
                self._write_probe(entry[2], yp, c)
        if yt is not None and _nonempty(yt):
            t = _f32(yt)
            f = ops.reshape(t, (-1,))
            mn, mx, fin, n = self._basic(f, c)
            nonbinary = _count(ops.not_equal(ops.multiply(f, ops.subtract(c["one"], f)), c["zero"]))
            put("target", [mn, mx, fin, nonbinary], n)
            if len(t.shape) >= 2 and t.shape[-1] is not None and t.shape[-1] > 1:
                binary = ops.all(ops.logical_or(ops.equal(t, c["zero"]), ops.equal(t, c["one"])))
                rows1 = ops.all(ops.equal(ops.sum(t, axis=-1), c["one"]))
                extra[_ONEHOT_COL - _W0] = ops.cast(ops.logical_and(binary, rows1), "float32")
        if xf is not None and _nonempty(xf[1]):
            f = ops.reshape(_f32(xf[1]), (-1,))
            mn, mx, fin, n = self._basic(f, c)
            put("input", [mn, mx, fin, ops.sum(ops.multiply(f, f))], n)
        if loss is not None:
            l = _f32(loss)
            if len(l.shape) > 0:
                l = ops.mean(l)
            cols[LOSS_COLUMN] = l
            extra[_SEEN_COL - _W0] = c["one"]
        for i, v in enumerate(cols):
            if v is None:
                cols[i] = c[f"neutral{i}"]
        row = ops.stack(cols + extra)
        idx = ops.minimum(self._row.value, c["last"])
        mask = ops.expand_dims(ops.equal(c["arange"], idx), 1)
        self._buf.assign(ops.where(mask, ops.expand_dims(row, 0), self._buf.value))
        self._row.assign(self._row.value + 1)

    def _basic(self, f: Any, c: dict) -> tuple:
        fin = _count(ops.isfinite(f))
        # min/max propagate NaN on both backends (tf.reduce_min/max, torch.amin/amax): a NaN anywhere
        # in the step shows as NaN, as the statistics declare (tested in test_keras_catalogue)
        mn, mx = ops.min(f), ops.max(f)
        if keras.backend.backend() == "tensorflow":
            n = ops.cast(ops.size(f), "float32")
        else:  # no Python number → device tensor (a host round-trip on an accelerator)
            n = ops.sum(ops.ones_like(f))
        return mn, mx, fin, n

    def _write_probe(self, z: Any, p: Any, c: dict) -> None:
        """A few rows of z and y_pred, to infer an activation applied outside any layer (read at the first check)."""
        zs, ps = tuple(z.shape[1:]), tuple(p.shape[1:])
        if zs != ps or any(d is None for d in zs):
            return
        per = int(np.prod(zs)) if zs else 1
        if per > _PROBE_K:
            return
        m = _PROBE_K // per
        k = c["nan_k"]
        out = []
        for t in (z, p):
            flat = ops.reshape(_f32(t[:m]), (-1,))
            flat = ops.concatenate([flat, k], axis=0)[:_PROBE_K]
            out.append(flat)
        self._probe.assign(ops.stack(out))
        self._trace["probe_shape"] = (m,) + zs

    # -------------------------------------------------------------- checks
    def _check(self) -> None:
        rows_all = self._read()
        n = max(1, min(self.step - self._interval_start + 1, rows_all.shape[0]))
        rows = rows_all[:n]
        first = not self._facts_ready
        if first:
            self._finalize_facts()
        counts = {k: int(round(float(rows[:, _N_COL[k]].sum()))) for k in KINDS}
        seen = rows[:, _SEEN_COL] > 0
        if first:
            self._notes(counts, bool(seen.any()))
        if counts["target"]:
            has_t = rows[:, _N_COL["target"]] > 0
            tmin = float(np.min(rows[has_t, _COL["target.min"]]))
            tmax = float(np.max(rows[has_t, _COL["target.max"]]))
            onehot = bool(np.all(rows[has_t, _ONEHOT_COL] > 0))
            self.monitor.observe_targets(tmin, tmax, onehot=onehot)
        snap = Snapshot.from_rows(rows[:, :_W0], counts, step=self.step, first_step=self._interval_start,
                                  epoch=self._epoch, loss_seen=seen)
        self._interval_start = self.step + 1
        self._epoch_add(rows[:, :_W0], counts, snap)
        self.last_snapshot = snap
        decisions = self.monitor.check(snap)
        self._sync_settings()
        self._act_on(decisions)

    def _finalize_facts(self) -> None:
        tr, head = self._trace, self._head
        owner = tr.get("owner") if tr else None
        if head is not None and head.static:
            owner = head.owner
        name, params = self._act
        if head is not None and not head.static:
            if owner is not None and tr.get("direct"):
                self._owner = owner
                try:
                    name, params = _classify([_inner(owner.activation)], (tr.get("pred_shape") or (1,))[-1] or 1)
                except Exception:
                    name, params = "unknown", {}
            elif owner is not None and tr.get("probe_shape"):
                self._owner = owner
                probe = np.asarray(ops.convert_to_numpy(self._probe.value), dtype=np.float64)
                shape = tr["probe_shape"]
                size = int(np.prod(shape))
                z, p = probe[0, :size].reshape(shape), probe[1, :size].reshape(shape)
                keep = np.all(np.isfinite(z.reshape(shape[0], -1)), axis=1)
                name, params = infer_activation(z[keep], p[keep]) if keep.any() else ("unknown", {})
                if name in ("softmax", "log_softmax"):
                    params = {"dim": -1}
            else:
                self._owner = owner
                name, params = "unknown", {}
            # unwrap the layers that turned out not to be the output
            for layer, w in list(self._wrapped):
                if layer is not self._owner and vars(layer).get("activation") is w:
                    layer.activation = _inner(w)
                    self._wrapped.remove((layer, w))
        self._act = (name, params)
        loss = self._loss
        pred_name = (head.out_name if head is not None and head.static and head.out_name else None) or \
            (_name(self._owner) if self._owner is not None else "model output")
        target_dtype = tr.get("target_dtype")
        target_integer = bool(target_dtype and not _float_dtype(target_dtype)) or bool(
            self._loss_name and str(self._loss_name).lower().startswith(("sparse", "sparsecategorical")))
        input_dtype = tr.get("input_dtype")
        shape = tr.get("pred_shape")
        classes = int(shape[-1]) if shape and len(shape) >= 2 and shape[-1] and shape[-1] > 1 else None
        idx = tr.get("input_index")
        facts = ModelFacts(
            pred_where=f"{pred_name} output",
            pre_where=f"{_name(self._owner)} pre-activation" if self._owner is not None else None,
            activation=name, activation_params=params,
            loss=loss, loss_where=self._loss_name,
            target_where="y" if tr.get("target_dtype") else None,
            input_where=("x" if tr.get("n_inputs", 0) <= 1 else f"x[{idx}]") if idx is not None else None,
            target_integer=target_integer,
            input_integer=bool(input_dtype and not _float_dtype(input_dtype)) and idx is None,
            classes=classes,
        )
        if "pre_dtype" in ModelFacts.__dataclass_fields__:
            facts.pre_dtype = tr.get("pre_dtype")
        self.monitor.set_facts(facts)
        if self.monitor.inserted:
            self._mark_bounded(self.monitor.inserted[-1])
        self._facts_ready = True

    def _notes(self, counts: dict, loss_seen: bool) -> None:
        tr, m = self._trace, self.monitor
        if not tr.get("loss_called"):
            m.note("loss", "the train step never called model.compute_loss, so predictions, targets, inputs and "
                   "the batch loss are not watched (a custom train_step computes its loss another way).",
                   "Call self.compute_loss(x=x, y=y, y_pred=y_pred) in the custom train_step.", step=self.step)
            return
        if self._owner is None:
            m.note("pre-activation", "the output layer's activation could not be located (the output is not a "
                   "Dense/Conv/Activation layer with an activation), so pre-activation and activation checks are off.",
                   "Make the output layer a Dense(..., activation=...) or add an Activation layer at the end.",
                   step=self.step)
        elif self._act[0] == "unknown":
            m.note("activation", "the output activation could not be identified, so activation checks are off.",
                   "Apply the output activation as activation= of the output layer.", step=self.step)
        if tr.get("multi"):
            m.note("outputs", "the model has several outputs; only the first is watched.",
                   "Watch one output per run, or compile the output you care about first.", step=self.step)
        if not counts["target"] and tr.get("target_dtype") is None:
            m.note("targets", "fit() got no targets, so target checks and bounds inference are off.",
                   "Pass y to fit(), or bounds= explicitly.", step=self.step)

    def _epoch_add(self, rows: np.ndarray, counts: dict, snap: Snapshot) -> None:
        red = _reduce_to_row(rows)
        self._epoch_rows.append(red)
        for k in KINDS:
            self._epoch_counts[k] += counts.get(k, 0)
        fin = snap.losses[np.isfinite(snap.losses)]
        self._epoch_loss[0] += float(fin.sum())
        self._epoch_loss[1] += int(fin.size)

    def _epoch_snapshot(self) -> Snapshot:
        row = _reduce_to_row(np.stack(self._epoch_rows))
        s, n = self._epoch_loss
        row[LOSS_COLUMN] = s / n if n else math.nan
        return Snapshot.from_rows(row[None], self._epoch_counts, step=self.step,
                                  first_step=self._epoch_first or 1, epoch=self._epoch, loss_seen=[n > 0])

    # -------------------------------------------------------------- actions
    def _act_on(self, decisions: list[Decision]) -> None:
        for d in decisions:
            if d.action == "halt":
                self.model.stop_training = True
            elif d.action == "bound":
                if self.monitor.inserted:  # one bound per run: a second range alert at the same check
                    d.action = d.alert.action = "warn"
                else:
                    self._insert_bound(d.alert)
            elif d.action == "raise":
                self._teardown_quietly()
                self.monitor.finish()
                raise BoundGuardError(d.alert)

    def _insert_bound(self, alert: Alert) -> Optional[dict]:
        b, owner, head = self.monitor.bounds, self._owner, self._head
        if owner is None or (head is not None and head.static and not head.shape_only_after):
            self.monitor.note("bound", "on_violation='bound' could not insert a bound: the output activation was not "
                              "located (or is followed by further operations).",
                              "Add the output activation to the model yourself.", step=self.step)
            return None
        if b is None or (b.kind != "distribution" and not b.finite):
            self.monitor.note("bound", "on_violation='bound' needs finite bounds to insert a bound.",
                              "Declare finite bounds=(lo, hi).", step=self.step)
            return None
        act = BoundActivation(*_bound_kind(b))
        for layer, w in self._wrapped:
            if layer is owner:
                w.inner = act
                break
        else:
            owner.activation = act
        rec = {"module": _name(owner), "path": [], "kind": act.kind, "lo": b.lo, "hi": b.hi, "dim": -1,
               "step": self.step, "attr": _attr_of(self._wmodel, owner), "output": True}
        self.monitor.inserted.append(rec)
        self._mark_bounded(rec)
        self._sync_settings()
        model = self.model
        model.make_train_function(force=True)
        for make in ("make_test_function", "make_predict_function"):
            if hasattr(model, make):
                getattr(model, make)(force=True)
        alert.details["inserted"] = rec
        msg = (f"boundguard inserted {act.kind} on the output of {rec['module']} at step {self.step}: "
               f"predictions are now in {b.describe()}.")
        warnings.warn(BoundGuardWarning(msg), stacklevel=3)
        _log.warning(msg)
        return rec

    def _mark_bounded(self, rec: dict) -> None:
        f = self.monitor.facts
        f.activation = {"softmax": "softmax", "sigmoid": "sigmoid", "tanh": "tanh"}.get(rec["kind"], "scaled_sigmoid")
        f.activation_params = {"lo": rec["lo"], "hi": rec["hi"]} if rec["kind"] == "scaled_sigmoid" else (
            {"dim": -1} if rec["kind"] == "softmax" else {})
        self._act = (f.activation, f.activation_params)


# ----------------------------------------------------------------------------------------- helpers
def _fields(kind: str) -> list[str]:
    return [s.field for s in STATS if s.kind == kind]


def _dtype(t: Any) -> Optional[str]:
    try:
        return keras.backend.standardize_dtype(t.dtype)
    except Exception:
        return None


def _float_dtype(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "half", "double"))


def _is_float(t: Any) -> bool:
    d = _dtype(t)
    return bool(d) and _float_dtype(d)


def _nonempty(t: Any) -> bool:
    """False only when the size is known to be zero (a dynamic size in a traced step counts as non-empty)."""
    try:
        shape = tuple(t.shape)
    except Exception:
        return True
    return not any(d == 0 for d in shape if d is not None)


def _f32(t: Any) -> Any:
    return ops.cast(ops.stop_gradient(t), "float32")


def _count(mask: Any) -> Any:
    return ops.sum(ops.cast(mask, "float32"))


def _units(model: Any, owner: Any) -> int:
    for get in (lambda: keras.tree.flatten(model.outputs)[0].shape[-1],
                lambda: owner.units, lambda: owner.filters):
        try:
            v = get()
            if isinstance(v, int) and v > 0:
                return v
        except Exception:
            continue
    return 1


def _reduce_to_row(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, rows.shape[-1])
    out = np.empty(_W0)
    for i, s in enumerate(STATS):
        col = rows[:, i]
        if s.reduce == "min":
            out[i] = np.min(col)
        elif s.reduce == "max":
            out[i] = np.max(col)
        elif s.reduce == "sum":
            out[i] = np.sum(col)
        else:
            out[i] = math.nan
    return out


def _attr_of(model: Any, layer: Any) -> Optional[str]:
    """The model attribute that holds ``layer`` (subclassed models), so a rebuilt model finds it again."""
    try:
        attrs = dict(vars(model))
    except TypeError:
        return None
    attrs.update(attrs.get("_modules") or {})  # torch backend: sub-layers live in the Module's _modules
    return next((k for k, v in attrs.items() if v is layer and not k.startswith("_")), None)


def _locate(model: Any, rec: dict, layers: dict) -> Any:
    """The layer a bound record names: by name, by attribute, or (a rebuilt model, other auto-names) the output."""
    for cand in (layers.get(rec.get("module")), getattr(model, rec["attr"], None) if rec.get("attr") else None):
        if cand is not None and _activation_attr(cand) is not None:
            return cand
    if rec.get("output"):
        head = _find_head(model)
        if head.static and head.owner is not None and head.shape_only_after:
            return head.owner
    return None


def _bound_kind(b: Bounds) -> tuple[str, float, float]:
    if b.kind == "distribution":
        return "softmax", 0.0, 1.0
    if (b.lo, b.hi) == (0.0, 1.0):
        return "sigmoid", 0.0, 1.0
    if (b.lo, b.hi) == (-1.0, 1.0):
        return "tanh", -1.0, 1.0
    return "scaled_sigmoid", b.lo, b.hi


def apply_bounds(model: Any, source: Any, *, retrace: bool = True) -> list[dict]:
    """Set the bounding activations boundguard recorded on ``model`` (e.g. a model rebuilt from code).

    ``source`` is a :class:`BoundGuard`, its ``state_dict()``, or a list of records. A model saved with
    ``model.save`` after training already carries its bound; this is for models rebuilt from code and
    given the weights. Idempotent. Returns the records applied.
    """
    if hasattr(source, "bounds_inserted"):
        records = list(source.bounds_inserted)
    elif isinstance(source, dict):
        records = list((source.get("monitor") or source).get("inserted", []))
    elif isinstance(source, (list, tuple)):
        records = list(source)
    else:
        raise TypeError(f"apply_bounds: cannot read bound records from {type(source).__name__}")
    layers = {_name(l): l for l in _flat_layers(model)}
    for rec in records:
        layer = _locate(model, rec, layers)
        if layer is None:
            raise ValueError(f"apply_bounds: the model has no layer named {rec['module']!r} with an activation "
                             f"(nor an output layer with one)")
        act = BoundActivation(rec["kind"], rec.get("lo", 0.0), rec.get("hi", 1.0), rec.get("dim", -1))
        cur = layer.activation
        if isinstance(cur, _WatchedActivation):
            cur.inner = act
        else:
            layer.activation = act
    if records and retrace:
        for make in ("make_train_function", "make_test_function", "make_predict_function"):
            if hasattr(model, make) and getattr(model, "compiled", False):
                try:
                    getattr(model, make)(force=True)
                except Exception:
                    pass
        if hasattr(model, "predict_function"):
            model.predict_function = None
    return records
