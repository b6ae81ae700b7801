"""Slow starters (issue 24): correct PyTorch programs (the plain loop and Lightning) whose loss sits near
the constant predictor's level for the first hundred or few hundred steps and only then falls.

Each is a tiny version of a program people really train: plain SGD at a small learning rate, Adam at
1e-4, Adadelta's warm-up, a sigmoid XOR net, a deep narrow tanh net, an RNN that must find which token
matters, a sequence reversal, rare positives weighted by ``pos_weight``. Each must really start slowly
(its loss around step 100 is still ``realworld_runs.SLOW_SHARE`` or more of its initial level) and really learn (its
loss at the end is well below its start): a program that no longer does both fails with ProgramBroken.
boundguard must raise nothing of severity warning or above.

The rules of the corpus (see test_torch_corpus.py) hold: a program the library gets wrong keeps its
correct expectation and is marked ``xfail(strict=True)`` with the code it wrongly raises.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from realworld_runs import Run, batches, guard_options, judge_slow_starter, slow_then_learnt

L = pytest.importorskip("lightning.pytorch")
from boundguard.integrations.lightning import BoundGuard  # noqa: E402
from boundguard.integrations.torch import watch  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

pytestmark = [
    pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("one_thread_seeded"),  # tiny models train fastest on one thread; one seed for all
]


# ============================================================================================ harness
def sgd(lr: float, **kw) -> Callable:
    return lambda params: torch.optim.SGD(params, lr=lr, **kw)


def adam(lr: float) -> Callable:
    return lambda params: torch.optim.Adam(params, lr=lr)


def plain_loop(tmp_path, model: nn.Module, loss_fn: Callable, data, optimizer: Callable,
               guard_kw: dict | None = None, forward: Callable | None = None) -> Run:
    """The loop of the PyTorch tutorials, with ``guard.step`` after the optimiser step."""
    opt = optimizer(model.parameters())
    forward = forward or (lambda m, x: m(x))
    losses = []
    with watch(model, **guard_options(tmp_path, **(guard_kw or {}))) as guard:
        for x, y in data:
            loss = loss_fn(forward(model, x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
            losses.append(float(loss.detach()))
    return Run(guard.alerts, losses, tmp_path / "alerts.jsonl")


class Lit(L.LightningModule):
    """``net``, a loss and the optimiser the program names."""

    def __init__(self, net: nn.Module, loss_fn: Callable, optimizer: Callable):
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return self.optimizer(self.parameters())


def loader(x, y, batch_size: int = 32) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


def lightning_fit(tmp_path, model: L.LightningModule, data: DataLoader, max_steps: int,
                  guard_kw: dict | None = None) -> Run:
    guard = BoundGuard(**guard_options(tmp_path, **(guard_kw or {})))
    opts = dict(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(callbacks=[guard], **opts).fit(model, data)
    return Run(guard.alerts, list(model.losses), tmp_path / "alerts.jsonl")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(*widths: int, act: Callable[[], nn.Module] = nn.ReLU, head: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    if head is not None:
        layers.append(head)
    return nn.Sequential(*layers)


# ============================================================================================ plain loop
def s_torch_binary_sgd_small_lr(tmp_path):
    """A binary classifier (linear label on 8 features), BCEWithLogitsLoss, plain SGD at lr 1e-2."""
    g = gen(100)
    x = torch.randn(512, 8, generator=g)
    y = ((x @ torch.randn(8, generator=g)) > 0).float().unsqueeze(1)
    run = plain_loop(tmp_path, mlp(8, 16, 1), nn.BCEWithLogitsLoss(), batches(x, y, 32, 1500), sgd(1e-2))
    return slow_then_learnt(run), {"pred_where": "2", "activation": "identity",
                                   "loss": "binary_cross_entropy_with_logits"}


def s_torch_xor_sigmoid_sgd(tmp_path):
    """The textbook XOR net: 2-4-1, sigmoid units, plain SGD on the four points; it sits at log 2
    (every output 0.5) for hundreds of steps before the hidden units split the plane."""
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    model = mlp(2, 4, 1, act=nn.Sigmoid, head=nn.Sigmoid())
    run = plain_loop(tmp_path, model, nn.BCELoss(), ((x, y) for _ in range(2000)), sgd(0.5))
    return slow_then_learnt(run), {"activation": "sigmoid", "loss": "binary_cross_entropy"}


class SeqClassifier(nn.Module):
    """The PyTorch examples' MNIST RNN, shrunk: an LSTM over the rows, two dense layers on its last
    state, log_softmax and nll_loss."""

    def __init__(self, features: int, classes: int, hidden: int = 16):
        super().__init__()
        self.rnn = nn.LSTM(features, hidden, batch_first=True)
        self.fc1 = nn.Linear(hidden, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return F.log_softmax(self.fc2(F.relu(self.fc1(out[:, -1]))), dim=1)


def s_torch_lstm_adadelta(tmp_path):
    """Adadelta (lr 0.1, as the example runs it) starts with tiny steps: its accumulated update is zero.
    The task: which of 3 channels of a noisy 12-step sequence carries the pulse."""
    g = gen(101)
    n, t, k = 512, 12, 3
    y = torch.randint(0, k, (n,), generator=g)
    x = 0.5 * torch.randn(n, t, k, generator=g)
    x[torch.arange(n), :, y] += 0.5
    run = plain_loop(tmp_path, SeqClassifier(k, k), F.nll_loss, batches(x, y, 32, 800),
                     lambda p: torch.optim.Adadelta(p, lr=0.1))
    return slow_then_learnt(run), {"pred_where": "model", "pre_where": "fc2", "activation": "log_softmax",
                                   "loss": "nll_loss"}


class Seq2Seq(nn.Module):
    """A GRU encoder-decoder with teacher forcing: the decoder reads BOS then the target shifted right."""

    def __init__(self, vocab: int, hidden: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab + 1, 16)  # the last id is BOS
        self.enc = nn.GRU(16, hidden, batch_first=True)
        self.dec = nn.GRU(16, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, src, dec_in):
        _, h = self.enc(self.emb(src))
        out, _ = self.dec(self.emb(dec_in), h)
        return self.out(out)


def s_torch_seq2seq_reversal(tmp_path):
    """Reverse a sequence of 6 tokens out of 10: the loss sits at log 10 until the encoder learns to
    carry the tokens to the decoder. The loop flattens the logits and targets, as the tutorials do."""
    g = gen(102)
    vocab = 10
    src = torch.randint(0, vocab, (1024, 6), generator=g)
    tgt = src.flip(1)
    dec_in = torch.cat([torch.full_like(tgt[:, :1], vocab), tgt[:, :-1]], dim=1)  # BOS, then teacher forcing
    data = ((xb, yb.flatten()) for xb, yb in batches(torch.stack([src, dec_in], 1), tgt, 32, 1000))
    run = plain_loop(tmp_path, Seq2Seq(vocab), nn.CrossEntropyLoss(), data, adam(1e-3),
                     forward=lambda m, x: m(x[:, 0], x[:, 1]).flatten(0, 1))
    return slow_then_learnt(run), {"pred_where": "out", "activation": "identity", "loss": "cross_entropy"}


def s_torch_regression_sgd_small_lr(tmp_path):
    """House prices in units of 100k (mean 3, spread 1: unscaled but reasonable), a small MLP, MSE and
    plain SGD at lr 3e-4."""
    g = gen(103)
    x = torch.randn(512, 8, generator=g)
    y = 3.0 + x @ (torch.randn(8, 1, generator=g) / math.sqrt(8)) + 0.1 * torch.randn(512, 1, generator=g)
    run = plain_loop(tmp_path, mlp(8, 16, 1), nn.MSELoss(), batches(x, y, 32, 1500), sgd(3e-4))
    return slow_then_learnt(run), {"pred_where": "2", "activation": "identity", "loss": "mse_loss",
                                   "family": "regression"}


def s_torch_deep_narrow_tanh(tmp_path):
    """Eight tanh layers of width 8 with PyTorch's default initialisation: the signal shrinks layer after
    layer, and the first hundreds of SGD steps barely move the loss."""
    g = gen(104)
    means = 2.0 * torch.randn(3, 8, generator=g)
    y = torch.randint(0, 3, (512,), generator=g)
    x = means[y] + torch.randn(512, 8, generator=g)
    x = x / x.std()
    model = mlp(8, *[8] * 8, 3, act=nn.Tanh)
    run = plain_loop(tmp_path, model, nn.CrossEntropyLoss(), batches(x, y, 32, 1200), sgd(5e-2))
    return slow_then_learnt(run), {"activation": "identity", "loss": "cross_entropy", "target_integer": True}


# ============================================================================================ Lightning
def s_lightning_cross_entropy_adam_1e4(tmp_path):
    """A multi-class MLP, CrossEntropyLoss, Adam at lr 1e-4: every weight moves 1e-4 a step."""
    g = gen(105)
    means = 2.0 * torch.randn(5, 8, generator=g)
    y = torch.randint(0, 5, (1024,), generator=g)
    x = means[y] + torch.randn(1024, 8, generator=g)
    model = Lit(mlp(8, 32, 5), nn.CrossEntropyLoss(), adam(1e-4))
    run = lightning_fit(tmp_path, model, loader(x / x.std(), y), 1200)
    return slow_then_learnt(run), {"pred_where": "net.2", "activation": "identity", "loss": "cross_entropy",
                                   "target_integer": True}


class BagClassifier(nn.Module):
    """The text classification tutorial's model: EmbeddingBag (mean of the word vectors) and a linear
    layer, initialised as the tutorial does."""

    def __init__(self, vocab: int, dim: int, classes: int):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.fc = nn.Linear(dim, classes)
        self.embedding.weight.data.uniform_(-0.5, 0.5)
        self.fc.weight.data.uniform_(-0.5, 0.5)
        self.fc.bias.data.zero_()

    def forward(self, tokens):
        return self.fc(self.embedding(tokens))


def s_lightning_embeddingbag_text(tmp_path):
    """Documents of 24 words out of 200; a positive document holds some of 10 positive words, a negative
    one some of 10 negative words; the mean of the word vectors dilutes them, and it sits at chance
    for a while."""
    g = gen(106)
    n, length = 1024, 24
    y = torch.randint(0, 2, (n,), generator=g)
    docs = torch.randint(20, 200, (n, length), generator=g)
    cue = torch.randint(0, 10, (n, 3), generator=g) + 10 * (1 - y).unsqueeze(1)  # 0..9 positive, 10..19 negative
    docs[:, :3] = cue
    model = Lit(BagClassifier(200, 16, 2), nn.CrossEntropyLoss(), sgd(0.5))
    run = lightning_fit(tmp_path, model, loader(docs, y, 16), 800)
    return slow_then_learnt(run), {"pred_where": "net.fc", "activation": "identity", "loss": "cross_entropy"}


def s_lightning_autoencoder(tmp_path):
    """A tanh autoencoder 16-8-3-8-16 on data of rank 3, MSE and plain SGD: the reconstruction stays at
    the data's variance until the bottleneck finds the subspace."""
    g = gen(107)
    x = torch.randn(1024, 3, generator=g) @ torch.randn(3, 16, generator=g) / math.sqrt(3)
    x = x + 0.05 * torch.randn(1024, 16, generator=g)
    model = Lit(mlp(16, 8, 3, 8, 16, act=nn.Tanh), nn.MSELoss(), sgd(2e-2))
    run = lightning_fit(tmp_path, model, loader(x, x), 1200)
    return slow_then_learnt(run), {"pred_where": "net.6", "activation": "identity", "loss": "mse_loss"}


