"""Training, top to bottom: the EDM2 optimizer recipe, the setup of a run, one training step, and the loop.

One batch travels: dataset -> `BatchStream.steps` (this process's share of the global batch, read ahead by
DataLoader workers) -> `train_step` (noise levels and noise for the whole global batch, the encoder's map from raw
items to the network's space, EDM2 loss through the preconditioned network, backward, Adam with the learning-rate
schedule) -> `PosthocEMA.update` (snapshots on disk) -> checkpoint.

Inside a torch.distributed process group (see `edm2.runtime.distributed`) the global batch is split over the
processes: each computes `batch_gpu` images per accumulation round at its own positions of the one global data
stream, with its slice of the noise drawn for the whole global batch, so that the run equals a single-process
run up to float summation order, and resumes under any number of processes. Rank 0 writes every file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edm2.augment import EDM_AUGMENT_KWARGS, AugmentPipe
from edm2.checkpoint import (
    OPTIONS_FILE,
    RunLock,
    atomic_write_text,
    check_run_folder,
    find_checkpoints,
    load_training_state,
    remove_stale_temps,
    save_training_state,
    scratch_folder,
)
from edm2.data import BatchStream, Encoder, StandardRGBEncoder, encoder_from_dict, open_dataset
from edm2.edm_losses import EDM_LOSSES, EDMLoss
from edm2.ema_trackers import EMATrackers, TraditionalEMATracker
from edm2.layers import force_weight_normalization_
from edm2.losses import EDM2Loss
from edm2.networks import Precond, build_network
from edm2.options import RunConfig, TrainOptions, resolve_run
from edm2.posthoc import PosthocEMA
from edm2.recipes import BudgetPlan, RunCosts, budget_clock, describe, plan_duration
from edm2.runlog import RunLog
from edm2.runtime import (
    STOP_NONE,
    STOP_PAUSE,
    STOP_SIGNAL,
    StopRequest,
    agree_on_stop,
    fast_paths_for,
    resolve_device,
    set_cuda_math,
    world_info,
)

__all__ = ["learning_rate_schedule", "make_adam", "sanitize_gradients", "ADAM_BETAS", "ADAM_EPS", "Trainer",
           "setup", "train_step", "train", "TrainOptions", "RunConfig", "resolve_run", "measure_costs",
           "plan_budget"]

ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8


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
def sanitize_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace NaN and +-Inf gradient entries by 0, in place (one bad batch must not poison Adam)."""
    for g in [p.grad for p in params if p.grad is not None]:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)


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
    scaler: torch.amp.GradScaler  # dynamic loss scaling with fp16, a no-op otherwise
    loss_fn: EDM2Loss | EDMLoss  # EDM-release runs: VPLoss, VELoss or EDMLoss
    data: BatchStream
    ema: PosthocEMA | EMATrackers | None  # EMAs: rank 0 of a run with an out-dir writes the snapshots
    augment_pipe: AugmentPipe | None = None  # EDM-release runs with --augment > 0
    encoder: Encoder = field(default_factory=StandardRGBEncoder)  # raw items -> the network's space


