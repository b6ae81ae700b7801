"""TensorFlow only: the statistics read copies of the ops that made a tensor, so that reading it does not
change how Grappler compiles the training step (:func:`unshared`, behind
:meth:`~.buffer.TensorFlowStrategy.unshared`).

No change to training. The statistics only read tensors (through ``stop_gradient``), but on TensorFlow a
read is itself a change to the traced graph: Grappler's remapper fuses a contraction, its bias add and the
activation after them into one kernel (``_FusedMatMul``, ``_FusedConv2D``) only when each op's output has
that one consumer, and the fused activation (oneDNN on CPU) rounds differently from the plain ``Tanh`` /
``Sigmoid`` / ``Elu``. A statistic of the pre-activation would stop that fusion and move the weights (by
6e-8 to 2e-7 in float32 after 2 epochs, 4e-4 under ``mixed_bfloat16``; issue 21), so the step reads the
pre-activation (and a linear prediction, which a loss may activate) from copies of those ops: one more
forward of the output layer's contraction per step, for the statistics only. torch and JAX need none: the
monitored and plain runs are bit-identical there, and on TensorFlow with the copies
(``tests/integrations/keras/test_keras_identical.py``).

TensorFlow graph internals used here: ``Tensor.op`` / ``consumers``, ``Operation.type`` / ``inputs`` /
``outputs`` / ``node_def`` and ``Graph.create_op``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["unshared", "CONTRACTIONS", "UNFUSED_CONSUMERS", "ADDS", "COPY_DEPTH"]

#: TensorFlow ops that Grappler's remapper fuses with the adds and the activation after them.
CONTRACTIONS = frozenset({"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Conv2D", "Conv3D",
                          "DepthwiseConv2dNative", "Conv2DBackpropInput", "Conv3DBackpropInputV2", "Einsum"})
#: Consumers the remapper never fuses into the contraction (measured bit-identical without a copy): a
#: multi-class head's logits feed these, and a copy of a language-model head would cost a second
#: vocabulary-sized matmul per step for nothing.
UNFUSED_CONSUMERS = frozenset({"Softmax", "LogSoftmax", "SparseSoftmaxCrossEntropyWithLogits",
                               "SoftmaxCrossEntropyWithLogits", "Relu", "Relu6"})
#: The adds between a contraction and the activation (bias, residual).
ADDS = frozenset({"BiasAdd", "BiasAddV1", "AddV2", "Add"})
COPY_DEPTH = 3  # adds and contractions followed back from the tensor read


def unshared(ts: tuple, counter: Any) -> tuple:
    """In a traced step, a tensor made by a contraction (``MatMul``, ``Conv2D``, ...) and the adds after
    it (bias, residual) is recomputed by copies of those ops that only the statistics read, so the
    originals keep their one consumer and Grappler fuses them with the activation as in the plain step
    (see the module docstring). The copies carry a control input on the row counter (the ``keras.Variable``
    ``counter``), so Grappler's common-subexpression passes do not merge them back into the originals (under
    XLA they merge: XLA gives the same result either way). Eager steps, and tensors made by other ops, are
    read as they are; should copying fail, the tensor is read as it is (the statistics are right either
    way). ``None`` entries stay None."""
    import tensorflow as tf

    if tf.executing_eagerly():
        return ts
    memo: dict[int, Any] = {}
    gate: list = []
    return tuple(t if t is None or _never_fused(t) else _copy(tf, t, gate, counter, memo, COPY_DEPTH)
                 for t in ts)


def _never_fused(t: Any) -> bool:
    """Every op that reads ``t`` (besides the statistics) is one the remapper does not fuse with it."""
    try:
        consumers = t.consumers()
        return bool(consumers) and all(c.type in UNFUSED_CONSUMERS for c in consumers)
    except Exception:
        return False


def _copy(tf: Any, t: Any, gate: list, counter: Any, memo: dict[int, Any], depth: int) -> Any:
    """``t`` recomputed by copies of the contraction and adds that made it (see :func:`unshared`); ``t``
    itself when another op made it."""
    try:
        op = t.op
        if depth <= 0 or op.type not in CONTRACTIONS | ADDS or len(op.outputs) != 1 \
                or op.graph is not tf.compat.v1.get_default_graph():
            return t
        if id(op) in memo:
            return memo[id(op)]
        inputs = list(op.inputs) if op.type in CONTRACTIONS else \
            [_copy(tf, u, gate, counter, memo, depth - 1) for u in op.inputs]
        if not gate:
            gate.append(tf.convert_to_tensor(counter.value))  # read by the row writer only
        attrs = {k: v for k, v in op.node_def.attr.items() if not k.startswith("_")}
        with op.graph.control_dependencies(gate), tf.name_scope("boundguard"):
            copy = op.graph.create_op(op.type, inputs, [t.dtype], attrs=attrs).outputs[0]
        memo[id(op)] = copy
        return copy
    except Exception:
        return t
