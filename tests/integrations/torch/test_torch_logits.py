"""A language model's head: logits that run away are caught (``logits_growing``) while a healthy model's
slowly growing logits are not, and the soft cap ``cap * tanh(z / cap)`` that ``bound`` inserts is recorded,
replayed on resume, applied by ``apply_bounds`` and carried by a copy.

The model is a tiny causal LM (vocabulary 256, a bigram mixer and a linear head) trained in a plain loop on
a next-token rule with 10 % noise; the diverging run warms its SGD learning rate up to 100, a peak far too
high, as a misconfigured schedule would."""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from boundguard.integrations.torch import apply_bounds, watch

pytestmark = [pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
              pytest.mark.usefixtures("one_thread")]  # every test here trains on one torch thread

V, D, T, B = 256, 32, 16, 8


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(2 * D, D)
        self.head = nn.Linear(D, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
        return self.head(torch.tanh(self.mix(torch.cat([h, prev], -1))))


def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, V, (B, T), generator=g)
    y = (x * 7 + 3) % V
    noise = torch.rand(B, T, generator=g) < 0.1
    return x, torch.where(noise, torch.randint(0, V, (B, T), generator=g), y)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).view(-1, V), y.view(-1))


def train(model: nn.Module, *, sgd_peak: float = 0.0, steps: int = 400, adam_lr: float = 1e-3,
          loss_of: Callable = lm_loss, batch_of: Callable = batch, **options):
    """Adam at ``adam_lr`` (healthy), or SGD warmed up over 300 steps to ``sgd_peak``; ``loss_of(model, x, y)``
    is the step's loss, ``batch_of(generator)`` its batch. Returns the guard and the losses."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=sgd_peak) if sgd_peak else torch.optim.Adam(model.parameters(), adam_lr)
    options.setdefault("alerts_path", None)
    guard = watch(model, check_every_n_steps=10, **options)
    losses = []
    for i in range(steps):
        if sgd_peak:
            for group in opt.param_groups:
                group["lr"] = sgd_peak * min(1.0, (i + 1) / 300)
        x, y = batch_of(g)
        loss = loss_of(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss, inputs=x, targets=y)
        losses.append(loss.item())
    guard.close()
    return guard, losses


def test_runaway_logits_are_caught_before_the_loss_diverges():
    torch.manual_seed(0)
    guard, losses = train(TinyLM(), sgd_peak=100.0)
    codes = {a.code: a for a in reversed(guard.alerts)}  # (the first alert of each code)
    assert "logits_growing" in codes, [a.code for a in guard.alerts]
    alert = codes["logits_growing"]
    assert alert.severity == "warning" and alert.where == "head"
    assert alert.details["absmax"] >= 50 and alert.details["lse"] >= alert.details["early_lse"] + 20
    assert alert.details["cap"] == 30.0  # its early logits were small: Gemma 2's cap
    if "loss_diverging" in codes:
        assert alert.step <= codes["loss_diverging"].step
    assert max(losses[-50:]) > 3 * min(losses)  # (the run does diverge)


def test_a_healthy_language_model_whose_logits_grow_slowly_is_clean():
    torch.manual_seed(0)
    guard, losses = train(TinyLM())
    assert [a.code for a in guard.alerts if a.severity != "info"] == []
    assert losses[-1] < 0.6 * losses[0]  # it learns (a slow start near log V for the first ~150 steps)
    stats = guard.engine.session.monitor.history
    assert len(stats.logit_recent) == 8 and stats.logit_recent[-1][1] < 10  # the signal is read, and modest


def test_the_soft_cap_is_inserted_recorded_replayed_and_copied():
    torch.manual_seed(0)
    model = TinyLM()
    guard, losses = train(model, sgd_peak=100.0, actions={"logits_growing": "bound"})
    (rec,) = guard.bounds_inserted
    assert rec["kind"] == "softcap" and (rec["lo"], rec["hi"]) == (-30.0, 30.0) and rec["module"] == "head"
    x, _ = batch(torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        capped = model(x)
        h = model.emb(x)
        features = torch.tanh(model.mix(torch.cat([h, torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)], -1)))
        raw = F.linear(features, model.head.weight, model.head.bias)  # (the head without its hooks)
    assert torch.allclose(capped, 30.0 * torch.tanh(raw / 30.0), atol=1e-5)
    assert capped.abs().max() < 30.0
    assert max(losses[-50:]) < 12  # capped logits keep the loss from running away (uncapped: above 15)
    # replay on resume: a new guard on a fresh copy of the weights, loaded from the saved state
    fresh = TinyLM()
    fresh.load_state_dict(model.state_dict())
    resumed = watch(fresh, alerts_path=None)
    resumed.load_state_dict(guard.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), capped)
    resumed.close()
    # apply_bounds, for inference, from the saved state; and a deep copy carries the cap
    other = TinyLM()
    other.load_state_dict(model.state_dict())
    applied = apply_bounds(other, guard.state_dict())
    assert [r["kind"] for r in applied] == ["softcap"]
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), capped)
        assert torch.equal(copy.deepcopy(other)(x), capped)


class ChunkedLM(nn.Module):
    """The full logits never exist: the loss is a chunked linear + cross-entropy on the head's weight (as
    memory-saving LM trainers compute it), summed over chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.body = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(self.emb(x))).reshape(-1, D)
        y = y.reshape(-1)
        total = h.new_zeros(())
        for hc, yc in zip(h.split(32), y.split(32)):
            total = total + F.cross_entropy(F.linear(hc, self.lm_head.weight), yc, reduction="sum")
        return total / y.numel()


def test_a_head_whose_logits_never_exist_is_said_unwatched_not_failed():
    torch.manual_seed(0)
    guard, losses = train(ChunkedLM(), steps=60, adam_lr=1e-2, loss_of=lambda m, x, y: m(x, y),
                          strict=True)  # (strict: an internal error fails the test)
    assert not guard.engine.disabled and losses[-1] < 0.5 * losses[0]
    assert [a.code for a in guard.alerts if a.severity != "info"] == []
    notes = " ".join(a.message for a in guard.alerts if a.code == "probe_incomplete")
    assert "prediction" in notes and "pre-activation could not be located" in notes
    assert not guard.engine.session.monitor.history.logit_recent  # no logits read: logits_growing is off


def test_the_probe_keeps_no_temporary_of_the_loss_alive():
    """A loss that upcasts the logits (as the Hugging Face models' loss does under bf16): the fp32 copy dies
    when the loss returns, as it does without boundguard (the probe step holds large tensors by weak
    reference), and the probe still finds the head through the dead copy: its classes, the raw logits,
    their logsumexp."""
    import weakref

    copies: list = []

    def upcast_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        up = logits.float()  # bf16 -> fp32: a new tensor (64 x 16 x 256, more than the probe holds)
        copies.append(weakref.ref(up))
        loss = F.cross_entropy(up.view(-1, V), y.view(-1))
        del up
        assert copies[-1]() is None, "the fp32 copy of the logits outlived the loss"
        return loss

    def wide(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [batch(g) for _ in range(8)]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    torch.manual_seed(0)
    guard, _ = train(TinyLM(), steps=20, loss_of=upcast_loss, batch_of=wide, strict=True)
    facts = guard.engine.session.facts
    assert (facts.pre_where, facts.classes, facts.loss_where) == ("head", V, "cross_entropy"), facts
    assert not guard.engine.disabled and [a.code for a in guard.alerts if a.severity != "info"] == []
    assert guard.engine.session.monitor.history.logit_recent  # the logsumexp of the raw logits is read
