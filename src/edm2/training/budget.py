"""Time budgets: measure what a run's time goes to on a throw-away copy of the run, then fix its duration once
(the plan's arithmetic is `edm2.training.recipes.plan_duration`)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from edm2.files import check_run_folder, save_training_state, scratch_folder
from edm2.runtime import fast_paths_for, resolve_device, world_info
from edm2.training.options import RunConfig, TrainOptions, resolve_run
from edm2.training.recipes import BudgetPlan, RunCosts, budget_clock, plan_duration
from edm2.training.step import setup, train_step

__all__ = ["measure_costs", "plan_budget"]


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
        save_training_state(scratch, nimg, run.to_dict(), t.net, t.optimizer, ema_state, t.scaler,
                            t.recorded_loss_scale())

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
