"""Multi-process training and generation under torchrun (gloo on the CPU): the same results as one process,
exact agreement on stop requests, resume under another number of processes, one-line errors for bad setups.

Every multi-process run here is a real `torchrun --nproc-per-node 2` launch of the `edm2` command (or of a
small script calling the library), with one thread per process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm2.checkpoint import Snapshot, find_checkpoints, load_snapshot, load_tensors, read_metadata, save_snapshot
from edm2.cli import main
from edm2.training import TrainOptions, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed in this build")

# Six steps of 16 images on the minimal network; with --batch-gpu 4 and two processes, each step is two
# accumulation rounds of 4 images in each process.
BASE = dict(data="digits", preset="cpu-tiny8", batch=16, duration=16 * 6, status=32, snapshot=48, checkpoint=32,
            seed=3, device="cpu")
CLI_BASE = ["--data", "digits", "--preset", "cpu-tiny8", "--batch", "16", "--duration", "96", "--status", "32",
            "--snapshot", "48", "--checkpoint", "32", "--seed", "3", "--device", "cpu"]
# Different summation order of the gradients (all-reduce, accumulation) only: float32 rounding, carried
# through six Adam steps.
TOL = dict(rtol=1e-4, atol=2e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 <args>` with one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun_edm2(args: list[str]) -> subprocess.CompletedProcess:
    return torchrun(["-m", "edm2.cli", *[str(a) for a in args]])


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def rank_results(folder: Path) -> list[dict]:
    """The JSON result each rank of a test script wrote to `folder/rank<r>.json`, in rank order."""
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def final_state(outdir: Path, nimg: int = BASE["duration"]) -> dict[str, torch.Tensor]:
    tensors, meta = load_tensors(find_checkpoints(outdir)[-1], kind="checkpoint")
    assert meta["nimg"] == nimg
    return tensors


def assert_close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=k)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """One process, the whole global batch at once."""
    outdir = tmp_path_factory.mktemp("ref") / "run"
    result = train(TrainOptions(outdir=str(outdir), **BASE), progress=False)
    assert result["status"] == "finished" and result["processes"] == 1
    return outdir


def test_two_processes_with_accumulation_match_one_process(reference_run: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "ddp"
    proc = ok(torchrun_edm2(["train", "--outdir", outdir, *CLI_BASE, "--batch-gpu", "4"]))
    assert proc.stdout.count("finished at 96 images") == 1  # rank 0 speaks, rank 1 is silent

    # Optimizer state, weights and both EMAs equal those of the single-process run.
    a, b = final_state(outdir), final_state(reference_run)
    assert_close_states(a, b)
    # The same files, written once (by rank 0), and the same per-window losses.
    assert sorted(p.name for p in outdir.iterdir()) == sorted(p.name for p in reference_run.iterdir())
    for path in reference_run.glob("snapshot-*.safetensors"):
        assert_close_states(load_tensors(outdir / path.name)[0], load_tensors(path)[0])
    log = (outdir / "log.txt").read_text()
    assert log.count("starting 0 images") == 1 and "2 process(es) x 4 x 2 accumulation" in log
    stats = [json.loads(line) for line in (outdir / "stats.jsonl").read_text().splitlines()]
    ref_stats = [json.loads(line) for line in (reference_run / "stats.jsonl").read_text().splitlines()]
    assert [s["nimg"] for s in stats] == [s["nimg"] for s in ref_stats] == [32, 64, 96]
    np.testing.assert_allclose([s["loss"] for s in stats], [s["loss"] for s in ref_stats], rtol=1e-5)
    run = json.loads((outdir / "training_options.json").read_text())
    assert run["processes"] == 2 and run["batch_gpu"] == 4


INTERRUPT_SCRIPT = """
import json, os, signal, sys
import edm2.training as T
import edm2.training.step
from edm2.runtime import distributed

rank = int(os.environ["RANK"])
real_schedule = edm2.training.step.learning_rate_schedule