def setup(run: RunConfig, dataset, device: torch.device, outdir: str | Path | None = None) -> Trainer:
    """Build the network (its weights fixed by the run's seed), optimizer, loss scaler, loss, encoder, data stream
    and, with an `outdir` on rank 0, the EMA tracker. `dataset`: what `edm2.data.open_dataset` returns."""
    rank, world = world_info()
    torch.manual_seed(run.seed)
    net = Precond(**run.network) if run.network_class is None else build_network(run.network_class, run.network)
    net = net.train().requires_grad_(True).set_precision(run.precision)
    # channels_last pays with low-precision convolutions (oneDNN/AMX on CPU, tensor cores on CUDA), not in
    # float32 on CPU (docs/benchmarks.md).
    net = net.to(device, memory_format=torch.contiguous_format if run.precision == "fp32" else torch.channels_last)
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    model = ddp or net
    # fp16: dynamic loss scaling, starting where the official code trains (scale 1); the scale doubles after
    # 2000 steps without overflow and halves (skipping the step) on one.
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, enabled=run.precision == "fp16")
    encoder = encoder_from_dict(run.encoder)
    ema = None
    if outdir is not None and rank == 0:
        info = {"preset": run.preset, "dataset": run.dataset, "data": run.data}
        ema = PosthocEMA(net, outdir, run.ema_stds, snapshot_every=run.snapshot, network=run.network_config(),
                         rank=rank, info=info, encoder=encoder.to_dict()) if run.ema_stds else None
        if run.edm is not None:  # the EDM release's traditional EMA, with power EMAs beside it when asked
            traditional = TraditionalEMATracker(net, outdir, run.edm["ema_halflife_Mimg"],
                                                run.edm["ema_rampup_ratio"], run.snapshot, run.network_config(),
                                                info, rank, encoder.to_dict())
            ema = EMATrackers({"traditional": traditional, **({"power": ema} if ema is not None else {})})
    edm = run.edm or {}
    loss_fn = EDM2Loss(P_mean=run.P_mean, P_std=run.P_std, sigma_data=net.sigma_data) if not edm else \
        _edm_loss(edm["loss"], run, net)
    data = BatchStream(dataset, run.seed, run.batch, run.batch_gpu, net.label_dim, rank, world,
                       xflip=run.dataset.get("xflip", False), max_size=run.dataset.get("max_size"),
                       workers=run.workers, pin_memory=device.type == "cuda")
    return Trainer(
        run=run, device=device, net=net, ddp=ddp, model=torch.compile(model) if run.compile else model,
        optimizer=make_adam(net.parameters(), fused=True,  # one kernel for all tensors, CPU and CUDA
                            betas=tuple(edm.get("adam_betas", ADAM_BETAS))),
        scaler=scaler, loss_fn=loss_fn, data=data, ema=ema,
        augment_pipe=AugmentPipe(p=edm["augment"], **EDM_AUGMENT_KWARGS) if edm.get("augment") else None,
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
    loss_scaling = 1.0 if run.edm is None else run.edm["loss_scaling"]
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
            t.scaler.scale(loss.sum().mul(loss_scaling / (run.batch // run.processes))).backward()
        loss_sum += loss.detach().sum()
    t.scaler.unscale_(t.optimizer)  # no-op unless fp16 loss scaling is on
    sanitize_gradients(t.net.parameters())
    t.scaler.step(t.optimizer)  # skips the step when fp16 gradients overflowed
    t.scaler.update()
    return loss_sum / run.batch, lr


@contextlib.contextmanager
def claim_run_folder(outdir: Path, run: RunConfig) -> Iterator[Path | None]:
    """Rank 0 checks `outdir` (reading only, so a refused run touches nothing), locks it, removes temporaries
    of killed writers and writes the options; every other process waits for its verdict, so all raise the same
    error or all go ahead. Yields the checkpoint to resume from (None for a new run); unlocks at the end."""
    rank, world = world_info()
    lock = RunLock(outdir)
    verdict: list = [None, None]  # error, checkpoint
    if rank == 0:
        try:
            check_run_folder(outdir, run.identity())
            outdir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            resuming = check_run_folder(outdir, run.identity())  # again: it might have changed before the lock
            remove_stale_temps(outdir)
            atomic_write_text(outdir / OPTIONS_FILE, json.dumps(run.to_dict(), indent=2) + "\n")
            checkpoints = find_checkpoints(outdir) if resuming else []
            verdict = [None, str(checkpoints[-1]) if checkpoints else None]
        except (ValueError, OSError) as e:
            lock.release()
            verdict = [str(e), None]
    if world > 1:
        torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ValueError(verdict[0])
    try:
        yield None if verdict[1] is None else Path(verdict[1])
    finally:
        lock.release()


def _crossed(nimg: int, interval: int, batch: int) -> bool:
    """Whether the step that ended at `nimg` crossed a multiple of `interval`."""
    return nimg % interval < batch


# ----------------------------------------------------------------------------------------------------
# Time budgets: measure the throughput on a throw-away copy of the run, then fix the duration once.


def _agree(value, world: int):
    """Rank 0's `value` in every process."""
    if world > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def _median_time(clock, action: Callable[[], object], repeats: int) -> float:
    """The median time on `clock` of `repeats` calls of `action`: a burst of slowness on a shared machine during
    the measurement must not set the pace of a whole run, which repeats each action many times."""
    times = []
    for _ in range(repeats):
        start = clock()
        action()
        times.append(clock() - start)
    return statistics.median(times)


def measure_costs(run: RunConfig, dataset, device: torch.device, clock, seconds: float, deadline: float,
                  scratch: Path) -> RunCosts:
    """What the run's time goes to (`RunCosts`), measured on `clock` on a copy of the run built for the purpose
    and thrown away (the run itself starts afresh): building it (a second time: the first pays one-time costs
    such as lazy imports), the first step alone, then the fastest median of 3 to 6 runs of 8 steps with EMA
    updates (about `seconds` in all), and the median of 3 snapshots and 3 checkpoints written into `scratch`
    (rank 0). ValueError when the first step ends after `deadline`."""
    rank, world = world_info()
    run = dataclasses.replace(run, snapshot=None)  # no snapshot during the steps: they are timed on their own
    setup(run, dataset, device)
    start = clock()
    t = setup(run, dataset, device, scratch)
    setup_time = clock() - start
    nimg = 0

    def step() -> None:
        nonlocal nimg
        loss, _ = train_step(t, nimg, next(batches))
        nimg += run.batch
        if t.ema is not None:
            t.ema.update(nimg)
        float(loss)  # waits for queued device work

    with fast_paths_for(run.precision, run.compile), t.data.steps(0) as batches:  # the loop's data path
        first = _median_time(clock, step, 1)
        if _agree(clock() > deadline, world):
            raise ValueError(f"--budget is too short for one training step: the first step of {run.batch} images took "
                             f"{first:.2g} s; give a longer --budget or a smaller --batch")
        # The fastest of 3 to 6 medians of 8 steps: a slow spell of a shared machine (here about 1 s, a tenth of
        # the time) must not set the pace of the whole run, which the 5 % reserve then absorbs.
        windows = _agree(max(3, min(6, int(seconds / max(first, 1e-6)) // 8)), world)
        per_image = min(_median_time(clock, step, 8) for _ in range(windows)) / run.batch

    def save_checkpoint() -> None:
        ema_state = None if t.ema is None else t.ema.state_dict()
        save_training_state(scratch, nimg, run.to_dict(), t.net, t.optimizer, ema_state, t.scaler)

    snapshot = checkpoint = 0.0  # a run without EMAs writes no snapshot
    if rank == 0:
        if t.ema is not None:
            snapshot = _median_time(clock, t.ema.save_snapshots, 3)
        checkpoint = _median_time(clock, save_checkpoint, 3)
    return _agree(RunCosts(per_image, first, setup_time, snapshot, checkpoint), world)


def plan_budget(opts: TrainOptions, dataset, previous: dict | None, started: float) -> BudgetPlan:
    """The duration that fits `opts.budget` (seconds of `opts.budget_clock`, counted from `started`): the plan of
    the run being resumed when it had the same budget, else measured on this machine (rank 0's measurement).
    The plan pays for the run's setup and for the snapshots and checkpoints of the schedule it derives."""
    if previous is not None:
        old = previous.get("budget")
        if old is None or (old["seconds"], old["clock"]) != (float(opts.budget), opts.budget_clock):
            what = "a fixed duration" if old is None else f"--budget {old['seconds']:g}s ({old['clock']} clock)"
            raise ValueError(f"--outdir {opts.outdir} holds a run planned for {what}; resume it with the same "
                             "options, or use a new --outdir")
        return BudgetPlan.from_dict(old)
    check_run_folder(opts.outdir, {})  # a folder of other files is refused before any time is spent
    world = world_info()[1]
    clock = budget_clock(opts.budget_clock)
    draft = resolve_run(opts, dataset, world)  # the preset's duration stands in; only the costs matter here
    with scratch_folder(opts.outdir) as scratch:  # the timed writes go to the file system of the run
        costs = measure_costs(draft, dataset, resolve_device(opts.device), clock, min(0.03 * opts.budget, 20.0),
                              started + opts.budget, scratch)

    def writes(duration: int) -> tuple[int, int]:  # snapshots and checkpoints of the run, the final ones too
        plan = BudgetPlan(opts.budget, opts.budget_clock, costs.seconds_per_image, 0, duration)
        run = resolve_run(opts, dataset, world, plan)
        return run.duration // run.snapshot + 1, run.duration // run.checkpoint + 1

    return _agree(plan_duration(opts.budget, opts.budget_clock, clock() - started, costs, draft.batch, writes),
                  world)  # each process has its own clock: rank 0's plan holds


def _previous_options(outdir: Path) -> dict | None:
    """The options of the run in `outdir`, or None (absent or unreadable: `check_run_folder` reports that)."""
    try:
        return json.loads((outdir / OPTIONS_FILE).read_text())
    except (OSError, ValueError):
        return None


def train(opts: TrainOptions, progress: bool = True, max_steps: int | None = None) -> dict:
    """Train (or resume) the run in `opts.outdir`; returns a summary dict. Everything about the run is
    validated before the folder is touched, and one process at a time may train it. Re-running the same
    options continues from the newest checkpoint; SIGINT/SIGTERM checkpoint and stop cleanly. With
    `opts.budget`, the duration is planned from the throughput of the first steps (`plan_budget`). `max_steps`
    stops after that many optimizer steps in this call (for tests and benchmarks)."""
    clock = budget_clock(opts.budget_clock)
    started = clock()
    rank, world = world_info()
    dataset = open_dataset(opts.data, progress=progress and rank == 0)
    outdir = Path(opts.outdir)
    previous = _previous_options(outdir)
    plan = None if opts.budget is None else plan_budget(opts, dataset, previous, started)
    run = resolve_run(opts, dataset, world, plan, previous)
    device = resolve_device(opts.device)
    with claim_run_folder(outdir, run) as checkpoint:
        set_cuda_math(device, run.allow_tf32)
        t = setup(run, dataset, device, outdir)
        cur_nimg = 0 if checkpoint is None else load_training_state(checkpoint, t.net, t.optimizer, t.ema, t.scaler)
        recipe = [f"recipe: {line}" for line in describe(run.provenance)]
        if progress and rank == 0 and recipe:
            print("\n".join(recipe), flush=True)  # once, before the progress bar
        log = RunLog(outdir, run.duration, cur_nimg, device, rank, world, progress)
        log.say(f"{'resuming at' if cur_nimg else 'starting'} {cur_nimg} images: preset {run.preset}, data "
                f"{run.data}, batch {run.batch} ({world} process(es) x {run.batch_gpu} x {len(t.data.offsets)} "
                f"accumulation), device {device}, precision {run.precision}{', compiled' if run.compile else ''}")
        for line in recipe:
            log.say(line)
        steps, status = 0, "finished"
        with StopRequest() as stop, fast_paths_for(run.precision, run.compile), t.data.steps(cur_nimg) as batches:
            while cur_nimg < run.duration:
                loss, lr = train_step(t, cur_nimg, next(batches))
                cur_nimg += run.batch
                steps += 1
                done = cur_nimg >= run.duration
                if t.ema is not None and (t.ema.update(cur_nimg) or (done and t.ema.save_snapshots())):
                    log.say(f"snapshot at {cur_nimg} images")  # at every multiple of run.snapshot, and at the end
                log.step(cur_nimg, loss, lr, report=_crossed(cur_nimg, run.status, run.batch) or done)

                stop_code = STOP_SIGNAL if stop.requested else STOP_NONE
                if max_steps is not None and steps >= max_steps:
                    stop_code = max(stop_code, STOP_PAUSE)
                stop_code = agree_on_stop(stop_code, device)
                if rank == 0 and (_crossed(cur_nimg, run.checkpoint, run.batch) or done or stop_code):
                    ema_state = None if t.ema is None else t.ema.state_dict()
                    save_training_state(outdir, cur_nimg, run.to_dict(), t.net, t.optimizer, ema_state, t.scaler)
                if stop_code and not done:
                    status = "interrupted" if stop_code == STOP_SIGNAL else "paused"
                    log.say(f"{status} at {cur_nimg} images; run the same command again to resume")
                    break
        if world > 1:
            torch.distributed.barrier()  # the others wait for rank 0's last checkpoint
        if status == "finished":
            log.say(f"finished at {cur_nimg} images")
        if opts.budget is not None:
            log.say(f"{clock() - started:.1f} s of {opts.budget_clock} time used in this call (budget "
                    f"{opts.budget:g} s)")
        log.close()
    return {"status": status, "nimg": cur_nimg, "outdir": str(outdir), "steps": steps, "run": run.to_dict(),
            "rank": rank, "processes": world, "seconds": clock() - started}
