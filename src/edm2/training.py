"""Training: the EDM2 optimizer recipe (learning-rate schedule, Adam, gradient guard) and the training loop."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edm2.distributed import resolve_device, world_info
from edm2.posthoc import PosthocEMA

__all__ = ["learning_rate_schedule", "make_adam", "sanitize_gradients", "ADAM_BETAS", "ADAM_EPS",
           "TrainOptions", "RunConfig", "resolve_run", "train", "find_checkpoints"]

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
              foreach: bool | None = None) -> torch.optim.Adam:
    """Adam with the EDM2 settings: betas (0.9, 0.99), eps 1e-8, no weight decay."""
    return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused, foreach=foreach)


@torch.no_grad()
def sanitize_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace NaN and +-Inf gradient entries by 0, in place (one bad batch must not poison Adam)."""
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)


# ----------------------------------------------------------------------------------------------------
# The training loop.


@dataclass
class TrainOptions:
    """What the user asks for; None means 'take it from the preset'. Image counts are in images."""

    outdir: str
    data: str = "digits"
    preset: str = "cpu-digits8"
    cond: bool = True
    duration: int | None = None
    batch: int | None = None
    batch_gpu: int | None = None  # micro-batch per process; gradient accumulation when smaller
    lr: float | None = None
    decay: float | None = None
    dropout: float | None = None
    P_mean: float | None = None
    P_std: float | None = None
    status: int | None = None
    snapshot: int | None = None
    checkpoint: int | None = None
    ema_stds: tuple[float, ...] | None = None
    seed: int = 0
    device: str = "auto"
    precision: str | None = None  # fp32, bf16 or fp16; None: fp16 on CUDA for use_fp16 presets, else fp32
    compile: bool = False  # torch.compile the network


@dataclass(frozen=True)
class RunConfig:
    """The fully resolved run, written to training_options.json; a resumed run must match it."""

    data: str
    dataset: dict
    preset: str
    network: dict
    batch: int
    batch_gpu: int
    lr: float
    decay: float
    rampup_Mimg: float
    P_mean: float
    P_std: float
    ema_stds: tuple[float, ...]
    seed: int
    duration: int
    status: int
    snapshot: int
    checkpoint: int
    precision: str = "fp32"
    compile: bool = False
    processes: int = 1

    # Fields that may change between a run and its resumption (the number of processes too: the data
    # stream, the noise and the optimizer state do not depend on it).
    MUTABLE = ("duration", "status", "snapshot", "checkpoint", "batch_gpu", "precision", "compile", "processes")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def identity(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.MUTABLE}


def resolve_run(opts: TrainOptions, dataset, world: int | None = None) -> RunConfig:
    """Combine options, preset and dataset into a RunConfig; ValueError for inconsistent requests.
    `world` is the number of processes (default: that of the current process group)."""
    from edm2.networks import resolve_precision
    from edm2.presets import get_preset

    preset = get_preset(opts.preset)
    net, tr = preset.network, preset.training
    if dataset.resolution != net.img_resolution or dataset.channels != net.img_channels:
        raise ValueError(f"dataset {dataset.name} is {dataset.resolution}x{dataset.resolution}x{dataset.channels} "
                         f"but preset {preset.name} expects {net.img_resolution}x{net.img_resolution}x"
                         f"{net.img_channels}; choose a preset that matches the data")
    if opts.cond and not dataset.has_labels:
        raise ValueError(f"--cond needs labels but dataset {dataset.name} has none; add dataset.json labels "
                         "or train with --uncond")
    world = world_info()[1] if world is None else world
    batch = opts.batch or tr.batch_size
    batch_gpu = opts.batch_gpu or batch // world
    if batch > 0 and batch % world != 0:
        raise ValueError(f"--batch {batch} cannot be split over {world} processes; use a number of processes that "
                         "divides it")
    if batch <= 0 or batch_gpu <= 0 or batch % (world * batch_gpu) != 0:
        raise ValueError(f"--batch {batch} must be a positive multiple of processes ({world}) x --batch-gpu "
                         f"({batch_gpu})")
    precision = resolve_precision(opts.precision, resolve_device(opts.device), net.use_fp16)
    net = dataclasses.replace(net, label_dim=dataset.num_classes if opts.cond else 0,
                              dropout=net.dropout if opts.dropout is None else opts.dropout)
    pick = lambda v, d: d if v is None else v  # noqa: E731
    run = RunConfig(
        data=opts.data, dataset=dataset.describe(), preset=preset.name, network=net.to_dict(), batch=batch,
        batch_gpu=batch_gpu, lr=pick(opts.lr, tr.lr), decay=pick(opts.decay, tr.decay), rampup_Mimg=tr.rampup_Mimg,
        P_mean=pick(opts.P_mean, tr.P_mean), P_std=pick(opts.P_std, tr.P_std),
        ema_stds=tuple(pick(opts.ema_stds, tr.ema_stds)), seed=opts.seed, duration=pick(opts.duration, tr.duration),
        status=pick(opts.status, tr.status), snapshot=pick(opts.snapshot, tr.snapshot),
        checkpoint=pick(opts.checkpoint, tr.checkpoint), precision=precision, compile=bool(opts.compile),
        processes=world,
    )
    for name in ("duration", "status", "snapshot", "checkpoint"):
        if getattr(run, name) <= 0:
            raise ValueError(f"--{name} must be a positive number of images, got {getattr(run, name)}")
    if run.lr <= 0 or run.P_std <= 0:
        raise ValueError(f"--lr and --P-std must be positive, got lr={run.lr}, P_std={run.P_std}")
    return run


