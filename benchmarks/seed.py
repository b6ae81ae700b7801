"""The seed's model, shared by ``make demo`` (:mod:`benchmarks.demo`) and the overhead benchmark.

The seed is the program whose bug boundguard was written for: an LSTM regressor predicting a
probability with no output activation on its linear head, trained with MSE. Importing this module
imports torch and Lightning (it is outside the numpy-only core on purpose).
"""
from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn

__all__ = ["LSTMRegressor"]


class LSTMRegressor(L.LightningModule):
    """The seed's model: LSTM(1→32) + Linear(32→1), no output activation, MSE, Adam at lr 1e-2.

    Inputs are ``(batch, steps, 1)``; the prediction is the head's raw output at the last step,
    ``(batch, 1)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, 32, batch_first=True)
        self.fc = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])  # no output activation: the seed's bug

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)