def schedule(cur_nimg, *args):
    # Only rank 1 is asked to stop, at the start of the step from 48 images; the processes must agree
    # to stop together after that step, and rank 0 must write the checkpoint.
    if rank == 1 and cur_nimg == 48:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_schedule(cur_nimg, *args)

edm2.training.step.learning_rate_schedule = schedule
with distributed("cpu"):
    result = T.train(T.TrainOptions(outdir=sys.argv[1], **json.loads(sys.argv[2])), progress=False)
with open(f"{sys.argv[3]}/rank{rank}.json", "w") as f:  # one file per rank: stdout lines may interleave
    json.dump({"rank": rank, "status": result["status"], "nimg": result["nimg"]}, f)
"""


def test_stop_request_on_one_rank_stops_all_then_resume_with_one_process(reference_run: Path,
                                                                         tmp_path: Path) -> None:
    script = tmp_path / "interrupt.py"
    script.write_text(textwrap.dedent(INTERRUPT_SCRIPT))
    outdir = tmp_path / "stopped"
    ok(torchrun([str(script), str(outdir), json.dumps(BASE), str(tmp_path)]))
    results = rank_results(tmp_path)
    assert results == [{"rank": 0, "status": "interrupted", "nimg": 64},
                       {"rank": 1, "status": "interrupted", "nimg": 64}]
    assert read_metadata(find_checkpoints(outdir)[-1])["nimg"] == 64
    assert "interrupted at 64 images" in (outdir / "log.txt").read_text()

    # Resume in a single process (a different number of processes): the same end as the uninterrupted run.
    result = train(TrainOptions(outdir=str(outdir), **BASE), progress=False)
    assert result["status"] == "finished" and result["steps"] == 2
    assert_close_states(final_state(outdir), final_state(reference_run))
    assert json.loads((outdir / "training_options.json").read_text())["processes"] == 1


def test_resume_a_single_process_run_with_two_processes(reference_run: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "grow"
    first = train(TrainOptions(outdir=str(outdir), **BASE), progress=False, max_steps=2)
    assert first["status"] == "paused" and first["nimg"] == 32
    proc = ok(torchrun_edm2(["train", "--outdir", outdir, *CLI_BASE]))
    assert "finished at 96 images" in proc.stdout
    assert "resuming at 32 images" in (outdir / "log.txt").read_text()
    assert_close_states(final_state(outdir), final_state(reference_run))


def test_distributed_generation_writes_the_single_process_images(reference_run: Path, tmp_path: Path) -> None:
    # The snapshot with its learned gains set to 1, so that the network visibly shapes the images.
    snap = load_snapshot(reference_run / "snapshot-0000000096-0.100.safetensors")
    state = {k: torch.ones_like(v) if k.endswith(("emb_gain", "out_gain")) else v for k, v in snap.state_dict.items()}
    net = tmp_path / "loud.safetensors"
    save_snapshot(net, Snapshot(state, snap.network, snap.sigma_rel, snap.nimg, snap.info))
    gen = ["generate", "--net", net, "--seeds", "0-6", "--batch", "2", "--steps", "4", "--device", "cpu"]

    single = CliRunner().invoke(main, [str(a) for a in [*gen, "--outdir", tmp_path / "one",
                                                          "--grid", tmp_path / "one.png"]])
    assert single.exit_code == 0, single.output
    proc = ok(torchrun_edm2([*gen, "--outdir", tmp_path / "two", "--grid", tmp_path / "two.png"]))
    assert proc.stdout.count("wrote 7 images") == 1

    names = [f"{s:06d}.png" for s in range(7)]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:
        assert np.array_equal(read_png(tmp_path / "two" / name), read_png(tmp_path / "one" / name)), name
    assert np.array_equal(read_png(tmp_path / "two.png"), read_png(tmp_path / "one.png"))
    assert len({read_png(tmp_path / "one" / n).tobytes() for n in names}) == 7


POSTHOC_DDP_SCRIPT = """
import json, sys
import torch
from edm2.runtime import distributed
from edm2.posthoc import PosthocEMA

def batches():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 8, 4, generator=g)  # six steps, global batch 8

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

