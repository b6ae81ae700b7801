"""PyTorch adapter: the probe, on-device statistics, bound insertion, and ``watch`` for plain loops.

The Lightning callbacks are thin wrappers over :class:`TorchEngine`; ``watch(model)`` gives a plain
PyTorch loop the same monitoring.

Between checks nothing is read back to the host: every watched tensor is reduced on its device into
one row of a preallocated fp32 buffer; at a check the rows travel to the host in one transfer and
the framework-free core judges them.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

try:
    import torch
    from torch import Tensor, nn
    from torch.overrides import TorchFunctionMode
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "boundguard.integrations.torch needs PyTorch: pip install 'boundguard[torch]' "
        "(or 'boundguard[lightning]' for the Lightning callback)"
    ) from e

import numpy as np

from boundguard.alerts import Alert, BoundGuardError, BoundGuardWarning
from boundguard.bounds import Bounds
from boundguard.config import Config
from boundguard.model_facts import ModelFacts, classify_loss, infer_activation
from boundguard.monitor import Decision, Monitor
from boundguard.rules import TAIL_THRESHOLD
from boundguard.sinks import logger
from boundguard.stats import COLUMNS, LOSS_COLUMN, Snapshot, neutral_row

__all__ = ["watch", "Guard", "TorchEngine", "apply_bounds", "bound_records", "DEFAULT_ALERTS_PATH"]

DEFAULT_ALERTS_PATH = Path("boundguard") / "alerts.jsonl"

# ----------------------------------------------------------------------------------------- structures
def flatten(obj: Any, prefix: tuple = (), depth: int = 0) -> Iterator[tuple[tuple, Tensor]]:
    """Every tensor in a nested structure (tuple/list/dict/ModelOutput/dataclass) with its path."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif depth > 6:
        return
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from flatten(v, prefix + (k,), depth + 1)
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from flatten(v, prefix + (i,), depth + 1)
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from flatten(getattr(obj, f.name, None), prefix + (f.name,), depth + 1)


def get_path(obj: Any, path: tuple) -> Optional[Tensor]:
    """The tensor at ``path`` in ``obj``, or None when the structure does not have it."""
    for key in path:
        try:
            if isinstance(obj, Mapping) or isinstance(obj, (tuple, list)):
                obj = obj[key]
            else:
                obj = getattr(obj, key)
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    return obj if isinstance(obj, Tensor) else None


def set_path(obj: Any, path: tuple, value: Tensor) -> Any:
    """A copy of ``obj`` with the tensor at ``path`` replaced (tuples rebuilt, dicts copied)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return obj._replace(**{obj._fields[key]: set_path(obj[key], rest, value)})
    if isinstance(obj, tuple):
        return tuple(set_path(v, rest, value) if i == key else v for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [set_path(v, rest, value) if i == key else v for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        new = obj.__class__(obj) if not hasattr(obj, "to_tuple") else obj  # keep ModelOutput types
        new[key] = set_path(obj[key], rest, value)
        return new
    setattr(obj, key, set_path(getattr(obj, key), rest, value))
    return obj


def describe_path(root: str, path: tuple) -> str:
    return root + "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in path)


# ----------------------------------------------------------------------------------------- probe
_LOSS_FUNCS = {
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "cross_entropy", "nll_loss", "kl_div", "multilabel_soft_margin_loss",
    # losses boundguard does not judge by family, but whose input is still the prediction
    "gaussian_nll_loss", "poisson_nll_loss", "soft_margin_loss", "multi_margin_loss", "hinge_embedding_loss",
    "margin_ranking_loss", "cosine_embedding_loss", "triplet_margin_loss", "ctc_loss",
}
_SHAPE_OPS = {
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "__getitem__", "select", "contiguous", "float",
    "to", "type", "permute", "transpose", "view_as", "reshape_as", "double", "half", "bfloat16", "clone",
    "detach", "narrow", "expand", "expand_as",
}
_ACT_OPS = {"sigmoid", "tanh", "softmax", "log_softmax", "clamp", "clip", "hardtanh", "relu", "relu6",
            "clamp_min", "clamp_max"}
_INPUT = "<input>"  # path marker: a module's first positional input, not its output
_INPUT_KEYS = ("x", "input", "inputs", "features", "image", "images", "pixel_values", "input_ids", "data", "src")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels", "y_true")


class _Call:
    __slots__ = ("name", "func", "args", "kwargs", "out")

    def __init__(self, name, func, args, kwargs, out):
        self.name, self.func, self.args, self.kwargs, self.out = name, func, args, kwargs, out

    def tensor_arg(self, pos: int = 0, name: Optional[str] = None) -> Optional[Tensor]:
        if name and isinstance(self.kwargs.get(name), Tensor):
            return self.kwargs[name]
        ts = [a for a in self.args if isinstance(a, Tensor)]
        return ts[pos] if len(ts) > pos else None

    def arg(self, pos: int, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[pos] if len(self.args) > pos else default


class _Recorder(TorchFunctionMode):
    """Records every torch function call of the probe step, keeping the tensors alive so ids stay unique."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_Call] = []
        self.producer: dict[int, _Call] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "") or ""
        if name.endswith("_") and not name.startswith("__"):  # in-place variants: treat like the op
            name = name[:-1]
        call = _Call(name, func, args, kwargs, out)
        self.calls.append(call)
        if isinstance(out, Tensor):
            self.producer.setdefault(id(out), call)
        return out


