"""Hostile and odd inputs: the run always completes; the result is an alert or one info message."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from boundguard.integrations.lightning import BoundGuard

from conftest import L, Tiny, data, loader, trainer


def run(model, dl, tmp_path, max_steps=12, precision=None, **kw):
    g = BoundGuard(alerts_path=tmp_path / "a.jsonl", strict=True, check_every_n_steps=5, on_violation="log", **kw)
    t = trainer([g], max_steps=max_steps, **({"precision": precision} if precision else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, dl)
    assert t.global_step == max_steps and not g._engine.disabled
    return g


def codes(g, severities=("warning", "error", "critical")):
    return {a.code for a in g.alerts if a.severity in severities}


class _Module(L.LightningModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _SigmoidHead(_Module):
    """Linear(8→1) + sigmoid; subclasses differ in their batches and steps."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        return torch.sigmoid(self.fc(x))


class DictBatchDictOutput(_Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        return {"logits": self.fc(x), "aux": x.sum()}

    def training_step(self, batch, i):
        return nn.functional.binary_cross_entropy_with_logits(self(batch["features"])["logits"], batch["label"])


class DictData(Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        x = torch.randn(8, generator=torch.Generator().manual_seed(i))
        return {"features": x, "label": (x[:1] > 0).float()}


def test_dict_batch_and_dict_output(tmp_path):
    g = run(DictBatchDictOutput(), DataLoader(DictData(), batch_size=16), tmp_path)
    f = g._engine.monitor.facts
    assert f.pred_where == "fc" and f.target_where == "batch['label']" and f.input_where == "batch['features']"
    assert not codes(g)


@dataclass
class ModelOutput:  # HF-style output object
    logits: torch.Tensor
    hidden: torch.Tensor


class DataclassOutput(_Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return ModelOutput(logits=self.fc(h), hidden=h)

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self(x).logits, y)


def test_dataclass_output_with_class_targets(tmp_path):
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    g = run(DataclassOutput(), DataLoader(TensorDataset(x, y), batch_size=16), tmp_path)
    assert g._engine.monitor.bounds.kind == "distribution" and not codes(g)


class Sequence(_Module):
    """(N, T, C) logits flattened for the loss: the view is traced back to the Linear's output."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 16, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self(x).reshape(-1, 5), y.reshape(-1))


def test_sequence_outputs(tmp_path):
    x, y = torch.randn(128, 10, 4), torch.randint(0, 5, (128, 10))
    g = run(Sequence(), DataLoader(TensorDataset(x, y), batch_size=16), tmp_path)
    assert g._engine.monitor.facts.pred_where == "fc" and not codes(g)


class ScalarOutput(_Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc(x).sum()

    def training_step(self, batch, i):
        x, y = batch
        return (self(x) - y.sum()) ** 2  # no torch loss function to find


def test_scalar_output_without_a_loss_function(tmp_path):
    x, y = torch.randn(128, 8), torch.rand(128, 1)
    g = run(ScalarOutput(), DataLoader(TensorDataset(x, y), batch_size=16), tmp_path)
    notes = [a for a in g.alerts if a.code == "probe_incomplete"]
    assert notes and all(a.severity == "info" for a in notes) and "loss" in notes[0].where
    assert g._engine.monitor.bounds is None, "no bounds may be inferred from a guessed target"
    assert not codes(g) & {"output_out_of_range", "missing_output_activation"}


class TokenInputs(_Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 1)

    def forward(self, ids):
        return torch.sigmoid(self.fc(self.emb(ids).mean(1)))

    def training_step(self, batch, i):
        ids, y = batch
        return nn.functional.binary_cross_entropy(self(ids), y)


def test_integer_inputs_and_functional_sigmoid(tmp_path):
    ids, y = torch.randint(0, 50, (128, 6)), (torch.rand(128, 1) > 0.5).float()
    g = run(TokenInputs(), DataLoader(TensorDataset(ids, y), batch_size=16), tmp_path)
    f = g._engine.monitor.facts
    assert f.input_integer and f.activation == "sigmoid" and not codes(g)


class BoolTargets(_Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc(x)

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x), y.float())


def test_boolean_targets(tmp_path):
    x, y = torch.randn(128, 8), torch.rand(128, 1) > 0.5
    g = run(BoolTargets(), DataLoader(TensorDataset(x, y), batch_size=16), tmp_path)
    assert g._engine.monitor.facts.target_where == "batch[1]" and not codes(g)


class TensorBatch(_SigmoidHead):
    def training_step(self, batch, i):  # the batch is one tensor, neither tuple nor dict
        return nn.functional.mse_loss(self(batch), batch[:, :1].sigmoid())


def test_batch_that_is_a_bare_tensor(tmp_path):
    g = run(TensorBatch(), DataLoader(torch.randn(128, 8), batch_size=16), tmp_path)
    assert not codes(g)


class EmptyBatches(_SigmoidHead):
    def training_step(self, batch, i):
        x, y = batch
        if i % 3 == 1:
            x, y = x[:0], y[:0]
            return self.fc.weight.sum() * 0 + nn.functional.mse_loss(self(x), y).nan_to_num(0.0)
        return nn.functional.mse_loss(self(x), y)


def test_empty_batches(tmp_path):
    x, y = torch.randn(128, 8), torch.rand(128, 1)
    g = run(EmptyBatches(), DataLoader(TensorDataset(x, y), batch_size=16), tmp_path)
    assert not codes(g, ("error", "critical"))


def test_nan_targets_are_reported(tmp_path):
    x, y = torch.randn(128, 8), torch.rand(128, 1)
    y[40] = float("nan")
    g = run(Tiny(din=8, head=nn.Sigmoid()), DataLoader(TensorDataset(x, y), batch_size=16), tmp_path)
    a = next(a for a in g.alerts if a.code == "nonfinite_input" and a.where == "batch[1]")
    assert a.severity == "critical" and a.step == 3  # batch 3 (rows 32-47): its NaN loss trips a check


def test_bf16_autocast(tmp_path):
    g = run(Tiny(head=nn.Sigmoid(), loss_fn=nn.BCELoss()), loader(*data()), tmp_path, precision="bf16-mixed")
    assert not codes(g)


def test_fp16_head_near_overflow_is_reported(tmp_path):
    """A float16 head whose pre-activations approach 65504 is an overflow risk before it is Inf."""
    from boundguard.integrations.torch import watch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1)).half()
    with torch.no_grad():
        model[0].weight.fill_(3000.0)
    with watch(model, on_violation="log", check_every_n_steps=5, alerts_path=tmp_path / "a.jsonl", strict=True) as g:
        for _ in range(5):
            x = torch.ones(4, 8, dtype=torch.float16)
            y = torch.full((4, 1), 2.0, dtype=torch.float16)
            g.step(loss=nn.functional.mse_loss(model(x).float(), y.float()), inputs=x, targets=y)
    assert g.engine.monitor.facts.pre_dtype == "float16"
    a = next(a for a in g.alerts if a.code == "preactivation_exploding")
    assert "float16" in a.message and a.value == 24000.0


class ScalesInPlace(_SigmoidHead):
    """Pixel values 0..255 in the batch; ``training_step`` scales them in place before the forward pass
    (``x /= 255``), so the model sees [0, 1]. With ``in_place=False`` the model is fed the raw values."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place

    def training_step(self, batch, i):
        x, y = batch
        if self.in_place:
            x.div_(255.0)
        return nn.functional.binary_cross_entropy(self(x), y)


def _pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (128, 8), generator=g).float()
    return DataLoader(TensorDataset(x, (x[:, :1] > 127).float()), batch_size=16)


def test_inputs_scaled_in_place_by_the_step_are_judged_as_the_model_saw_them(tmp_path):
    """The batch's tensors are read after the step's backward pass, so an in-place change made by the
    step (what the model and the loss consumed) is what is judged: no inputs_not_scaled; the raw twin
    fires it."""
    assert "inputs_not_scaled" not in codes(run(ScalesInPlace(True), _pixels(), tmp_path / "in_place"))
    assert "inputs_not_scaled" in codes(run(ScalesInPlace(False), _pixels(), tmp_path / "raw"))


class ResizesTheBatch(_SigmoidHead):
    def training_step(self, batch, i):
        self.x = batch[0]
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def on_after_backward(self):
        self.x.resize_(3)  # the batch tensor no longer has the shape it was recorded with


def test_a_batch_tensor_resized_in_place_is_dropped_not_a_failed_step(tmp_path):
    x, y = torch.randn(128, 8), torch.rand(128, 1)
    g = run(ResizesTheBatch(), DataLoader(TensorDataset(x, y), batch_size=16), tmp_path)
    snap = g._engine.session.last_snapshot
    assert snap.counts["target"] > 0 and snap.counts["input"] < snap.counts["target"] * 8
