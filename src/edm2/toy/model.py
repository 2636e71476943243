"""A small MLP denoiser for the 2D toy, with EDM preconditioning and class conditioning, its training with the EDM
loss on a CPU in minutes, and its files (safetensors with JSON metadata; no pickle).

D(x; sigma, c) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), c) with EDM's
c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4. F is a residual MLP: the noise level (Fourier
features of c_noise) and the class (a learned embedding; none in the unconditional variant) enter every block.
Training draws fresh data from the mixture at every step, ln(sigma) ~ N(P_mean, P_std^2), and minimizes
lambda(sigma) ||D(y + n; sigma) - y||^2 with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, with Adam
(cosine learning-rate decay) and a power-function EMA of the weights (EDM2's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edm2.ema.power import PowerFunctionEMA
from edm2.files.base import load_tensors, save_tensors
from edm2.losses import edm_loss_weight
from edm2.toy.mixture import GaussianMixture, as_sigma

__all__ = ["ToyNetConfig", "ToyTrainConfig", "ToyDenoiser", "train_toy", "save_toy_model", "load_toy_model",
           "TOY_MODEL_KIND", "one_thread"]

TOY_MODEL_KIND = "toy-denoiser"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block. The toy's matrices are tiny: a second thread hardly helps,
    and on a busy machine the threads of each small operation wait for one another many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class ToyNetConfig:
    """The shape of a toy denoiser: `num_classes` 0 makes it unconditional; `hidden` units per layer, `blocks`
    residual blocks, `noise_features` Fourier features of c_noise."""

    num_classes: int = 2
    hidden: int = 64
    blocks: int = 3
    noise_features: int = 16
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if self.num_classes < 0 or self.hidden < 1 or self.blocks < 1 or self.noise_features < 2:
            raise ValueError(f"a toy network needs num_classes >= 0, hidden >= 1, blocks >= 1 and noise_features "
                             f">= 2, got {self.num_classes}, {self.hidden}, {self.blocks}, {self.noise_features}")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {self.sigma_data}")


@dataclass(frozen=True)
class ToyTrainConfig:
    """How a toy denoiser is trained: Adam for `steps` steps of `batch_size` fresh samples, learning rate `lr`
    decayed along a cosine to `lr * final_lr`, noise levels ln(sigma) ~ N(P_mean, P_std^2), a power-function EMA
    of relative length `ema_std` (0: none), all drawn from `seed`."""

    steps: int = 4000
    batch_size: int = 2048
    lr: float = 3e-3
    final_lr: float = 0.02
    P_mean: float = -2.0
    P_std: float = 1.5
    ema_std: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"training needs steps >= 1 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if not self.lr > 0 or not self.P_std > 0 or not 0 <= self.final_lr <= 1 or self.ema_std < 0:
            raise ValueError("training needs lr > 0, P_std > 0, 0 <= final_lr <= 1 and ema_std >= 0")


class _Block(nn.Module):
    """h + W2 silu(W1 silu(h + emb)): one residual block with the conditioning added at its input."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(nn.functional.silu(h + emb))))


