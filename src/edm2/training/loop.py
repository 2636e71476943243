"""The training loop, top to bottom: claim the run folder, build the run (`edm2.training.step.setup`), then step,
average, log and checkpoint until the duration is reached or a stop is asked for.

A run is validated before its folder is touched (`edm2.training.options.resolve_run`); rank 0 writes every file:
`training_options.json` (`record_run`, once the checkpoint is loaded), `log.txt` and `stats.jsonl` (`RunLog`), the
EMA snapshots (`edm2.ema.trackers`) and the training-state checkpoints (`edm2.files.run_folder`). Before each
status report, snapshot and checkpoint the loss and the weights are checked to be finite: a diverged run stops
with the last good checkpoint kept. A refused resume changes no file; a new run that fails before its first
checkpoint leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from edm2.data import open_dataset
from edm2.files import (
    OPTIONS_FILE,
    RunLock,
    atomic_write_text,
    check_run_folder,
    discard_new_run,
    find_checkpoints,
    load_training_state,
    read_metadata,
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
from edm2.training.dynamics import DynamicsProbe
from edm2.training.option_table import Option
from edm2.training.options import RunConfig, TrainOptions, check_memory, resolve_run
from edm2.training.recipes import budget_clock, describe
from edm2.training.runlog import RunLog
from edm2.training.step import Trainer, all_finite, setup, train_step

__all__ = ["claim_run_folder", "record_run", "train"]


def _claim(outdir: Path, run: RunConfig, lock: RunLock) -> tuple[str | None, bool]:
    """Rank 0's part of `claim_run_folder`: (the checkpoint to resume from, whether the folder holds a new run)."""
    may_change = tuple(Option("").spelling(k) for k in run.MUTABLE if k not in ("processes", "provenance"))
    check_run_folder(outdir, run.identity(), run.ADDED, may_change)
    outdir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    resuming = check_run_folder(outdir, run.identity(), run.ADDED, may_change)  # again: it may have changed
    remove_stale_temps(outdir)
    checkpoints = find_checkpoints(outdir) if resuming else []
    if not checkpoints:
        return None, not resuming
    trained = read_metadata(checkpoints[-1], kind="checkpoint")["nimg"]
    if trained > run.duration:
        raise ValueError(f"--outdir {outdir}: the run already trained {trained} images, more than --duration "
                         f"{run.duration}; give --duration {trained} or more to resume it, or use a new --outdir")
    return str(checkpoints[-1]), False


def _let_go(lock: RunLock, made: list[Path]) -> None:
    """Unlock, and remove the folders `claim_run_folder` made when nothing was left in them."""
    lock.release()
    for folder in made:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def claim_run_folder(outdir: Path, run: RunConfig) -> Iterator[Path | None]:
    """Rank 0 checks `outdir` (reading only, so a refused run touches nothing), locks it, removes temporaries of
    killed writers and checks the newest checkpoint (readable, not past the run's duration); every other process
    waits for its verdict, so all raise the same error or all go ahead. Yields the checkpoint to resume from (None
    for a new run); unlocks at the end. A new run that ends with an error before its first checkpoint is discarded
    (`discard_new_run`, and the folder when this call made it), so the corrected command starts afresh."""
    rank, world = world_info()
    lock = RunLock(outdir)
    made = [p for p in (outdir, *outdir.parents) if not p.exists()]
    verdict: list = [None, None, False]  # error, checkpoint, new run
    if rank == 0:
        try:
            verdict = [None, *_claim(outdir, run, lock)]
        except (ValueError, OSError) as e:
            _let_go(lock, made)
            verdict = [str(e), None, False]
    if world > 1:
        torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ValueError(verdict[0])
    try:
        yield None if verdict[1] is None else Path(verdict[1])
    except Exception:
        if rank == 0 and verdict[2] and not find_checkpoints(outdir):
            discard_new_run(outdir)
        raise
    finally:
        if rank == 0:
            _let_go(lock, made)


