"""The training loop, top to bottom: claim the run folder, build the run (`edm2.training.step.setup`), then step,
average, log and checkpoint until the duration is reached or a stop is asked for.

A run is validated before its folder is touched (`edm2.training.options.resolve_run`); rank 0 writes every file:
`training_options.json`, `log.txt` and `stats.jsonl` (`RunLog`), the EMA snapshots (`edm2.ema.trackers`) and the
training-state checkpoints (`edm2.files.run_folder`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from edm2.data import open_dataset
from edm2.files import (
    OPTIONS_FILE,
    RunLock,
    atomic_write_text,
    check_run_folder,
    find_checkpoints,
    load_training_state,
    remove_stale_temps,
    save_training_state,
)
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
from edm2.training.budget import plan_budget
from edm2.training.options import RunConfig, TrainOptions, resolve_run
from edm2.training.recipes import budget_clock, describe
from edm2.training.runlog import RunLog
from edm2.training.step import setup, train_step

__all__ = ["claim_run_folder", "train"]


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
            check_run_folder(outdir, run.identity(), run.ADDED)
            outdir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            resuming = check_run_folder(outdir, run.identity(), run.ADDED)  # again: it may have changed before the lock
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
        t = setup(run, dataset, device, outdir, fresh=checkpoint is None)
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
                    save_training_state(outdir, cur_nimg, run.to_dict(), t.net, t.optimizer, ema_state, t.scaler,
                                        t.recorded_loss_scale())
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
