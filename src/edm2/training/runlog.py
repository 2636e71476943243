"""What a training run tells the user: `log.txt` (events), `stats.jsonl` (one JSON line per status interval,
its image counts growing: a resumed run first drops the lines past its checkpoint, `trim_stats`), the progress
bar, and the window of losses they average."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from edm2.files import LOG_FILE, STATS_FILE, atomic_write_text

__all__ = ["RunLog", "trim_stats"]


def _nimg(line: str) -> int | None:
    """The image count of one stats.jsonl line; None for a line that is not one (cut short by a crash)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    nimg = entry.get("nimg") if isinstance(entry, dict) else None
    return nimg if isinstance(nimg, int) else None


def trim_stats(path: str | Path, nimg: int) -> bool:
    """Drop the lines of `stats.jsonl` at `path` past image `nimg` (a run resumed from its checkpoint at `nimg`
    writes them again) and the lines cut short, atomically, so that its image counts only grow; a file with
    nothing to drop is left as it is. Returns whether it was rewritten."""
    path = Path(path)
    if not path.is_file():
        return False
    lines = path.read_text().splitlines(keepends=True)
    kept = [line if line.endswith("\n") else line + "\n" for line in lines
            if (n := _nimg(line)) is not None and n <= nimg]
    if kept == lines:
        return False
    atomic_write_text(path, "".join(kept))
    return True


class RunLog:
    """The run's log, statistics and progress bar, from image `cur_nimg` on (a resumed run's stats.jsonl is trimmed
    to it first). Only rank 0 writes; every process must call `step`, since a status report sums the loss window
    over the processes (a collective)."""

    def __init__(self, outdir: str | Path, total_nimg: int, cur_nimg: int, device: torch.device, rank: int = 0,
                 world: int = 1, progress: bool = True) -> None:
        from tqdm import tqdm

        outdir = Path(outdir)
        self.world = world
        if rank == 0:
            trim_stats(outdir / STATS_FILE, cur_nimg)
        self.log = (outdir / LOG_FILE).open("a") if rank == 0 else None
        self.stats = (outdir / STATS_FILE).open("a") if rank == 0 else None
        self.bar = tqdm(total=total_nimg, initial=cur_nimg, unit_scale=1 / 1000, disable=not progress or rank,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}{postfix}]")
        self.window_loss = torch.zeros([], device=device)  # stays on the device; read at status time only
        self.window_steps, self.window_start, self.window_nimg, self.last_nimg = 0, time.time(), cur_nimg, cur_nimg

    def say(self, msg: str) -> None:
        """One time-stamped line in log.txt."""
        if self.log is not None:
            self.log.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
            self.log.flush()

    def step(self, nimg: int, loss: torch.Tensor, lr: float, report: bool, extra: dict | None = None) -> None:
        """Count a finished step (`loss`: this process's share of the batch's mean loss); with `report`,
        write the window's mean loss, learning rate and speed (and the entries of `extra`) to stats.jsonl, log.txt
        and the bar."""
        self.window_loss += loss
        self.window_steps += 1
        self.bar.update(nimg - self.last_nimg)
        self.last_nimg = nimg
        if not report:
            return
        if self.world > 1:
            torch.distributed.all_reduce(self.window_loss)
        sec_per_kimg = (time.time() - self.window_start) / max(nimg - self.window_nimg, 1) * 1000
        entry = {"nimg": nimg, "kimg": nimg / 1000, "loss": float(self.window_loss) / self.window_steps, "lr": lr,
                 "sec_per_kimg": sec_per_kimg, "time": time.time(), **(extra or {})}
        if self.stats is not None:
            self.stats.write(json.dumps(entry) + "\n")
            self.stats.flush()
        self.bar.set_postfix_str(f"loss {entry['loss']:.4f}, lr {lr:.2e}, {sec_per_kimg:.2f} s/kimg")
        self.say(f"kimg {entry['kimg']:.1f} loss {entry['loss']:.4f} lr {lr:.3e} sec/kimg {sec_per_kimg:.2f}")
        if not math.isfinite(entry["loss"]):
            self.say("loss is not finite")
        self.window_loss.zero_()
        self.window_steps, self.window_start, self.window_nimg = 0, time.time(), nimg

    def close(self) -> None:
        """Close the bar and the files. Every line was flushed when written, so closing loses nothing; after a
        failed write (a full disk) the unwritten rest is dropped instead of raising a second error."""
        self.bar.close()
        for f in (self.stats, self.log):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
