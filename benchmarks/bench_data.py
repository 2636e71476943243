"""Data loading: loader speed against what a training step consumes, peak memory against dataset size, VAE encoding
speed; prints one JSON document (progress on stderr).

    python benchmarks/bench_data.py [--workers 0,2,4] [--sizes 2000,20000] [--vae-resolution 256] [--device cpu]
                                    [--skip loader,rss,vae] [--workdir DIR]

- loader: `BatchStream.steps` (the training loop's reader) over a zip of uncompressed 32x32 RGB PNGs (`cpu-rgb32`,
  micro-batch 64) and a zip of 8x64x64 float32 `.npy` latents (`edm2-img512-xs`, micro-batch 32), with 0, 2, 4
  worker processes: images/s after the first batch (startup reported apart), and the ratio to the images/s of
  `train_step` on the same preset (on the CPU: a short run at a small batch). Ratio > 1: the loader keeps up.
- rss: `edm2.training.train` for 3 steps of `cpu-rgb32` (batch 4) on zips of 2k and 20k tiny (32x32) PNGs, each in a
  fresh process: the training process's peak RSS (VmHWM) and the peak of the memory private to its DataLoader
  workers (summed, sampled every 20 ms). For contrast the same images from an `.npz`, which is held in memory:
  there the peak grows with the dataset, which shows the measurement sees it.
- vae: `StabilityVAEEncoder.encode_pixels` images/s with the Stable Diffusion VAE's architecture (the
  sd-vae-ft-mse configuration, random weights: nothing is downloaded) at --vae-resolution, fp32 and bf16 on the CPU,
  fp32/bf16/fp16 on CUDA.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from _shared import log, machine_info, random_trainer, sync

from edm2.data import BatchStream, open_dataset

SRC = Path(__file__).resolve().parents[1] / "src"


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=0)  # as `edm2 dataset convert` writes
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_zip(path: Path, n: int, make, name, classes: int = 10) -> Path:
    if path.exists():
        return path
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        labels = []
        for i in range(n):
            z.writestr(name(i), make(i))
            labels.append([name(i), i % classes])
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


def pixel_zip(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    return write_zip(folder / f"rgb32-{n}.zip", n, lambda i: png_bytes(rng.integers(0, 256, [32, 32, 3], np.uint8)),
                     lambda i: f"{i // 1000:05d}/img{i:08d}.png")


def latent_zip(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    return write_zip(folder / f"lat64-{n}.zip", n,
                     lambda i: npy_bytes(rng.normal(0, 1, [8, 64, 64]).astype(np.float32)),
                     lambda i: f"{i // 1000:05d}/img-mean-std-{i:08d}.npy")


def loader_speed(path: Path, batch: int, workers: int, batches: int) -> dict:
    ds = open_dataset(path)
    stream = BatchStream(ds, seed=0, batch=batch, batch_gpu=batch, label_dim=ds.num_classes, workers=workers)
    start = time.perf_counter()
    with stream.steps(0) as steps:
        next(steps)
        first = time.perf_counter()
        for _ in range(batches):
            next(steps)
        end = time.perf_counter()
    return {"workers": workers, "startup_s": round(first - start, 3),
            "images_per_s": round(batches * batch / (end - first), 1)}


def step_speed(preset: str, batch: int, device: torch.device, steps: int) -> float:
    """Images/s of `train_step` on `preset` (after one warm-up step)."""
    from edm2.training import train_step

    t = random_trainer(preset, batch, device)
    train_step(t, 0, t.data.micro_batches(0))
    sync(device)
    start = time.perf_counter()
    for k in range(steps):
        train_step(t, (k + 1) * batch, t.data.micro_batches((k + 1) * batch))
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def bench_loader(workdir: Path, workers: list[int], device: torch.device) -> dict:
    cpu = device.type == "cpu"
    plans = [("cpu-rgb32", pixel_zip(workdir, 2048), 64, 40, 16 if cpu else 256, 2 if cpu else 20),
             ("edm2-img512-xs", latent_zip(workdir, 512), 32, 12, 1 if cpu else 64, 1 if cpu else 20)]
    out = {}
    for preset, path, batch, batches, step_batch, steps in plans:
        log(f"loader: {preset} train_step at batch {step_batch} ...")
        consume = step_speed(preset, step_batch, device, steps)
        rows = []
        for w in workers:
            log(f"loader: {preset} with {w} workers ...")
            row = loader_speed(path, batch, w, batches)
            row["ratio_to_train_step"] = round(row["images_per_s"] / consume, 1)
            rows.append(row)
        out[preset] = {"data": path.name, "micro_batch": batch, "train_step_batch": step_batch,
                       "train_step_images_per_s": round(consume, 2), "loader": rows}
    return out


RSS_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time, torch
    torch.set_num_threads(1)
    from edm2.training import TrainOptions, train

    def kb(path, keys):
        try:
            with open(path) as f:
                return sum(int(line.split()[1]) for line in f if line.startswith(keys))
        except OSError:
            return 0

    def workers():  # the DataLoader workers are children of the main thread
        return [int(p) for p in open(f"/proc/self/task/{os.getpid()}/children").read().split()]

    peak, done = [0], threading.Event()
    def sample():  # memory private to the workers (what they do not share with the trainer), summed
        while not done.wait(0.02):
            peak[0] = max(peak[0], sum(kb(f"/proc/{p}/smaps_rollup", ("Private_Clean", "Private_Dirty"))
                                       for p in workers()))
    threading.Thread(target=sample, daemon=True).start()
    opts = TrainOptions(outdir=sys.argv[1], data=sys.argv[2], preset="cpu-rgb32", batch=4, duration=1 << 20,
                        status=1 << 20, snapshot=1 << 20, checkpoint=1 << 20, device="cpu")
    result = train(opts, progress=False, max_steps=3)
    done.set()
    print(json.dumps({"peak_rss_mb": kb("/proc/self/status", ("VmHWM",)) / 1024,
                      "peak_workers_private_mb": peak[0] / 1024, "workers": result["run"]["workers"]}))
""")