def find_checkpoints(outdir: str | Path) -> list[Path]:
    """Training-state checkpoints in `outdir`, oldest first."""
    return sorted(Path(outdir).glob("checkpoint-??????????.safetensors"))


def _prepare_outdir(outdir: Path, run: RunConfig) -> bool:
    """Create the run directory or check that it holds this run. Returns True when resuming."""
    options = outdir / "training_options.json"
    if options.is_file():
        try:
            old = json.loads(options.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{options} is damaged; use a new --outdir") from None
        new = run.identity()
        diff = sorted(k for k in new if old.get(k) != new[k])
        if diff:
            raise ValueError(f"--outdir {outdir} holds a different run (differs in {', '.join(diff)}); "
                             "use a new --outdir or the original options")
        for stale in outdir.glob(".*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
        return True
    if outdir.exists() and any(outdir.iterdir()):
        raise ValueError(f"--outdir {outdir} is not empty and holds no edm2 run; choose a new or empty folder")
    return False


def _save_checkpoint(outdir: Path, nimg: int, run: RunConfig, net: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, ema: PosthocEMA,
                     scaler: torch.amp.GradScaler | None = None) -> None:
    from edm2.checkpoint import save_tensors

    tensors = {f"net/{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in ema.state_dict().items()})
    for i, st in optimizer.state_dict()["state"].items():
        tensors.update({f"adam/{i}/{k}": torch.as_tensor(v) for k, v in st.items()})
    if scaler is not None and scaler.is_enabled():
        st = scaler.state_dict()
        tensors["scaler/scale"] = torch.tensor(float(st["scale"]), dtype=torch.float64)
        tensors["scaler/growth_tracker"] = torch.tensor(int(st["_growth_tracker"]), dtype=torch.int64)
    save_tensors(outdir / f"checkpoint-{nimg:010d}.safetensors", tensors,
                 {"kind": "checkpoint", "nimg": nimg, "run": run.to_dict()})
    for old in find_checkpoints(outdir)[:-2]:  # keep the two newest
        old.unlink(missing_ok=True)


def _load_checkpoint(path: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: PosthocEMA | None,
                     scaler: torch.amp.GradScaler | None = None) -> int:
    """Restore the training state; `ema` may be None (only rank 0 tracks the averages)."""
    from edm2.checkpoint import load_tensors

    tensors, meta = load_tensors(path, kind="checkpoint")
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")}, strict=True)
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")})
    if scaler is not None and scaler.is_enabled() and "scaler/scale" in tensors:
        scaler.load_state_dict({"scale": float(tensors["scaler/scale"]),
                                "_growth_tracker": int(tensors["scaler/growth_tracker"]),
                                **{k: v for k, v in scaler.state_dict().items()
                                   if k not in ("scale", "_growth_tracker")}})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("adam/"):
            _, i, name = k.split("/")
            state.setdefault(int(i), {})[name] = v
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, st in state.items():  # moments in their parameter's memory layout (channels_last too), as in the
        for name, v in st.items():  # uninterrupted run: the fused step's rounding depends on the layout
            if v.shape == params[i].shape:
                st[name] = torch.empty_like(params[i], dtype=v.dtype).copy_(v)
    opt_state = optimizer.state_dict()
    opt_state["state"] = state
    optimizer.load_state_dict(opt_state)
    return int(meta["nimg"])


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps (the loop then checkpoints and exits)."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _step_seed(*keys: int) -> int:
    """A 32-bit seed determined by the integers `keys` (run seed, images seen, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _prepare_outdir_on_rank0(outdir: Path, run: RunConfig, rank: int, world: int) -> tuple[bool, str | None]:
    """Rank 0 validates (and creates) the out-dir and finds the newest checkpoint; every other process
    waits for its verdict, so all raise the same error or all go ahead. Returns (resuming, checkpoint)."""
    from edm2.checkpoint import atomic_write_text

    verdict: list = [None, False, None]  # error, resuming, checkpoint path
    if rank == 0:
        try:
            resuming = _prepare_outdir(outdir, run)
            checkpoints = find_checkpoints(outdir) if resuming else []
            outdir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(outdir / "training_options.json", json.dumps(run.to_dict(), indent=2) + "\n")
            verdict = [None, resuming, str(checkpoints[-1]) if checkpoints else None]
        except (ValueError, OSError) as e:
            verdict = [f"{e}", False, None]
    if world > 1:
        torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ValueError(verdict[0])
    return verdict[1], verdict[2]


STOP_NONE, STOP_PAUSE, STOP_SIGNAL = 0, 1, 2


def _agree_on_stop(code: int, world: int, device: torch.device) -> int:
    """The strongest stop request of any process (all-reduced), so that every process stops at one step."""
    if world == 1:
        return code
    flag = torch.tensor([code], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def train(opts: TrainOptions, progress: bool = True, max_steps: int | None = None) -> dict:
    """Train (or resume) the run in `opts.outdir`. Returns a summary dict.

    Everything about the run is validated before the output folder is touched. Re-running with the same
    options continues from the newest checkpoint; SIGINT/SIGTERM checkpoint and stop cleanly.
    `max_steps` stops after that many optimizer steps in this call (for tests and benchmarks).

    Inside a torch.distributed process group (see `edm2.distributed`), the global batch is split over the
    processes: each computes `batch_gpu` images per accumulation round at its own positions of the one
    global data stream, with its slice of the noise drawn for the whole global batch, so that the run
    equals a single-process run up to float summation order, and resumes under any number of processes.
    Rank 0 writes every file; the others wait for its out-dir verdict and agree on stop requests.
    """
    from tqdm import tqdm

    from edm2.data import InfiniteSampler, open_dataset
    from edm2.layers import fast_paths, force_weight_normalization_
    from edm2.losses import EDM2Loss, sample_sigma
    from edm2.networks import Precond
    from edm2.presets import NetworkConfig

    dataset = open_dataset(opts.data)
    run = resolve_run(opts, dataset)
    rank, world = world_info()
    device = resolve_device(opts.device)
    outdir = Path(opts.outdir)
    resuming, checkpoint = _prepare_outdir_on_rank0(outdir, run, rank, world)

    # Model, optimizer, EMA (rank 0 only: it alone writes snapshots), loss. The seed fixes the weights.
    torch.manual_seed(run.seed)
    low_precision = run.precision != "fp32"
    net = Precond(**run.network).train().requires_grad_(True).set_precision(run.precision)
    # channels_last pays with low-precision convolutions (oneDNN/AMX on CPU, tensor cores on CUDA), not in
    # float32 on CPU (docs/benchmarks.md).
    net = net.to(device, memory_format=torch.channels_last if low_precision else torch.contiguous_format)
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else net
    model = torch.compile(ddp) if run.compile else ddp
    optimizer = make_adam(net.parameters(), fused=True)  # one kernel for all tensors, CPU and CUDA
    # fp16: dynamic loss scaling, starting where the official code trains (scale 1); the scale doubles after
    # 2000 steps without overflow and halves (skipping the step) on one.
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, enabled=run.precision == "fp16")
    info = {"preset": run.preset, "dataset": run.dataset, "data": run.data}
    ema = PosthocEMA(net, outdir, run.ema_stds, snapshot_every=run.snapshot,
                     network=NetworkConfig.from_dict(run.network), info=info, rank=rank) if rank == 0 else None
    loss_fn = EDM2Loss(P_mean=run.P_mean, P_std=run.P_std, sigma_data=net.sigma_data)
    sampler = InfiniteSampler(len(dataset), run.seed)
    num_accum = run.batch // (world * run.batch_gpu)

    cur_nimg = 0
    if checkpoint is not None:
        cur_nimg = _load_checkpoint(Path(checkpoint), net, optimizer, ema, scaler)
    log = (outdir / "log.txt").open("a") if rank == 0 else None

    def say(msg: str) -> None:
        if log is not None:
            log.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
            log.flush()

    say(f"{'resuming at' if cur_nimg else 'starting'} {cur_nimg} images: preset {run.preset}, data {run.data}, "
        f"batch {run.batch} ({world} process(es) x {run.batch_gpu} x {num_accum} accumulation), device {device}, "
        f"precision {run.precision}{', compiled' if run.compile else ''}")

    bar = tqdm(total=run.duration / 1000, initial=cur_nimg / 1000, unit="kimg", disable=not progress or rank != 0,
               bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}{postfix}]")
    stats_file = (outdir / "stats.jsonl").open("a") if rank == 0 else None
    window_loss = torch.zeros([], device=device)
    window_steps, window_start, window_nimg = 0, time.time(), cur_nimg
    steps, status = 0, "finished"
    # Attention by SDPA and fast strided norms change float32 results by rounding only; the exact path
    # stays in use for plain float32 eager training.
    fast = low_precision or run.compile
    with _StopRequest() as stop, fast_paths(sdpa=fast, strided_norm=fast):
        while cur_nimg < run.duration:
            # One optimizer step over the global batch, as num_accum micro-batches per process.
            lr = learning_rate_schedule(cur_nimg, run.batch, run.lr, run.decay, run.rampup_Mimg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            # Noise levels and noise of the whole global batch come from one generator per step, so that
            # every image sees the same noise whatever the number of processes or accumulation rounds.
            gen = torch.Generator(device).manual_seed(_step_seed(run.seed, cur_nimg))
            sigma_all = sample_sigma(run.batch, run.P_mean, run.P_std, device, gen)
            noise_all = torch.randn([run.batch, net.img_channels, net.img_resolution, net.img_resolution],
                                    device=device, generator=gen)
            step_loss = torch.zeros([], device=device)
            for r in range(num_accum):
                start = (r * world + rank) * run.batch_gpu  # position of this micro-batch in the global batch
                part = slice(start, start + run.batch_gpu)
                torch.manual_seed(_step_seed(run.seed, cur_nimg, start))  # dropout
                images, labels = dataset.batch(sampler.indices(cur_nimg + start, run.batch_gpu), net.label_dim)
                images = images.to(device)
                labels = None if labels is None else labels.to(device)
                if run.compile:
                    force_weight_normalization_(net)  # compiled code does not write the weights itself
                with ddp.no_sync() if world > 1 and r < num_accum - 1 else contextlib.nullcontext():
                    loss = loss_fn(model, images, labels, sigma=sigma_all[part], noise=noise_all[part])
                    scaler.scale(loss.sum().mul(1 / (run.batch // world))).backward()
                step_loss += loss.detach().sum() / run.batch
            scaler.unscale_(optimizer)  # no-op unless fp16 loss scaling is on
            sanitize_gradients(net.parameters())
            scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
            scaler.update()
            cur_nimg += run.batch
            done = cur_nimg >= run.duration
            if ema is not None:  # snapshots at every multiple of run.snapshot, and at the end
                if ema.update(cur_nimg) or (done and ema.save_snapshots()):
                    say(f"snapshot at {cur_nimg} images")
            steps += 1
            window_loss += step_loss  # stays on the device; read at status time only
            window_steps += 1

            bar.update(run.batch / 1000)
            if cur_nimg % run.status < run.batch or done:
                if world > 1:
                    torch.distributed.all_reduce(window_loss)
                elapsed = time.time() - window_start
                sec_per_kimg = elapsed / max(cur_nimg - window_nimg, 1) * 1000
                entry = {"nimg": cur_nimg, "kimg": cur_nimg / 1000, "loss": float(window_loss) / window_steps,
                         "lr": lr, "sec_per_kimg": sec_per_kimg, "time": time.time()}
                if stats_file is not None:
                    stats_file.write(json.dumps(entry) + "\n")
                    stats_file.flush()
                bar.set_postfix_str(f"loss {entry['loss']:.4f}, lr {lr:.2e}, {sec_per_kimg:.2f} s/kimg")
                say(f"kimg {entry['kimg']:.1f} loss {entry['loss']:.4f} lr {lr:.3e} sec/kimg {sec_per_kimg:.2f}")
                if not math.isfinite(entry["loss"]):
                    say("loss is not finite")
                window_loss.zero_()
                window_steps, window_start, window_nimg = 0, time.time(), cur_nimg
            stop_code = STOP_SIGNAL if stop.requested else STOP_NONE
            if max_steps is not None and steps >= max_steps:
                stop_code = max(stop_code, STOP_PAUSE)
            stop_code = _agree_on_stop(stop_code, world, device)
            if rank == 0 and (cur_nimg % run.checkpoint < run.batch or done or stop_code):
                _save_checkpoint(outdir, cur_nimg, run, net, optimizer, ema, scaler)
            if stop_code and not done:
                status = "interrupted" if stop_code == STOP_SIGNAL else "paused"
                say(f"{status} at {cur_nimg} images; run the same command again to resume")
                break
    bar.close()
    if world > 1:
        torch.distributed.barrier()  # the others wait for rank 0's last checkpoint
    if stats_file is not None:
        stats_file.close()
    if status == "finished":
        say(f"finished at {cur_nimg} images")
    if log is not None:
        log.close()
    return {"status": status, "nimg": cur_nimg, "outdir": str(outdir), "steps": steps, "run": run.to_dict(),
            "rank": rank, "processes": world}
