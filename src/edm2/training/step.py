"""One training step, top to bottom: the EDM2 optimizer recipe, the setup of a run, and `train_step`.

One batch travels: dataset -> `BatchStream.steps` (this process's share of the global batch, read ahead by
DataLoader workers) -> `train_step` (noise levels and noise for the whole global batch, the encoder's map from raw
items to the network's space, the loss through the preconditioned network, backward, Adam with the learning-rate
schedule) -> the EMA tracker (snapshots on disk, `edm2.training.loop`).

Inside a torch.distributed process group (see `edm2.runtime.distributed`) the global batch is split over the
processes: each computes `batch_gpu` images per accumulation round at its own positions of the one global data
stream, with its slice of the noise drawn for the whole global batch, so that the run equals a single-process
run up to float summation order, and resumes under any number of processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edm2.data import BatchStream, Encoder, StandardRGBEncoder
from edm2.ema.trackers import EMATrackers, PosthocEMA, TraditionalEMATracker
from edm2.layers import force_weight_normalization_
from edm2.losses import EDM_LOSSES, EDM2Loss, EDMLoss
from edm2.networks import build_network
from edm2.runtime import world_info
from edm2.training.augment import EDM_AUGMENT_KWARGS, AugmentPipe
from edm2.training.options import RunConfig
from edm2.training.transfer import load_transfer_weights

__all__ = ["learning_rate_schedule", "make_adam", "sanitize_gradients", "optimizer_step", "ADAM_BETAS", "ADAM_EPS",
           "NONFINITE_EDM2", "NONFINITE_EDM", "step_seed", "Trainer", "setup", "train_step", "all_finite"]

ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8
# What +-Inf gradient entries become before Adam (NaN always becomes 0): the official EDM2 loop zeroes them, the
# official EDM (2022) loop clamps them to +-1e5.
NONFINITE_EDM2 = 0.0
NONFINITE_EDM = 1e5


def learning_rate_schedule(cur_nimg: float, batch_size: int, ref_lr: float = 100e-4, ref_batches: float = 70e3,
                           rampup_Mimg: float = 10) -> float:
    """alpha_ref / sqrt(max(t / t_ref, 1)) with t in batches (EDM2 Eq. 67), times a linear warm-up over
    the first `rampup_Mimg` million images. `ref_batches=0` disables the decay, `rampup_Mimg=0` the warm-up."""
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return float(lr)


def make_adam(params: Iterable[torch.nn.Parameter], lr: float = 0.0, fused: bool | None = None,
              foreach: bool | None = None, betas: tuple[float, float] = ADAM_BETAS) -> torch.optim.Adam:
    """Adam with the EDM2 settings: betas (0.9, 0.99), eps 1e-8, no weight decay (EDM-release runs: betas
    (0.9, 0.999))."""
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=ADAM_EPS, fused=fused, foreach=foreach)


@torch.no_grad()
def sanitize_gradients(params: Iterable[torch.nn.Parameter], inf: float = NONFINITE_EDM2) -> None:
    """Replace NaN gradient entries by 0 and +-Inf by +-`inf`, in place, as the official loops do before every
    step (`NONFINITE_EDM2`: 0, `NONFINITE_EDM`: 1e5), so that one bad batch does not poison Adam."""
    for g in [p.grad for p in params if p.grad is not None]:
        torch.nan_to_num_(g, nan=0.0, posinf=inf, neginf=-inf)


def optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter],
                   scaler: torch.amp.GradScaler, inf: float = NONFINITE_EDM2) -> None:
    """Update the weights from the gradients in `params`, as the official loops do: replace non-finite gradient
    entries (`sanitize_gradients`) and always step. A constant loss scale stays in the gradients, as in the
    official code (Adam does not see it but through eps). With dynamic loss scaling (`scaler` enabled: fp16 with
    --dynamic-ls) the gradients are unscaled first, and the scaler skips a step whose gradients overflowed and
    adapts its scale."""
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
        sanitize_gradients(params, inf)
        scaler.step(optimizer)
        scaler.update()
        return
    sanitize_gradients(params, inf)
    optimizer.step()


def step_seed(*keys: int) -> int:
    """A 32-bit seed determined by the integers `keys` (run seed, images seen, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@dataclass
class Trainer:
    """Everything a training step needs: what `setup` returns."""

    run: RunConfig
    device: torch.device
    net: torch.nn.Module  # the weights being trained: a Precond, or an EDM-release preconditioning
    ddp: torch.nn.parallel.DistributedDataParallel | None  # `net` wrapped for several processes, else None
    model: torch.nn.Module  # what the loss calls: `ddp or net`, torch.compile'd with --compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # dynamic loss scaling (fp16 with --dynamic-ls), else a disabled no-op
    loss_fn: EDM2Loss | EDMLoss  # EDM-release runs: VPLoss, VELoss or EDMLoss
    data: BatchStream
    ema: PosthocEMA | EMATrackers | None  # EMAs: rank 0 of a run with an out-dir writes the snapshots
    augment_pipe: AugmentPipe | None = None  # EDM-release runs with --augment > 0
    encoder: Encoder = field(default_factory=StandardRGBEncoder)  # raw items -> the network's space

    def recorded_loss_scale(self) -> float | None:
        """The constant loss scale an fp16 checkpoint records as `scaler/scale` (the dynamic scaler records its
        own); None for runs in other precisions."""
        return self.run.loss_scaling if self.run.precision == "fp16" and not self.scaler.is_enabled() else None


def setup(run: RunConfig, dataset, device: torch.device, outdir: str | Path | None = None,
          fresh: bool = True) -> Trainer:
    """Build the network (its weights fixed by the run's seed, or those of `run.transfer` for a `fresh` run, one
    that does not resume), optimizer, loss scaler, loss, encoder, data stream and, with an `outdir` on rank 0, the
    EMA tracker (starting from the network's weights). `dataset`: what `edm2.data.open_dataset` returns."""
    rank, world = world_info()
    torch.manual_seed(run.seed)
    net = build_network(run.network)
    if run.transfer is not None and fresh:
        load_transfer_weights(net, run.transfer)
    net = net.train().requires_grad_(True).set_precision(run.precision)
    # channels_last pays with low-precision convolutions (oneDNN/AMX on CPU, tensor cores on CUDA), not in
    # float32 on CPU (docs/benchmarks.md).
    net = net.to(device, memory_format=torch.contiguous_format if run.precision == "fp32" else torch.channels_last)
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    model = ddp or net
    # fp16 trains as the official code: a constant loss scale (run.loss_scaling), every step taken. With
    # --dynamic-ls instead, dynamic loss scaling starting at 1: the scale doubles after 2000 steps without overflow
    # and halves (skipping the step) on one.
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0,
                                  enabled=run.precision == "fp16" and run.dynamic_loss_scaling)
    encoder = run.encoder or StandardRGBEncoder()
    ema = None
    if outdir is not None and rank == 0:
        info = {"preset": run.preset, "dataset": run.dataset, "data": run.data}
        dtype = getattr(torch, run.snapshot_dtype)
        ema = PosthocEMA(net, outdir, run.ema_stds, snapshot_every=run.snapshot, network=run.network, rank=rank,
                         info=info, encoder=encoder.to_dict(), snapshot_dtype=dtype) if run.ema_stds else None
        if run.edm is not None:  # the EDM release's traditional EMA, with power EMAs beside it when asked
            traditional = TraditionalEMATracker(net, outdir, run.edm.ema_halflife_Mimg, run.edm.ema_rampup_ratio,
                                                run.snapshot, run.network, info, rank, encoder.to_dict(), dtype)
            ema = EMATrackers({"traditional": traditional, **({"power": ema} if ema is not None else {})})
    edm = run.edm
    loss_fn = EDM2Loss(P_mean=run.P_mean, P_std=run.P_std, sigma_data=net.sigma_data) if edm is None else \
        _edm_loss(edm.loss, run, net)
    data = BatchStream(dataset, run.seed, run.batch, run.batch_gpu, net.label_dim, rank, world,
                       xflip=run.dataset.get("xflip", False), max_size=run.dataset.get("max_size"),
                       workers=run.workers, pin_memory=device.type == "cuda")
    return Trainer(
        run=run, device=device, net=net, ddp=ddp, model=torch.compile(model) if run.compile else model,
        optimizer=make_adam(net.parameters(), fused=True,  # one kernel for all tensors, CPU and CUDA
                            betas=ADAM_BETAS if edm is None else tuple(edm.adam_betas)),
        scaler=scaler, loss_fn=loss_fn, data=data, ema=ema,
        augment_pipe=AugmentPipe(p=edm.augment, **EDM_AUGMENT_KWARGS) if edm is not None and edm.augment else None,
        encoder=encoder,
    )


