"""What a user sees in a terminal: a Lightning run with its tqdm progress bar, an alert, the end-of-run table.

(Lightning's Rich bar redirects stderr above itself when it draws live; off a terminal it draws once at the end.)"""
from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import TQDMProgressBar
    from boundguard.integrations.lightning import BoundGuard

    class Reg(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1)
            nn.init.constant_(self.fc.bias, -3.0)
        def forward(self, x):
            return self.fc(x)
        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    x = torch.randn(256, 4) * 0.1
    y = torch.rand(256, 1)
    L.Trainer(max_steps=16, callbacks=[BoundGuard(bounds=(0, 1), check_every_n_steps=4),
                                            TQDMProgressBar()], logger=False,
              enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=True,
              accelerator="cpu").fit(Reg(), DataLoader(TensorDataset(x, y), batch_size=16))
""")


def test_alerts_never_land_on_the_progress_bar_line(tmp_path):
    # the bar (stdout) and the warnings (stderr) share one stream, as they share a terminal
    out = subprocess.run([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=300, cwd=tmp_path).stdout
    assert "Epoch 0" in out, out[-2000:]
    starts = [i for i in range(len(out)) if out.startswith("BoundGuardWarning", i)]
    assert starts, out[-2000:]
    for i in starts:
        line_start = max(out.rfind("\n", 0, i), out.rfind("\r", 0, i)) + 1
        head = out[line_start:i]
        assert "Epoch" not in head and "it/s" not in head, repr(out[line_start - 80:i + 40])
    table = out.index("boundguard: ")
    assert out[table - 1] in "\r\n", repr(out[table - 80:table + 40])
    assert "output_out_of_range" in out[table:]