class Probe:
    """Watches one training step to find prediction, pre-activation, activation, loss, targets and inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.recorder = _Recorder()
        self.module_outputs: dict[int, tuple[str, tuple, Tensor]] = {}  # id(tensor) -> (module name, path, t)
        self.module_inputs: dict[str, Tensor] = {}  # first tensor argument of each module's first call
        self.order: list[tuple[str, nn.Module, Any]] = []
        self.root_inputs: Optional[tuple] = None
        self._handles: list = []
        self.active = False

    def start(self) -> None:
        for m, name in self.names.items():
            self._handles.append(m.register_forward_hook(self._hook(name)))
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre))
        self.recorder.__enter__()
        self.active = True

    def stop(self) -> None:
        if self.active:
            self.active = False
            try:
                self.recorder.__exit__(None, None, None)
            except Exception:  # another mode was pushed on top: leave the stack to its owner
                pass
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _root_pre(self, module, args):
        if self.root_inputs is None:
            self.root_inputs = args

    def _hook(self, name: str):
        def hook(module, args, output):
            self.order.append((name, module, output))
            if name not in self.module_inputs and args and isinstance(args[0], Tensor):
                self.module_inputs[name] = args[0]
            for path, t in flatten(output):
                self.module_outputs.setdefault(id(t), (name, path, t))  # innermost module first
        return hook

    # -------------------------------------------------------------------------------- analysis
    def _site(self, t: Tensor) -> Optional[tuple[str, tuple, Tensor]]:
        site = self.module_outputs.get(id(t))
        if site is not None:
            return site
        # the same storage under another view (e.g. logits.view(-1, C))
        for name, path, u in self.module_outputs.values():
            if u.numel() == t.numel() and u.numel() > 0 and _same_storage(u, t):
                return name, path, u
        return None

    def _has_params(self, name: str) -> bool:
        m = dict(self.model.named_modules()).get(name)
        return m is not None and any(True for _ in m.parameters(recurse=False))

    def _walk_to_param_output(self, t: Tensor, max_depth: int = 12) -> tuple[Optional[tuple], list[_Call]]:
        """From ``t`` back along first tensor arguments to the output of a parametrised module."""
        chain: list[_Call] = []
        cur = t
        for _ in range(max_depth):
            site = self._site(cur)
            if site is not None and self._has_params(site[0]):
                return site, chain
            call = self.recorder.producer.get(id(cur))
            if call is None:
                return None, chain
            nxt = call.tensor_arg(0)
            if nxt is None:
                return None, chain
            chain.append(call)
            cur = nxt
        return None, chain

    def analyse(self, loss: Optional[Tensor]) -> "ProbeResult":
        r = ProbeResult()
        calls = [c for c in self.recorder.calls if c.name in _LOSS_FUNCS]
        chosen = None
        if calls:
            chosen = next((c for c in calls if loss is not None and c.out is loss), None) or calls[-1]
            if len(calls) > 1:
                r.notes.append(("loss", f"{len(calls)} loss calls were seen in one step "
                                f"({', '.join(c.name for c in calls)}); watching the input of {chosen.name}.",
                                "Compute the loss you want watched last, or pass bounds= explicitly."))
        if chosen is not None:
            r.loss_name = chosen.name
            pred = chosen.tensor_arg(0, "input")
            r.target = chosen.tensor_arg(1, "target")
        else:
            pred = None
            r.notes.append(("loss", "no torch loss function (nn.*Loss or torch.nn.functional.*) was seen in the "
                            "first training step, so the loss family and the prediction it consumes are unknown.",
                            "Compute the loss with an nn.*Loss module or a torch.nn.functional loss on the "
                            "model's output; the loss value itself is still watched."))
            for _name, module, out in reversed(self.order):
                if module is self.model:
                    pred = next((t for _, t in flatten(out) if t.is_floating_point()), None)
                    break
        if pred is None:
            r.notes.append(("prediction", "the prediction could not be located.",
                            "Return the prediction from forward() and compute the loss on it."))
            return r
        r.pred = pred
        # where the prediction comes from: a module output reached through shape ops only
        site = self._site(pred)
        cur, steps = pred, []
        while site is None:
            call = self.recorder.producer.get(id(cur))
            if call is None or call.name not in _SHAPE_OPS | _ACT_OPS or call.tensor_arg(0) is None:
                break
            steps.append(call)
            cur = call.tensor_arg(0)
            site = self._site(cur)
        # pre-activation: the input of a parameter-free activation module that produces the
        # prediction (nn.Sigmoid, nn.Softmax, a custom activation module), else the output of the
        # last parametrised layer before the prediction.
        z = self._activation_module_input(site)
        if z is not None:
            r.pre_site, r.pre = (site[0], (_INPUT, 0)), z
            chain = self._chain_between(site[2], z)
            r.activation, r.activation_params = (
                _classify_chain(chain, z, site[2]) if chain is not None else infer_activation(_np(z), _np(site[2])))
        else:
            pre_site, chain = self._walk_to_param_output(pred)
            if pre_site is None:
                pre_site = self._fallback_pre(pred)
                if pre_site is not None:
                    r.activation, r.activation_params = infer_activation(_np(pre_site[2]), _np(pred))
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
        r.root_inputs = self.root_inputs
        return r

    def _activation_module_input(self, site: Optional[tuple]) -> Optional[Tensor]:
        """The input tensor of ``site``'s module when it is a parameter-free leaf (an activation module)."""
        if site is None or site[0] not in self.module_inputs:
            return None
        m = dict(self.model.named_modules()).get(site[0])
        if m is None or m is self.model or any(True for _ in m.children()) or any(True for _ in m.parameters()):
            return None
        z = self.module_inputs[site[0]]
        return z if z.is_floating_point() and z.numel() == site[2].numel() else None

    def _chain_between(self, p: Tensor, z: Tensor, max_depth: int = 12) -> Optional[list[_Call]]:
        """The recorded calls leading from ``z`` to ``p`` (walked backwards), or None if not connected."""
        chain: list[_Call] = []
        cur = p
        for _ in range(max_depth):
            if cur is z:
                return chain
            call = self.recorder.producer.get(id(cur))
            if call is None or call.tensor_arg(0) is None:
                return None
            chain.append(call)
            cur = call.tensor_arg(0)
        return None

    def _fallback_pre(self, pred: Tensor) -> Optional[tuple[str, tuple, Tensor]]:
        for name, module, out in reversed(self.order):
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            for path, t in flatten(out):
                if t.numel() == pred.numel() and t is not pred:
                    return name, path, t
        return None