def _previous_options(outdir: Path) -> dict | None:
    """The options of the run in `outdir`, or None (absent or unreadable: `check_run_folder` reports that)."""
    try:
        options = json.loads((outdir / OPTIONS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return options if isinstance(options, dict) else None


def record_run(outdir: Path, run: RunConfig) -> None:
    """Write `training_options.json` (rank 0, once the run is built and its checkpoint loaded): a new run's options
    as resolved; a resumed run's with the mutable fields (`RunConfig.MUTABLE`) as given now and the provenance of
    the first run kept, only the entries of the mutable values that change replaced. An unchanged file is not
    rewritten."""
    old = _previous_options(outdir)
    options = run.to_dict()
    if old is not None and isinstance(old.get("provenance"), dict):
        kept = dict(old["provenance"])
        for name, entry in options["provenance"].items():
            before = kept.get(name)
            if not isinstance(before, dict) or (name in run.MUTABLE and before.get("value") != entry["value"]):
                kept[name] = entry
        options["provenance"] = kept
    text = json.dumps(options, indent=2) + "\n"
    path = outdir / OPTIONS_FILE
    if old is None or path.read_text() != text:
        atomic_write_text(path, text)


def _crossed(nimg: int, interval: int, batch: int) -> bool:
    """Whether the step that ended at `nimg` crossed a multiple of `interval`."""
    return nimg % interval < batch


def _newest_checkpoint(outdir: Path) -> str | None:
    """The name of the newest checkpoint in `outdir`: what of the run survives an error."""
    checkpoints = find_checkpoints(outdir) if outdir.is_dir() else []
    return checkpoints[-1].name if checkpoints else None


def _diverged(outdir: Path, nimg: int, log: RunLog) -> ValueError:
    """The error of a run whose loss or weights are no longer finite, also written to log.txt."""
    newest = _newest_checkpoint(outdir)
    kept = f"the last good checkpoint is {newest}" if newest else "no checkpoint was written yet"
    message = (f"training diverged at {nimg} images: the loss or the weights are not finite (NaN or inf); nothing "
               f"holding them was written ({kept}) and the same options would diverge again: train into a new "
               "--outdir with a lower --lr or a longer --rampup")
    log.say(message)
    return ValueError(message)


def _no_space(outdir: Path) -> OSError:
    """The one-line error of a full disk (errno ENOSPC)."""
    newest = _newest_checkpoint(outdir)
    kept = f"the newest checkpoint, {newest}, is intact and the run resumes from it" if newest else \
        "no checkpoint was written yet, so the run starts afresh"
    error = OSError(f"no space left on device while training into {outdir}; {kept}: free some space and run the "
                    "same command again")
    error.errno = errno.ENOSPC
    return error


def _steps(t: Trainer, log: RunLog, outdir: Path, cur_nimg: int, max_steps: int | None) -> tuple[str, int, int]:
    """Step from `cur_nimg` until the duration or a stop; returns (status, images seen, steps taken)."""
    run, rank = t.run, world_info()[0]
    steps, status = 0, "finished"
    probe = DynamicsProbe(t.net, activations=not run.compile) if rank == 0 else None  # Figure 3's magnitudes
    with StopRequest() as stop, fast_paths_for(run.precision, run.compile), t.data.steps(cur_nimg) as batches:
        while cur_nimg < run.duration:
            # Whether the step reports is known before it is taken, so that the instruments can measure it.
            done = cur_nimg + run.batch >= run.duration
            report = _crossed(cur_nimg + run.batch, run.status, run.batch) or done
            measure = probe is not None and report
            with probe.measuring(t.optimizer) if measure else contextlib.nullcontext():
                loss, lr = train_step(t, cur_nimg, next(batches))
            cur_nimg += run.batch
            steps += 1
            stop_code = STOP_SIGNAL if stop.requested else STOP_NONE
            if max_steps is not None and steps >= max_steps:
                stop_code = max(stop_code, STOP_PAUSE)
            stop_code = agree_on_stop(stop_code, t.device)
            save = _crossed(cur_nimg, run.checkpoint, run.batch) or done or bool(stop_code)
            # Every process looks (a collective) before anything that could hold a non-finite value is written.
            if (report or save or _crossed(cur_nimg, run.snapshot, run.batch)) and not all_finite(
                    t, log.window_loss + loss):
                raise _diverged(outdir, cur_nimg, log)
            if t.ema is not None and (t.ema.update(cur_nimg) or (done and t.ema.save_snapshots())):
                log.say(f"snapshot at {cur_nimg} images")  # at every multiple of run.snapshot, and at the end
            log.step(cur_nimg, loss, lr, report=report, extra={"dynamics": probe.collect()} if measure else None)
            if rank == 0 and save:
                ema_state = None if t.ema is None else t.ema.state_dict()
                save_training_state(outdir, cur_nimg, run.to_dict(), t.net, t.optimizer, ema_state, t.scaler,
                                    t.recorded_loss_scale())
            if stop_code and not done:
                status = "interrupted" if stop_code == STOP_SIGNAL else "paused"
                log.say(f"{status} at {cur_nimg} images; run the same command again to resume")
                break
    return status, cur_nimg, steps


def _run(run: RunConfig, dataset, device: torch.device, outdir: Path, checkpoint: Path | None, progress: bool,
         max_steps: int | None, closing: Callable[[], str | None]) -> tuple[str, int, int]:
    """Build the run, load its checkpoint, record its options, then step (`_steps`); `closing()` gives the last
    line of the log, if any. Returns (status, images seen, steps taken)."""
    rank, world = world_info()
    set_cuda_math(device, run.allow_tf32)
    t = setup(run, dataset, device, outdir, fresh=checkpoint is None)
    cur_nimg = 0 if checkpoint is None else load_training_state(checkpoint, t.net, t.optimizer, t.ema, t.scaler)
    if rank == 0:
        record_run(outdir, run)
    recipe = [f"recipe: {line}" for line in describe(run.provenance)]
    if progress and rank == 0 and recipe:
        print("\n".join(recipe), flush=True)  # once, before the progress bar
    log = RunLog(outdir, run.duration, cur_nimg, device, rank, world, progress)
    try:
        log.say(f"{'resuming at' if cur_nimg else 'starting'} {cur_nimg} images: preset {run.preset}, data "
                f"{run.data}, batch {run.batch} ({world} process(es) x {run.batch_gpu} x {len(t.data.offsets)} "
                f"accumulation), device {device}, precision {run.precision}{', compiled' if run.compile else ''}")
        for line in recipe:
            log.say(line)
        status, cur_nimg, steps = _steps(t, log, outdir, cur_nimg, max_steps)
        if world > 1:
            torch.distributed.barrier()  # the others wait for rank 0's last checkpoint
        if status == "finished":
            log.say(f"finished at {cur_nimg} images")
        if (line := closing()) is not None:
            log.say(line)
    finally:
        log.close()
    return status, cur_nimg, steps


def train(opts: TrainOptions, progress: bool = True, max_steps: int | None = None) -> dict:
    """Train (or resume) the run in `opts.outdir`; returns a summary dict. Everything about the run is
    validated before the folder is touched, and one process at a time may train it. Re-running the same
    options continues from the newest checkpoint; SIGINT/SIGTERM checkpoint and stop cleanly. With
    `opts.budget`, the duration is planned from the throughput of the first steps (`plan_budget`). `max_steps`
    stops after that many optimizer steps in this call (for tests and benchmarks). A full disk is one OSError
    (errno ENOSPC) saying what was kept; a diverged run one ValueError."""
    clock = budget_clock(opts.budget_clock)
    started = clock()
    rank, world = world_info()
    dataset = open_dataset(opts.data, progress=progress and rank == 0)
    outdir = Path(opts.outdir)
    previous = _previous_options(outdir)
    plan = None if opts.budget is None else plan_budget(opts, dataset, previous, started)
    run = resolve_run(opts, dataset, world, plan, previous)
    device = resolve_device(opts.device)
    check_memory(run, device)  # before the folder is touched

    def closing() -> str | None:
        if opts.budget is None:
            return None
        return f"{clock() - started:.1f} s of {opts.budget_clock} time used in this call (budget {opts.budget:g} s)"

    try:
        with claim_run_folder(outdir, run) as checkpoint:
            status, cur_nimg, steps = _run(run, dataset, device, outdir, checkpoint, progress, max_steps, closing)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise _no_space(outdir) from None
    return {"status": status, "nimg": cur_nimg, "outdir": str(outdir), "steps": steps, "run": run.to_dict(),
            "rank": rank, "processes": world, "seconds": clock() - started}
