"""Writers under SIGKILL: for each writer (train, generate, reconstruct, dataset convert/encode/decode, metrics ref,
judge train, ema-sweep, guidance-sweep, toy train), kill it at seeded random points and rerun; count the points
tried and survived (the rerun equals an uninterrupted run and leaves no temporary) and time the finishing run. Also
counts the rows of the bad-input matrix (tests/test_bad_input.py) per command. Prints one JSON document.

    python benchmarks/bench_faults.py [--points 6] [--seed 0] [--workdir DIR] [--writers train,generate]

Half of the points kill at a random moment of the run (uniform over 5..95 % of the uninterrupted wall time),
half inside a temporary write (at the n-th `os.fsync` or `os.replace` of the process, n random in 1..4).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _shared import log, machine_info

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from fault_harness import (  # noqa: E402
    LATENT_NAMES,
    NAMES,
    kill_then_finish,
    latent_writers,
    make_inputs,
    make_latent_inputs,
    run,
    writers,
)


def bench_writer(name: str, writer, workdir: Path, points: int, rng: random.Random) -> dict:
    ref_dir = workdir / "reference"
    code, err, seconds = run(writer, ref_dir)
    if code != 0:
        return {"error": err.strip().splitlines()[-1:], "points": 0}
    reference = writer.digest(ref_dir)
    trials = []
    for k in range(points):
        out = workdir / f"trial{k}"
        if k % 2 == 0:
            when = {"kill_after": rng.uniform(0.05 * seconds, 0.95 * seconds)}
        else:
            when = {"mode": rng.choice(["fsync", "replace"]), "n": rng.randint(1, 4)}
        r = kill_then_finish(writer, out, **when)
        ok = r["exit"] == 0 and r["digest"] == reference and not r["temps"]
        trials.append({**when, "killed": r["killed"], "survived": ok, "resume_seconds": r["resume_seconds"],
                       **({} if ok else {"stderr": r["stderr"], "temps": r["temps"]})})
        log(f"  {name} point {k}: {when} killed={r['killed']} survived={ok} ({r['resume_seconds']:.1f} s)")
    killed = [t for t in trials if t["killed"]]
    return {"uninterrupted_seconds": seconds, "points": len(trials), "killed": len(killed),
            "survived": sum(t["survived"] for t in trials),
            "mean_resume_seconds": sum(t["resume_seconds"] for t in killed) / max(len(killed), 1),
            "trials": trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--writers", default=",".join(NAMES + LATENT_NAMES))
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-faults-"))
    start = time.perf_counter()
    inputs = make_latent_inputs(workdir / "inputs", make_inputs(workdir / "inputs"))
    every = {**writers(inputs), **latent_writers(inputs)}
    rng = random.Random(args.seed)
    result = {"benchmark": "faults", "machine": machine_info(["cpu"]), "points_per_writer": args.points,
              "seed": args.seed, "writers": {}}
    for name in args.writers.split(","):
        log(f"{name} ...")
        result["writers"][name] = bench_writer(name, every[name], workdir / name.replace(" ", "-"),
                                               args.points, rng)
    from test_bad_input import ROWS

    result["bad_input_rows"] = dict(Counter(r[0] for r in ROWS))
    result["bad_input_classes"] = dict(Counter(r[1] for r in ROWS))
    result["seconds"] = time.perf_counter() - start
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
