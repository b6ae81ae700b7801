"""Loss rules work for losses of either sign (Gaussian NLL goes negative)."""
from __future__ import annotations

import torch

from boundguard.integrations.torch import watch


def run(tmp_path, losses):
    g = watch(torch.nn.Linear(1, 1), bounds=None, on_violation="log", check_every_n_steps=10,
              alerts_path=tmp_path / "a.jsonl", strict=True)
    for loss in losses:
        g.step(loss=torch.tensor(float(loss)))
    g.close()
    return {a.code for a in g.alerts}


def test_improving_negative_loss_is_quiet(tmp_path):
    assert not run(tmp_path, [-0.1 * s for s in range(1, 201)]) & {"loss_diverging", "loss_spike", "loss_plateau"}


def test_noisy_negative_plateau_is_not_divergence(tmp_path):
    losses = [-2.87 + 0.03 * ((s * 7) % 5 - 2) for s in range(1, 301)]
    assert "loss_diverging" not in run(tmp_path, losses)


def test_negative_loss_diverging(tmp_path):
    losses = [-3.0 + (0 if s < 50 else 0.3 * (s - 50)) + 0.01 * (s % 3) for s in range(1, 101)]
    assert "loss_diverging" in run(tmp_path, losses)


def test_negative_loss_spike(tmp_path):
    losses = [-3.0 + 0.05 * (s % 3) + (5.0 if s == 60 else 0.0) for s in range(1, 101)]
    assert "loss_spike" in run(tmp_path, losses)


def test_no_notes_for_arguments_watch_was_not_given(tmp_path):
    g = watch(torch.nn.Linear(1, 1), on_violation="log", alerts_path=tmp_path / "a.jsonl")
    x = torch.randn(4, 1)
    g.step(loss=torch.nn.functional.mse_loss(g.engine.model(x), x))
    g.close()
    assert not [a for a in g.alerts if a.code == "probe_incomplete" and a.where in ("targets", "inputs")]