outdir, mode = sys.argv[1], sys.argv[2]
if mode == "single":
    net = model()
    wrapped, rank, world = net, 0, 1
else:
    ctx = distributed("cpu")
    rank, world = ctx.__enter__()
    net = model()
    wrapped = torch.nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
ema = PosthocEMA(wrapped, outdir, stds=(0.05, 0.10), snapshot_every=2)
written = []
for step, x in enumerate(batches(), 1):
    part = x.chunk(world)[rank]  # this process's share of the global batch
    loss = wrapped(part).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    written += [p.rsplit("/", 1)[-1] for p in map(str, ema.update(step))]
if len(sys.argv) > 3:  # one file per rank: stdout lines of two processes may interleave
    with open(f"{sys.argv[3]}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "written": written}, f)
if mode != "single":  # leave the process group, then exit without the interpreter's teardown: in about 1 run
    ctx.__exit__(None, None, None)  # in 8 a C++ destructor of torch's gloo group aborted after the last line
    import os
    os._exit(0)  # (SIGABRT, no Python frame); the results are in the files above
"""


def test_posthoc_ema_of_a_ddp_model_writes_once_and_equals_one_process(tmp_path: Path) -> None:
    script = tmp_path / "posthoc_ddp.py"
    script.write_text(textwrap.dedent(POSTHOC_DDP_SCRIPT))
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "single"], capture_output=True,
                            text=True, timeout=60)
    assert single.returncode == 0, single.stderr
    ok(torchrun([str(script), str(tmp_path / "two"), "ddp", str(tmp_path)]))
    results = rank_results(tmp_path)
    names = [f"snapshot-{t:010d}-{s:.3f}.safetensors" for t in (2, 4, 6) for s in (0.05, 0.10)]
    assert results == [{"rank": 0, "written": names}, {"rank": 1, "written": []}]  # rank 0 alone writes
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:
        a, b = load_tensors(tmp_path / "two" / name)[0], load_tensors(tmp_path / "one" / name)[0]
        assert sorted(a) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # no "module." prefix
        assert_close_states(a, b)
    first, last = (load_tensors(tmp_path / "two" / n)[0] for n in (names[0], names[-2]))
    assert not torch.allclose(first["0.weight"], last["0.weight"])  # the averages follow training


def test_batch_not_divisible_by_processes_is_one_line_error(tmp_path: Path) -> None:
    outdir = tmp_path / "bad"
    proc = torchrun_edm2(["train", "--outdir", outdir, *CLI_BASE, "--batch-gpu", "3"])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "edm2: error:" in line]
    # Rank 0 reports; rank 1 would repeat the same line only if torchrun had not stopped it within seconds.
    assert 1 <= len(errors) <= 2
    assert set(errors) == {"edm2: error: --batch 16 must be a positive multiple of processes (2) x --batch-gpu (3)"}
    assert "Traceback" not in "\n".join(line for line in proc.stderr.splitlines() if "edm2" in line)
    assert not outdir.exists()


def test_resume_with_a_number_of_processes_that_cannot_split_the_batch(reference_run: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    import edm2.training.loop as T

    before = {p.name: p.read_bytes() for p in reference_run.iterdir()}
    monkeypatch.setattr(T, "world_info", lambda: (0, 3))  # as if launched with --nproc-per-node 3
    with pytest.raises(ValueError, match=r"--batch 16 cannot be split over 3 processes"):
        train(TrainOptions(outdir=str(reference_run), **BASE), progress=False)
    assert {p.name: p.read_bytes() for p in reference_run.iterdir()} == before  # nothing touched


@pytest.mark.parametrize("command", ["train", "generate"])
def test_fp16_on_cpu_is_one_line_error(command: str, reference_run: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    if command == "train":
        args = ["train", "--outdir", outdir, *CLI_BASE, "--precision", "fp16"]
    else:
        args = ["generate", "--net", reference_run / "snapshot-0000000096-0.100.safetensors", "--outdir", outdir,
                "--seeds", "0", "--device", "cpu", "--precision", "fp16"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error: --precision fp16 needs a CUDA device"), lines
    assert not outdir.exists()
