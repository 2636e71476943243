"""EMA-length sweep (the EDM2 paper's Figure 5a for any metric): reconstruct a list of lengths, score each
with a metric callable, and write a table and a plot of the metric against the EMA length."""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edm2.ema.reconstruct import (
    DEFAULT_MAX_ERROR,
    EMATarget,
    execute_reconstruction,
    plan_reconstruction,
    reconstruction_errors,
)
from edm2.files import atomic_write_text, save_figure

__all__ = ["SweepResult", "ema_sweep", "plot_sweep", "PerTensorResult", "per_tensor_sweep",
           "check_tensor_patterns"]


@dataclass
class SweepResult:
    """Rows (sigma_rel, profile_error, path, metric values) sorted by sigma_rel, the best row, and the
    lengths left out because the snapshots do not support them."""

    rows: list[dict]
    best: dict
    key: str
    minimize: bool
    nimg: int
    json_path: Path | None
    plot_path: Path | None
    skipped: dict[float, float] = field(default_factory=dict)  # sigma_rel -> profile error

    @property
    def best_at_edge(self) -> bool:
        """Whether the best length is the shortest or longest one tried (the optimum may lie outside)."""
        return len(self.rows) > 1 and self.best["sigma_rel"] in (self.rows[0]["sigma_rel"], self.rows[-1]["sigma_rel"])


