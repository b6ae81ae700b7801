"""A corpus of real (tiny) PyTorch training programs under boundguard: Lightning, the plain loop and the
Hugging Face Trainer.

HEALTHY programs are correct programs people train; each really learns on small synthetic data, and
boundguard must raise nothing of severity warning or above, and infer the right facts (the watched
output, its activation, the loss). FAULTY programs reproduce real bug reports (Stack Overflow
questions, published fault benchmarks); boundguard must raise the root-cause code.

A program the library gets wrong stays in the corpus with its correct expectation, marked
``xfail(strict=True)`` with the code it wrongly raises / misses: the suite stays green and the defect
stays visible (and the mark fails once the library is fixed, so it gets removed).
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

from realworld_runs import Run, batches, check_facts, guard_options, program_is_valid

L = pytest.importorskip("lightning.pytorch")
from boundguard.integrations.lightning import BoundGuard  # noqa: E402
from boundguard.integrations.torch import watch  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

pytestmark = [
    pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("one_thread_seeded"),  # tiny models train fastest on one thread; one seed for all
]


# ============================================================================================ harness
class Lit(L.LightningModule):
    """The LightningModule most tutorials write: ``net``, a loss, Adam (or SGD)."""

    def __init__(self, net: nn.Module, loss_fn: Callable, lr: float = 1e-2, sgd: bool = False):
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.lr = lr
        self.sgd = sgd
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD if self.sgd else torch.optim.Adam
        return opt(self.parameters(), lr=self.lr)


def loader(x, y, batch_size: int = 32) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def trainer(guard, max_steps: int, **kw) -> "L.Trainer":
    opts = dict(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, deterministic=False)
    opts.update(kw)
    return L.Trainer(callbacks=[guard], **opts)


def lightning_fit(tmp_path, model: L.LightningModule, data: DataLoader, max_steps: int = 40,
                  guard_kw: dict | None = None, **trainer_kw) -> Run:
    guard = BoundGuard(**guard_options(tmp_path, **(guard_kw or {})))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(guard, max_steps, **trainer_kw).fit(model, data)
    return Run(guard.alerts, list(getattr(model, "losses", [])), tmp_path / "alerts.jsonl")


def plain_loop(tmp_path, model: nn.Module, loss_fn: Callable, data, lr: float = 1e-2, sgd: bool = False,
               guard_kw: dict | None = None, forward: Callable | None = None, autocast: bool = False) -> Run:
    """The loop of the PyTorch tutorials, with ``guard.step`` after the optimiser step."""
    opt = (torch.optim.SGD if sgd else torch.optim.Adam)(model.parameters(), lr=lr)
    forward = forward or (lambda m, x: m(x))
    losses = []
    with watch(model, **guard_options(tmp_path, **(guard_kw or {}))) as guard:
        for x, y in data:
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_fn(forward(model, x), y)
            else:
                loss = loss_fn(forward(model, x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
            losses.append(float(loss.detach()))
    return Run(guard.alerts, losses, tmp_path / "alerts.jsonl")


def mlp(din: int, dout: int, hidden: int = 32, act: nn.Module | None = None, head: nn.Module | None = None):
    layers = [nn.Linear(din, hidden), act or nn.ReLU(), nn.Linear(hidden, dout)]
    if head is not None:
        layers.append(head)
    return nn.Sequential(*layers)


# ============================================================================================ data
def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def binary_data(n: int = 512, d: int = 8, seed: int = 0):
    g = gen(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    y = ((x @ w) > 0).float().unsqueeze(1)
    return x, y


def class_data(n: int = 512, d: int = 8, k: int = 4, seed: int = 0, sep: float = 2.0):
    g = gen(seed)
    means = sep * torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = means[y] + torch.randn(n, d, generator=g)
    return x / x.std(), y


def regression_data(n: int = 512, d: int = 8, seed: int = 0, noise: float = 0.0, scale: float = 1.0):
    g = gen(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g) / math.sqrt(d)
    y = scale * (x @ w + 0.5) + noise * torch.randn(n, 1, generator=g)
    return x, y


def images_8x8(n: int = 384, seed: int = 0, raw: bool = False):
    """Three kinds of 8x8 grey images: a horizontal bar, a vertical bar, a diagonal; plus noise.
    ``raw``: pixels as uint8-range floats 0..255 (as read from a PNG), else in [0, 1]."""
    g = gen(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    img = 0.1 * torch.rand(n, 1, 8, 8, generator=g)
    pos = torch.randint(1, 7, (n,), generator=g)
    for i in range(n):
        p = int(pos[i])
        if y[i] == 0:
            img[i, 0, p, :] = 0.9
        elif y[i] == 1:
            img[i, 0, :, p] = 0.9
        else:
            img[i, 0] += 0.8 * torch.eye(8)
    img = img.clamp(0, 1)
    return (img * 255).round() if raw else img, y


# ============================================================================================ programs
class SmallCNN(nn.Module):
    """A hand-written CNN for 8x8 images (the tutorial's LeNet, shrunk)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class TinyUNet(nn.Module):
    """Encoder, bottleneck, decoder with a skip connection; a sigmoid per pixel."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        e = self.enc(x)
        m = self.mid(F.max_pool2d(e, 2))
        d = self.dec(torch.cat([self.up(m), e], dim=1))
        return torch.sigmoid(self.out(d))


def seg_data(n: int = 256, size: int = 16, seed: int = 0):
    """Bright squares on a noisy background; the mask is the square."""
    g = gen(seed)
    x = 0.3 * torch.rand(n, 1, size, size, generator=g)
    mask = torch.zeros(n, 1, size, size)
    for i in range(n):
        r, c = torch.randint(0, size - 6, (2,), generator=g).tolist()
        s = int(torch.randint(3, 7, (1,), generator=g))
        mask[i, 0, r:r + s, c:c + s] = 1.0
    x = x + 0.6 * mask
    return x, mask


def h_lightning_bce_with_logits(tmp_path):
    x, y = binary_data()
    model = Lit(mlp(8, 1), nn.BCEWithLogitsLoss())
    run = lightning_fit(tmp_path, model, loader(x, y), max_steps=40)
    return run, {"pred_where": "net.2", "activation": "identity", "loss": "binary_cross_entropy_with_logits",
                 "family": "logits"}


def h_lightning_cross_entropy(tmp_path):
    x, y = class_data()
    model = Lit(mlp(8, 4), nn.CrossEntropyLoss())
    run = lightning_fit(tmp_path, model, loader(x, y), max_steps=40)
    return run, {"pred_where": "net.2", "activation": "identity", "loss": "cross_entropy", "family": "logits",
                 "target_integer": True}


def h_lightning_cnn_8x8(tmp_path):
    x, y = images_8x8()
    model = Lit(SmallCNN(), nn.CrossEntropyLoss())
    run = lightning_fit(tmp_path, model, loader(x, y), max_steps=40)
    return run, {"pred_where": "net.fc", "activation": "identity", "loss": "cross_entropy"}


def h_lightning_unet_segmentation(tmp_path):
    x, y = seg_data()
    model = Lit(TinyUNet(), nn.BCELoss())
    run = lightning_fit(tmp_path, model, loader(x, y, 16), max_steps=40)
    return run, {"pred_where": "net", "pre_where": "net.out", "activation": "sigmoid", "loss": "binary_cross_entropy",
                 "family": "probability"}


def h_lightning_tanh_head(tmp_path):
    """A steering angle / normalised signal in [-1, 1]: tanh head, MSE."""
    g = gen(1)
    x = torch.randn(512, 8, generator=g)
    y = 0.9 * torch.tanh(x[:, :3].sum(1, keepdim=True))
    model = Lit(mlp(8, 1, act=nn.Tanh(), head=nn.Tanh()), nn.MSELoss())
    run = lightning_fit(tmp_path, model, loader(x, y), max_steps=50)
    return run, {"pred_where": "net.3", "activation": "tanh", "loss": "mse_loss", "family": "regression"}


def h_lightning_poisson(tmp_path):
    """Count regression: the net predicts the log-rate, PoissonNLLLoss(log_input=True). The loss
    (exp(z) - y z, without the Stirling term) starts near 1 and ends below zero."""
    g = gen(2)
    x = torch.randn(512, 8, generator=g)
    rate = torch.exp(1.5 + 0.4 * x[:, :2].sum(1, keepdim=True))
    y = torch.poisson(rate, generator=g)
    model = Lit(mlp(8, 1), nn.PoissonNLLLoss(log_input=True))
    run = lightning_fit(tmp_path, model, loader(x, y), max_steps=60)
    run.extra["crossed_zero"] = run.losses[0] > 0 > max(run.losses[-5:])
    return run, {"pred_where": "net.2", "activation": "identity", "loss": "poisson_nll_loss"}


class Distill(L.LightningModule):
    """Knowledge distillation (Hinton et al.): a frozen teacher, a smaller student, the KL between
    the softened distributions (times T^2) plus the hard-label cross-entropy."""

    def __init__(self, teacher: nn.Module, T: float = 2.0, alpha: float = 0.7):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = mlp(8, 4, hidden=16)
        self.T, self.alpha = T, alpha
        self.losses: list[float] = []

    def forward(self, x):
        return self.student(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self(x)
        kd = F.kl_div(F.log_softmax(s_logits / self.T, dim=1), F.softmax(t_logits / self.T, dim=1),
                      reduction="batchmean") * self.T ** 2
        loss = self.alpha * kd + (1 - self.alpha) * F.cross_entropy(s_logits, y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.student.parameters(), lr=1e-2)


def h_lightning_distillation(tmp_path):
    x, y = class_data(seed=3)
    teacher = mlp(8, 4, hidden=64)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(60):  # the teacher was trained before (unmonitored)
        loss = F.cross_entropy(teacher(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    model = Distill(teacher)
    run = lightning_fit(tmp_path, model, loader(x, y), max_steps=40)
    return run, {"pred_where": "student.2", "activation": "log_softmax", "loss": "kl_div", "family": "log_probs"}


class GAN(L.LightningModule):
    """The Lightning docs' GAN with manual optimisation: two optimisers, manual_backward, on 2-D points."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
        self.losses: list[float] = []
        self.fake_means: list[torch.Tensor] = []

    def forward(self, z):
        return self.generator(z)

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 4)
        # discriminator
        fake = self(z)
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_loss = 0.5 * (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                        + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        # generator
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.losses.append(float(g_loss.detach()))
        self.fake_means.append(fake.detach().mean(0))

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=5e-3, betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator.parameters(), lr=5e-3, betas=(0.5, 0.999)))


