"""Keras 3 adapter: ``BoundGuard``, a ``keras.callbacks.Callback`` that watches ``model.fit`` from inside the step.

How it sees the compiled step, with no change to the user's code:

- **Prediction and pre-activation.** At ``on_train_begin`` the output layer's ``activation``
  attribute (``Dense(activation=...)``, a trailing ``Activation`` layer, a custom function such as
  ``tf.clip_by_value``) is wrapped so that each call hands its input ``z`` and output to the callback.
  The train function traces lazily, so the wrapper is part of the traced step.
- **Targets, inputs and the batch loss.** ``model.compute_loss`` is wrapped by an instance attribute
  (a user override of ``compute_loss`` keeps working underneath). Keras' own ``train_step`` calls it
  with ``x``, ``y``, ``y_pred`` and ``training=True``; there the statistics of the step are reduced
  with ``keras.ops`` into one row of a device buffer. Nothing is read back between checks.
- **Checks.** The run's lifecycle is the core's :class:`~boundguard.session.Session`: at the first step
  and every ``check_every_n_steps`` (and once at the end of ``fit`` for the steps since the last check)
  the buffer comes to the host in one transfer and the core judges it; ``halt`` sets
  ``model.stop_training``, ``raise`` raises :class:`~boundguard.BoundGuardError`, ``bound`` swaps the
  output activation for :class:`BoundActivation` and retraces the step (for ``logits_growing``, a soft cap
  ``cap * tanh(z / cap)`` on the logits; the loss keeps ``from_logits=True``).
- **Clean model.** ``on_train_end`` removes both wrappers and drops the traced train function; an
  inserted bound stays and is saved by ``model.save`` (it is registered as serializable, so
  ``keras.models.load_model`` works after ``import boundguard.integrations.keras``).

Model shapes: Sequential and functional models (the output layer found from the graph, through trailing
parameter-free layers such as ``Softmax``/``Activation``/``Reshape``/``Dropout``, also through a nested
model at the output) and subclassed models (the layer whose activation output *is* ``y_pred`` is found
while the step is traced; an activation applied outside any layer is inferred from the first batch).
Models with several outputs are watched on one output, with its own targets and loss: ``output_key=``
names it (an output name or an index in Keras' order of the outputs; default the first), and one info note
says which. Backends: TensorFlow (graph and eager, ``steps_per_execution`` > 1 included) and torch (eager, and ``jit_compile=True``, where the callback's
Python side runs outside the compiled graph: one graph break per step instead of a recompile) and JAX
(jitted or eager, ``steps_per_execution`` > 1 included), whose stateless train step carries the buffer:
its variables belong to a ``keras.metrics.Metric`` the model holds while ``fit`` runs, so they travel
with the model's metric variables (see :mod:`.buffer`). A custom ``train_step`` that does not call
``self.compute_loss`` gets activation facts only (the callback says so in a ``probe_incomplete`` note).

Known limits: with ``bounds="auto"`` the targets are first seen at the first check, so the out-of-range
*counts* of step 1 are taken against the bounds the loss implies (``(0, 1)`` / a distribution for
probability losses, none for regression losses); min/max of step 1 are exact and the inferred bounds
apply from step 2. The callback is ``async_safe``: on torch and JAX Keras keeps dispatching batch-end hooks
on its callback thread; the callback records only the running loss's finiteness there and does its work on
the training thread (at the next batch's begin and at the epoch's end), so there a check of step ``n``
runs before batch ``n + 1`` and a ``halt`` stops ``fit`` one batch later than on TensorFlow (whose
batch-end hooks run synchronously, where a check and a halt act at the step itself).

Modules: :mod:`.graph` (model inspection; every use of Keras internals), :mod:`.activations`
(``BoundActivation``, the watch wrapper, ``apply_bounds``), :mod:`.buffer` (the device buffer, one
strategy per backend, and the row writer), :mod:`.fusion` (TensorFlow: the statistics read copies of
the output layer's ops, so Grappler's fusion is unchanged), :mod:`.probe` (what the traced step shows:
tensors, facts, notes), :mod:`.callback` (``BoundGuard``).
"""
try:
    import keras
    from keras import ops  # noqa: F401  (``boundguard.integrations.keras.ops`` is keras.ops, for tests)
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

from boundguard.integrations.keras.activations import BoundActivation, apply_bounds  # noqa: E402
from boundguard.integrations.keras.callback import BoundGuard  # noqa: E402
from boundguard.session import DEFAULT_ALERTS_PATH  # noqa: E402

__all__ = ["BoundGuard", "BoundActivation", "apply_bounds", "DEFAULT_ALERTS_PATH"]