def ema_sweep(
    source: str | Path,
    outdir: str | Path,
    stds: Sequence[float],
    metric: Callable[[Path], Mapping[str, float]],
    key: str,
    minimize: bool = True,
    nimg: int | None = None,
    input_stds: Sequence[float] | None = None,
    max_error: float = DEFAULT_MAX_ERROR,
    allow_gaps: bool = False,
    per_pass: int = 8,
    skip_unsupported: bool = False,
    json_path: str | Path | None = "ema_sweep.json",
    plot_path: str | Path | None = "ema_sweep.png",
    secondary: str | None = None,
    title: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> SweepResult:
    """Reconstruct each EMA length in `stds` from the snapshots in `source`, score it with
    `metric(path_of_reconstructed_snapshot) -> {name: value}`, and pick the best by `metric[key]`.

    Every length is validated before any work starts: one the snapshots do not support (profile error
    above `max_error`) is an error, or with `skip_unsupported` (a sweep over a grid) left out and listed
    in `SweepResult.skipped`. Reconstruction streams the snapshots once per `per_pass` lengths (memory:
    `per_pass` models plus one). The reconstructed snapshots stay in `outdir`;
    `json_path` / `plot_path` (relative to `outdir` unless absolute; None to skip) receive the table and
    the plot of `key` (and `secondary` on a second axis) against sigma_rel.
    """
    stds = sorted({float(s) for s in stds})
    if per_pass <= 0:
        raise ValueError(f"per_pass must be positive, got {per_pass}")
    skipped = {}
    if skip_unsupported:
        stds, skipped = _supported(source, stds, nimg, input_stds, max_error, allow_gaps, echo)
    targets = [EMATarget(s) for s in stds]
    plan = plan_reconstruction(source, targets, nimg, input_stds, max_error, allow_gaps)
    outdir = Path(outdir)
    rows = [row for _, _, row in _reconstruct_and_score(plan, targets, outdir, per_pass, metric, key, echo)]
    finite = [r for r in rows if math.isfinite(r[key])]
    if not finite:
        raise ValueError(f"metric {key!r} is not finite for any EMA length")
    best = (min if minimize else max)(finite, key=lambda r: r[key])
    json_file = None if json_path is None else outdir / json_path
    plot_file = None if plot_path is None else outdir / plot_path
    result = SweepResult(rows, best, key, minimize, plan.nimg, json_file, plot_file, skipped)
    if json_file is not None:
        table = {"source": str(plan.source), "nimg": plan.nimg, "key": key, "minimize": minimize,
                 "num_snapshots": len(plan.used), "source_sigma_rels": sorted({i.sigma_rel for i in plan.used}),
                 "best": best, "best_at_edge": result.best_at_edge, "rows": rows,
                 "skipped": [{"sigma_rel": s, "profile_error": e} for s, e in skipped.items()]}
        atomic_write_text(json_file, json.dumps(table, indent=2) + "\n")
    if plot_file is not None:
        plot_sweep(rows, plot_file, key, title or f"{key} vs EMA length at time {plan.nimg}", secondary, minimize)
    return result


def _supported(source, stds: list[float], nimg, input_stds, max_error: float, allow_gaps: bool,
               echo) -> tuple[list[float], dict[float, float]]:
    """(the lengths the snapshots support, {left-out length: its profile error})."""
    errors = reconstruction_errors(source, stds, nimg, input_stds, allow_gaps)
    skipped = {s: e for s, e in errors.items() if not e <= max_error}
    stds = [s for s in stds if s not in skipped]
    if not stds:
        raise ValueError(f"the snapshots in {source} support none of the EMA lengths {sorted(skipped)} (profile "
                         f"errors above {max_error:g}); save snapshots more often or choose other lengths")
    if skipped and echo is not None:
        echo(f"note: skipping sigma_rel {', '.join(f'{s:.3f}' for s in skipped)}: the snapshots do not support "
             f"them (profile error above {max_error:g}); save snapshots more often or train longer to include them")
    return stds, skipped


def _reconstruct_and_score(plan, targets: Sequence[EMATarget], outdir: Path, per_pass: int,
                           metric: Callable[[Path], Mapping[str, float]], key: str, echo):
    """Reconstruct `targets` (streaming the snapshots once per `per_pass` of them) and score each as it is written:
    yields (target, its reconstruction, its row of the sweep table)."""
    for start in range(0, len(targets), per_pass):
        chunk = targets[start:start + per_pass]
        if echo is not None:
            echo(f"reconstructing sigma_rel {', '.join(t.describe() for t in chunk)} ...")
        for target, result in zip(chunk, execute_reconstruction(plan, chunk, outdir, None)):
            row = _score(result, metric, key)
            if echo is not None:
                echo(f"  sigma_rel {target.describe()}: {key} {row[key]:.4g}")
            yield target, result, row


def _score(result, metric: Callable[[Path], Mapping[str, float]], key: str) -> dict:
    """One row of the sweep table: the reconstructed length and its metric values."""
    values = dict(metric(result.path))
    if key not in values:
        raise ValueError(f"metric returned {sorted(values)} without the key {key!r} to optimize")
    return {"sigma_rel": result.sigma_rel, "profile_error": result.profile_error, "path": str(result.path),
            **{k: float(v) for k, v in values.items()}}


def plot_sweep(rows: Sequence[Mapping], path: str | Path, key: str, title: str, secondary: str | None = None,
               minimize: bool = True) -> None:
    """Plot `key` (and `secondary` on a second axis) against sigma_rel, marking the best point; PNG, atomic."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    stds = [r["sigma_rel"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=120)
    ax.plot(stds, [r[key] for r in rows], "o-", color="tab:blue", ms=4,
            label=f"{key} ({'lower' if minimize else 'higher'} is better)")
    best = (min if minimize else max)(rows, key=lambda r: r[key])
    ax.plot([best["sigma_rel"]], [best[key]], "*", ms=14, color="tab:red",
            label=f"best sigma_rel {best['sigma_rel']:.3f}")
    ax.set_xlabel("EMA length sigma_rel")
    ax.set_ylabel(key)
    handles = ax.get_legend_handles_labels()[0]
    if secondary is not None:
        ax2 = ax.twinx()
        ax2.plot(stds, [r[secondary] for r in rows], "s--", color="tab:green", ms=3, label=secondary)
        ax2.set_ylabel(secondary)
        handles += ax2.get_legend_handles_labels()[0]
    values = [r[key] for r in rows if math.isfinite(r[key])]
    if values and min(values) > 0 and max(values) > 2 * min(values):
        ax.set_yscale("log")  # keep the region around the optimum readable next to a steep end
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------
# Per-tensor sweeps (EDM2 Figure 5b).


@dataclass
class PerTensorResult:
    """One curve per tensor pattern: the metric as that tensor's EMA length varies while every other tensor keeps
    `base_std`; `base` is the metric of `base_std` for all."""

    base_std: float
    base: dict
    curves: dict[str, list[dict]]
    key: str
    json_path: Path | None
    plot_path: Path | None


def per_tensor_sweep(
    source: str | Path,
    outdir: str | Path,
    stds: Sequence[float],
    tensors: Sequence[str],
    base_std: float,
    metric: Callable[[Path], Mapping[str, float]],
    key: str,
    minimize: bool = True,
    nimg: int | None = None,
    input_stds: Sequence[float] | None = None,
    max_error: float = DEFAULT_MAX_ERROR,
    allow_gaps: bool = False,
    per_pass: int = 8,
    skip_unsupported: bool = False,
    json_path: str | Path | None = "ema_sweep_per_tensor.json",
    plot_path: str | Path | None = "ema_sweep_per_tensor.png",
    title: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> PerTensorResult:
    """For each fnmatch pattern in `tensors` (a tensor name such as 'unet.enc.16x16_block0.conv_res0.weight', or
    'unet.dec.*'), reconstruct the averages where the matching tensors have each length in `stds` and every other
    tensor `base_std`, and score them with `metric` (as `ema_sweep`). Every pattern must match an averaged
    tensor and every length be supported, checked before anything is written. The per-tensor reconstructions
    are removed once scored; the table and the plot stay."""
    stds = sorted({float(s) for s in stds})
    if skip_unsupported:
        stds, _ = _supported(source, stds, nimg, input_stds, max_error, allow_gaps, echo)
    check_tensor_patterns(source, tensors, base_std, nimg, input_stds, allow_gaps)
    targets = [EMATarget(base_std)] + [EMATarget(base_std, ((p, s),)) for p in tensors for s in stds]
    plan = plan_reconstruction(source, targets, nimg, input_stds, max_error, allow_gaps)
    outdir = Path(outdir)
    scored = []
    for target, result, row in _reconstruct_and_score(plan, targets, outdir, per_pass, metric, key, echo):
        scored.append((target, row))
        if target.per_tensor:
            result.path.unlink(missing_ok=True)
    base = scored[0][1]
    curves = {p: [row | {"sigma_rel": t.per_tensor[0][1]} for t, row in scored[1:] if t.per_tensor[0][0] == p]
              for p in tensors}
    json_file = None if json_path is None else outdir / json_path
    plot_file = None if plot_path is None else outdir / plot_path
    if json_file is not None:
        table = {"source": str(plan.source), "nimg": plan.nimg, "key": key, "minimize": minimize,
                 "base_std": base_std, "base": base, "tensors": curves}
        atomic_write_text(json_file, json.dumps(table, indent=2) + "\n")
    if plot_file is not None:
        _plot_per_tensor(base_std, base, curves, key, plot_file,
                         title or f"{key} as one tensor's EMA length varies (the others at {base_std:.3f})")
    return PerTensorResult(base_std, base, curves, key, json_file, plot_file)


def check_tensor_patterns(source: str | Path, tensors: Sequence[str], base_std: float, nimg: int | None = None,
                          input_stds: Sequence[float] | None = None, allow_gaps: bool = False) -> None:
    """ValueError unless every fnmatch pattern in `tensors` names an averaged tensor of the snapshots in `source`
    (reads headers only)."""
    if not tensors or any(not str(p).strip() for p in tensors):
        raise ValueError("--per-tensor needs the name (or fnmatch pattern) of a weight tensor, e.g. "
                         "'unet.enc.*block0.conv_res0.weight'")
    plan = plan_reconstruction(source, [EMATarget(base_std)], nimg, input_stds, math.inf, allow_gaps)  # names only
    averaged = sorted(plan.averaged)
    for pattern in tensors:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in averaged):
            raise ValueError(f"--per-tensor {pattern!r} names no averaged tensor of the snapshots in {source} "
                             f"(they are named like {averaged[len(averaged) // 2]!r}; fnmatch wildcards allowed)")


def _plot_per_tensor(base_std: float, base: Mapping, curves: Mapping[str, list[dict]], key: str, path: Path,
                     title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=120)
    for pattern, rows in curves.items():
        ax.plot([r["sigma_rel"] for r in rows], [r[key] for r in rows], "o-", ms=3, lw=1, alpha=0.8, label=pattern)
    ax.axhline(base[key], color="black", ls="--", lw=1, label=f"all tensors at {base_std:.3f}")
    ax.axvline(base_std, color="grey", ls=":", lw=1)
    ax.set_xlabel("EMA length sigma_rel of the chosen tensor")
    ax.set_ylabel(key)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
