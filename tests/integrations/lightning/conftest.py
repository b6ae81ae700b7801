"""Tiny real Lightning runs shared by the Lightning tests."""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")

class Tiny(L.LightningModule):
    """Linear(8→16)→Tanh→Linear(16→out) with a configurable head activation and loss.

    ``loss_fn(pred, y)`` is any callable (module or functional); ``script(step, loss)`` may rewrite
    the loss to script a sequence (spikes, divergence, NaN).
    """

    def __init__(self, head: Optional[nn.Module] = None, loss_fn: Callable = nn.MSELoss(), out: int = 1,
                 lr: float = 1e-2, script: Optional[Callable] = None, scale: float = 1.0, din: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(din, 16), nn.Tanh())
        self.fc = nn.Linear(16, out)
        self.head = head or nn.Identity()
        self.loss_fn = loss_fn
        self.lr = lr
        self.script = script
        self.scale = scale

    def forward(self, x):
        z = self.fc(self.body(x))
        if self.scale != 1.0:
            z = z * self.scale
        return self.head(z)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        if self.script is not None:
            loss = self.script(self.global_step, loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(n: int = 512, din: int = 8, kind: str = "binary", seed: int = 0, x_scale: float = 1.0, out: int = 1):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, din)).astype("float32")
    s = x[:, :2].sum(1, keepdims=True)
    if kind == "binary":
        y = (s > 0).astype("float32")
    elif kind == "unit":
        y = (1 / (1 + np.exp(-s))).astype("float32")
    elif kind == "wide":
        y = (5 + 5 * np.tanh(s)).astype("float32")  # in [0, 10]
    elif kind == "sym3":
        y = (3 * np.tanh(s)).astype("float32")
    elif kind == "sym":
        y = (0.8 * np.tanh(s)).astype("float32")
    elif kind == "classes":
        y = (np.digitize(s[:, 0], [-1, 0, 1])).astype("int64")  # 4 classes
    elif kind == "onehot":
        y = np.eye(4, dtype="float32")[np.digitize(s[:, 0], [-1, 0, 1])]
    elif kind == "regression":
        y = (20 * s).astype("float32")
    else:
        raise ValueError(kind)
    return x * x_scale, y


def loader(x, y, batch_size: int = 32, shuffle: bool = False):
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=batch_size, shuffle=shuffle)


def trainer(callbacks, max_steps: int = 40, **kw):
    opts = dict(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    opts.update(kw)
    return L.Trainer(callbacks=callbacks, **opts)


def fit(model, x, y, guard, max_steps: int = 40, **kw):
    t = trainer([guard], max_steps=max_steps, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader(x, y))
    return t