def _edm_loss(name: str, run: RunConfig, net: torch.nn.Module) -> EDM2Loss | EDMLoss:
    """The loss of an EDM-release run: VPLoss and VELoss with the official parameters, EDMLoss with the run's
    P_mean, P_std and the network's sigma_data."""
    if name == "EDMLoss":
        return EDMLoss(P_mean=run.P_mean, P_std=run.P_std, sigma_data=net.sigma_data)
    return EDM_LOSSES[name]()


def train_step(t: Trainer, cur_nimg: int,
               micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, float]:
    """One optimizer step over the global batch that starts at image `cur_nimg`, from this process's
    `micro_batches` (raw items, uint8 pixels or raw latents, and one-hot labels, one pair per accumulation round,
    at `t.data.offsets` in the global batch). Returns (this process's share of the batch's mean loss, on the
    device; the learning rate used)."""
    run = t.run
    lr = learning_rate_schedule(cur_nimg, run.batch, run.lr, run.decay, run.rampup_Mimg)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    t.optimizer.zero_grad(set_to_none=True)
    # Noise levels and noise of the whole global batch come from one generator per step, so that every
    # image sees the same noise whatever the number of processes or accumulation rounds.
    gen = torch.Generator(t.device).manual_seed(step_seed(run.seed, cur_nimg))
    sigma = t.loss_fn.sample_sigma(run.batch, t.device, gen)
    shape = [run.batch, t.net.img_channels, t.net.img_resolution, t.net.img_resolution]
    noise = torch.randn(shape, device=t.device, generator=gen)
    # The VAE encoder samples each latent from its stored mean and std: from the same generator, after the noise.
    latent_noise = torch.randn(shape, device=t.device, generator=gen) if t.encoder.stochastic else None
    augment = None if t.augment_pipe is None else t.augment_pipe.sample(run.batch, t.device, gen)
    loss_sum = torch.zeros([], device=t.device)
    for r, (images, labels) in enumerate(micro_batches):
        start = t.data.offsets[r]
        part = slice(start, start + len(images))
        torch.manual_seed(step_seed(run.seed, cur_nimg, start))  # dropout
        if run.compile:
            force_weight_normalization_(t.net)  # compiled code does not write the weights itself
        last = r == len(micro_batches) - 1
        images = t.encoder.encode_latents(images.to(t.device), None if latent_noise is None else latent_noise[part])
        extra = {}
        if augment is not None:  # non-leaky augmentation: the network sees the augment labels
            images, extra["augment_labels"] = t.augment_pipe.apply(images, augment[part])
        with t.ddp.no_sync() if t.ddp is not None and not last else contextlib.nullcontext():
            loss = t.loss_fn(t.model, images, None if labels is None else labels.to(t.device),
                             sigma=sigma[part], noise=noise[part], **extra)
            # The official arithmetic: the loss sum times the constant loss scale over this process's share of the
            # batch (the dynamic scaler, when on, multiplies by its own scale on top).
            t.scaler.scale(loss.sum().mul(run.loss_scaling / (run.batch // run.processes))).backward()
        loss_sum += loss.detach().sum()
    inf = NONFINITE_EDM2 if run.edm is None else NONFINITE_EDM
    optimizer_step(t.optimizer, list(t.net.parameters()), t.scaler, inf)
    return loss_sum / run.batch, lr


@torch.no_grad()
def all_finite(t: Trainer, loss: torch.Tensor) -> bool:
    """Whether `loss` (this process's losses of the steps since the last look, summed) and every weight of the
    network are finite, in every process: the largest magnitude of each weight tensor in one fused call and one
    wait for the device (an all-reduce with several processes). Non-finite weights stay non-finite under Adam, so
    looking before each write is enough to keep them out of every checkpoint and snapshot."""
    peaks = torch.stack(torch._foreach_norm(list(t.net.parameters()), float("inf")))
    ok = (torch.isfinite(peaks).all() & torch.isfinite(loss)).to(torch.int32)
    if world_info()[1] > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok)
