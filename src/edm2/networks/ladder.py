"""The network side of EDM2's ablation ladder (EDM2 Table 1, configurations C to G) as switches on the one U-Net.

Configurations A and B are EDM's ADM network (`DhariwalUNet`, see `edm2.training.ladder`); from C on the network is
EDM2's `UNet` with the switches below, each configuration adding one step of the paper (docs/ablation.md):

- C: no biases, a constant input channel, He-uniform weights used as they are, Fourier features, simplified group
  norms (no mean subtraction, no learned scale), cosine attention, ADM's block order (norm, SiLU and resampling
  inside the residual branch), a two-layer embedding, an output nonlinearity;
- D: every learned layer normalizes its weights on use (weights N(0, 1));
- E: forced weight normalization (and, in training, the inverse-square-root learning-rate decay);
- F: no group norms (pixel norms on the encoder's main path), resampling and the encoder's channel change on the
  main path, one embedding layer, no output nonlinearity;
- G: magnitude-preserving SiLU, sums, concatenation and Fourier features, learned output and embedding gains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edm2.layers import MPConv

__all__ = ["LadderSwitches", "CONFIG_SWITCHES", "NETWORK_CONFIGS", "switches_of", "group_rms_norm"]


@dataclass(frozen=True)
class LadderSwitches:
    """What one configuration (C to G) turns on in the U-Net; G has them all."""

    weight_norm: bool  # D+: learned layers use normalize(w) / sqrt(fan_in); else He-uniform w as it is
    forced_weight_norm: bool  # E+: training overwrites each weight by its normalized self
    streamlined: bool  # F+: no group norms, resampling on the main path, one embedding layer, linear output
    mp_fixed: bool  # G: magnitude-preserving fixed-function layers and the learned gains

    def conv(self, in_channels: int, out_channels: int, kernel: list[int]) -> MPConv:
        """A learned layer of this configuration (a linear layer when `kernel` is empty)."""
        return MPConv(in_channels, out_channels, kernel, self.weight_norm, self.forced_weight_norm)


CONFIG_SWITCHES: dict[str, LadderSwitches] = {
    "C": LadderSwitches(weight_norm=False, forced_weight_norm=False, streamlined=False, mp_fixed=False),
    "D": LadderSwitches(weight_norm=True, forced_weight_norm=False, streamlined=False, mp_fixed=False),
    "E": LadderSwitches(weight_norm=True, forced_weight_norm=True, streamlined=False, mp_fixed=False),
    "F": LadderSwitches(weight_norm=True, forced_weight_norm=True, streamlined=True, mp_fixed=False),
    "G": LadderSwitches(weight_norm=True, forced_weight_norm=True, streamlined=True, mp_fixed=True),
}
NETWORK_CONFIGS = tuple(CONFIG_SWITCHES)


def switches_of(config: str) -> LadderSwitches:
    """The switches of configuration `config` (C to G); ValueError for another letter."""
    if config not in CONFIG_SWITCHES:
        raise ValueError(f"the EDM2 U-Net has configurations {', '.join(NETWORK_CONFIGS)}, got {config!r} (A and B "
                         "are EDM's ADM network: edm2.training.ladder)")
    return CONFIG_SWITCHES[config]


def group_rms_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Configuration C's simplified group norm: each group of channels divided by its RMS over channels and pixels,
    no mean subtracted, no learned scale; ADM's grouping (32 groups, at least 4 channels each)."""
    groups = max(min(32, x.shape[1] // 4), 1)
    y = x.float().reshape(x.shape[0], groups, -1)
    y = y * (y.square().mean(dim=2, keepdim=True) + eps).rsqrt()
    return y.reshape(x.shape).to(x.dtype)