class TinySeg(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        return self.out(self.body(x))


def s_lightning_segmentation_pos_weight(tmp_path):
    """Per-pixel BCEWithLogitsLoss(pos_weight=20) on rare positives: one 2x2 spot per 12x12 image
    (2.8% of the pixels), plain SGD."""
    g = gen(108)
    n, size = 256, 12
    x = 0.3 * torch.rand(n, 1, size, size, generator=g)
    mask = torch.zeros(n, 1, size, size)
    r, c = torch.randint(0, size - 2, (2, n), generator=g)
    for i in range(n):
        mask[i, 0, r[i]:r[i] + 2, c[i]:c[i] + 2] = 1.0
    x = x + 0.5 * mask
    crit = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(20.0))
    model = Lit(TinySeg(), crit, sgd(2e-2))
    run = lightning_fit(tmp_path, model, loader(x, mask, 16), 600)
    return slow_then_learnt(run), {"pred_where": "net.out", "activation": "identity",
                                   "loss": "binary_cross_entropy_with_logits"}


# ============================================================================================ registry
SLOW_STARTERS = [
    pytest.param(s_torch_binary_sgd_small_lr, id="torch-binary-sgd-lr1e-2-bce-with-logits"),
    pytest.param(s_torch_xor_sigmoid_sgd, id="torch-xor-sigmoid-mlp-sgd"),
    pytest.param(s_torch_lstm_adadelta, id="torch-lstm-adadelta-sequence-classifier"),
    pytest.param(s_torch_seq2seq_reversal, id="torch-gru-seq2seq-reversal"),
    pytest.param(s_torch_regression_sgd_small_lr, id="torch-regression-sgd-lr3e-4-unscaled-targets"),
    pytest.param(s_torch_deep_narrow_tanh, id="torch-deep-narrow-tanh-mlp"),
    pytest.param(s_lightning_cross_entropy_adam_1e4, id="lightning-mlp-cross-entropy-adam-lr1e-4"),
    pytest.param(s_lightning_embeddingbag_text, id="lightning-embeddingbag-text-classifier"),
    pytest.param(s_lightning_autoencoder, id="lightning-tanh-autoencoder-sgd"),
    pytest.param(s_lightning_segmentation_pos_weight, id="lightning-segmentation-pos-weight-rare-positives"),
]


@pytest.mark.parametrize("program", SLOW_STARTERS)
def test_slow_starter(tmp_path, program):
    run, facts = program(tmp_path)
    judge_slow_starter(run, facts)