def fit_gan(tmp_path, model: GAN) -> Run:
    """60 steps on 2-D points around (2, -1); it learnt when the generator's mean came half the way there."""
    g = gen(4)
    real = torch.tensor([2.0, -1.0]) + 0.3 * torch.randn(1024, 2, generator=g)
    guard = BoundGuard(**guard_options(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(guard, 60).fit(model, DataLoader(TensorDataset(real), batch_size=32, shuffle=True))
    run = Run(guard.alerts, model.losses, tmp_path / "alerts.jsonl")
    target = torch.tensor([2.0, -1.0])
    start = float((model.fake_means[0] - target).norm())
    end = float((torch.stack(model.fake_means[-5:]).mean(0) - target).norm())
    run.extra["learnt"] = end < 0.5 * start
    return run


def h_lightning_gan_manual_optimisation(tmp_path):
    run = fit_gan(tmp_path, GAN())
    # the loss of each step is the discriminator's logits through BCE-with-logits
    return run, {"pred_where": "discriminator.2", "activation": "identity", "loss": "binary_cross_entropy_with_logits"}


class SigmoidGAN(GAN):
    """The Lightning docs' GAN as written there: a sigmoid on the discriminator and
    ``F.binary_cross_entropy`` (the generator's step first, on all-ones labels)."""

    def __init__(self):
        super().__init__()
        self.discriminator = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1), nn.Sigmoid())

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        fake = self(torch.randn(real.shape[0], 4))
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        g_loss = F.binary_cross_entropy(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        d_loss = 0.5 * (F.binary_cross_entropy(self.discriminator(real), ones)
                        + F.binary_cross_entropy(self.discriminator(fake.detach()), zeros))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.losses.append(float(g_loss.detach()))
        self.fake_means.append(fake.detach().mean(0))


def h_lightning_gan_sigmoid_discriminator(tmp_path):
    run = fit_gan(tmp_path, SigmoidGAN())
    return run, {"pred_where": "discriminator.3", "activation": "sigmoid", "loss": "binary_cross_entropy"}


def h_lightning_bf16_mixed(tmp_path):
    x, y = class_data(seed=5)
    model = Lit(mlp(8, 4), nn.CrossEntropyLoss())
    run = lightning_fit(tmp_path, model, loader(x, y), max_steps=40, precision="bf16-mixed")
    return run, {"pred_where": "net.2", "activation": "identity", "loss": "cross_entropy", "pre_dtype": "bfloat16"}


def h_lightning_batch_size_1(tmp_path):
    """Online learning, one example per step (SGD): the loss of single examples jumps about."""
    x, y = regression_data(n=128, seed=6, noise=0.05)
    model = Lit(mlp(8, 1, hidden=16), nn.MSELoss(), lr=2e-2, sgd=True)
    run = lightning_fit(tmp_path, model, loader(x, y, batch_size=1), max_steps=80,
                        guard_kw={"check_every_n_steps": 10})
    return run, {"pred_where": "net.2", "activation": "identity", "loss": "mse_loss"}


def h_torch_sigmoid_bce(tmp_path):
    x, y = binary_data(seed=7)
    model = mlp(8, 1, head=nn.Sigmoid())
    run = plain_loop(tmp_path, model, nn.BCELoss(), batches(x, y, 32, 40))
    return run, {"pred_where": "3", "activation": "sigmoid", "loss": "binary_cross_entropy",
                 "family": "probability"}


def h_torch_mse_converges_to_zero(tmp_path):
    """Noise-free linear target: the loss goes to ~1e-5 and wobbles there."""
    x, y = regression_data(seed=8, scale=3.0)
    model = nn.Linear(8, 1)
    run = plain_loop(tmp_path, model, nn.MSELoss(), batches(x, y, 32, 80), lr=5e-2)
    run.extra["near_zero"] = max(run.losses[-5:]) < 1e-2 * run.losses[0]
    return run, {"pred_where": "model", "activation": "identity", "loss": "mse_loss", "family": "regression"}


def h_torch_noisy_regression(tmp_path):
    """Signal-to-noise 1: mini-batch losses scatter widely around a floor of ~1."""
    x, y = regression_data(seed=9, noise=1.0, scale=2.0)
    model = mlp(8, 1, hidden=16)
    run = plain_loop(tmp_path, model, nn.MSELoss(), batches(x, y, 16, 80), lr=1e-2)
    return run, {"pred_where": "2", "activation": "identity", "loss": "mse_loss"}


class VAE(nn.Module):
    def __init__(self, d: int = 16, z: int = 2):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d, 32), nn.ReLU())
        self.mu, self.logvar = nn.Linear(32, z), nn.Linear(32, z)
        self.dec = nn.Sequential(nn.Linear(z, 32), nn.ReLU(), nn.Linear(32, d), nn.Sigmoid())

    def forward(self, x):
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec(z), mu, logvar


