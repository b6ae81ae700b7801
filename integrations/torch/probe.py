"""The probe: one recorded training step finds the prediction, its pre-activation, the activation in
between, the loss that consumes it, and the targets.

A :class:`~.recorder.Recorder` (a torch function mode) records every torch call of the step and forward hooks
record every module's output; :meth:`Probe.analyse` walks back from the loss call's input to the
module that produced it. The recorder holds the step's small tensors until the analysis and a large one (above
:data:`~.recorder.STRONG_MAX` elements) by weak reference, so a temporary (a loss's fp32 copy of the logits) dies
when it would without the probe. Modules' inputs and outputs are held until the analysis.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from torch import Tensor, nn

from boundguard.integrations.torch.hooks import MonitorHook, training_forward
from boundguard.integrations.torch.paths import INPUT, flatten, get_path
from boundguard.integrations.torch.recorder import LOSS_FUNCS, Call, Recorder, Ref, Weak
from boundguard.model_facts import infer_activation

__all__ = ["Probe", "ProbeResult", "same_storage"]

#: Layers that normalise what they are given (the raw inputs' scale does not matter after them).
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)  # (InstanceNorm is a _NormBase)
#: Losses whose two arguments play the same part (a distance): the prediction may come second.
_SYMMETRIC_LOSSES = frozenset({"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"})
#: Class-index losses with an ``ignore_index`` (its targets at that value do not count).
_IGNORING_LOSSES = frozenset({"cross_entropy", "nll_loss"})
_SHAPE_OPS = {
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "__getitem__", "select", "contiguous", "float",
    "to", "type", "permute", "transpose", "view_as", "reshape_as", "double", "half", "bfloat16", "clone",
    "detach", "narrow", "expand", "expand_as",
}
_SUM_OPS = {"add", "__add__", "__radd__", "__iadd__", "sub", "__sub__", "__rsub__", "sum", "mean", "stack", "cat"}
_SCALE_OPS = {"mul", "__mul__", "__rmul__", "__imul__", "div", "__truediv__"}
_ACT_OPS = {"sigmoid", "tanh", "softmax", "log_softmax", "clamp", "clip", "hardtanh", "relu", "relu6",
            "clamp_min", "clamp_max"}

def _plain(call: Call, loss: Optional[Tensor], n_calls: int) -> bool:
    """The training loss is this one loss call's value, averaged over the batch (no auxiliary terms,
    no sum reduction, no class weights or label smoothing; a trainer's division by 1 is fine). Probe step only: one small read."""
    out = call.out
    if n_calls != 1 or loss is None or not isinstance(out, Tensor) or out.numel() != 1 or loss.numel() != 1:
        return False
    if call.kwargs.get("reduction", "mean") != "mean" or any(a in ("sum", "none") for a in call.args
                                                               if isinstance(a, str)):
        return False
    if any(isinstance(call.kwargs.get(k), Tensor) for k in ("weight", "pos_weight")) \
            or isinstance(call.arg(2, "weight"), Tensor) or call.kwargs.get("label_smoothing") or 0.0:
        return False  # weighted or smoothed: a constant prediction scores another loss than the plain one
    a, b = float(out.detach()), float(loss.detach())
    return math.isfinite(a) and abs(a - b) <= 1e-6 * max(1.0, abs(a))


