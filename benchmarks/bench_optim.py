"""Cost of one optimizer step and one power-EMA update over all parameters of a preset's network, per
implementation; prints one JSON document.

    python benchmarks/bench_optim.py [--presets cpu-digits8,edm2-img64-xs] [--device cpu|cuda]

Adam (EDM2 settings, `edm2.training.make_adam`) as a for-loop over tensors, foreach, and fused; the
power EMA as `PowerFunctionEMA.update` (foreach lerp) and as a per-tensor lerp loop. The fastest of 3
rounds counts. Also reports how far fused Adam drifts from the for-loop after 20 steps (float rounding).
"""

from __future__ import annotations

import json
import shlex
import sys

import torch
from _shared import device_and_presets, fastest, log, machine_info

from edm2.ema import PowerFunctionEMA
from edm2.networks import Precond
from edm2.presets import get_preset
from edm2.training import make_adam


def best_ms(fn, device: torch.device, calls: int) -> float:
    """Milliseconds per call of `fn` after one warm-up call, the fastest of 3 rounds."""
    fn()
    return round(fastest(fn, device, rounds=3, calls=calls) * 1e3, 3)


def bench(preset: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    net = Precond(**get_preset(preset).network.to_dict()).to(device)
    params = list(net.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    calls = 20 if sum(p.numel() for p in params) < 1e7 else 3
    out = {"preset": preset, "parameters": sum(p.numel() for p in params), "adam_ms": {}}
    for name, kw in [("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))]:
        opt = make_adam(params, lr=1e-4, **kw)
        out["adam_ms"][name] = best_ms(opt.step, device, calls)
    ema = PowerFunctionEMA(net, (0.10,))
    t = [1000]

    def foreach_update() -> None:
        t[0] += 1000
        ema.update(t[0], 1000)

    averages, live = ema.emas[0], [p.detach() for p in params]
    out["ema_update_ms"] = {"foreach": best_ms(foreach_update, device, calls),
                            "per-tensor": best_ms(lambda: [a.lerp_(b, 0.01) for a, b in zip(averages, live)],
                                                  device, calls)}
    # Drift of fused from for-loop Adam on a small tensor set over 20 steps with the same gradients.
    ref = [torch.randn(64, 33, 3, 3, generator=torch.Generator().manual_seed(1)).to(device)]
    results = {}
    for name, kw in [("for-loop", dict(foreach=False)), ("fused", dict(fused=True))]:
        q = [r.clone().requires_grad_(True) for r in ref]
        opt = make_adam(q, lr=1e-2, **kw)
        gen = torch.Generator().manual_seed(2)
        for _ in range(20):
            q[0].grad = torch.randn(q[0].shape, generator=gen).to(device)
            opt.step()
        results[name] = q[0].detach()
    out["fused_vs_for_loop_max_abs_diff_after_20_steps"] = float((results["fused"] - results["for-loop"]).abs().max())
    return out


def main() -> None:
    device, presets = device_and_presets(__doc__.split("\n\n")[0])
    results = []
    for preset in presets:
        log(f"[{device}] {preset}")
        results.append(bench(preset, device))
    print(json.dumps({"command": shlex.join(["python", *sys.argv]), "machine": machine_info([device.type]),
                      "device": str(device), "results": results}, indent=2))


if __name__ == "__main__":
    main()