def _same_storage(a: Tensor, b: Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.device == b.device
    except Exception:
        return False


def _np(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _classify_chain(chain: list[_Call], z: Tensor, p: Tensor) -> tuple[str, dict]:
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
    return infer_activation(_np(z), _np(p))


class ProbeResult:
    def __init__(self) -> None:
        self.loss_name: Optional[str] = None
        self.pred: Optional[Tensor] = None
        self.pre: Optional[Tensor] = None
        self.target: Optional[Tensor] = None
        self.pred_site: Optional[tuple[str, tuple]] = None
        self.pre_site: Optional[tuple[str, tuple]] = None
        self.pred_from_pre = False
        self.activation = "unknown"
        self.activation_params: dict = {}
        self.root_inputs: Optional[tuple] = None
        self.notes: list[tuple[str, str, str]] = []


# ----------------------------------------------------------------------------------------- activations
def activation_fn(name: str, params: dict) -> Optional[Callable[[Tensor], Tensor]]:
    """A torch function for an activation the core names (used to replay functional activations)."""
    lo, hi = params.get("lo"), params.get("hi")
    dim = params.get("dim", -1)
    if name == "identity":
        return lambda z: z
    if name == "sigmoid":
        return torch.sigmoid
    if name == "tanh":
        return torch.tanh
    if name == "softmax":
        return lambda z: torch.softmax(z, dim=dim)
    if name == "log_softmax":
        return lambda z: torch.log_softmax(z, dim=dim)
    if name == "relu":
        return torch.relu
    if name == "clamp":
        return lambda z: torch.clamp(z, min=lo, max=hi)
    if name == "scaled_sigmoid":
        return lambda z: lo + (hi - lo) * torch.sigmoid(z)
    if name == "scaled_tanh":
        return lambda z: (lo + hi) / 2 + (hi - lo) / 2 * torch.tanh(z)
    return None


class BoundHook:
    """A picklable forward hook that bounds one tensor of a module's output.

    ``kind``: ``sigmoid`` | ``tanh`` | ``scaled_sigmoid`` (``lo + (hi - lo) * sigmoid(z)``) | ``softmax``.
    """

    def __init__(self, record: dict) -> None:
        self.record = dict(record)

    def bound(self, z: Tensor) -> Tensor:
        r = self.record
        kind = r["kind"]
        if kind == "sigmoid":
            return torch.sigmoid(z)
        if kind == "tanh":
            return torch.tanh(z)
        if kind == "softmax":
            return torch.softmax(z, dim=r.get("dim", -1))
        lo, hi = float(r["lo"]), float(r["hi"])
        return lo + (hi - lo) * torch.sigmoid(z)

    def __call__(self, module: nn.Module, args: Any, *output: Any) -> Any:
        path = tuple(self.record.get("path", ()))
        if path[:1] == (_INPUT,):  # registered as a forward pre-hook: bound the module's input
            if not args or not isinstance(args[0], Tensor):
                return None
            return (self.bound(args[0]),) + tuple(args[1:])
        output = output[0]
        t = get_path(output, path)
        if t is None:
            return None
        return set_path(output, path, self.bound(t))


def bound_record(bounds: Bounds, module: str, path: tuple, dim: int, step: int) -> Optional[dict]:
    """The bounding activation for ``bounds``: sigmoid (0, 1), tanh (-1, 1), scaled sigmoid, or softmax."""
    if bounds.kind == "distribution":
        kind = "softmax"
    elif not bounds.finite:
        return None
    elif (bounds.lo, bounds.hi) == (0.0, 1.0):
        kind = "sigmoid"
    elif (bounds.lo, bounds.hi) == (-1.0, 1.0):
        kind = "tanh"
    else:
        kind = "scaled_sigmoid"
    return {"module": module, "path": list(path), "kind": kind, "lo": bounds.lo, "hi": bounds.hi,
            "dim": dim, "step": step}


def bound_records(source: Any) -> list[dict]:
    """The inserted-bound records held by a guard/callback, a callback state, or a Lightning checkpoint."""
    if source is None:
        return []
    if isinstance(source, (str, Path)):
        source = torch.load(source, map_location="cpu", weights_only=False)
    if hasattr(source, "bounds_inserted"):
        return [dict(r) for r in source.bounds_inserted]
    if isinstance(source, Mapping):
        if "callbacks" in source:  # a Lightning checkpoint
            out: list[dict] = []
            for state in source["callbacks"].values():
                if isinstance(state, Mapping) and "monitor" in state:  # a boundguard callback's state
                    out.extend(bound_records(state))
            return out
        if "monitor" in source:
            return [dict(r) for r in source["monitor"].get("inserted", [])]
        if "inserted" in source:
            return [dict(r) for r in source["inserted"]]
    if isinstance(source, (list, tuple)):
        return [dict(r) for r in source]
    raise TypeError(f"apply_bounds: cannot read bound records from {type(source).__name__}")


def apply_bounds(model: nn.Module, source: Any) -> list[dict]:
    """Insert the bounding activations boundguard recorded into ``model`` (for inference or export).

    ``source`` is a guard or callback, its ``state_dict()``, a Lightning checkpoint (dict or path),
    or a list of records. Idempotent; parameter names are unchanged. Returns the records applied.

    Example:
        >>> # model = LitModel.load_from_checkpoint("last.ckpt"); apply_bounds(model, "last.ckpt")
    """
    records = bound_records(source)
    modules = dict(model.named_modules())
    applied = getattr(model, "_boundguard_bounds", None)
    if applied is None:
        applied = {}
        try:
            object.__setattr__(model, "_boundguard_bounds", applied)
        except Exception:
            pass
    for rec in records:
        key = (rec["module"], tuple(rec.get("path", ())))
        if key in applied:
            continue
        m = modules.get(rec["module"])
        if m is None:
            raise ValueError(f"apply_bounds: the model has no module named {rec['module']!r}")
        hook = BoundHook(rec)
        if key[1][:1] == (_INPUT,):
            applied[key] = m.register_forward_pre_hook(hook)
        else:
            applied[key] = m.register_forward_hook(hook)
    return records


# ----------------------------------------------------------------------------------------- reducer
class Reducer:
    """Per-step statistics reduced on the device into one preallocated buffer.

    Layout (one device allocation, typed views into its bytes): ``rows`` (fp32) — one row per step
    with each watched tensor's min / max / sum of squares (and the row-sum error of a distribution)
    and the loss, written in place with ``out=``; ``bins`` (int64) — per watched tensor, counts of
    values between a few edges (the bounds, clamp points, 0 and 1 for targets, ±inf), accumulated
    over the interval with ``bucketize`` + ``index_add_``. Four small kernels per tensor per step and
    no host synchronisation: only shapes (host metadata) are read between checks. :meth:`read` moves
    the whole buffer to the host in one transfer and turns it into the core's rows
    (:data:`boundguard.stats.COLUMNS`).
    """

    ROW = {"pred": ("min", "max", "rowsum_err"), "pre": ("min", "max", "sumsq"),
           "target": ("min", "max"), "input": ("min", "max", "sumsq")}
    MAX_BINS = 16
    #: Per watched tensor, up to this many elements per interval are staged as raw values (one copy
    #: per step) and reduced in one batch at the check; larger tensors are reduced every step.
    STAGE_ELEMENTS = 1 << 18
    STAGE_ROW_CAP = 4096
    #: Tensors this large count finite values without bucketize when no bound or threshold applies.
    FAST_COUNT_MIN = 1 << 14

    def __init__(self, rows: int, device: torch.device, stage_elements: Optional[int] = None) -> None:
        self.device = device
        self.n_rows = rows
        offs, o = {}, 0
        for kind, fs in self.ROW.items():
            offs[kind] = o
            o += len(fs)
        self.loss_col = o
        self.width = o + 1
        row_bytes = -(-rows * self.width * 4 // 8) * 8  # int64 bins start 8-byte aligned
        nbins = self.MAX_BINS * len(self.ROW)
        self.raw = torch.zeros(row_bytes + nbins * 8, dtype=torch.uint8, device=device)
        self.rows = self.raw[: rows * self.width * 4].view(torch.float32).view(rows, self.width)
        bins = self.raw[row_bytes:].view(torch.int64)
        self._row_bytes = row_bytes
        self.bins = {k: bins[i * self.MAX_BINS: (i + 1) * self.MAX_BINS] for i, k in enumerate(self.ROW)}
        self.bin_cells = {k: (b[2], b[3]) for k, b in self.bins.items()}  # [-MAX, inf) and +inf/NaN
        neutral = []
        for fs in self.ROW.values():
            neutral += [math.inf if f == "min" else (-math.inf if f in ("max", "rowsum_err") else 0.0) for f in fs]
        neutral.append(math.nan)
        self.neutral_row = torch.tensor(neutral, dtype=torch.float32, device=device)
        # per row and kind, the 0-d views the kernels write into with out=
        self.cells = [{k: [self.rows[i, offs[k] + j] for j in range(len(fs))] for k, fs in self.ROW.items()}
                      for i in range(rows)]
        self.loss_cells = [self.rows[i, self.loss_col] for i in range(rows)]
        self.offs = offs
        self.one = torch.ones((), dtype=torch.int64, device=device)
        self._ones: dict[int, Tensor] = {}
        self.edges: dict[str, torch.Tensor] = {}
        self.edge_values: dict[str, list[float]] = {}
        self.row = 0
        self.counts = {k: 0 for k in self.ROW}
        self.loss_seen = [False] * rows
        self._written: set[str] = set()
        # what pred/pre statistics count; set before configure()
        self.lo: Optional[float] = None
        self.hi: Optional[float] = None
        self.distribution = False
        self.class_dim = 1
        self.pin: Optional[tuple[Optional[float], Optional[float]]] = None
        self.tail: Optional[float] = None
        self.shared = False  # pred is the pre-activation tensor itself (identity head)
        budget = self.STAGE_ELEMENTS if stage_elements is None else stage_elements
        self.cap = min(self.STAGE_ROW_CAP, budget // rows)
        self.stage = {k: torch.empty((rows, self.cap), dtype=torch.float32, device=device) for k in self.ROW} \
            if self.cap > 0 else {}
        self.stage_rows = {k: [b[i] for i in range(rows)] for k, b in self.stage.items()}
        self.staged = {k: [0] * rows for k in self.stage}  # elements staged per row (host ints)
        self.configure()
        self._reset()

    def configure(self) -> None:
        """(Re)build each tensor's bin edges from the bounds, clamp points and tail threshold in force."""
        points = {
            "pred": [p for p in (self.lo, self.hi) + tuple(self.pin or ()) if p is not None and math.isfinite(p)],
            "pre": [-self.tail, self.tail] if self.tail is not None else [],
            "target": [0.0, 1.0],
            "input": [],
        }
        for kind, ps in points.items():
            e = [-math.inf, -_F32_MAX]
            for p in sorted(set(ps)):
                e += [p, _next32(p)]
            e.append(math.inf)
            e = sorted(e)
            self.edge_values[kind] = e
            self.edges[kind] = torch.tensor(e, dtype=torch.float32, device=self.device)

    def _reset(self) -> None:
        self.rows.copy_(self.neutral_row.expand(self.n_rows, -1))
        self.raw[self._row_bytes:].zero_()

    def _flat(self, t: Tensor) -> Tensor:
        t = t.detach()
        if t.device != self.device:  # e.g. a head on another device than the buffer
            t = t.to(self.device, non_blocking=True)
        if t.dtype != torch.float32:
            t = t.float()
        return t.reshape(-1)

    def _cells(self, kind: str) -> tuple[list[Tensor], Optional[list[Tensor]]]:
        """Where this step's values of ``kind`` go; a second call in one step writes to scratch and merges."""
        cells = self.cells[self.row][kind]
        if kind not in self._written:
            self._written.add(kind)
            return cells, None
        return [torch.full((), math.inf if f == "min" else (-math.inf if f in ("max", "rowsum_err") else 0.0),
                           dtype=torch.float32, device=self.device) for f in self.ROW[kind]], cells  # neutral scratch

    def _merge(self, kind: str, new: list[Tensor], dst: Optional[list[Tensor]]) -> None:
        if dst is None:
            return
        for f, n, d in zip(self.ROW[kind], new, dst):
            if f == "min":
                torch.minimum(d, n, out=d)
            elif f in ("max", "rowsum_err"):
                torch.maximum(d, n, out=d)
            else:
                d.add_(n)

    def _stage(self, kind: str, t: Tensor, n: int) -> bool:
        """Copy a small tensor's values into this step's staging row (one kernel); False: reduce now."""
        if n > self.cap or kind in self._written or (kind == "pred" and self.distribution):
            return False
        self._written.add(kind)
        self.stage_rows[kind][self.row][:n].copy_(t.detach().reshape(-1))
        self.staged[kind][self.row] = n
        return True

    def flush(self) -> None:
        """Reduce the staged values of the interval into the rows and bins (a few kernels per run of
        equal-sized steps); called at the check, before the buffer is merged across processes or read."""
        used = max(self.row, 1)
        for kind, lens in self.staged.items():
            if not any(lens[:used]):
                continue
            bins_kind = "pred" if kind == "pre" and self.shared else kind
            start = 0
            while start < used:
                n = lens[start]
                end = start + 1
                while end < used and lens[end] == n:
                    end += 1
                if n:
                    self._reduce_block(kind, bins_kind, self.stage[kind][start:end, :n], start, end)
                start = end
            for i in range(used):
                lens[i] = 0

    def _reduce_block(self, kind: str, bins_kind: str, block: Tensor, a: int, b: int) -> None:
        off = self.offs[kind]
        mn, mx = torch.aminmax(block, dim=1)
        cols = self.rows[a:b]
        cols[:, off].copy_(torch.minimum(cols[:, off], mn))
        cols[:, off + 1].copy_(torch.maximum(cols[:, off + 1], mx))
        if "sumsq" in self.ROW[kind]:
            j = off + self.ROW[kind].index("sumsq")
            cols[:, j].add_((block * block).sum(1))
        idx = torch.bucketize(block.contiguous(), self.edges[bins_kind], right=True).reshape(-1)
        self.bins[bins_kind].index_add_(0, idx, self.one.expand(idx.shape[0]))

    def _bin(self, kind: str, f: Tensor) -> None:
        n = f.shape[0]
        if n >= self.FAST_COUNT_MIN and len(self.edge_values[kind]) == 3:
            # no interior edges: only finite vs not counts. (f - f) is 0 where f is finite and NaN
            # elsewhere: two light passes instead of a binary search and a scatter over every element.
            finite_bin, other_bin = self.bin_cells[kind]
            bad = torch.count_nonzero(f - f)
            other_bin.add_(bad)
            finite_bin.add_(n).sub_(bad)
            return
        idx = torch.bucketize(f, self.edges[kind], right=True)
        n = idx.shape[0]
        ones = self._ones.get(n)
        if ones is None:
            if len(self._ones) > 64:
                self._ones.clear()
            ones = self._ones[n] = self.one.expand(n)  # batch sizes repeat: one view per size
        self.bins[kind].index_add_(0, idx, ones)

    def _observe(self, kind: str, t: Tensor, bins_kind: Optional[str] = None) -> None:
        """One step's statistics of a watched tensor: staged when small, else reduced now."""
        n = t.numel()
        if n == 0:
            return
        bins_kind = bins_kind or kind
        # a staged pre-activation is binned at the flush as the prediction iff the head is shared
        stageable = (bins_kind == "pred") == self.shared if kind == "pre" else True
        if not (stageable and self._stage(kind, t, n)):
            f = self._flat(t)
            c, merge = self._cells(kind)
            torch.aminmax(f, out=(c[0], c[1]))
            if "sumsq" in self.ROW[kind]:
                torch.dot(f, f, out=c[2])
            if kind == "pred" and self.distribution and t.dim() >= 1:
                dim = self.class_dim if t.dim() > self.class_dim else -1
                torch.amax((f.view(t.shape).sum(dim) - 1).abs(), out=c[2])
            self._bin(bins_kind, f)
            self._merge(kind, c, merge)
        self.counts[kind] += n
        if bins_kind != kind:
            self.counts[bins_kind] += n

    def pred(self, p: Tensor) -> None:
        self._observe("pred", p)

    def pre(self, z: Tensor, also_pred: bool = False) -> None:
        """``also_pred``: the tensor is the prediction too (identity head); its bins count for both."""
        self._observe("pre", z, "pred" if also_pred else None)

    def target(self, y: Tensor) -> None:
        self._observe("target", y)

    def input(self, x: Tensor) -> None:
        self._observe("input", x)

    def loss(self, loss: Tensor) -> None:
        l = loss.detach()
        if l.numel() != 1:
            if l.numel() == 0:
                return
            l = l.float().mean()
        self.loss_cells[self.row].copy_(l.reshape(()))
        self.loss_seen[self.row] = True

    def next_row(self) -> None:
        self.row += 1
        self._written = set()

    def all_reduce(self) -> None:
        """Merge every process's buffer in place (min/max/sum per column, losses averaged), so every
        rank judges the same snapshot. Four collectives per check, none between checks."""
        import torch.distributed as dist

        self.flush()
        world = dist.get_world_size()
        kinds = {"min": [], "max": [], "sum": []}
        for kind, fs in self.ROW.items():
            for j, f in enumerate(fs):
                kinds["min" if f == "min" else ("sum" if f == "sumsq" else "max")].append(self.offs[kind] + j)
        rows = self.rows
        for op, cols in (("min", kinds["min"]), ("max", kinds["max"])):
            t = rows[:, cols].contiguous()
            dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
            rows[:, cols] = t
        sums = rows[:, kinds["sum"] + [self.loss_col]].contiguous()
        counts = torch.tensor([self.counts[k] for k in self.ROW], dtype=torch.float32, device=self.device)
        packed = torch.cat([sums.reshape(-1), counts])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        sums = packed[: sums.numel()].view_as(sums)
        rows[:, kinds["sum"]] = sums[:, :-1]
        rows[:, self.loss_col] = sums[:, -1] / world
        bins = self.raw[self._row_bytes:].view(torch.int64)
        dist.all_reduce(bins, op=dist.ReduceOp.SUM)
        for k, v in zip(self.ROW, packed[sums.numel():].tolist()):
            self.counts[k] = int(v)

    def read(self) -> tuple[np.ndarray, dict[str, int], list[bool]]:
        """One device→host transfer; returns the interval as core rows and resets the buffer."""
        self.flush()
        n = max(self.row, 1)
        host = self.raw.to("cpu", copy=True).numpy()
        self._reset()
        dev_rows = host[: self.n_rows * self.width * 4].view(np.float32).reshape(self.n_rows, self.width)[:n]
        bins = host[self._row_bytes:].view(np.int64)
        counts, seen = dict(self.counts), self.loss_seen[:n]
        out = np.tile(neutral_row(), (n, 1))
        col = {c: i for i, c in enumerate(COLUMNS)}
        for kind, fs in self.ROW.items():
            for j, f in enumerate(fs):
                out[:, col[f"{kind}.{f}"]] = dev_rows[:, self.offs[kind] + j]
        out[:, LOSS_COLUMN] = dev_rows[:, self.loss_col]
        if self.shared:  # identity head: the prediction's min/max are the pre-activation's
            for f in ("min", "max"):
                out[:, col[f"pred.{f}"]] = out[:, col[f"pre.{f}"]]
        for i, kind in enumerate(self.ROW):
            b = bins[i * self.MAX_BINS: (i + 1) * self.MAX_BINS]
            for name, v in _bin_counts(self.edge_values[kind], b, self._points(kind)).items():
                out[0, col[f"{kind}.{name}"]] = v
        if self.shared:
            out[0, col["pre.finite"]] = out[0, col["pred.finite"]]
        self.row = 0
        self._written = set()
        self.counts = {k: 0 for k in self.counts}
        self.loss_seen = [False] * self.n_rows
        return out, counts, seen

    def _points(self, kind: str) -> dict[str, Any]:
        if kind == "pred":
            return {"below": self.lo, "above": self.hi, "pinned": self.pin}
        if kind == "pre":
            return {"tail": self.tail}
        if kind == "target":
            return {"nonbinary": True}
        return {}


_F32_MAX = float(np.finfo(np.float32).max)


def _next32(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def _bin_counts(edges: list[float], bins: np.ndarray, points: dict[str, Any]) -> dict[str, float]:
    """Turn bucketize counts into the core's count columns.

    Bin ``i`` holds values in ``[edges[i-1], edges[i])``; bin 1 is -inf, the last bin +inf and NaN.
    """
    k = len(edges)
    finite_bins = [(edges[i - 1], edges[i], float(bins[i])) for i in range(2, k)]
    out = {"finite": sum(c for _, _, c in finite_bins)}

    def lt(a):
        return sum(c for _, hi, c in finite_bins if hi <= a)

    def gt(a):
        return sum(c for lo, _, c in finite_bins if lo > a)

    def eq(a):
        return sum(c for lo, hi, c in finite_bins if lo == a and hi == _next32(a))

    if "below" in points:
        lo, hi = points["below"], points["above"]
        out["below"] = lt(lo) if lo is not None else 0.0
        out["above"] = gt(hi) if hi is not None else 0.0
        pin = points.get("pinned")
        out["pinned"] = sum(eq(p) for p in pin if p is not None) if pin else 0.0
    if "tail" in points:
        t = points["tail"]
        out["tail"] = (lt(-t) + gt(t)) if t is not None else 0.0
    if "nonbinary" in points:
        out["nonbinary"] = out["finite"] - eq(0.0) - eq(1.0)
    return out


# ----------------------------------------------------------------------------------------- engine
class TorchEngine:
    """Everything the PyTorch adapters share: probe, hooks, reducer, checks and actions."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.monitor = Monitor(config)
        self.model: Optional[nn.Module] = None
        self.step = 0
        self.epoch: Optional[int] = None
        self.interval_start = 1
        self.reducer: Optional[Reducer] = None
        self.probe: Optional[Probe] = None
        self.probed = False
        self.armed = False
        self.disabled = False
        self.distributed = False  # set by adapters running under torch.distributed
        self.explicit_batch = False  # watch(): inputs/targets are passed to step(), or deliberately not
        self._hooks: list = []
        self._result: Optional[ProbeResult] = None
        self._loss_seen_this_step = False
        self._batch_recorded = False
        self._target_path: Optional[tuple] = None
        self._input_path: Optional[tuple] = None
        self._pred_from_pre: Optional[Callable[[Tensor], Tensor]] = None
        self._logits = False
        self._bound_version: Any = None
        self._warned_error = False
        self.last_snapshot: Optional[Snapshot] = None

    # ------------------------------------------------------------------ lifecycle
    def attach(self, model: nn.Module, alerts_path: Optional[Path] = None, write: bool = True) -> None:
        self.model = model
        if self.monitor.alerts_path is None:
            path = Path(self.config.alerts_path) if self.config.alerts_path else (alerts_path or DEFAULT_ALERTS_PATH)
            self.monitor.write = write
            self.monitor.open_files(path)
        if self.monitor.inserted:
            apply_bounds(model, self.monitor.inserted)

    @property
    def alerts(self) -> list[Alert]:
        return self.monitor.alerts

    @property
    def bounds_inserted(self) -> list[dict]:
        return list(self.monitor.inserted)

    def begin_step(self) -> None:
        """Before the forward pass of a training step."""
        if self.disabled or self.model is None:
            return
        self.armed = True
        self._loss_seen_this_step = False
        self._batch_recorded = False
        if not self.probed and self.probe is None:
            self.probe = Probe(self.model)
            self.probe.start()

    def record_loss(self, loss: Any) -> None:
        if self.disabled or not isinstance(loss, Tensor):
            return
        if self.probe is not None and self.probe.active:
            self._finish_probe(loss)
        if self.reducer is not None and not self._loss_seen_this_step:
            self.reducer.loss(loss)
            self._loss_seen_this_step = True

    def record_batch(self, batch: Any = None, inputs: Any = None, targets: Any = None) -> None:
        """Targets and inputs of the step: given explicitly, or located in the batch (once per step)."""
        if self.disabled or self.reducer is None or self._batch_recorded:
            return
        self._batch_recorded = True
        y = targets if isinstance(targets, Tensor) else (get_path(batch, self._target_path) if self._target_path is not None else None)
        x = inputs if isinstance(inputs, Tensor) else (get_path(batch, self._input_path) if self._input_path is not None else None)
        if isinstance(y, Tensor):
            self.reducer.target(y)
        if isinstance(x, Tensor) and x.is_floating_point():
            self.reducer.input(x)

    def end_step(self, epoch: Optional[int] = None) -> list[Decision]:
        """After the optimiser step. Returns the decisions of a check (empty between checks)."""
        if self.disabled:
            return []
        if self.probe is not None and self.probe.active:
            self._finish_probe(None)
        self.armed = False
        self.step += 1
        self.epoch = epoch
        if self.reducer is None:
            return []
        if self.is_check_step(self.step):
            return self._check()
        self.reducer.next_row()
        return []

    def is_check_step(self, step: int) -> bool:
        """Statistics are judged at the first step and every ``check_every_n_steps``."""
        return step == 1 or step % self.config.check_every_n_steps == 0

    def _check(self) -> list[Decision]:
        assert self.reducer is not None
        self.reducer.next_row()
        if self.distributed:
            self.reducer.all_reduce()
        rows, counts, seen = self.reducer.read()
        snap = Snapshot.from_rows(rows, counts, step=self.step, first_step=self.interval_start, epoch=self.epoch,
                                  loss_seen=seen)
        self.interval_start = self.step + 1
        self.last_snapshot = snap
        decisions = self.monitor.check(snap)
        self._sync_bounds()
        return decisions

    def check_partial_step(self) -> list[Decision]:
        """After the training loop raised mid-step: judge what the unfinished step already showed
        (a NaN input before the loss crashed, say), so the alerts file explains the crash. Records
        alerts only; takes no action."""
        if self.disabled or self.reducer is None or not self.armed:
            return []
        self.armed = False
        if self.probe is not None:
            self.probe.stop()
            self.probe = None
        self.step += 1
        decisions = self._check()
        for d in decisions:
            d.alert.details["during_exception"] = True
        return decisions

    def finish(self) -> None:
        if self.probe is not None:
            self.probe.stop()
            self.probe = None
        self.monitor.finish()

    def disable(self, error: BaseException) -> None:
        """Switch the monitor off after an internal error: one warning, hooks removed, training untouched."""
        self.disabled = True
        if self.probe is not None:
            self.probe.stop()
            self.probe = None
        self._remove_hooks()
        if not self._warned_error:
            self._warned_error = True
            warnings.warn(
                BoundGuardWarning(f"boundguard hit an internal error and switched itself off; training goes on "
                                  f"unmonitored: {type(error).__name__}: {error}"), stacklevel=3)

    # ------------------------------------------------------------------ probe → hooks
    def _finish_probe(self, loss: Optional[Tensor]) -> None:
        probe = self.probe
        assert probe is not None
        probe.stop()
        self.probe = None
        self.probed = True
        try:
            r = probe.analyse(loss)
        finally:
            probe.recorder.calls.clear()
            probe.recorder.producer.clear()
        self._result = r
        facts = ModelFacts(
            pred_where=_where(r.pred_site) if r.pred_site else (_where(r.pre_site) if r.pre_site else None),
            pre_where=_where(r.pre_site) if r.pre_site else None,
            activation=r.activation, activation_params=r.activation_params,
            loss=classify_loss(r.loss_name), loss_where=r.loss_name,
        )
        self._logits = bool(facts.loss and facts.loss.link_applied)
        device = _device_of(self.model, r)
        self.reducer = Reducer(self.config.check_every_n_steps, device)
        for key, msg, fix in r.notes:
            self.monitor.note(key, msg, fix, step=self.step + 1)
        if r.pre is not None:
            facts.pre_dtype = str(r.pre.dtype).replace("torch.", "")
        if r.pred is not None and r.pred.dim() >= 2:
            facts.classes = int(r.pred.shape[1 if facts.loss and facts.loss.multiclass else -1])
        self._locate_batch_tensors(r, facts)
        self.monitor.set_facts(facts)
        if r.target is not None:
            t = r.target.detach()
            tf = t.float()
            fin = tf[torch.isfinite(tf)]
            if fin.numel():
                onehot = bool(
                    t.dim() >= 2 and t.shape[-1] > 1 and ((tf == 0) | (tf == 1)).all() and (tf.sum(-1) == 1).all()
                )
                self.monitor.observe_targets(float(fin.min()), float(fin.max()), onehot=onehot)
        self._configure_reducer()
        self._install_hooks()
        # statistics of this (probe) step come from the tensors the probe saw
        self._reduce_outputs(r.pre, r.pred)
        if r.target is not None and self._target_path is None:
            self.reducer.target(r.target)

    def _locate_batch_tensors(self, r: ProbeResult, facts: ModelFacts) -> None:
        batch = getattr(self, "_batch", None)
        cfg = self.config
        tensors = list(flatten(batch)) if batch is not None else []
        if cfg.target_key is not None:
            self._target_path = (cfg.target_key,)
        elif r.target is not None:
            for path, t in tensors:
                if t is r.target or (t.numel() == r.target.numel() and t.numel() > 0 and _same_storage(t, r.target)):
                    self._target_path = path
                    break
            else:
                for path, t in tensors:
                    if t.numel() == r.target.numel() and t.numel() > 0 and torch.equal(
                            t.detach().reshape(-1).float(), r.target.detach().reshape(-1).float()):
                        self._target_path = path
                        break
        if self._target_path is None and r.target is None:
            self._target_path = _guess(tensors, _TARGET_KEYS, position=1)
        if cfg.input_key is not None:
            self._input_path = (cfg.input_key,)
        else:
            root = [t for _, t in flatten(r.root_inputs)] if r.root_inputs else []
            for path, t in tensors:
                if any(t is u for u in root):
                    self._input_path = path
                    break
            else:
                self._input_path = _guess([(p, t) for p, t in tensors if p != self._target_path], _INPUT_KEYS, 0)
        if self._target_path is not None:
            facts.target_where = describe_path("batch", self._target_path)
            y = get_path(batch, self._target_path) if batch is not None else r.target
            if y is None and batch is not None:
                self.monitor.note("targets", f"target_key={cfg.target_key!r} is not in the batch.",
                                  "Pass target_key= naming the batch entry (index or dict key) of the targets.",
                                  step=self.step + 1)
                self._target_path = None
        elif r.target is None and not self.explicit_batch:
            self.monitor.note("targets", "the targets could not be located in the batch, so target checks and "
                              "bounds inference are off.",
                              "Pass target_key= (batch index or dict key) or bounds= explicitly.", step=self.step + 1)
        if r.target is not None:
            facts.target_integer = not r.target.is_floating_point()
        elif self._target_path is not None and batch is not None:
            y = get_path(batch, self._target_path)
            facts.target_integer = y is not None and not y.is_floating_point()
        if self._input_path is not None and batch is not None:
            x = get_path(batch, self._input_path)
            if x is None:
                self._input_path = None
            else:
                facts.input_where = describe_path("batch", self._input_path)
                facts.input_integer = not x.is_floating_point()
        if self._input_path is None and batch is not None and not self.explicit_batch:
            self.monitor.note("inputs", "the inputs could not be located in the batch, so input checks are off.",
                              "Pass input_key= (batch index or dict key).", step=self.step + 1)

    def _configure_reducer(self) -> None:
        red, facts = self.reducer, self.monitor.facts
        assert red is not None
        b = self.monitor.bounds
        red.lo = red.hi = None
        red.distribution = False
        if b is not None:
            red.lo, red.hi = b.lo, b.hi
            red.distribution = b.kind == "distribution"
        red.class_dim = 1 if facts.loss is not None and facts.loss.multiclass else -1
        if facts.activation == "softmax":
            red.class_dim = int(facts.activation_params.get("dim", -1))
        red.pin = None
        if facts.activation == "clamp":
            red.pin = (facts.activation_params.get("lo"), facts.activation_params.get("hi"))
        red.tail = TAIL_THRESHOLD.get(facts.activation)
        red.configure()
        self._bound_version = b

    def _sync_bounds(self) -> None:
        if self.reducer is not None and self.monitor.bounds != self._bound_version:
            self._configure_reducer()

    def _install_hooks(self) -> None:
        self._remove_hooks()
        r = self._result
        if r is None or self.model is None:
            return
        modules = dict(self.model.named_modules())
        pre_site, pred_site = r.pre_site, r.pred_site
        if self._logits:
            pred_site = None  # predictions are link(raw): in range by construction
        inserted = self.monitor.inserted
        replay = activation_fn(r.activation, r.activation_params) if r.pred_from_pre and not self._logits else None
        if inserted and r.pred_from_pre:
            hook = BoundHook(inserted[-1])
            act = replay or (lambda z: z)
            replay = lambda z: act(hook.bound(z))  # noqa: E731
        self._pred_from_pre = replay
        same = (pre_site is not None and pred_site is not None and pre_site == pred_site and not inserted
                and not self._logits)
        if self.reducer is not None:
            self.reducer.shared = same
        if pre_site is not None and pre_site[0] in modules:
            self._hooks.append(modules[pre_site[0]].register_forward_hook(
                self._stats_hook(pre_site[1], "pre+pred" if same else "pre"), prepend=True))
        if pred_site is not None and not same and pred_site[0] in modules:
            self._hooks.append(modules[pred_site[0]].register_forward_hook(self._stats_hook(pred_site[1], "pred")))

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _stats_hook(self, path: tuple, what: str):
        @_eager
        def hook(module, args, output):
            if not self.armed or self.disabled:
                return None
            try:
                t = (args[0] if args and isinstance(args[0], Tensor) else None) if path[:1] == (_INPUT,) else get_path(output, path)
                if t is None:
                    return None
                if what == "pred":
                    self.reducer.pred(t)
                elif what == "pre+pred":
                    self._reduce_outputs(t, t)
                else:
                    self._reduce_outputs(t, None)
            except Exception as e:  # never break the user's forward pass
                if self.config.strict:
                    raise
                self.disable(e)
            return None
        return hook

    def _reduce_outputs(self, pre: Optional[Tensor], pred: Optional[Tensor]) -> None:
        red = self.reducer
        assert red is not None
        if red.shared and pre is not None:  # identity head: one tensor is both
            red.pre(pre, also_pred=True)
            return
        if pre is not None:
            red.pre(pre)
        if self._logits:
            return
        if pred is not None and self._result is not None and self._result.pred_site is not None:
            red.pred(pred)
        elif self._pred_from_pre is not None and pre is not None:
            red.pred(self._pred_from_pre(pre.detach()))

    # ------------------------------------------------------------------ actions
    def insert_bound(self, alert: Alert) -> Optional[dict]:
        """Carry out ``bound``: a bounding activation on the raw output that feeds the prediction."""
        r, b = self._result, self.monitor.bounds
        site = (r.pre_site or r.pred_site) if r is not None else None
        if site is None or b is None or self.model is None:
            self.monitor.note("bound", "on_violation='bound' could not insert a bound: the output layer was not located.",
                              "Add the output activation to the model yourself.", step=self.step)
            return None
        dim = 1 if (r.pred is not None and r.pred.dim() >= 2 and b.kind == "distribution"
                    and self.monitor.facts.loss is not None and self.monitor.facts.loss.multiclass) else -1
        rec = bound_record(b, site[0], site[1], dim, self.step)
        if rec is None:
            self.monitor.note("bound", f"on_violation='bound' cannot bound to {b.describe()} (not finite).",
                              "Declare finite bounds=(lo, hi).", step=self.step)
            return None
        apply_bounds(self.model, [rec])
        self.monitor.inserted.append(rec)
        self.monitor.facts.activation = {"softmax": "softmax", "sigmoid": "sigmoid", "tanh": "tanh"}.get(
            rec["kind"], "scaled_sigmoid")
        self.monitor.facts.activation_params = {"lo": b.lo, "hi": b.hi} if rec["kind"] == "scaled_sigmoid" else (
            {"dim": dim} if rec["kind"] == "softmax" else {})
        self._install_hooks()
        self._configure_reducer()
        msg = (f"boundguard inserted {rec['kind']} on the output of {rec['module'] or 'the model'} at step "
               f"{self.step}: predictions are now in {b.describe()}.")
        alert.details["inserted"] = rec
        warnings.warn(BoundGuardWarning(msg), stacklevel=3)
        logger.warning(msg)
        return rec

    def act(self, decisions: list[Decision]) -> bool:
        """Carry out decisions. Returns True when training should halt; raises for ``raise``."""
        halt = False
        for d in decisions:
            if d.action == "halt":
                halt = True
            elif d.action == "bound":
                if self.monitor.inserted:  # one bound per run: a second range alert at the same check
                    d.action = d.alert.action = "warn"
                else:
                    self.insert_bound(d.alert)
            elif d.action == "raise":
                self.monitor.finish()
                raise BoundGuardError(d.alert)
        return halt

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "step": self.step, "config": self.config.describe()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state.get("monitor", {}))
        self.step = int(state.get("step", 0))
        self.interval_start = self.step + 1
        if self.model is not None and self.monitor.inserted:
            apply_bounds(self.model, self.monitor.inserted)


def _eager(fn: Callable) -> Callable:
    """Run ``fn`` eagerly under torch.compile: statistics writes into the monitor's buffer are
    side effects dynamo must not trace (they would break AOT autograd's view-mutation rules)."""
    try:
        return torch._dynamo.disable(fn, recursive=True)
    except Exception:  # pragma: no cover - torch without dynamo
        return fn


def _where(site: tuple[str, tuple]) -> str:
    name, path = site
    return describe_path(name or "model", path) if path and path != () else (name or "model")


def _guess(tensors: list[tuple[tuple, Tensor]], keys: tuple[str, ...], position: int) -> Optional[tuple]:
    for path, _ in tensors:
        if len(path) == 1 and isinstance(path[0], str) and path[0].lower() in keys:
            return path
    for path, _ in tensors:
        if path == (position,):
            return path
    return None


def _device_of(model: Optional[nn.Module], r: ProbeResult) -> torch.device:
    for t in (r.pre, r.pred):
        if isinstance(t, Tensor):
            return t.device
    if model is not None:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------- plain loop
class Guard:
    """``watch(model, ...)`` for a plain PyTorch loop. Call :meth:`step` once per batch.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 1))
        >>> with watch(model, bounds=(0, 1), on_violation="log", alerts_path=None) as guard:
        ...     for _ in range(3):
        ...         x, y = torch.randn(8, 4), torch.rand(8, 1)
        ...         loss = torch.nn.functional.mse_loss(model(x), y)
        ...         loss.backward()
        ...         guard.step(loss=loss, inputs=x, targets=y)
        >>> "missing_output_activation" in {a.code for a in guard.alerts}
        True
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch() needs a torch.nn.Module, got {type(model).__name__}")
        self.engine = TorchEngine(Config(**options))
        self.engine.explicit_batch = True
        self.engine.attach(model)
        self.should_stop = False  #: set by on_violation="halt"; the loop decides
        self._pre = model.register_forward_pre_hook(self._before_forward)
        self._closed = False

    def _before_forward(self, module, args):
        e = self.engine
        try:
            if module.training and not e.armed and not e.disabled:
                e._batch = args
                e.begin_step()
        except Exception as err:
            if e.config.strict:
                raise
            e.disable(err)

    def step(self, loss: Any = None, inputs: Any = None, targets: Any = None) -> list[Alert]:
        """Record one training batch; at a check, judge and act. Returns the alerts raised at this call."""
        e = self.engine
        if self._closed or e.disabled:
            return []
        try:
            if not e.armed:
                e.begin_step()  # no forward seen (e.g. model in eval mode): still count the step
            e._batch = (inputs, targets)
            if loss is not None:
                e.record_loss(loss)
            elif e.probe is not None and e.probe.active:
                e._finish_probe(None)
            e.record_batch(None, inputs=inputs, targets=targets)
            decisions = e.end_step()
            if e.act(decisions):
                self.should_stop = True
            return [d.alert for d in decisions]
        except BoundGuardError:
            raise
        except Exception as err:
            if e.config.strict:
                raise
            e.disable(err)
            return []

    @property
    def alerts(self) -> list[Alert]:
        return self.engine.alerts

    @property
    def bounds_inserted(self) -> list[dict]:
        return self.engine.bounds_inserted

    @property
    def alerts_path(self) -> Optional[Path]:
        return self.engine.monitor.alerts_path

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pre.remove()
            self.engine._remove_hooks()
            self.engine.finish()

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def watch(model: nn.Module, **options: Any) -> Guard:
    """Monitor a plain PyTorch training loop; same options as the callbacks. See :class:`Guard`."""
    return Guard(model, **options)