def vae_loss(out, x):
    recon, mu, logvar = out
    bce = F.binary_cross_entropy(recon, x, reduction="sum") / x.shape[0]
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    return bce + kld


def h_torch_vae(tmp_path):
    """The PyTorch examples' VAE on 16-pixel binary patterns (two prototypes with flipped bits)."""
    g = gen(10)
    protos = (torch.rand(4, 16, generator=g) > 0.5).float()
    idx = torch.randint(0, 4, (512,), generator=g)
    flip = (torch.rand(512, 16, generator=g) < 0.05).float()
    x = (protos[idx] - flip).abs()
    model = VAE()
    run = plain_loop(tmp_path, model, vae_loss, batches(x, x, 32, 60), lr=1e-2)
    return run, {"pred_where": "dec.3", "activation": "sigmoid", "loss": "binary_cross_entropy",
                 "target_where": "targets"}


def h_torch_contrastive_infonce(tmp_path):
    """SimCLR-style InfoNCE: two noisy views, cosine similarity logits / temperature, CE on arange."""
    x, _ = class_data(seed=11, d=16)
    enc = mlp(16, 8, hidden=32)

    def data():
        g = gen(12)
        for xb, _ in batches(x, x, 32, 50):
            v1 = xb + 0.3 * torch.randn(xb.shape, generator=g)
            v2 = xb + 0.3 * torch.randn(xb.shape, generator=g)
            yield torch.stack([v1, v2]), torch.arange(xb.shape[0])

    def forward(m, views):
        z1, z2 = F.normalize(m(views[0]), dim=1), F.normalize(m(views[1]), dim=1)
        return z1 @ z2.T / 0.1

    run = plain_loop(tmp_path, enc, nn.CrossEntropyLoss(), data(), lr=1e-2, forward=forward)
    return run, {"loss": "cross_entropy", "family": "logits"}


