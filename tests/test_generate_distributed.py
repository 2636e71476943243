"""`edm2.generate` under torchrun (2 processes, gloo on the CPU): each process keeps and returns only what it
sampled unless asked to gather, and the grid of the first images equals that of one process, its images gathered
from the processes that sampled them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from edm2.generate import generate_images
from edm2.networks import Precond
from edm2.sampling import SamplerSettings

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed in this build")

SCRIPT = """
import json, os, sys
import torch
from edm2.generate import generate_images
from edm2.networks import Precond
from edm2.runtime import distributed
from edm2.sampling import SamplerSettings

def net():
    torch.manual_seed(0)
    n = Precond(img_resolution=8, img_channels=1, label_dim=0, model_channels=16, channel_mult=[1], num_blocks=1,
                attn_resolutions=[], use_fp16=False)
    with torch.no_grad():
        for p in n.parameters():
            if p.ndim == 0:
                p.fill_(0.8)
    return n.eval().requires_grad_(False)

out = sys.argv[1]
with distributed("cpu") as (rank, world):
    settings = SamplerSettings(num_steps=2)
    mine = generate_images(net(), list(range(70)), None, settings, batch_size=8, grid=f"{out}/grid.png")
    every = generate_images(net(), list(range(70)), None, settings, batch_size=8, gather=True)
    none = generate_images(net(), list(range(5)), None, settings, batch_size=8, return_images=False)
    torch.save(every, f"{out}/every{rank}.pt")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"world": world, "mine": len(mine), "every": len(every), "none": none is None}, f)
"""


def loud_net() -> Precond:
    """The network of the script above."""
    torch.manual_seed(0)
    net = Precond(img_resolution=8, img_channels=1, label_dim=0, model_channels=16, channel_mult=[1], num_blocks=1,
                  attn_resolutions=[], use_fp16=False)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.8)
    return net.eval().requires_grad_(False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_keep_their_own_images_and_the_grid_gathers_only_the_first(tmp_path: Path) -> None:
    script = tmp_path / "gen.py"
    script.write_text(textwrap.dedent(SCRIPT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # 70 seeds in batches of at most 8 per process: 10 batches of 7, five for each process.
    assert ranks == [{"world": 2, "mine": 35, "every": 70, "none": True}] * 2
    single = generate_images(loud_net(), list(range(70)), None, SamplerSettings(num_steps=2), batch_size=8,
                             grid=tmp_path / "single.png")
    for r in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"every{r}.pt"), single, rtol=0, atol=1e-5)  # in order
    generate_images(loud_net(), list(range(64)), None, SamplerSettings(num_steps=2), grid=tmp_path / "first.png")
    grid = (tmp_path / "grid.png").read_bytes()
    assert grid == (tmp_path / "single.png").read_bytes() == (tmp_path / "first.png").read_bytes()
