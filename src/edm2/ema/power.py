"""Power-function EMA and its post-hoc reconstruction (EDM2 Section 3 and Appendix C).

Time is counted in training images. A power-function average with exponent gamma weights the
parameter history by p(tau) = (gamma + 1) / t * (tau / t)^gamma on [0, t]; its relative standard
deviation sigma_rel is the EMA length the paper uses. The functions are float64 NumPy; the classes
average the parameters of a `torch.nn.Module`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "exp_to_std", "std_to_exp", "power_function_beta", "power_function_response",
    "power_function_correlation", "solve_posthoc_coefficients", "PowerFunctionEMA", "TraditionalEMA",
    "MAX_SIGMA_REL",
]

ArrayLike = float | np.ndarray | Sequence[float]


def exp_to_std(exp: ArrayLike) -> np.ndarray:
    """sigma_rel of a power-function profile with exponent gamma: sqrt(g+1) / ((g+2) sqrt(g+3))."""
    exp = np.float64(exp)
    return np.sqrt((exp + 1) / (exp + 2) ** 2 / (exp + 3))


def std_to_exp(std: ArrayLike) -> np.ndarray:
    """Exponent gamma for a given sigma_rel: the largest real root of
    g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0, the inverse of `exp_to_std`."""
    std = np.float64(std)
    if np.any(std <= 0) or np.any(std >= exp_to_std(0.0)):
        raise ValueError(f"sigma_rel must lie in (0, {float(exp_to_std(0.0)):.4f}); got {np.ravel(std).tolist()}")
    exp = []
    for s2 in np.ravel(std) ** -2:
        roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
        exp.append(roots[np.abs(roots.imag) <= 1e-9 * np.abs(roots)].real.max())
    return np.float64(exp).reshape(std.shape)


MAX_SIGMA_REL = float(exp_to_std(0.0))  # 0.2887: the uniform average, the longest power-function EMA


def power_function_beta(std: ArrayLike, t_next: ArrayLike, t_delta: ArrayLike) -> np.ndarray:
    """EMA decay for a step of t_delta images ending at time t_next: (1 - t_delta / t_next)^(gamma + 1)."""
    return (1 - np.float64(t_delta) / np.float64(t_next)) ** (std_to_exp(std) + 1)


def power_function_response(ofs: ArrayLike, std: ArrayLike, len: int, axis: int = 0) -> np.ndarray:
    """Discrete response of power-function EMAs ending at `ofs`, sampled at t = 0..len-1 along `axis`,
    normalized to sum 1 along that axis."""
    ofs, std = np.broadcast_arrays(np.float64(ofs), np.float64(std))
    ofs = np.expand_dims(ofs, axis)
    exp = np.expand_dims(std_to_exp(std), axis)
    shape = [1] * exp.ndim
    shape[axis] = -1
    t = np.arange(len, dtype=np.float64).reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        resp = np.where(t <= ofs, (t / ofs) ** exp, 0) / ofs * (exp + 1)
    return resp / resp.sum(axis=axis, keepdims=True)


def power_function_correlation(a_ofs: ArrayLike, a_std: ArrayLike, b_ofs: ArrayLike, b_std: ArrayLike) -> np.ndarray:
    """Inner product of two continuous power-function profiles (a ending at a_ofs, b at b_ofs)."""
    a_ofs, b_ofs = np.float64(a_ofs), np.float64(b_ofs)
    a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    num = (a_exp + 1) * (b_exp + 1) * (a_ofs / b_ofs) ** t_exp
    return num / ((a_exp + b_exp + 1) * np.maximum(a_ofs, b_ofs))


def solve_posthoc_coefficients(in_ofs: ArrayLike, in_std: ArrayLike, out_ofs: ArrayLike,
                               out_std: ArrayLike) -> np.ndarray:
    """Least-squares weights X [num_in, num_out] that combine the stored profiles (in_ofs, in_std) into
    the requested ones (out_ofs, out_std), each column normalized to sum 1 (as the official function): the
    weights of the stored parameter sets."""
    in_ofs, in_std = np.broadcast_arrays(np.float64(in_ofs), np.float64(in_std))
    out_ofs, out_std = np.broadcast_arrays(np.float64(out_ofs), np.float64(out_std))
    col, row = (lambda v: v.reshape(-1, 1)), (lambda v: v.reshape(1, -1))
    A = power_function_correlation(col(in_ofs), col(in_std), row(in_ofs), row(in_std))
    B = power_function_correlation(col(in_ofs), col(in_std), row(out_ofs), row(out_std))
    X = np.linalg.lstsq(A, B, rcond=None)[0]
    return X / X.sum(axis=0, keepdims=True)


def _copy_all(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """dst[i] <- src[i] for every pair; nothing for empty lists (a network without buffers or parameters),
    which the fused `torch._foreach_copy_` refuses."""
    dst, src = list(dst), list(src)
    if dst:
        torch._foreach_copy_(dst, src)


def _lerp_all(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], weight: float) -> None:
    """dst[i] <- dst[i] + weight (src[i] - dst[i]) for every pair; nothing for empty lists."""
    dst, src = list(dst), list(src)
    if dst:
        torch._foreach_lerp_(dst, src, weight)


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while hasattr(net, "module") or hasattr(net, "_orig_mod"):
        net = getattr(net, "module", None) or net._orig_mod
    return net


class PowerFunctionEMA:
    """Track power-function EMAs of a module's parameters, one per sigma_rel.

    Call `update(cur_nimg, batch_size)` after each optimizer step (or every k steps with the images seen
    since the last update as `batch_size`); the averages start from the parameters at construction.
    """

    def __init__(self, net: torch.nn.Module, stds: Sequence[float] = (0.050, 0.100)) -> None:
        self.net = _unwrap(net)
        self.stds = [float(s) for s in stds]
        std_to_exp(self.stds)  # validate
        self.names = [name for name, _ in self.net.named_parameters()]
        self.emas = [[p.detach().clone() for p in self.net.parameters()] for _ in self.stds]
        self._copies: list[torch.nn.Module] | None = None  # made by get()

    @torch.no_grad()
    def reset(self) -> None:
        """Set every average to the current parameters."""
        for ema in self.emas:
            _copy_all(ema, [p.detach() for p in self.net.parameters()])

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        """Advance the averages to time `cur_nimg`, `batch_size` images after the previous update."""
        params = [p.detach() for p in self.net.parameters()]
        for std, ema in zip(self.stds, self.emas):
            beta = float(power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size))
            _lerp_all(ema, params, 1 - beta)

    @torch.no_grad()
    def get(self) -> list[tuple[torch.nn.Module, str]]:
        """[(network, suffix)] per average, as the official class returns: a copy of the network holding the
        averaged parameters and the live network's buffers, and its file-name suffix ('-0.050'). The copies
        are made at the first call and refreshed in place by each later one."""
        if self._copies is None:
            self._copies = [copy.deepcopy(self.net).requires_grad_(False) for _ in self.stds]
        for ema, copy_net in zip(self.emas, self._copies):
            _copy_all(copy_net.parameters(), ema)
            _copy_all(copy_net.buffers(), self.net.buffers())
        return [(copy_net, f"-{std:.3f}") for std, copy_net in zip(self.stds, self._copies)]

    def state_dicts(self) -> list[tuple[float, dict[str, torch.Tensor]]]:
        """(sigma_rel, state dict) of each average; buffers are taken from the live module."""
        out = []
        for std, ema in zip(self.stds, self.emas):
            sd = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            sd.update(zip(self.names, (t.clone() for t in ema)))
            out.append((std, sd))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Averages as flat tensors, keyed `<sigma_rel index>/<parameter name>` (for checkpoints)."""
        return {f"{i}/{n}": t for i, ema in enumerate(self.emas) for n, t in zip(self.names, ema)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore averages saved by `state_dict`."""
        for i, ema in enumerate(self.emas):
            for n, t in zip(self.names, ema):
                t.copy_(state[f"{i}/{n}"])


class TraditionalEMA:
    """Classic exponential EMA with a half-life in Mimg and the EDM ramp-up (half-life <= ratio * t)."""

    def __init__(self, net: torch.nn.Module, halflife_Mimg: float = float("inf"), rampup_ratio: float | None = 0.09):
        self.net = _unwrap(net)
        self.halflife_Mimg = halflife_Mimg
        self.rampup_ratio = rampup_ratio
        self.ema = [p.detach().clone() for p in self.net.parameters()]

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        """Advance the average by one step of `batch_size` images ending at `cur_nimg`."""
        halflife = self.halflife_Mimg * 1e6
        if self.rampup_ratio is not None:
            halflife = min(halflife, cur_nimg * self.rampup_ratio)
        beta = 0.5 ** (batch_size / max(halflife, 1e-8))
        _lerp_all(self.ema, [p.detach() for p in self.net.parameters()], 1 - beta)