class MeanVar(nn.Module):
    """Heteroscedastic regression: the head returns a mean and a (softplus) variance."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 32), nn.Tanh())
        self.mean = nn.Linear(32, 1)
        self.var = nn.Linear(32, 1)

    def forward(self, x):
        h = self.body(x)
        return self.mean(h), F.softplus(self.var(h)) + 1e-6


def h_torch_gaussian_nll(tmp_path):
    g = gen(13)
    x = torch.randn(512, 4, generator=g)
    y = torch.sin(x[:, :1]) + (0.05 + 0.3 * x[:, 1:2].abs()) * torch.randn(512, 1, generator=g)
    crit = nn.GaussianNLLLoss()
    run = plain_loop(tmp_path, MeanVar(), lambda out, t: crit(out[0], t, out[1]), batches(x, y, 32, 60), lr=1e-2)
    run.extra["crossed_zero"] = run.losses[0] > 0 > max(run.losses[-5:])
    return run, {"pred_where": "mean", "loss": "gaussian_nll_loss"}


QUANTILES = torch.tensor([0.1, 0.5, 0.9])


def pinball(pred, y):
    diff = y - pred  # (B, 3) against (B, 1)
    return torch.maximum(QUANTILES * diff, (QUANTILES - 1) * diff).mean()


def h_torch_quantile_pinball(tmp_path):
    x, y = regression_data(seed=14, noise=0.5, scale=2.0)
    run = plain_loop(tmp_path, mlp(8, 3), pinball, batches(x, y, 32, 60), lr=1e-2)
    return run, {"pred_where": "2", "activation": "identity"}  # a hand-written loss: not identified (info)


def h_torch_bf16_autocast(tmp_path):
    x, y = class_data(seed=15)
    run = plain_loop(tmp_path, mlp(8, 4), nn.CrossEntropyLoss(), batches(x, y, 32, 40), autocast=True)
    return run, {"pred_where": "2", "activation": "identity", "loss": "cross_entropy", "pre_dtype": "bfloat16"}


def bag_of_words(n: int = 512, vocab: int = 40, seed: int = 16):
    """Word counts of long documents (CountVectorizer output): two topics with different word rates."""
    g = gen(seed)
    y = torch.randint(0, 2, (n, 1), generator=g).float()
    base = 10 + 20 * torch.rand(vocab, generator=g)
    topic = torch.zeros(vocab)
    topic[:8] = 6.0
    rates = base + torch.where(y > 0, topic, -topic)
    return torch.poisson(rates, generator=g), y


def h_torch_bag_of_words_logreg(tmp_path):
    x, y = bag_of_words()
    model = nn.Linear(40, 1)
    nn.init.zeros_(model.weight)  # logistic regression starts at w = 0 (loss log 2), as sklearn's does
    nn.init.zeros_(model.bias)
    run = plain_loop(tmp_path, model, nn.BCEWithLogitsLoss(), batches(x, y, 32, 60), lr=1e-3)
    run.extra["input_rms"] = float(x.pow(2).mean().sqrt())
    return run, {"pred_where": "model", "activation": "identity", "loss": "binary_cross_entropy_with_logits"}


# --------------------------------------------------------------------------- Hugging Face (tiny, from configs)
def _tokens(n: int, seq: int, vocab: int, seed: int):
    g = gen(seed)
    return torch.randint(2, vocab, (n, seq), generator=g)


def h_hf_bert_trainer(tmp_path):
    """BertForSequenceClassification built from a config, fine-tuned with transformers.Trainer: the label
    is whether the first token is in the first half of the vocabulary."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from boundguard.integrations.transformers import BoundGuardCallback

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    ids = _tokens(256, 10, 50, 17)
    labels = (ids[:, 0] < 26).long()  # the first token (the one the pooler reads) decides

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels[i]}

    cb = BoundGuardCallback(**guard_options(tmp_path))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=50, per_device_train_batch_size=16,
                                          learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, logging_steps=1, seed=0, dataloader_num_workers=0)
    t = transformers.Trainer(model=model, args=args, train_dataset=DS(), callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    return Run(cb.alerts, losses, tmp_path / "alerts.jsonl"), {
        "pred_where": "classifier", "activation": "identity", "loss": "cross_entropy"}


def h_hf_gpt2_plain_loop(tmp_path):
    """A tiny GPT2LMHeadModel from a config, trained as a causal LM in a plain loop (outputs.loss)."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                                                                 n_positions=32))
    g = gen(20)
    start = torch.randint(0, 50, (512, 1), generator=g)
    step = torch.randint(1, 4, (512, 1), generator=g)
    ids = (start + step * torch.arange(12)) % 50  # arithmetic sequences: learnable next tokens
    run = plain_loop(tmp_path, model, lambda out, y: out.loss, batches(ids, ids, 16, 50), lr=1e-2,
                     forward=lambda m, x: m(input_ids=x, labels=x))
    return run, {"pred_where": "lm_head", "activation": "identity", "loss": "cross_entropy"}


# ============================================================================================ faulty programs
def f_lightning_softmax_into_cross_entropy(tmp_path):
    """SO classic: nn.Softmax as the last layer, then nn.CrossEntropyLoss (which applies log_softmax)."""
    x, y = class_data(seed=21)
    return lightning_fit(tmp_path, Lit(mlp(8, 4, head=nn.Softmax(dim=1)), nn.CrossEntropyLoss()), loader(x, y), 30)


def f_torch_sigmoid_into_bce_with_logits(tmp_path):
    x, y = binary_data(seed=22)
    return plain_loop(tmp_path, mlp(8, 1, head=nn.Sigmoid()), nn.BCEWithLogitsLoss(), batches(x, y, 32, 30))


def f_lightning_missing_sigmoid_mse(tmp_path):
    """A probability target in [0, 1] (click-through rate), a linear head, MSE: nothing bounds the output."""
    g = gen(23)
    x = torch.randn(512, 8, generator=g)
    y = torch.sigmoid(2 * x[:, :2].sum(1, keepdim=True))
    return lightning_fit(tmp_path, Lit(mlp(8, 1), nn.MSELoss()), loader(x, y), 30)


def f_torch_unscaled_images_0_255(tmp_path):
    """Pixels straight from the PNG (0..255), no ToTensor()/255: the CNN sees huge inputs."""
    x, y = images_8x8(seed=24, raw=True)
    return plain_loop(tmp_path, SmallCNN(), nn.CrossEntropyLoss(), batches(x, y, 32, 30), lr=1e-3)


def f_lightning_relu_on_logits(tmp_path):
    """The head ends with nn.ReLU() before BCEWithLogitsLoss: the logits are never negative, so the
    predicted probability sigmoid(relu(z)) is never below 0.5 — class 0 can never be predicted."""
    x, y = binary_data(seed=25)
    return lightning_fit(tmp_path, Lit(mlp(8, 1, head=nn.ReLU()), nn.BCEWithLogitsLoss()), loader(x, y), 30)


def f_torch_learning_rate_too_large(tmp_path):
    """SGD with lr=1.1 on a linear regression: past the stability limit (lr < 1 for unit-variance
    inputs) every step overshoots by 20%, and the loss grows geometrically (huge, still finite)."""
    x, y = regression_data(seed=26, scale=2.0)
    run = plain_loop(tmp_path, nn.Linear(8, 1), nn.MSELoss(), batches(x, y, 32, 50), lr=1.1, sgd=True)
    run.extra["diverged"] = math.isfinite(run.losses[-1]) and run.losses[-1] > 1e3 * min(run.losses)
    return run


def f_lightning_nan_in_inputs(tmp_path):
    """A CSV with missing values read into a tensor: 2% of the features are NaN."""
    x, y = binary_data(seed=27)
    holes = torch.rand(x.shape, generator=gen(28)) < 0.02
    x = x.masked_fill(holes, float("nan"))
    return lightning_fit(tmp_path, Lit(mlp(8, 1), nn.BCEWithLogitsLoss()), loader(x, y), 20)


def f_torch_predicts_the_mean_forever(tmp_path):
    """SO classic: output (B, 1) against targets (B,) — MSELoss broadcasts to (B, B), and the model can
    only learn the targets' mean: the loss is stuck at their variance (~4.2 here) however long it trains."""
    x, y = regression_data(seed=29, scale=2.0)
    y = y.squeeze(1) * 1.0
    crit = nn.MSELoss()
    run = plain_loop(tmp_path, mlp(8, 1), crit, batches(x, y, 32, 1100), lr=1e-2,
                     guard_kw={"thresholds": {"loss_plateau": {"patience": 30}}})
    run.extra["stuck_at_variance"] = sum(run.losses[-20:]) / 20 > 0.8 * float(y.var())
    return run


def f_lightning_labels_1_to_k(tmp_path):
    """Labels 1..4 from a CSV for 4 classes: CrossEntropyLoss raises 'IndexError: Target 4 is out of
    bounds' at the first batch holding a 4; the alerts file should say why."""
    x, y = class_data(seed=30)
    model = Lit(mlp(8, 4), nn.CrossEntropyLoss())
    guard = BoundGuard(**guard_options(tmp_path))
    with warnings.catch_warnings(), pytest.raises((IndexError, RuntimeError)):
        warnings.simplefilter("ignore")
        trainer(guard, 20).fit(model, loader(x, y + 1))
    return Run(guard.alerts, model.losses, tmp_path / "alerts.jsonl")


def f_torch_sigmoid_head_percent_targets(tmp_path):
    """A sigmoid output trained on a percentage 0..100 (not divided by 100)."""
    g = gen(31)
    x = torch.randn(512, 8, generator=g)
    y = 100 * torch.sigmoid(x[:, :2].sum(1, keepdim=True))
    return plain_loop(tmp_path, mlp(8, 1, head=nn.Sigmoid()), nn.MSELoss(), batches(x, y, 32, 20))


def f_torch_sigmoid_bce_onehot_10_classes(tmp_path):
    """One-hot targets over 10 mutually exclusive classes, a sigmoid per class and BCELoss: the rows are
    not a distribution, and the 'accuracy' of the per-unit loss is 90% for a model that predicts nothing."""
    g = gen(32)
    means = 2 * torch.randn(10, 8, generator=g)
    labels = torch.randint(0, 10, (512,), generator=g)
    x = means[labels] + torch.randn(512, 8, generator=g)
    y = F.one_hot(labels, 10).float()
    return plain_loop(tmp_path, mlp(8, 10, head=nn.Sigmoid()), nn.BCELoss(), batches(x / x.std(), y, 32, 30))


def f_torch_softmax_over_single_unit(tmp_path):
    """nn.Softmax(dim=1) on a 1-unit binary head: the output is exactly 1.0 for every example, BCELoss
    sits at ~50 (log clamped at -100) and nothing is learnt."""
    x, y = binary_data(seed=33)
    run = plain_loop(tmp_path, mlp(8, 1, head=nn.Softmax(dim=1)), nn.BCELoss(), batches(x, y, 32, 20))
    run.extra["stuck"] = min(run.losses) > 20
    return run


# ============================================================================================ registry
def xfail(reason: str):
    """A known library defect. Only an AssertionError (the corpus' expectation on boundguard) counts as
    the expected failure: a program that no longer trains as it claims fails with ProgramBroken."""
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


HEALTHY = [
    pytest.param(h_lightning_bce_with_logits, id="lightning-binary-bce-with-logits"),
    pytest.param(h_lightning_cross_entropy, id="lightning-softmax-classifier-cross-entropy"),
    pytest.param(h_lightning_cnn_8x8, id="lightning-cnn-8x8-images"),
    pytest.param(h_lightning_unet_segmentation, id="lightning-unet-sigmoid-segmentation"),
    pytest.param(h_lightning_tanh_head, id="lightning-tanh-head-symmetric-target"),
    pytest.param(h_lightning_poisson, id="lightning-poisson-regression"),
    pytest.param(h_lightning_distillation, id="lightning-distillation-kl"),
    pytest.param(h_lightning_gan_manual_optimisation, id="lightning-gan-manual-optimisation"),
    pytest.param(h_lightning_gan_sigmoid_discriminator, id="lightning-gan-sigmoid-discriminator"),
    pytest.param(h_lightning_bf16_mixed, id="lightning-bf16-mixed"),
    pytest.param(h_lightning_batch_size_1, id="lightning-batch-size-1"),
    pytest.param(h_torch_sigmoid_bce, id="torch-sigmoid-bce"),
    pytest.param(h_torch_mse_converges_to_zero, id="torch-mse-converges-to-zero"),
    pytest.param(h_torch_noisy_regression, id="torch-noisy-regression"),
    pytest.param(h_torch_vae, id="torch-vae"),
    pytest.param(h_torch_contrastive_infonce, id="torch-contrastive-infonce"),
    pytest.param(h_torch_gaussian_nll, id="torch-gaussian-nll-heteroscedastic"),
    pytest.param(h_torch_quantile_pinball, id="torch-quantile-pinball"),
    pytest.param(h_torch_bf16_autocast, id="torch-bf16-autocast"),
    pytest.param(h_torch_bag_of_words_logreg, id="torch-bag-of-words-logreg"),
    pytest.param(h_hf_bert_trainer, id="hf-bert-trainer"),
    pytest.param(h_hf_gpt2_plain_loop, id="hf-gpt2-plain-loop"),
]

FAULTY = [
    pytest.param(f_lightning_softmax_into_cross_entropy, "activation_loss_mismatch",
                 id="lightning-softmax-into-cross-entropy"),
    pytest.param(f_torch_sigmoid_into_bce_with_logits, "activation_loss_mismatch",
                 id="torch-sigmoid-into-bce-with-logits"),
    pytest.param(f_lightning_missing_sigmoid_mse, "missing_output_activation", id="lightning-missing-sigmoid-mse"),
    pytest.param(f_torch_unscaled_images_0_255, "inputs_not_scaled", id="torch-unscaled-images-0-255"),
    pytest.param(f_lightning_relu_on_logits, "activation_loss_mismatch", id="lightning-relu-on-logits"),
    pytest.param(f_torch_learning_rate_too_large, "loss_diverging", id="torch-learning-rate-too-large"),
    pytest.param(f_lightning_nan_in_inputs, "nonfinite_input", id="lightning-nan-in-inputs"),
    pytest.param(f_torch_predicts_the_mean_forever, "loss_at_baseline", id="torch-predicts-the-mean-forever"),
    pytest.param(f_lightning_labels_1_to_k, "target_out_of_range", id="lightning-labels-1-to-k"),
    pytest.param(f_torch_sigmoid_head_percent_targets, "target_out_of_range", id="torch-sigmoid-head-percent-targets"),
    pytest.param(f_torch_sigmoid_bce_onehot_10_classes, "activation_loss_mismatch",
                 id="torch-sigmoid-bce-onehot-10-classes"),
    pytest.param(f_torch_softmax_over_single_unit, "output_saturated", id="torch-softmax-over-single-unit"),
]


@pytest.mark.parametrize("program", HEALTHY)
def test_healthy_program(tmp_path, program):
    run, facts = program(tmp_path)
    print(run.facts().get("watched"))
    print(run.describe())
    program_is_valid(run, healthy=True)
    if facts:
        check_facts(run, facts)
    assert not run.severe, run.describe()


@pytest.mark.parametrize("program,code", FAULTY)
def test_faulty_program(tmp_path, program, code):
    run = program(tmp_path)
    print(run.facts().get("watched"))
    print(run.describe())
    program_is_valid(run, healthy=False)
    assert code in run.codes, run.describe()
