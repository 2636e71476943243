"""Training, one concern a module: `option_table` (what the user asks, declared once), `options` (the run it
resolves to), `recipes` (schedules that follow the run, the `--preset auto` table, the budget arithmetic),
`augment` (non-leaky augmentation of the EDM recipe), `step` (optimizer recipe, setup, `train_step`), `budget`
(measuring a run's costs for `--budget`), `runlog` (log, stats, progress bar) and `loop` (`train`: the loop a
newcomer reads first)."""

from edm2.training.budget import measure_costs, plan_budget
from edm2.training.loop import claim_run_folder, train
from edm2.training.options import RunConfig, TrainOptions, resolve_run
from edm2.training.step import (
    ADAM_BETAS,
    ADAM_EPS,
    Trainer,
    learning_rate_schedule,
    make_adam,
    optimizer_step,
    sanitize_gradients,
    setup,
    step_seed,
    train_step,
)

__all__ = ["learning_rate_schedule", "make_adam", "sanitize_gradients", "optimizer_step", "ADAM_BETAS", "ADAM_EPS",
           "step_seed", "Trainer", "setup", "train_step", "train", "claim_run_folder", "TrainOptions", "RunConfig",
           "resolve_run", "measure_costs", "plan_budget"]
