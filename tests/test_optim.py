"""EDM2 optimizer recipe (SPEC section 3): learning-rate schedule, Adam settings, gradient guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edm2.training import learning_rate_schedule, make_adam, sanitize_gradients


def test_learning_rate_schedule_golden(golden_phema):
    g = golden_phema
    lr = np.array([
        learning_rate_schedule(cur_nimg=c, batch_size=int(b), ref_lr=r, ref_batches=rb, rampup_Mimg=ru)
        for c, b, r, rb, ru in zip(g["lr/cur_nimg"], g["lr/batch_size"], g["lr/ref_lr"], g["lr/ref_batches"],
                                   g["lr/rampup_Mimg"])
    ])
    assert len(lr) == 972
    np.testing.assert_allclose(lr, g["lr/lr"], rtol=1e-12, atol=1e-15)
    # The grid covers the special cases: lr(0) = 0 under ramp-up, no decay, no ramp-up.
    assert np.any((g["lr/cur_nimg"] == 0) & (g["lr/rampup_Mimg"] > 0))
    assert np.any(g["lr/ref_batches"] == 0) and np.any(g["lr/rampup_Mimg"] == 0)


def test_learning_rate_schedule_default_args_golden(golden_phema):
    g = golden_phema
    lr = np.array([learning_rate_schedule(float(c), 2048) for c in g["lr/default_args_cur_nimg"]])
    np.testing.assert_allclose(lr, g["lr/default_args_lr"], rtol=1e-12, atol=1e-15)


def test_learning_rate_schedule_formula():
    # alpha_ref / sqrt(max(t / t_ref, 1)) with t in batches, times min(nimg / 1e7, 1).
    ref_lr, t_ref, bs = 0.012, 35000, 2048
    for nimg in [0, 1, 5e6, 1e7, 2e7, t_ref * bs, 4 * t_ref * bs, 2**31]:
        t = nimg / bs
        expected = ref_lr / math.sqrt(max(t / t_ref, 1)) * min(nimg / 1e7, 1)
        got = learning_rate_schedule(nimg, bs, ref_lr=ref_lr, ref_batches=t_ref)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), nimg
    # Four times the reference duration halves the rate.
    half = learning_rate_schedule(4 * t_ref * bs, bs, ref_lr=ref_lr, ref_batches=t_ref)
    assert abs(half - ref_lr / 2) < 1e-15


def test_make_adam_settings():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_adam([p], lr=0.01)
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert tuple(group["betas"]) == (0.9, 0.99)
    assert group["eps"] == 1e-8
    assert group["weight_decay"] == 0
    assert group["lr"] == 0.01
    assert not group["amsgrad"]
    assert group["params"] == [p]


@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused"])  # the trainer uses fused=True
def test_make_adam_step_matches_hand_computed(fused):
    # Three steps with different gradients, including tiny entries where eps matters and a sign flip;
    # the learning rate changes between steps the way the training loop sets it.
    grads = torch.tensor([
        [0.5, -2.0, 1e-8, 3e-9, 0.0],
        [0.4, 1.0, 2e-8, -3e-9, 1.0],
        [-0.1, 0.3, 1e-8, 0.0, 2.0],
    ], dtype=torch.float64)
    lrs = [0.01, 0.02, 0.005]
    theta0 = torch.tensor([1.0, -0.5, 0.25, 2.0, 0.0], dtype=torch.float64)
    p = torch.nn.Parameter(theta0.clone())
    opt = make_adam([p], lr=lrs[0], fused=fused)

    b1, b2, eps = 0.9, 0.99, 1e-8
    m = np.zeros(5)
    v = np.zeros(5)
    theta = theta0.numpy().copy()
    for k, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = g.clone()
        opt.step()
        g = g.numpy()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**k)
        v_hat = v / (1 - b2**k)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
        np.testing.assert_allclose(p.detach().numpy(), theta, rtol=0, atol=1e-7)
        np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-12, atol=1e-15)
    # Step 1 moves each weight with a nonzero gradient by about lr * sign(g) (m_hat / sqrt(v_hat) = 1),
    # except where |g| is comparable to eps.
    assert not np.allclose(theta, theta0.numpy())


@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused"])
def test_make_adam_float32_step(fused):
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    opt = make_adam([p], lr=0.01, fused=fused)
    p.grad = torch.tensor([0.3, -0.2, 1e-8])
    opt.step()
    g = np.array([0.3, -0.2, 1e-8])
    # First step: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
    expected = np.array([1.0, -1.0, 0.5]) - 0.01 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=0, atol=1e-7)


def test_sanitize_gradients():
    a = torch.nn.Parameter(torch.zeros(8))
    a.grad = torch.tensor([float("nan"), 1.5, float("inf"), -2.0, float("-inf"), 0.0, 3e-30, -1e30])
    b = torch.nn.Parameter(torch.zeros(2, 2))
    b.grad = torch.tensor([[float("nan"), float("nan")], [float("-inf"), 4.0]], dtype=torch.float32)
    c = torch.nn.Parameter(torch.zeros(3))  # grad None
    d = torch.nn.Parameter(torch.zeros(3))
    d.grad = torch.tensor([0.25, -0.5, 7.0])
    grad_a, grad_d = a.grad, d.grad.clone()

    sanitize_gradients(iter([a, b, c, d]))  # any iterable, e.g. net.parameters()

    assert a.grad is grad_a  # in place
    torch.testing.assert_close(a.grad, torch.tensor([0.0, 1.5, 0.0, -2.0, 0.0, 0.0, 3e-30, -1e30]),
                               rtol=0, atol=0)
    torch.testing.assert_close(b.grad, torch.tensor([[0.0, 0.0], [0.0, 4.0]]), rtol=0, atol=0)
    assert c.grad is None
    assert torch.equal(d.grad, grad_d)
