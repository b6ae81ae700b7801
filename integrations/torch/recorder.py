"""The probe step's recorder: a :class:`~torch.overrides.TorchFunctionMode` that records every torch call
of one training step (its name, arguments and output), so :mod:`.probe` can walk back from the loss call
to the module that made the prediction.

Tensors up to :data:`STRONG_MAX` elements are held until the analysis; a larger one by weak reference
(:class:`Weak`), so a temporary (a loss's fp32 copy of a language model's logits) dies when it would without
the recorder, and the analysis walks through it by the call that made it, knowing its shape.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Optional, Union

from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["LOSS_FUNCS", "STRONG_MAX", "Call", "Recorder", "Ref", "Weak"]

#: The torch.nn.functional losses whose first argument is the prediction.
LOSS_FUNCS = {
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "cross_entropy", "nll_loss", "kl_div", "multilabel_soft_margin_loss",
    # losses boundguard does not judge by family, but whose input is still the prediction
    "gaussian_nll_loss", "poisson_nll_loss", "soft_margin_loss", "multi_margin_loss", "hinge_embedding_loss",
    "margin_ranking_loss", "cosine_embedding_loss", "triplet_margin_loss", "ctc_loss",
}
#: The largest tensor (in elements) the recorder holds by strong reference until the analysis.
STRONG_MAX = 1 << 16


class Weak:
    """A large tensor of the probe step, held weakly: :meth:`get` gives the tensor while it lives, else this
    stand-in (its shape, dtype and gradient flag, and :attr:`producer`, the recorded call that made it)."""
    __slots__ = ("ref", "shape", "dtype", "device", "requires_grad", "floating", "producer")

    def __init__(self, t: Tensor, on_death: Callable[[int], None]) -> None:
        key = id(t)
        self.ref = weakref.ref(t, lambda _ref: on_death(key))
        self.shape, self.dtype, self.device = tuple(t.shape), t.dtype, t.device
        self.requires_grad, self.floating = t.requires_grad, t.is_floating_point()
        self.producer: Optional[Call] = None

    def get(self) -> Union[Tensor, "Weak"]:
        t = self.ref()
        return t if t is not None else self

    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.floating


#: What the analysis handles: a live tensor, or the stand-in of one that died.
Ref = Union[Tensor, Weak]


def _live(x: Any) -> Any:
    return x.get() if isinstance(x, Weak) else x


def _is_tensor(x: Any) -> bool:
    return isinstance(x, (Tensor, Weak))


class Call:
    __slots__ = ("name", "func", "args", "kwargs", "_out")

    def __init__(self, name, func, args, kwargs, out):
        self.name, self.func, self.args, self.kwargs, self._out = name, func, args, kwargs, out

    @property
    def out(self) -> Any:
        return _live(self._out)

    def tensor_arg(self, pos: int = 0, name: Optional[str] = None) -> Optional[Ref]:
        if name and _is_tensor(self.kwargs.get(name)):
            return _live(self.kwargs[name])
        ts = [a for a in self.args if _is_tensor(a)]
        return _live(ts[pos]) if len(ts) > pos else None

    def tensors(self) -> list[Ref]:
        """Every tensor argument, those in a list argument too (``torch.cat``)."""
        out: list[Ref] = []
        for a in self.args:
            if isinstance(a, (list, tuple)):
                out.extend(_live(x) for x in a if _is_tensor(x))
            elif _is_tensor(a):
                out.append(_live(a))
        return out

    def arg(self, pos: int, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return _live(self.kwargs[name])
        return _live(self.args[pos]) if len(self.args) > pos else default


class Recorder(TorchFunctionMode):
    """Records every torch function call of the probe step. Small tensors are held (so their ids stay
    unique); a large one is held by weak reference (:class:`Weak`), and its id is forgotten when it dies."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.producer: dict[int, Call] = {}  # id of a held or living tensor -> the call that made it
        self._weak: dict[int, Weak] = {}  # id of a living, weakly held tensor -> its stand-in
        self.failed: Optional[Call] = None  # the call that raised (a loss refusing its targets, say)
        #: called once when the backward pass reaches a recorded loss call's output (see Probe.on_backward)
        self.on_backward: Optional[Any] = None
        self._armed_backward = False
        self.recording = True  # False: calls pass through unrecorded (paused, not yet left)
        self.entered = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.recording:
            return func(*args, **kwargs)
        try:
            out = func(*args, **kwargs)
        except Exception:
            self.failed = Call(getattr(func, "__name__", "") or "", func, args, kwargs, None)
            raise
        name = getattr(func, "__name__", "") or ""
        if name.endswith("_") and not name.startswith("__"):  # in-place variants: treat like the op
            name = name[:-1]
        self._record(name, func, args, kwargs, out)
        if isinstance(out, Tensor):
            if name in LOSS_FUNCS and self.on_backward is not None and out.requires_grad and not self._armed_backward:
                self._armed_backward = True
                out.register_hook(self._backward_started)
        return out

    def _record(self, name: str, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """One call, its large tensors held weakly; a loss call's targets, weights and value are held (they
        are small, and the analysis reads them), its input by the size rule like any other tensor."""
        loss = name in LOSS_FUNCS
        first = next((i for i, a in enumerate(args) if isinstance(a, Tensor)), None) if "input" not in kwargs else None
        call = Call(name, func,
                     tuple(self._hold(a, strong=loss and i != first) for i, a in enumerate(args)),
                     {k: self._hold(v, strong=loss and k != "input") for k, v in kwargs.items()},
                     None)
        call._out = self._hold(out, strong=loss)
        self.calls.append(call)
        if isinstance(out, Tensor):
            self.producer.setdefault(id(out), call)
            w = call._out
            if isinstance(w, Weak) and w.producer is None:
                w.producer = call

    def _hold(self, x: Any, strong: bool = False) -> Any:
        if isinstance(x, Tensor):
            if strong or x.numel() <= STRONG_MAX:
                return x
            w = self._weak.get(id(x))
            if w is None:
                w = self._weak[id(x)] = Weak(x, self._died)
            return w
        if isinstance(x, (list, tuple)) and any(isinstance(i, Tensor) for i in x):
            return [self._hold(i, strong) for i in x]
        return x

    def _died(self, key: int) -> None:
        """A weakly held tensor died: its id may be given to another tensor now."""
        self._weak.pop(key, None)
        self.producer.pop(key, None)

    def producer_of(self, t: Optional[Ref]) -> Optional[Call]:
        """The recorded call that made ``t`` (a living tensor, or the stand-in of one that died)."""
        if t is None:
            return None
        return t.producer if isinstance(t, Weak) else self.producer.get(id(t))

    def clear(self) -> None:
        self.calls.clear()
        self.producer.clear()
        self._weak.clear()

    def _backward_started(self, grad: Tensor) -> None:
        callback, self.on_backward = self.on_backward, None
        if callback is not None:
            callback()

    def last_loss(self) -> Optional[Tensor]:
        """The training loss as the step recorded it: the last 0-d output with a gradient (the sum of the
        loss calls, their scaling...), when the loss itself is not handed over."""
        for call in reversed(self.calls):
            out = call.out
            if isinstance(out, Tensor) and out.dim() == 0 and out.requires_grad:
                return out
        return None
