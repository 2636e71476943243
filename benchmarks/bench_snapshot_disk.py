"""Disk per EMA snapshot of an official preset: the same averages written as float16 (the official files, and
`edm2 train`'s default for the official presets) and as float32 (`--snapshot-dtype float32`).

    python benchmarks/bench_snapshot_disk.py [--preset edm2-img512-xs]

Prints one JSON document: bytes per snapshot in each dtype and their ratio, and what a run of the paper's
length writes (two tracked EMAs, a snapshot every 8 Mi images).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from _shared import log

from edm2.ema.trackers import PosthocEMA
from edm2.networks import build_network
from edm2.presets import get_preset


def snapshot_bytes(preset: str, dtype: torch.dtype, folder: Path) -> int:
    """Size of one snapshot file of the preset's network written by `PosthocEMA` in `dtype`."""
    spec = get_preset(preset).network
    torch.manual_seed(0)
    net = build_network(spec)
    ema = PosthocEMA(net, folder, stds=(0.10,), network=spec, snapshot_dtype=dtype)
    ema.update(1)
    paths = ema.save_snapshots()
    return sum(Path(p).stat().st_size for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="edm2-img512-xs")
    args = parser.parse_args()
    p = get_preset(args.preset)
    sizes = {}
    for name, dtype in (("float16", torch.float16), ("float32", torch.float32)):
        with tempfile.TemporaryDirectory() as folder:
            log(f"{args.preset}: writing a {name} snapshot")
            sizes[name] = snapshot_bytes(args.preset, dtype, Path(folder))
    snapshots = p.training.duration // p.training.snapshot * len(p.training.ema_stds)
    print(json.dumps({
        "preset": args.preset, "bytes_per_snapshot": sizes,
        "ratio_float32_to_float16": sizes["float32"] / sizes["float16"],
        "run": {"snapshots": snapshots, "GB": {k: round(v * snapshots / 1e9, 1) for k, v in sizes.items()}},
    }, indent=2))


if __name__ == "__main__":
    main()
