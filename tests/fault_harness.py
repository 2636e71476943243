"""Killing writers: run an `edm2` command in a child process, SIGKILL it at a chosen moment (a random time, or
inside a temporary write: at the n-th `os.fsync` or `os.replace` of the process), run it again, and compare what
it leaves with an uninterrupted run. Used by tests/test_faults.py and benchmarks/bench_faults.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The child: optionally patch os.<mode> to SIGKILL the process at its n-th call, then run the edm2 command.
BOOT = r"""
import os, signal, sys
mode, n = sys.argv[1], int(sys.argv[2])
del sys.argv[1:3]
if mode != "none":
    real, calls = getattr(os, mode), [0]
    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(os, mode, patched)
sys.argv[0] = "edm2"
from edm2.cli import main
main()
"""

TEMP_GLOB = ".*.tmp"


@dataclass
class Writer:
    """One writer under test: `argv(out)` is its command line writing into the folder `out`, and `digest(out)`
    what must come out of it (file -> content digest), independent of how often it was killed."""

    name: str
    argv: Callable[[Path], list[str]]
    digest: Callable[[Path], dict[str, str]]
    env: dict[str, str] = field(default_factory=dict)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONHASHSEED": "0", "EDM2_OFFLINE": "1", **(extra or {})}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def run(writer: Writer, out: Path, mode: str = "none", n: int = 0, kill_after: float | None = None,
        timeout: float = 300) -> tuple[int, str, float]:
    """Run the writer once: (exit code, stderr, seconds); -9 when it was killed."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", BOOT, mode, str(n), *map(str, writer.argv(out))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env(writer.env))
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode(errors="replace"), time.perf_counter() - start


def temps(out: Path) -> list[Path]:
    """Temporary files of the atomic writer left anywhere under `out`."""
    return sorted(out.rglob(TEMP_GLOB)) if out.exists() else []


def kill_then_finish(writer: Writer, out: Path, mode: str = "none", n: int = 0,
                     kill_after: float | None = None, reruns: int = 3) -> dict:
    """Kill the writer (at the n-th os.<mode> call, or after `kill_after` seconds), then rerun the same command
    until it succeeds (at most `reruns` times); a writer that ended before the point is not run again. Returns
    what happened, the digest of the result, the temporaries left, and the seconds of the finishing run."""
    code, err, seconds = run(writer, out, mode, n, kill_after)
    killed = code == -signal.SIGKILL
    finished = code if not killed else None  # not killed (it ended before the point): its own result counts
    for _ in range(reruns if killed else 0):
        finished, err, seconds = run(writer, out)
        if finished == 0:
            break
    return {"killed": killed, "first_exit": code, "exit": finished, "stderr": err.strip().splitlines()[-3:],
            "digest": writer.digest(out) if finished == 0 else {}, "temps": [str(p) for p in temps(out)],
            "resume_seconds": seconds}


# ----------------------------------------------------------------------------------------------------
# Digests of the outputs: equal content, whatever the write history.


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_digest(out: Path, pattern: str) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): file_digest(p) for p in sorted(out.rglob(pattern)) if p.is_file()}


def tensors_digest(out: Path, pattern: str) -> dict[str, str]:
    """Safetensors files by their tensors only (metadata such as timings may differ between runs)."""
    from safetensors.numpy import load_file

    result = {}
    for p in sorted(out.rglob(pattern)):
        h = hashlib.sha256()
        for k, v in sorted(load_file(str(p)).items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes())
        result[p.relative_to(out).as_posix()] = h.hexdigest()
    return result


def zip_digest(path: Path) -> dict[str, str]:
    with zipfile.ZipFile(path) as z:
        return {name: hashlib.sha256(z.read(name)).hexdigest() for name in sorted(z.namelist())}


def npz_digest(path: Path) -> dict[str, str]:
    with np.load(path, allow_pickle=False) as d:
        return {k: hashlib.sha256(np.ascontiguousarray(d[k]).tobytes()).hexdigest() for k in sorted(d.files)}


def json_values(path: Path, keys: tuple[str, ...]) -> dict[str, str]:
    data = json.loads(path.read_text())
    rows = data.get("rows", [])
    return {f"row{i}.{k}": repr(r.get(k)) for i, r in enumerate(rows) for k in keys}


def stats_counts(run: Path) -> list[int]:
    """The image counts of stats.jsonl, in file order (they must only grow)."""
    lines = (run / "stats.jsonl").read_text().splitlines() if (run / "stats.jsonl").exists() else []
    return [json.loads(line)["nimg"] for line in lines if line.strip()]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# The writers under test and their inputs.


