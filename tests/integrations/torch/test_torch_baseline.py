"""``loss_at_baseline`` on a real loop: MSE between a (B, 1) output and (B,) targets broadcasts to every
pair, so the model can only learn the targets' mean and its loss stays at their variance; the same loop
with the shapes matched (the healthy twin) learns and stays silent. The loss starts near the baseline,
like a slow starter's, so the rule waits ``start_steps`` (1000) before it judges."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from boundguard.integrations.torch import watch
from torch import nn


@pytest.mark.parametrize("broadcast", [True, False])
def test_a_loss_stuck_at_the_constant_baseline(tmp_path, broadcast):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = torch.randn(4, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, check_every_n_steps=20, on_violation="log", alerts_path=tmp_path / "a.jsonl")
        for _ in range(1100):
            x = torch.randn(32, 4, generator=g)
            y = x @ w + 2.0  # (B,)
            pred = model(x)
            loss = F.mse_loss(pred if broadcast else pred.squeeze(-1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
        guard.close()
    codes = {a.code: a for a in reversed(guard.alerts)}  # (the first alert of each code)
    if broadcast:
        a = codes["loss_at_baseline"]
        # its loss started near the baseline (the targets' variance) and stayed: judged after start_steps
        assert a.severity == "warning" and a.step >= 1000 and "variance" in a.message
    else:
        assert float(loss.detach()) < 0.1 * float(y.var())
        assert "loss_at_baseline" not in codes, guard.alerts
