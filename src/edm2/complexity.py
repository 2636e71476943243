"""Parameter and operation counts of a network, without allocating it (built on the meta device).

Convention (the paper's "Gflops" per evaluation): one multiply-accumulate of a convolution, linear layer
or attention matmul counts as one operation, plus the weight normalization every evaluation performs
(square, accumulate, divide, scale: four operations per weight element). Elementwise work on
activations is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from edm2.layers import MPConv
from edm2.networks.spec import NetworkSpec, build_network

__all__ = ["Complexity", "count_complexity"]

WEIGHT_NORM_OPS = 4


@dataclass(frozen=True)
class Complexity:
    parameters: int
    macs: int  # multiply-accumulates of convolutions, linear layers and attention
    weight_norm_ops: int  # elementwise operations normalizing the weights
    gflops: float  # (macs + weight_norm_ops) / 1e9, per single-image evaluation


def count_complexity(config: NetworkSpec) -> Complexity:
    """Parameters and operations per single-image evaluation of the network described by `config` (an EDM2
    network, or one of the EDM release; the latter have no weight normalization)."""
    with torch.device("meta"):
        net = build_network(config).eval()
        x = torch.zeros(1, config.img_channels, config.img_resolution, config.img_resolution)
        sigma = torch.ones(1)
        labels = torch.zeros(1, config.label_dim) if config.label_dim else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, sigma, labels)
    macs = counter.get_total_flops() // 2  # the counter reports 2 flops per multiply-accumulate
    norm_ops = WEIGHT_NORM_OPS * sum(m.weight.numel() for m in net.modules() if isinstance(m, MPConv)
                                     and m.weight_norm and m is not getattr(net, "logvar_linear", None))
    return Complexity(parameters=sum(p.numel() for p in net.parameters()), macs=macs, weight_norm_ops=norm_ops,
                      gflops=(macs + norm_ops) / 1e9)
