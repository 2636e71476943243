"""The run folder: `training_options.json`, `log.txt`, `stats.jsonl`, `checkpoint-<nimg>.safetensors` (the
training state for resuming, `kind: "checkpoint"`: network, Adam, EMAs, loss scale; the two newest kept),
the snapshots (`edm2.files.snapshot`), and while a process trains it, a lock file naming its holder.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import filelock
import torch

from edm2.files.base import TEMP_SUFFIX, load_tensors, save_tensors

__all__ = ["OPTIONS_FILE", "LOG_FILE", "STATS_FILE", "LOCK_FILE", "KEEP_CHECKPOINTS", "checkpoint_filename",
           "find_checkpoints", "save_training_state", "load_training_state", "RunLock", "check_run_folder",
           "discard_new_run"]

OPTIONS_FILE = "training_options.json"
LOG_FILE = "log.txt"
STATS_FILE = "stats.jsonl"
LOCK_FILE = ".edm2-train.lock"
KEEP_CHECKPOINTS = 2


def checkpoint_filename(nimg: int) -> str:
    """Name of the training-state checkpoint after `nimg` images."""
    return f"checkpoint-{int(nimg):010d}.safetensors"


def find_checkpoints(outdir: str | Path) -> list[Path]:
    """Training-state checkpoints in `outdir`, oldest first."""
    return sorted(Path(outdir).glob("checkpoint-??????????.safetensors"))


# ----------------------------------------------------------------------------------------------------
# Training state. Keys: `net/<name>` (weights and buffers), `ema/<EMA state key>`, `adam/<param index>/<name>`
# (step, exp_avg, exp_avg_sq), `scaler/scale` and `scaler/growth_tracker` (fp16 runs only: the dynamic scaler's
# state, or the constant loss scale of the official recipe with growth tracker 0).


def save_training_state(outdir: str | Path, nimg: int, run: dict, net: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, ema_state: dict[str, torch.Tensor] | None = None,
                        scaler: torch.amp.GradScaler | None = None, loss_scale: float | None = None) -> Path:
    """Write `checkpoint-<nimg>.safetensors` into `outdir` and keep only the newest KEEP_CHECKPOINTS. The loss scale
    is the enabled `scaler`'s, else the constant `loss_scale` of an fp16 run (None: none recorded)."""
    tensors = {f"net/{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in (ema_state or {}).items()})
    for i, st in optimizer.state_dict()["state"].items():
        tensors.update({f"adam/{i}/{k}": torch.as_tensor(v) for k, v in st.items()})
    if scaler is not None and scaler.is_enabled():
        st = scaler.state_dict()
        tensors["scaler/scale"] = torch.tensor(float(st["scale"]), dtype=torch.float64)
        tensors["scaler/growth_tracker"] = torch.tensor(int(st["_growth_tracker"]), dtype=torch.int64)
    elif loss_scale is not None:
        tensors["scaler/scale"] = torch.tensor(float(loss_scale), dtype=torch.float64)
        tensors["scaler/growth_tracker"] = torch.tensor(0, dtype=torch.int64)
    path = Path(outdir) / checkpoint_filename(nimg)
    save_tensors(path, tensors, {"kind": "checkpoint", "nimg": int(nimg), "run": run})
    for old in find_checkpoints(outdir)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def load_training_state(path: str | Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema=None, scaler: torch.amp.GradScaler | None = None) -> int:
    """Restore what `save_training_state` wrote; returns the number of images seen. `ema` (anything with
    `load_state_dict`) may be None: only rank 0 tracks the averages."""
    tensors, meta = load_tensors(path, kind="checkpoint")
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")}, strict=True)
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")})
    if scaler is not None and scaler.is_enabled() and "scaler/scale" in tensors:
        scaler.load_state_dict({**scaler.state_dict(), "scale": float(tensors["scaler/scale"]),
                                "_growth_tracker": int(tensors["scaler/growth_tracker"])})
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


# ----------------------------------------------------------------------------------------------------
# The run folder: who may train it, and whether it holds this run.


class RunLock:
    """One live training process per run folder. An OS file lock (the `filelock` package), so the kernel
    drops it when its process dies: a run killed by SIGKILL never blocks the next. The lock file names its
    holder (pid, host, start time) for the error a second process gets, and is removed on release."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._lock = filelock.FileLock(str(self.path), timeout=0, on_acquired=self._write_owner)

    @staticmethod
    def _write_owner(fd: int) -> None:
        owner = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode(), 0)

    def owner(self) -> str:
        """Who holds the lock, as its file says."""
        try:
            return self.path.read_text().strip() or "unknown process"
        except OSError:
            return "unknown process"

    def acquire(self) -> RunLock:
        """Take the lock or raise ValueError naming the folder and the process that holds it."""
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise ValueError(f"--outdir {self.folder} is being trained by another process ({self.owner()}); "
                             "wait for it to finish or stop it, or use another --outdir") from None
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self.path.unlink(missing_ok=True)  # while still held, so no contender takes a file about to vanish
            self._lock.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _shown(value: object) -> str:
    """A recorded value in one short line."""
    text = "absent" if value is None else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: object, new: object, name: str) -> list[str]:
    """`name: old in the run, new now` for each differing value, nested dicts (the network, the dataset) by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [*new, *(k for k in old if k not in new)]
        return [line for k in keys if old.get(k) != new.get(k)
                for line in _differences(old.get(k), new.get(k), f"{name}.{k}")]
    return [f"{name} {_shown(old)} in the run, {_shown(new)} now"]


def _is_temp(path: Path) -> bool:
    """A temporary of the atomic writer (`.<name>.<random>.tmp`): what a killed first start leaves; the run's
    start removes those nobody holds."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and path.is_file()


def check_run_folder(outdir: str | Path, identity: dict, added: dict | None = None,
                     options_that_may_change: tuple[str, ...] = ()) -> bool:
    """Whether `outdir` can hold the run whose identity (options that may not change on resume) is given:
    True when it already holds it (resume), False when it is absent or empty (new run). ValueError when it
    holds another run (naming each differing value, the run's and the new one), damaged options, or foreign
    files. `added`: identity keys that earlier releases did not write, with the value such a run implied;
    `options_that_may_change`: the options a resumed run may change, named in that error. Reads only."""
    outdir = Path(outdir)
    options = outdir / OPTIONS_FILE
    if options.is_file():
        try:
            old = json.loads(options.read_text())
        except ValueError:  # not JSON, not text
            old = None
        if not isinstance(old, dict):
            raise ValueError(f"{options} is damaged (not the JSON object edm2 writes); use a new --outdir")
        old = {**(added or {}), **old}
        diff = [k for k in identity if old.get(k) != identity[k]]
        if diff:
            details = [line for k in diff for line in _differences(old.get(k), identity[k], k)]
            more = f"; and {len(details) - 3} more" if len(details) > 3 else ""
            free = ", ".join(options_that_may_change)
            raise ValueError(f"--outdir {outdir} holds a different run (differs in {', '.join(diff)}: "
                             f"{'; '.join(details[:3])}{more}); resume it with its own options"
                             f"{f' (only {free} may change)' if free else ''} or use a new --outdir")
        return True
    if outdir.exists() and any(p.name != LOCK_FILE and not _is_temp(p) for p in outdir.iterdir()):
        raise ValueError(f"--outdir {outdir} is not empty and holds no edm2 run; choose a new or empty folder")
    return False


def discard_new_run(outdir: str | Path) -> list[Path]:
    """Remove what a new run wrote into `outdir` before its first checkpoint (options, log, statistics, snapshots,
    temporaries), so that the folder holds no run and a corrected command starts afresh. Call it only while
    holding the folder (`RunLock`) and only for a run that found it empty. Returns what was removed."""
    outdir = Path(outdir)
    names = (OPTIONS_FILE, LOG_FILE, STATS_FILE, "snapshot-*.safetensors", f".*{TEMP_SUFFIX}")
    removed = sorted({p for name in names for p in outdir.glob(name) if p.name != LOCK_FILE})
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
