"""The training-dynamics instruments of EDM2's Figure 3: per U-Net block (encoder and decoder, every depth) the
magnitude of the main-path activations, the magnitude of the weights and the effective learning rate (the
relative size of one update), measured on the steps that end at a status report and written to `stats.jsonl`.

Magnitudes are RMS values: sqrt(mean(x^2)) over every element of a block's output (all images of the step), and
over every element of the block's weight tensors (convolutions and linear layers; gains, biases and norm scales are
left out). The effective learning rate is ||w_after - w_before|| / ||w_before|| over the block's weights, for
the one optimizer step. Nothing is measured on other steps; a measured step keeps one copy of the weights for the
length of the optimizer step.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edm2.files import STATS_FILE, save_figure

__all__ = ["DynamicsProbe", "network_blocks", "read_dynamics", "growth", "plot_dynamics", "KINDS"]


def network_blocks(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The U-Net's blocks in order, by name (`enc.32x32_block0`, ..., `dec.32x32_block3`): those of EDM2's `UNet`
    and of the EDM release's `DhariwalUNet` and `SongUNet`; empty for other networks."""
    inner = getattr(net, "unet", None) or getattr(net, "model", None)
    blocks: dict[str, torch.nn.Module] = {}
    for part in ("enc", "dec"):
        modules = getattr(inner, part, None)
        if isinstance(modules, torch.nn.ModuleDict):
            blocks.update({f"{part}.{name}": m for name, m in modules.items()})
    return blocks


def _block_weights(block: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in block.named_parameters() if name.endswith("weight") and p.ndim >= 2]


class DynamicsProbe:
    """Measures one training step at a time: `with probe.measuring(optimizer): <the step>`, then `probe.collect()`
    gives {'act': {block: rms}, 'weight': {block: rms}, 'elr': {block: relative update}}."""

    def __init__(self, net: torch.nn.Module, activations: bool = True) -> None:
        self.blocks = network_blocks(net)
        self.weights = {name: _block_weights(block) for name, block in self.blocks.items()}
        self.activations = activations  # off for compiled networks: a hook would change the compiled graph
        self._act: dict[str, list[torch.Tensor]] = {}
        self._before: list[torch.Tensor] | None = None
        self._elr: dict[str, torch.Tensor] = {}

    def _forward_hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            y = output.detach().float()
            sums = self._act.setdefault(name, [torch.zeros([], device=y.device), 0])
            sums[0] = sums[0] + y.square().sum()
            sums[1] += y.numel()
        return hook

    def _params(self) -> list[torch.Tensor]:
        return [p for ws in self.weights.values() for p in ws]

    def _before_step(self, *args) -> None:
        self._before = [p.detach().float().clone() for p in self._params()]

    @torch.no_grad()
    def _after_step(self, *args) -> None:
        if self._before is None:
            return
        before = iter(self._before)
        for name, ws in self.weights.items():
            old = [next(before) for _ in ws]
            if not old:
                continue
            change = torch.stack([(p.float() - o).square().sum() for p, o in zip(ws, old)]).sum()
            size = torch.stack([o.square().sum() for o in old]).sum()
            self._elr[name] = (change / size.clamp_min(1e-30)).sqrt()
        self._before = None

    @contextlib.contextmanager
    def measuring(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Record the block outputs of every forward and the update of the optimizer step inside the block."""
        self._act, self._elr = {}, {}
        handles = [optimizer.register_step_pre_hook(self._before_step),
                   optimizer.register_step_post_hook(self._after_step)]
        if self.activations:
            handles += [block.register_forward_hook(self._forward_hook(name)) for name, block in self.blocks.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._before = None

    @torch.no_grad()
    def collect(self) -> dict[str, dict[str, float]]:
        """The magnitudes of the measured step (weights: as they are now, after it), as plain floats."""
        act = {name: (s / n).sqrt() for name, (s, n) in self._act.items() if n}
        weight = {}
        for name, ws in self.weights.items():
            if ws:
                weight[name] = (torch.stack([p.float().square().sum() for p in ws]).sum()
                                / sum(p.numel() for p in ws)).sqrt()
        out = {}
        for key, values in (("act", act), ("weight", weight), ("elr", self._elr)):
            if values:  # one wait for the device per kind
                numbers = torch.stack(list(values.values())).double().cpu().tolist()
                out[key] = dict(zip(values, numbers))
        return out


# ----------------------------------------------------------------------------------------------------
# Reading the measurements back, and EDM2's Figure 3.

KINDS = {"act": "activation magnitude (RMS)", "weight": "weight magnitude (RMS)",
         "elr": "effective learning rate (|dw| / |w|)"}


def read_dynamics(run_dir: str | Path) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
    """The measurements in a run's `stats.jsonl`: (image counts, {kind: {block: one value per count}}), the
    counts of the lines that hold them. ValueError when the run has none (a run of an earlier release, or no
    status report yet)."""
    path = Path(run_dir) / STATS_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {STATS_FILE}; give the folder of a training run (edm2 train --outdir)")
    nimg: list[int] = []
    series: dict[str, dict[str, list[float]]] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        dynamics = entry.get("dynamics") if isinstance(entry, dict) else None
        if not dynamics:
            continue
        nimg.append(int(entry["nimg"]))
        for kind, values in dynamics.items():
            for block, value in values.items():
                series.setdefault(kind, {}).setdefault(block, []).append(value)
    if not nimg:
        raise ValueError(f"{path} holds no magnitudes (written from edm2 0.x on, at each status report); train "
                         "the run past a status report")
    return nimg, series


def growth(series: dict[str, list[float]]) -> float:
    """How much a kind of magnitude grew over a run: the median over blocks of the last value over the first
    positive one (the first update of a run with a warm-up has size 0)."""
    ratios = []
    for values in series.values():
        first = next((v for v in values if v > 0), None)
        if first is not None and len(values) > 1:
            ratios.append(values[-1] / first)
    return float(np.median(ratios)) if ratios else float("nan")


def plot_dynamics(runs: dict[str, str | Path], path: str | Path, kinds: tuple[str, ...] = tuple(KINDS)) -> dict:
    """EDM2's Figure 3 for each run (a row per run, labelled by the dict's keys): one panel per kind of magnitude
    over training, one line per block coloured by depth (encoder blue to decoder red). Writes a PNG to `path`;
    returns {label: {kind: growth}} (`growth`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {label: read_dynamics(folder) for label, folder in runs.items()}
    fig, axes = plt.subplots(len(data), len(kinds), figsize=(4.2 * len(kinds), 2.8 * len(data)), squeeze=False)
    summary = {}
    for row, (label, (nimg, series)) in enumerate(data.items()):
        summary[label] = {kind: growth(series.get(kind, {})) for kind in kinds}
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            blocks = series.get(kind, {})
            colours = plt.get_cmap("coolwarm")(np.linspace(0, 1, max(len(blocks), 2)))
            for colour, (block, values) in zip(colours, blocks.items()):
                ax.plot(np.asarray(nimg[-len(values):]) / 1e3, values, color=colour, lw=1,
                        label=block if block.endswith(("_conv", "block0")) else None)
            if kind == "elr":
                ax.set_yscale("log")
            ax.set_title(f"{label}: {KINDS[kind]}", fontsize=9)
            ax.set_xlabel("training images (thousands)", fontsize=8)
            ax.tick_params(labelsize=7)
    if data:
        axes[0][0].legend(fontsize=5, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    return summary