def bench_rss(workdir: Path, sizes: list[int]) -> dict:
    import os

    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    rows = []
    for n in sizes:
        zpath = pixel_zip(workdir, n)
        npz = workdir / f"rgb32-{n}.npz"
        if not npz.exists():
            ds = open_dataset(zpath)
            images, labels = ds.read_all()
            np.savez(npz, x=images.transpose(0, 2, 3, 1), y=labels)
        for kind, data in (("zip, streamed", zpath), ("npz, in memory", npz)):
            log(f"rss: {n} images, {kind} ...")
            with tempfile.TemporaryDirectory(dir=workdir) as out:
                proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, f"{out}/run", str(data)],
                                      env=env, capture_output=True, text=True, check=True)
            rows.append({"images": n, "data": kind, "file_mb": round(data.stat().st_size / 2**20, 1),
                         **json.loads(proc.stdout.strip().splitlines()[-1])})
    streamed = [r for r in rows if r["data"].startswith("zip")]
    growth = streamed[-1]["peak_rss_mb"] / streamed[0]["peak_rss_mb"] - 1
    return {"runs": rows, "streamed_peak_rss_growth": round(growth, 4)}


def sd_vae_config() -> dict:
    """The architecture of stabilityai/sd-vae-ft-mse (the AutoencoderKL of Stable Diffusion 1.x)."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, norm_num_groups=32, sample_size=512)


def bench_vae(workdir: Path, resolution: int, device: torch.device) -> dict:
    from diffusers import AutoencoderKL

    from edm2.data import StabilityVAEEncoder

    folder = workdir / "sd-vae-architecture"
    if not folder.exists():
        torch.manual_seed(0)
        AutoencoderKL(**sd_vae_config()).save_pretrained(folder)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    n = 2 if device.type == "cpu" else 32
    rows = []
    for precision in precisions:
        log(f"vae: encode {n} images of {resolution}x{resolution} in {precision} on {device} ...")
        enc = StabilityVAEEncoder(str(folder), batch_size=n, precision=precision)
        pixels = torch.randint(0, 256, [n, 3, resolution, resolution], dtype=torch.uint8, device=device)
        enc.encode_pixels(pixels[:1])  # load and warm up
        sync(device)
        start = time.perf_counter()
        enc.encode_pixels(pixels)
        sync(device)
        rows.append({"precision": precision, "images": n, "images_per_s": round(n / (time.perf_counter() - start), 3)})
    return {"resolution": resolution, "device": str(device), "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,2,4")
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--vae-resolution", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: loader, rss, vae")
    parser.add_argument("--workdir", help="folder for the synthetic datasets  [default: a temporary folder]")
    args = parser.parse_args()
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = {"machine": machine_info([device.type])}
        if "loader" not in skip:
            result["loader"] = bench_loader(workdir, [int(w) for w in args.workers.split(",")], device)
        if "rss" not in skip:
            result["rss"] = bench_rss(workdir, [int(n) for n in args.sizes.split(",")])
        if "vae" not in skip:
            result["vae"] = bench_vae(workdir, args.vae_resolution, device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
