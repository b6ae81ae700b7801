"""No host synchronisation on the hot path: between checks the guard reads nothing back; at a check it
moves exactly one tensor to the host. Counted at the dispatcher level, step by step, against the same
loop without the guard."""
from __future__ import annotations

import collections
import logging

import pytest
import torch
import torch.nn.functional as F
from boundguard.integrations.torch import watch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning")

#: ops that block on the device (a value or a data-dependent shape comes back to the host)
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
            "_unique2", "tolist"}


class Count(TorchDispatchMode):
    """Counts sync ops, and ``_to_copy`` calls that name a device (transfers, not dtype casts)."""

    def __init__(self):
        super().__init__()
        self.syncs = collections.Counter()
        self.transfers = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.syncs[name] += 1
        if name == "_to_copy" and kwargs.get("device") is not None:
            self.transfers += 1
        return func(*args, **kwargs)


def _binary():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
    return model, F.binary_cross_entropy, lambda: (torch.randn(16, 4), (torch.rand(16, 1) > 0.5).float())


def _classes():  # integer targets: the reducer casts them on the device (a dtype cast, not a transfer)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, F.cross_entropy, lambda: (torch.randn(16, 4), torch.randint(0, 3, (16,)))


def _raw_head():  # alerts fire at every check (identity head, declared (0, 1))
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    return model, F.mse_loss, lambda: (torch.randn(16, 4), torch.rand(16, 1))


def per_step_counts(make, steps, guard_options=None):
    model, loss_fn, data = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = watch(model, **guard_options) if guard_options is not None else None
    torch.manual_seed(1)
    batches = [data() for _ in range(steps)]
    counts = []
    for x, y in batches:
        with Count() as c:
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if guard is not None:
                guard.step(loss=loss, inputs=x, targets=y)
        counts.append(c)
    if guard is not None:
        guard.close()
        assert not guard.engine.disabled
    return counts


@pytest.mark.parametrize("make", [_binary, _classes, _raw_head], ids=["binary", "classes", "alerting"])
def test_no_host_syncs_between_checks_and_one_transfer_per_check(tmp_path, make, caplog):
    caplog.set_level(logging.CRITICAL + 1, logger="boundguard")
    n = 4
    steps = 2 * n + 1
    options = {"bounds": (0, 1), "on_violation": "log", "check_every_n_steps": n, "alerts_path": tmp_path / "a.jsonl"}
    watched = per_step_counts(make, steps, options)
    plain = per_step_counts(make, steps)
    checks = {1, n, 2 * n}
    for step, (w, p) in enumerate(zip(watched, plain), start=1):
        if step == 1:  # the probe step: it may look at the first batch once
            assert w.transfers - p.transfers == 1
            continue
        extra_syncs = w.syncs - p.syncs
        assert not extra_syncs, f"step {step}: the guard synchronised: {dict(extra_syncs)}"
        assert w.transfers - p.transfers == (1 if step in checks else 0), f"step {step}"