class Probe:
    """Watches one training step to find prediction, pre-activation, activation, loss, targets and inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.recorder = Recorder()
        self.module_outputs: dict[int, tuple[str, tuple, Tensor]] = {}  # id(tensor) -> (module name, path, t)
        self.module_inputs: dict[str, Tensor] = {}  # first tensor argument of each module's first call
        self.order: list[tuple[str, nn.Module, Any]] = []
        self.root_inputs: Optional[tuple] = None
        self._handles: list = []
        self.active = False

    def start(self, root_inputs: Any = None) -> None:
        """Record from now on; ``root_inputs``: the inputs of a forward call already under way (the
        model's own pre-hook has run, so :meth:`_root_pre` will not see them)."""
        if root_inputs is not None:
            self.root_inputs = root_inputs
        for m, name in self.names.items():
            self._handles.append(m.register_forward_hook(MonitorHook(self._hook(name))))
        self._handles.append(self.model.register_forward_pre_hook(MonitorHook(self._root_pre)))
        self.recorder.__enter__()
        self.recorder.entered = True
        self.active = True

    def stop(self) -> None:
        """Stop recording: the module hooks go, and the function mode is left (on the thread that entered
        it: from an autograd hook, :meth:`pause` instead, and :meth:`stop` later)."""
        self.pause()
        if self.recorder.entered:
            self.recorder.entered = False
            try:
                self.recorder.__exit__(None, None, None)
            except Exception:  # another mode was pushed on top: leave the stack to its owner
                pass

    def pause(self) -> None:
        """Stop recording without leaving the function mode (it passes calls through from now on)."""
        self.active = False
        self.recorder.recording = False
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def forget(self) -> None:
        """Let go of every tensor the step showed once it is analysed: the recorded calls and the modules'
        inputs and outputs (held through the backward pass they would keep the forward's activations alive
        after autograd has freed them)."""
        self.recorder.clear()
        self.module_outputs.clear()
        self.module_inputs.clear()
        self.order.clear()
        self.root_inputs = None

    def _root_pre(self, module, args):
        if self.root_inputs is None and training_forward(module):
            self.root_inputs = args

    def _hook(self, name: str):
        def hook(module, args, output):
            if not training_forward(module):  # a sample or an evaluation in the middle of the step
                return
            self.order.append((name, module, output))
            if name not in self.module_inputs and args and isinstance(args[0], Tensor):
                self.module_inputs[name] = args[0]
            for path, t in flatten(output):
                self.module_outputs.setdefault(id(t), (name, path, t))  # innermost module first
        return hook

    # -------------------------------------------------------------------------------- analysis
    def _site(self, t: Ref) -> Optional[tuple[str, tuple, Tensor]]:
        if isinstance(t, Weak):  # died before the analysis: not a module's output (those are held)
            return None
        site = self.module_outputs.get(id(t))
        if site is not None:
            return site
        # the same storage under another view (e.g. logits.view(-1, C))
        for name, path, u in self.module_outputs.values():
            if u.numel() == t.numel() and u.numel() > 0 and same_storage(u, t):
                return name, path, u
        return None

    def _has_params(self, name: str) -> bool:
        m = dict(self.model.named_modules()).get(name)
        return m is not None and any(True for _ in m.parameters(recurse=False))

    def _has_child_params(self, name: str) -> bool:
        m = dict(self.model.named_modules()).get(name)
        return m is not None and any(True for c in m.children() for _ in c.parameters())

    def _walk_to_param_output(self, t: Ref, max_depth: int = 12) -> tuple[Optional[tuple], list[Call]]:
        """From ``t`` back along first tensor arguments to the output of a parametrised module."""
        chain: list[Call] = []
        cur = t
        outer: Optional[tuple[tuple, list[Call]]] = None  # a container's own output, if nothing inside leads
        for _ in range(max_depth):
            site = self._site(cur)
            call = self.recorder.producer_of(cur)
            if site is not None and self._has_params(site[0]):
                # a module with parameters of its own *and* parametrised children (a model holding a
                # positional embedding, say) whose output is an activation's: the layer is inside it
                if not (call is not None and call.name in _ACT_OPS and self._has_child_params(site[0])):
                    return site, chain
                outer = outer or (site, list(chain))
            if call is None:
                break
            nxt = call.tensor_arg(0)
            if nxt is None:
                break
            chain.append(call)
            cur = nxt
        return outer if outer is not None else (None, chain)

    def _fed_by_output(self, calls: list[Call], key: Any) -> Optional[Call]:
        """The first loss call whose input is (computed from) the model's output element ``key``."""
        root = next((out for _name, module, out in reversed(self.order) if module is self.model), None)
        target = get_path(root, (key,)) if root is not None else None
        if target is None:
            return None
        for c in calls:
            stack, seen = [c.tensor_arg(0, "input")], 0
            while stack and seen < 64:
                t = stack.pop()
                seen += 1
                if t is None:
                    continue
                if t is target or (t.numel() == target.numel() and same_storage(t, target)):
                    return c
                call = self.recorder.producer_of(t)
                if call is not None:
                    stack.extend(call.tensors())
        return None

    def _main_loss_call(self, loss: Optional[Tensor], calls: list[Call]) -> Call:
        """The loss call that weighs most in the training loss: ``CE(logits) + 0.4 * CE(aux)`` → the
        first. Walks back from the loss through sums and scalar scalings; ties and unknown graphs fall
        back to the last loss call."""
        if loss is None:
            return calls[-1]
        outs = {id(c.out): c for c in calls}
        weight: dict[int, float] = {}
        stack: list[tuple[Ref, float, int]] = [(loss, 1.0, 0)]
        while stack:
            t, w, depth = stack.pop()
            c = outs.get(id(t))
            if c is not None:
                weight[id(c)] = weight.get(id(c), 0.0) + w
                continue
            call = self.recorder.producer_of(t)
            if call is None or depth > 32 or call.name not in _SUM_OPS | _SCALE_OPS:
                continue
            tensors = call.tensors()
            scalars = [float(a) for a in call.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
            f = 1.0
            if call.name in _SCALE_OPS and scalars:
                f = abs(1.0 / scalars[0] if call.name in ("div", "__truediv__") and scalars[0] else scalars[0])
            stack.extend((x, w * f, depth + 1) for x in tensors)
        if not weight:
            return calls[-1]

        def contribution(c: Call) -> float:
            v = c.out.detach().float().abs().sum() if isinstance(c.out, Tensor) else 0.0
            return weight.get(id(c), 0.0) * float(v)  # probe step only: one small read per loss call

        return max(reversed(calls), key=contribution)

    def analyse(self, loss: Optional[Tensor], output_key: Any = None) -> "ProbeResult":
        """What the step showed. ``output_key``: the element of the model's output (tuple index or dict
        key) that is the prediction; the loss call it feeds is watched (default: the heaviest loss)."""
        r = ProbeResult()
        pred = self._choose_loss(r, loss, output_key)
        if pred is None:
            r.notes.append(("prediction", "the prediction could not be located.",
                            "Return the prediction from forward() and compute the loss on it."))
            return r
        r.pred_shape = tuple(pred.shape)
        r.pred = pred if isinstance(pred, Tensor) else None  # (a temporary that died: its shape is known)
        self._locate_pre(r, pred)
        r.root_inputs = self.root_inputs
        r.input_scaled_by = self._input_normaliser()
        return r

    def _input_normaliser(self) -> Optional[str]:
        """A normalisation layer (``BatchNorm1d``, ``LayerNorm``, ...) that takes the model's input as it
        is: the model scales its own inputs, so their raw scale is not judged (as Keras' ``Normalization``)."""
        root = [t for _, t in flatten(self.root_inputs)] if self.root_inputs else []
        if not root:
            return None
        modules = {n: m for m, n in self.names.items()}
        for name, x in self.module_inputs.items():
            m = modules.get(name)
            if m is not None and m is not self.model and isinstance(m, _NORMS) and any(x is t for t in root):
                return name
        return None

    def _choose_loss(self, r: "ProbeResult", loss: Optional[Tensor], output_key: Any) -> Optional[Ref]:
        """The loss call that is watched (recorded in ``r``) and the prediction it consumes."""
        calls = [c for c in self.recorder.calls if c.name in LOSS_FUNCS]
        chosen = None
        if calls:
            chosen = self._main_loss_call(loss, calls)
            if output_key is not None:
                named = self._fed_by_output(calls, output_key)
                if named is None:
                    r.notes.append(("output", f"output_key={output_key!r} does not name an element of the model's "
                                    f"output that reaches a loss call; watching the input of {chosen.name}.",
                                    "Pass output_key= as the index (tuple output) or key (dict output) of the "
                                    "prediction in what forward() returns."))
                else:
                    chosen = named
            if len(calls) > 1 and (output_key is None or chosen is not named):
                r.notes.append(("loss", f"{len(calls)} loss calls were seen in one step "
                                f"({', '.join(c.name for c in calls)}); watching the input of {chosen.name}, "
                                "the one that weighs most in the training loss (auxiliary heads are not watched).",
                                "Watch one head per run: pass bounds= for the main head's range, or return "
                                "the main loss alone."))
        if chosen is not None:
            r.loss_name = chosen.name
            r.loss_plain = _plain(chosen, loss, len(calls))
            pred, target = chosen.tensor_arg(0, "input"), chosen.tensor_arg(1, "target")
            if (chosen.name in _SYMMETRIC_LOSSES and pred is not None and target is not None
                    and not pred.requires_grad and target.requires_grad):
                # F.mse_loss(x, self(x)): the prediction is the argument the model made, whichever position
                pred, target = target, pred
            r.target = target if isinstance(target, Tensor) else None
            if chosen.name == "poisson_nll_loss" and not chosen.arg(2, "log_input", True):
                r.loss_name = "poisson_nll_loss(log_input=False)"  # the rate itself: no link
            if chosen.name in _IGNORING_LOSSES:  # (input, target, weight, size_average, ignore_index, ...)
                ignore = chosen.arg(4, "ignore_index", -100)
                r.target_ignore = float(ignore) if isinstance(ignore, (int, float)) else None
        else:
            pred = None
            r.notes.append(("loss", "no torch loss function (nn.*Loss or torch.nn.functional.*) was seen in the "
                            "first training step (a loss written by hand?), so the loss family is unknown and the "
                            "prediction is taken from the model's output.",
                            "Pass output_key= to name the prediction in what forward() returns, and bounds= for its "
                            "range; or compute the loss with an nn.*Loss module or a torch.nn.functional loss. "
                            "The loss value itself is still watched."))
            for _name, module, out in reversed(self.order):
                if module is self.model:
                    named = get_path(out, (output_key,)) if output_key is not None else None
                    pred = named if named is not None and named.is_floating_point() else next(
                        (t for _, t in flatten(out) if t.is_floating_point()), None)
                    break
        return pred

    def _locate_pre(self, r: "ProbeResult", pred: Ref) -> None:
        """Where the prediction comes from (its module and pre-activation, the activation in between),
        recorded in ``r`` with a note for what could not be located."""
        # where the prediction comes from: a module output reached through shape ops only
        site = self._site(pred)
        cur: Optional[Ref] = pred
        steps: list[Call] = []
        while site is None and cur is not None:
            call = self.recorder.producer_of(cur)
            if call is None or call.name not in _SHAPE_OPS | _ACT_OPS or call.tensor_arg(0) is None:
                break
            steps.append(call)
            cur = call.tensor_arg(0)
            site = self._site(cur) if cur is not None else None
        # pre-activation: the input of a parameter-free activation module that produces the
        # prediction (nn.Sigmoid, nn.Softmax, a custom activation module), else the output of the
        # last parametrised layer before the prediction.
        z = self._activation_module_input(site)
        if z is not None and site is not None:
            r.pre_site, r.pre = (site[0], (INPUT, 0)), z
            chain = self._chain_between(site[2], z)
            r.activation, r.activation_params = (
                _classify_chain(chain, z, site[2]) if chain is not None else _infer(z, site[2]))
        else:
            pre_site, chain = self._walk_to_param_output(pred)
            if pre_site is None:
                pre_site = self._fallback_pre(pred)
                if pre_site is not None:
                    r.activation, r.activation_params = _infer(pre_site[2], pred)
                    if r.activation == "unknown":
                        pre_site = None
            else:
                r.activation, r.activation_params = _classify_chain(chain, pre_site[2], pred)
            if pre_site is not None:
                r.pre_site, r.pre = (pre_site[0], pre_site[1]), pre_site[2]
        acts_after_site = [c for c in steps if c.name not in _SHAPE_OPS]
        if site is not None and not acts_after_site:
            r.pred_site = (site[0], site[1])
        elif r.pre is not None and r.activation not in ("unknown",):
            r.pred_from_pre = True  # the activation is applied outside any module: recompute it
        else:
            r.notes.append(("prediction", "the prediction is computed outside any module by operations "
                            "boundguard cannot replay, so its range is not watched.",
                            "Apply the output activation inside forward() (e.g. an nn.Sigmoid module)."))
        if r.pre is None:
            r.notes.append(("pre-activation", "the output layer's pre-activation could not be located "
                            "(no parametrised layer leads to the prediction), so activation checks are off.",
                            "Make the head an nn.Module with parameters (e.g. nn.Linear) followed by its activation."))

    def _activation_module_input(self, site: Optional[tuple]) -> Optional[Tensor]:
        """The input tensor of ``site``'s module when it is a parameter-free leaf (an activation module)."""
        if site is None or site[0] not in self.module_inputs:
            return None
        m = dict(self.model.named_modules()).get(site[0])
        if m is None or m is self.model or any(True for _ in m.children()) or any(True for _ in m.parameters()):
            return None
        z = self.module_inputs[site[0]]
        return z if z.is_floating_point() and z.numel() == site[2].numel() else None

    def _chain_between(self, p: Tensor, z: Ref, max_depth: int = 12) -> Optional[list[Call]]:
        """The recorded calls leading from ``z`` to ``p`` (walked backwards), or None if not connected."""
        chain: list[Call] = []
        cur: Optional[Ref] = p
        for _ in range(max_depth):
            if cur is z:
                return chain
            call = self.recorder.producer_of(cur)
            if call is None or call.tensor_arg(0) is None:
                return None
            chain.append(call)
            cur = call.tensor_arg(0)
        return None

    def _fallback_pre(self, pred: Ref) -> Optional[tuple[str, tuple, Tensor]]:
        for name, module, out in reversed(self.order):
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            for path, t in flatten(out):
                if t.numel() == pred.numel() and t is not pred:
                    return name, path, t
        return None


def same_storage(a: Ref, b: Ref) -> bool:
    """``a`` and ``b`` start at the same element of the same memory (another view of one tensor, such as
    ``logits.view(-1, C)``); two slices of one storage at different offsets (``s[:, :-1]`` and ``s[:, 1:]``,
    a forecaster's inputs and targets) are not the same."""
    if isinstance(a, Weak) or isinstance(b, Weak):  # one died: not another view of a living tensor
        return False
    try:
        return a.data_ptr() == b.data_ptr() and a.device == b.device
    except Exception:
        return False


def _np(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _infer(z: Ref, p: Ref) -> tuple[str, dict]:
    """The activation from ``z`` to ``p`` read from their values; unknown when one of them died before the
    analysis (a temporary the probe did not keep alive)."""
    if isinstance(z, Weak) or isinstance(p, Weak):
        return "unknown", {}
    return infer_activation(_np(z), _np(p))


def _classify_chain(chain: list[Call], z: Ref, p: Ref) -> tuple[str, dict]:
    """The activation a chain of recorded calls applies (walked from the prediction back to z)."""
    acts = [c for c in chain if c.name not in _SHAPE_OPS]
    if not acts:
        return "identity", {}
    c = acts[0]  # the outermost op decides the range of the prediction
    if c.name in _ACT_OPS:
        if c.name in ("sigmoid", "tanh"):
            return c.name, {}
        if c.name in ("softmax", "log_softmax"):
            dim = c.arg(1, "dim", None)
            return c.name, {"dim": int(dim) if isinstance(dim, int) else -1}
        if c.name in ("clamp", "clip"):
            lo, hi = c.arg(1, "min", None), c.arg(2, "max", None)
            if isinstance(lo, (int, float)) or isinstance(hi, (int, float)) or (lo is None and hi is None):
                lo = float(lo) if isinstance(lo, (int, float)) else None
                hi = float(hi) if isinstance(hi, (int, float)) else None
                if lo == 0.0 and hi is None:
                    return "relu", {}
                return "clamp", {"lo": lo, "hi": hi}
        if c.name == "clamp_min":
            return "clamp", {"lo": float(c.arg(1, "min", 0.0)), "hi": None}
        if c.name == "clamp_max":
            return "clamp", {"lo": None, "hi": float(c.arg(1, "max", 0.0))}
        if c.name == "hardtanh":
            return "clamp", {"lo": float(c.arg(1, "min_val", -1.0)), "hi": float(c.arg(2, "max_val", 1.0))}
        if c.name == "relu":
            return "relu", {}
        if c.name == "relu6":
            return "clamp", {"lo": 0.0, "hi": 6.0}
    return _infer(z, p)


class ProbeResult:
    def __init__(self) -> None:
        self.loss_name: Optional[str] = None
        self.loss_plain = False
        self.pred: Optional[Tensor] = None  # None when it was a temporary that died before the analysis
        self.pred_shape: Optional[tuple[int, ...]] = None
        self.pre: Optional[Tensor] = None
        self.target: Optional[Tensor] = None
        self.pred_site: Optional[tuple[str, tuple]] = None
        self.pre_site: Optional[tuple[str, tuple]] = None
        self.pred_from_pre = False
        self.activation = "unknown"
        self.activation_params: dict = {}
        self.root_inputs: Optional[tuple] = None
        self.notes: list[tuple[str, str, str]] = []
        self.target_ignore: Optional[float] = None  # the loss's ignore_index (class-index losses)
        self.input_scaled_by: Optional[str] = None  # a normalisation layer the raw inputs go through first

    @property
    def pred_dim(self) -> Optional[int]:
        return len(self.pred_shape) if self.pred_shape is not None else None

    def forget_tensors(self) -> None:
        """Let go of the step's tensors once they are judged (a language model's logits are the largest
        tensor of its step): only the sites, the activation and the shapes stay."""
        self.pred = self.pre = self.target = None
        self.root_inputs = None
