"""Training: the EDM2 optimizer recipe (learning-rate schedule, Adam, gradient guard) and the training loop."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["learning_rate_schedule", "make_adam", "sanitize_gradients", "ADAM_BETAS", "ADAM_EPS"]

ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8


def learning_rate_schedule(cur_nimg: float, batch_size: int, ref_lr: float = 100e-4, ref_batches: float = 70e3,
                           rampup_Mimg: float = 10) -> float:
    """alpha_ref / sqrt(max(t / t_ref, 1)) with t in batches (EDM2 Eq. 67), times a linear warm-up over
    the first `rampup_Mimg` million images. `ref_batches=0` disables the decay, `rampup_Mimg=0` the warm-up."""
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return float(lr)


def make_adam(params: Iterable[torch.nn.Parameter], lr: float = 0.0, fused: bool | None = None,
              foreach: bool | None = None) -> torch.optim.Adam:
    """Adam with the EDM2 settings: betas (0.9, 0.99), eps 1e-8, no weight decay."""
    return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused, foreach=foreach)


@torch.no_grad()
def sanitize_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace NaN and +-Inf gradient entries by 0, in place (one bad batch must not poison Adam)."""
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