def make_inputs(root: Path) -> dict[str, Path]:
    """A tiny digits run with snapshots, a folder of 16x16 RGB images with labels, small detector weights."""
    from detector_weights import write_small_dinov2
    from PIL import Image

    from edm2.training import TrainOptions, train

    train(TrainOptions(outdir=str(root / "run"), data="digits", preset="cpu-tiny8", batch=16, duration=64,
                       status=32, snapshot=32, checkpoint=32, workers=0, device="cpu"), progress=False)
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(96):
        Image.fromarray(rng.integers(0, 256, [16, 16, 3], dtype=np.uint8)).save(images / f"{i:03d}.png")
    labels = [[f"{i:03d}.png", i % 4] for i in range(96)]
    (images / "dataset.json").write_text(json.dumps({"labels": labels}))
    det = root / "det"
    det.mkdir()
    write_small_dinov2(det)
    snap = sorted((root / "run").glob("snapshot-*-0.100.safetensors"))[-1]
    guide = sorted((root / "run").glob("snapshot-*-0.050.safetensors"))[0]
    return {"run": root / "run", "snap": snap, "guide": guide, "images": images, "det": det}


def make_latent_inputs(root: Path, inputs: dict[str, Path]) -> dict[str, Path]:
    """A tiny random VAE (no download), the images as a pixel zip and that zip encoded to latents."""
    from click.testing import CliRunner
    from conftest import save_tiny_vae

    from edm2.cli import main

    vae = save_tiny_vae(root / "vae")
    pixels, latents = root / "pixels.zip", root / "latents.zip"
    for args in (["dataset", "convert", "--source", inputs["images"], "--dest", pixels],
                 ["dataset", "encode", "--source", pixels, "--dest", latents, "--vae", vae, "--device", "cpu",
                  "--workers", 0]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return {**inputs, "vae": vae, "pixels": pixels, "latents": latents}


def writers(i: dict[str, Path]) -> dict[str, Writer]:
    return {
        "train": Writer("train", lambda o: ["train", "--outdir", o / "run", "--data", "digits", "--preset", "cpu-tiny8",
                                            "--batch", 16, "--duration", 192, "--status", 32, "--snapshot", 64,
                                            "--checkpoint", 32, "--workers", 0, "--device", "cpu"],
                        lambda o: tensors_digest(o, "snapshot-*.safetensors")),
        "generate": Writer("generate", lambda o: ["generate", "--net", i["snap"], "--seeds", "0-59", "--batch", 10,
                                                  "--steps", 3, "--outdir", o / "img", "--grid", o / "grid.png",
                                                  "--device", "cpu"],
                           lambda o: files_digest(o, "*.png")),
        "reconstruct": Writer("reconstruct", lambda o: ["reconstruct", "--indir", i["run"], "--outdir", o / "ema",
                                                        "--std", "0.05,0.07,0.09,0.12"],
                              lambda o: tensors_digest(o, "*.safetensors")),
        "dataset convert": Writer("convert", lambda o: ["dataset", "convert", "--source", i["images"], "--dest",
                                                        o / "d.zip"],
                                  lambda o: zip_digest(o / "d.zip")),
        "metrics ref": Writer("ref", lambda o: ["metrics", "ref", "--data", i["images"], "--dest", o / "ref.npz",
                                                "--metrics", "fd_dinov2", "--detector-dir", i["det"], "--device",
                                                "cpu", "--batch", 32],
                              lambda o: npz_digest(o / "ref.npz")),
        "judge train": Writer("judge", lambda o: ["judge", "train", "--data", "digits", "--out",
                                                  o / "judge.safetensors", "--images", 2000],
                              lambda o: tensors_digest(o, "judge.safetensors")),
        "ema-sweep": Writer("sweep", lambda o: ["ema-sweep", "--run", i["run"], "--outdir", o / "sw", "--std",
                                                "0.05,0.10", "--samples", 20, "--steps", 3, "--device", "cpu"],
                            lambda o: json_values(o / "sw" / "ema_sweep.json", ("sigma_rel", "fd", "accuracy"))),
        "guidance-sweep": Writer("gsweep", lambda o: ["guidance-sweep", "--net", i["snap"], "--gnet", i["guide"],
                                                      "--guidance", "1,2", "--samples", 20, "--steps", 3,
                                                      "--outdir", o / "gs", "--device", "cpu"],
                                 lambda o: json_values(o / "gs" / "guidance_sweep.json", ("guide", "weight", "fd"))),
        "toy train": Writer("toy", lambda o: ["toy", "train", "--outdir", o / "toy", "--fast", "--steps", 60],
                            lambda o: tensors_digest(o, "*.safetensors")),
    }


def latent_writers(i: dict[str, Path]) -> dict[str, Writer]:
    """The writers that need the tiny VAE (`make_latent_inputs`)."""
    return {
        "dataset encode": Writer("encode", lambda o: ["dataset", "encode", "--source", i["pixels"], "--dest",
                                                      o / "lat.zip", "--vae", i["vae"], "--device", "cpu",
                                                      "--workers", 0, "--batch", 8],
                                 lambda o: zip_digest(o / "lat.zip")),
        "dataset decode": Writer("decode", lambda o: ["dataset", "decode", "--source", i["latents"], "--dest",
                                                      o / "dec", "--device", "cpu", "--workers", 0],
                                 lambda o: files_digest(o / "dec", "*")),
    }


NAMES = ["train", "generate", "reconstruct", "dataset convert", "metrics ref", "judge train", "ema-sweep",
         "guidance-sweep", "toy train"]
LATENT_NAMES = ["dataset encode", "dataset decode"]
