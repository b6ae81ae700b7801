"""What the probe's result says about the model and the batch: the facts of the output layer and the loss
(:func:`probe_facts`, the class dimension of logits, the device the statistics live on), the output layer
whose gradients are watched, and where the targets and inputs sit in the batch (with the notes to give when
they cannot be found)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from boundguard.config import Config
from boundguard.integrations.torch.hooks import unreadable
from boundguard.integrations.torch.paths import INPUT_KEYS, TARGET_KEYS, describe_path, flatten, get_path, guess
from boundguard.integrations.torch.probe import ProbeResult, same_storage
from boundguard.model_facts import ModelFacts, classify_loss

__all__ = ["class_dim", "device_of", "explicit_batch", "grad_params", "locate_batch", "probe_facts", "site_name"]

#: A note for the user: (key, message, fix).
Note = tuple[str, str, str]


def probe_facts(r: ProbeResult) -> ModelFacts:
    """The facts the probe step showed: where the prediction and the pre-activation are, the activation,
    the loss (and whether it is plain, the target value it ignores), the pre-activation's dtype, the
    classes, and a normalisation the raw inputs go through. The batch's and the gradients' fields are
    filled by :func:`locate_batch` / :func:`explicit_batch` and :func:`grad_params`."""
    facts = ModelFacts(
        pred_where=site_name(r.pred_site) if r.pred_site else (site_name(r.pre_site) if r.pre_site else None),
        pre_where=site_name(r.pre_site) if r.pre_site else None,
        activation=r.activation, activation_params=r.activation_params,
        loss=classify_loss(r.loss_name), loss_where=r.loss_name,
        loss_plain=r.loss_plain, target_ignore=r.target_ignore, input_scaled_by=r.input_scaled_by,
    )
    if r.pre is not None:
        facts.pre_dtype = str(r.pre.dtype).replace("torch.", "")
    if r.pred_shape is not None and len(r.pred_shape) >= 2:
        facts.classes = int(r.pred_shape[1 if facts.loss and facts.loss.multiclass else -1])
    return facts


def site_name(site: tuple[str, tuple]) -> str:
    """A probe site ``(module name, path in its output)`` in words (``fc``, ``head[0]``, ``model['logits']``)."""
    name, path = site
    return describe_path(name or "model", path) if path and path != () else (name or "model")


def class_dim(pre: Optional[Tensor], facts: ModelFacts) -> Optional[int]:
    """The class dimension of raw logits a softmax cross-entropy consumes (the last, or the second, of the
    size of the classes): where their logsumexp is read. None for any other head."""
    loss = facts.loss
    if pre is None or loss is None or not (loss.multiclass and loss.link_applied) or not facts.classes \
            or pre.dim() < 2 or facts.activation not in ("identity", "unknown"):
        return None
    if pre.shape[-1] == facts.classes:
        return -1
    return 1 if pre.shape[1] == facts.classes else None


def device_of(model: Optional[nn.Module], r: ProbeResult) -> torch.device:
    """Where the statistics live: the device of the tensors the probe saw, else of the model's parameters."""
    for t in (r.pre, r.pred):
        if isinstance(t, Tensor):
            return t.device
    if model is not None:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def grad_params(model: Optional[nn.Module], r: ProbeResult) -> tuple[Optional[str], list[nn.Parameter]]:
    """The output layer whose gradients are watched: the module that produces the pre-activation (or the
    prediction), or, when that module has no parameters of its own (an ``nn.Sigmoid``), the last module
    before it (in ``named_modules`` order) that has. (FSDP2 keeps the module tree: its parameters are
    DTensors, read as local shards at each step.)"""
    site = r.pre_site or r.pred_site
    if site is None or model is None:
        return None, []
    modules = list(model.named_modules())
    names = [n for n, _ in modules]
    if site[0] not in names:
        return None, []
    for name, m in reversed(modules[: names.index(site[0]) + 1]):
        params = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if params:
            return (name or type(m).__name__), params
    return None, []


def locate_batch(batch: Any, r: ProbeResult, cfg: Config, facts: ModelFacts,
                 explicit: bool) -> tuple[Optional[tuple], Optional[tuple], list[Note]]:
    """Where the targets and the inputs are in ``batch`` (paths, or None), filling ``facts``' batch fields;
    ``explicit``: the adapter is handed them at each step (``guard.step(inputs=, targets=)``), so their
    absence from the batch is not worth a note."""
    tensors = list(flatten(batch)) if batch is not None else []
    notes: list[Note] = []
    target = _find_target(r, tensors, cfg)
    inputs = _find_input(r, tensors, cfg, target)
    if target is not None:
        facts.target_where = describe_path("batch", target)
        if batch is not None and get_path(batch, target) is None:
            notes.append(("targets", f"target_key={cfg.target_key!r} is not in the batch.",
                          "Pass target_key= naming the batch entry (index or dict key) of the targets."))
            target = None
    elif r.target is None and not explicit:
        notes.append(("targets", "the targets could not be located in the batch, so target checks and bounds "
                      "inference are off.", "Pass target_key= (batch index or dict key) or bounds= explicitly."))
    if r.target is not None:
        facts.target_integer = not r.target.is_floating_point()
    elif target is not None and batch is not None:
        y = get_path(batch, target)
        facts.target_integer = y is not None and not y.is_floating_point()
    if inputs is not None and batch is not None:
        x = get_path(batch, inputs)
        if x is None:
            inputs = None
        else:
            facts.input_where = describe_path("batch", inputs)
            facts.input_integer = not x.is_floating_point()
    if inputs is None and batch is not None and not explicit:
        notes.append(("inputs", "the inputs could not be located in the batch, so input checks are off.",
                      "Pass input_key= (batch index or dict key)."))
    return target, inputs, notes


def explicit_batch(r: ProbeResult, facts: ModelFacts) -> None:
    """An adapter handed the targets and inputs at each step (``guard.step(inputs=, targets=)``): name them
    so, with what the probe step showed of them (the loss's targets, the model's first input)."""
    if r.target is not None:
        facts.target_where, facts.target_integer = "targets", not r.target.is_floating_point()
    root = [t for _, t in flatten(r.root_inputs)] if r.root_inputs else []
    if root:
        facts.input_where, facts.input_integer = "inputs", not root[0].is_floating_point()


def _find_target(r: ProbeResult, tensors: list[tuple[tuple, Tensor]], cfg: Config) -> Optional[tuple]:
    if cfg.target_key is not None:
        return (cfg.target_key,)
    if r.target is None:
        return guess(tensors, TARGET_KEYS, position=1)
    y = r.target
    for path, t in tensors:  # the loss's own target tensor first, then another view of it
        if t is y:
            return path
    for path, t in tensors:
        if t.numel() == y.numel() and t.numel() > 0 and same_storage(t, y):
            return path
    for path, t in tensors:  # a copy of the batch's targets (moved, cast): the same values
        if t.numel() == y.numel() and t.numel() > 0 and unreadable(t) is None and torch.equal(
                t.detach().reshape(-1).float(), y.detach().reshape(-1).float()):
            return path
    return None


def _find_input(r: ProbeResult, tensors: list[tuple[tuple, Tensor]], cfg: Config,
                target: Optional[tuple]) -> Optional[tuple]:
    if cfg.input_key is not None:
        return (cfg.input_key,)
    root = [t for _, t in flatten(r.root_inputs)] if r.root_inputs else []
    for path, t in tensors:
        if any(t is u for u in root):
            return path
    return guess([(p, t) for p, t in tensors if p != target], INPUT_KEYS, 0)