class ToyDenoiser(nn.Module):
    """D(x; sigma, labels) of 2D points x [N, 2] with EDM preconditioning; `labels` [N] (integer classes) for a
    conditional network, None for an unconditional one."""

    def __init__(self, config: ToyNetConfig) -> None:
        super().__init__()
        self.config = config
        half = config.noise_features // 2
        self.register_buffer("freqs", math.pi * torch.linspace(0, 4, half).exp2(), persistent=False)
        self.noise_map = nn.Linear(2 * half, config.hidden)
        self.label_emb = nn.Embedding(config.num_classes, config.hidden) if config.num_classes else None
        self.inp = nn.Linear(2, config.hidden)
        self.blocks = nn.ModuleList(_Block(config.hidden) for _ in range(config.blocks))
        self.out = nn.Linear(config.hidden, 2)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def conditional(self) -> bool:
        """Whether the network takes class labels."""
        return self.label_emb is not None

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; sigma, labels) in x's dtype (computed in float32); sigma a number or one per point, labels one
        per point or one for all."""
        sd = self.config.sigma_data
        x32 = x.to(torch.float32)
        sigma = as_sigma(sigma, x32)[:, None]
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        phase = (sigma.log() / 4) * self.freqs[None]
        emb = self.noise_map(torch.cat([phase.cos(), phase.sin()], dim=1))
        if self.label_emb is not None:
            if labels is None:
                raise ValueError("this toy denoiser is class-conditional; pass labels")
            emb = emb + self.label_emb(torch.as_tensor(labels, device=x.device).reshape(-1).expand(x.shape[0]))
        h = self.inp(c_in * x32)
        for block in self.blocks:
            h = block(h, emb)
        F = self.out(nn.functional.silu(h))
        return (c_skip * x32 + c_out * F).to(x.dtype)


def _edm_loss(net: ToyDenoiser, y: torch.Tensor, labels: torch.Tensor | None, cfg: ToyTrainConfig,
              generator: torch.Generator) -> torch.Tensor:
    """The EDM loss of one batch: mean over points and coordinates of lambda(sigma) (D(y + n; sigma) - y)^2."""
    sigma = (torch.randn(y.shape[0], 1, generator=generator) * cfg.P_std + cfg.P_mean).exp()
    noise = torch.randn(y.shape, generator=generator) * sigma
    D = net(y + noise, sigma, labels)
    return (edm_loss_weight(sigma, net.config.sigma_data) * (D - y).square()).mean()


def train_toy(mixture: GaussianMixture, net_config: ToyNetConfig | None = None,
              train_config: ToyTrainConfig | None = None,
              progress: Callable[[int, float], None] | None = None) -> tuple[ToyDenoiser, list[float]]:
    """Train a toy denoiser on fresh samples of `mixture` (with their classes when the network is conditional).
    `progress(step, loss)` is called after every step. Returns the network (its EMA when `ema_std` > 0), in eval
    mode without gradients, and the loss of every step. Runs on one CPU thread (`one_thread`)."""
    net_config = net_config or ToyNetConfig(num_classes=mixture.num_classes, sigma_data=mixture.sigma_data())
    cfg = train_config or ToyTrainConfig()
    if net_config.num_classes not in (0, mixture.num_classes):
        raise ValueError(f"the network has {net_config.num_classes} classes, the mixture {mixture.num_classes}")
    with one_thread():
        return _train(mixture, net_config, cfg, progress)


def _train(mixture: GaussianMixture, net_config: ToyNetConfig, cfg: ToyTrainConfig,
           progress: Callable[[int, float], None] | None) -> tuple[ToyDenoiser, list[float]]:
    """The loop of `train_toy`."""
    torch.manual_seed(cfg.seed)
    net = ToyDenoiser(net_config)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    ema = PowerFunctionEMA(net, [cfg.ema_std]) if cfg.ema_std > 0 else None
    losses: list[float] = []
    for step in range(cfg.steps):
        decay = 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * (cfg.final_lr + (1 - cfg.final_lr) * decay)
        y, labels = mixture.sample_labeled(cfg.batch_size, generator)
        loss = _edm_loss(net, y.to(torch.float32), labels if net.conditional else None, cfg, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update((step + 1) * cfg.batch_size, cfg.batch_size)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, losses[-1])
    if ema is not None:
        net = ema.get()[0][0]
    return net.eval().requires_grad_(False), losses


def save_toy_model(path: str | Path, net: ToyDenoiser, metadata: dict | None = None) -> None:
    """Write a toy denoiser (its parameters, its `ToyNetConfig` and `metadata`) atomically as safetensors."""
    meta = {**(metadata or {}), "kind": TOY_MODEL_KIND, "net": dataclasses.asdict(net.config)}
    save_tensors(path, net.state_dict(), meta)


def load_toy_model(path: str | Path) -> tuple[ToyDenoiser, dict]:
    """A toy denoiser written by `save_toy_model` (no code is executed), in eval mode, and its metadata."""
    tensors, meta = load_tensors(path, kind=TOY_MODEL_KIND)
    try:
        net = ToyDenoiser(ToyNetConfig(**meta["net"]))
        net.load_state_dict(tensors)
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a usable toy denoiser ({e})") from None
    return net.eval().requires_grad_(False), meta
