"""Accuracy of post-hoc EMA reconstruction against the number of snapshots (the claim of the paper's Figure 4).

    python benchmarks/posthoc_accuracy.py --out DIR [--ns 2,3,4,...] [--targets 0.07,0.13,0.20]

Snapshots are taken at t_i = i/n (i = 1..n) of a training run of length 1, each holding either two averages
(sigma_rel 0.05 and 0.10, as the paper tracks) or one (0.10). For each target sigma_rel at t = 1 the
least-squares combination of the stored profiles is solved (`edm2.ema.solve_posthoc_coefficients`,
columns normalized to sum 1) and its relative squared L2 profile error is measured exactly from the
profiles' inner products (`edm2.reconstruct.profile_error`). Pure math; it takes seconds.

Writes DIR/posthoc_accuracy.json (errors, fitted log-log slopes over all n and over n >= 8) and
DIR/posthoc_accuracy.png (left: target and reconstructed profiles at n = 8; right: error against n with
n^-2 and n^-4 guides), and prints the slopes as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edm2.ema import solve_posthoc_coefficients, std_to_exp
from edm2.ema.reconstruct import profile_error

SETUPS = {"two averages (0.05, 0.10)": (0.05, 0.10), "one average (0.10)": (0.10,)}
TAIL_FROM = 8  # n from which the slope is fitted for the asymptotic rate


def snapshot_grid(n: int, stds: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Times and lengths of n snapshots at i/n, each with one average per entry of `stds`."""
    times = np.arange(1, n + 1) / n
    return np.repeat(times, len(stds)), np.tile(np.float64(stds), n)


def reconstruction(n: int, stds: tuple[float, ...], target: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(snapshot times, lengths, normalized coefficients, profile error) for `target` at t = 1."""
    in_t, in_s = snapshot_grid(n, stds)
    coefs = solve_posthoc_coefficients(in_t, in_s, 1.0, target)[:, 0]
    coefs = coefs / coefs.sum()
    return in_t, in_s, coefs, profile_error(in_t, in_s, coefs, 1.0, target)


def slope(ns: np.ndarray, errors: np.ndarray) -> float:
    """Least-squares slope of log(error) against log(n)."""
    return float(np.polyfit(np.log(ns), np.log(errors), 1)[0])


def profile(tau: np.ndarray, t: float, std: float) -> np.ndarray:
    g = float(std_to_exp(std))
    return np.where(tau <= t, (g + 1) / t * np.clip(tau / t, 0, 1) ** g, 0.0)


def plot(result: dict, path: Path, example_n: int, example_target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    tau = np.linspace(0, 1, 2001)
    left.plot(tau, profile(tau, 1.0, example_target), "k--", lw=1.5, label=f"target sigma_rel {example_target}")
    for (name, stds), color in zip(SETUPS.items(), ("tab:purple", "tab:orange")):
        in_t, in_s, coefs, err = reconstruction(example_n, stds, example_target)
        recon = sum(c * profile(tau, t, s) for c, t, s in zip(coefs, in_t, in_s))
        left.plot(tau, recon, color=color, lw=1.2, label=f"{name}: error {err:.1e}")
    left.set_title(f"weighting profile reconstructed from n = {example_n} snapshots", fontsize=10)
    left.set_xlabel("training time")
    left.legend(fontsize=7)

    ns = np.array(result["ns"], dtype=np.float64)
    markers = {"two averages (0.05, 0.10)": "o-", "one average (0.10)": "s--"}
    for name, per_target in result["errors"].items():
        for target, errs in per_target.items():
            right.loglog(ns, errs, markers[name], ms=3, label=f"{name}, target {target}")
    ref = result["errors"]["two averages (0.05, 0.10)"]
    anchor = np.array(next(iter(ref.values())))
    right.loglog(ns, anchor[-1] * (ns / ns[-1]) ** -4, ":", color="gray", label="n^-4")
    anchor = np.array(next(iter(result["errors"]["one average (0.10)"].values())))
    right.loglog(ns, anchor[-1] * (ns / ns[-1]) ** -2, "-.", color="gray", label="n^-2")
    ticks = [n for n in (2, 4, 8, 16, 32, 64, 128, 256) if ns.min() <= n <= ns.max()]
    right.set_xticks(ticks, [str(n) for n in ticks])
    right.minorticks_off()
    right.set_xlabel("number of snapshots n")
    right.set_ylabel("relative squared L2 error of the profile")
    right.set_title("reconstruction error against n", fontsize=10)
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="Output folder.")
    parser.add_argument("--ns", default="2,3,4,6,8,12,16,24,32,48,64", help="Numbers of snapshots.")
    parser.add_argument("--targets", default="0.07,0.13,0.20", help="Target sigma_rel values (at t = 1).")
    args = parser.parse_args(argv)
    ns = np.array([int(v) for v in args.ns.split(",")])
    targets = [float(v) for v in args.targets.split(",")]
    if len(ns) < 2 or ns.min() < 1:
        parser.error("--ns needs at least two positive numbers")
    errors = {name: {f"{t:g}": [reconstruction(int(n), stds, t)[3] for n in ns] for t in targets}
              for name, stds in SETUPS.items()}
    tail = ns >= TAIL_FROM
    slopes = {name: {t: {"all_n": slope(ns, np.array(e)),
                         f"n>={TAIL_FROM}": slope(ns[tail], np.array(e)[tail]) if tail.sum() >= 2 else None}
                     for t, e in per_target.items()} for name, per_target in errors.items()}
    result = {"ns": ns.tolist(), "targets": targets, "target_time": 1.0, "error": "relative squared L2 of the profile",
              "errors": errors, "slopes": slopes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "posthoc_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "posthoc_accuracy.png", example_n=8, example_target=0.13)
    json.dump({"slopes": slopes, "files": [str(args.out / "posthoc_accuracy.json"),
                                           str(args.out / "posthoc_accuracy.png")]}, sys.stdout, indent=2)
    print()
    return result


if __name__ == "__main__":
    main()
