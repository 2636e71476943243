"""EDM2's ablation ladder (Table 1, configurations A to G): each configuration's defining property measured on a
small network, the Table 1 counts at the S size (meta device), the training setups, and the training-dynamics
instruments against a direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edm2.cli import main
from edm2.complexity import count_complexity
from edm2.layers import MPConv
from edm2.networks import edm2 as edm2_net
from edm2.networks.spec import NetworkConfig, build_network
from edm2.presets import get_preset
from edm2.training import TrainOptions, train
from edm2.training.dynamics import DynamicsProbe, growth, network_blocks, read_dynamics
from edm2.training.ladder import CONFIGS, config_preset

SMALL = NetworkConfig(img_resolution=16, img_channels=3, label_dim=4, model_channels=32, channel_mult=(1, 2),
                      num_blocks=1, attn_resolutions=(8,), channels_per_head=32, use_fp16=False)


def _net(config: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(SMALL.replace(config=config))


# Table 1 of the EDM2 paper: Mparams and Gflops of the S network on 64x64x4 latents, per configuration.
TABLE1 = {"A": (295.9, 110.4), "B": (291.8, 100.4), "C": (277.8, 100.3), "D": (277.8, 101.2), "E": (277.8, 101.2),
          "F": (280.2, 102.1), "G": (280.2, 102.2)}


@pytest.mark.parametrize("config", CONFIGS)
def test_table1_counts(config):
    # Parameters to the paper's rounding; operations within 1 %: our convention (multiply-accumulates plus the
    # weight normalization, docs/ablation.md) leaves out the elementwise work the paper's count includes.
    c = count_complexity(config_preset(get_preset("edm2-img512-s"), config).network)
    params, gflops = TABLE1[config]
    assert abs(c.parameters / 1e6 - params) <= 0.06
    assert abs(c.gflops - gflops) <= 0.01 * gflops


def test_g_is_the_preset_itself_and_the_official_arguments():
    preset = get_preset("edm2-img512-s")
    assert config_preset(preset, "G") is preset
    assert "config" not in preset.network.to_dict()  # the official network's arguments, unchanged
    assert NetworkConfig.from_dict(SMALL.replace(config="D").to_dict()).config == "D"


def test_c_has_no_biases_and_a_constant_input_channel():
    c, b = _net("C"), build_network(config_preset(get_preset("cpu-digits8"), "B").network)
    assert not [n for n, _ in c.named_parameters() if n.endswith("bias")]
    assert [n for n, _ in b.named_parameters() if n.endswith("bias")]  # the ADM network of B has them
    assert c.unet.enc["16x16_conv"].weight.shape[1] == SMALL.img_channels + 1
    assert b.model.enc["8x8_conv"].weight.shape[1] == 1


@pytest.mark.parametrize("config, expected", [("D", 1.0), ("C", np.sqrt(2))])
def test_learned_layers_at_initialisation(config, expected):
    # D: every learned layer maps unit-variance input to unit-variance output; C's He-uniform layers to sqrt(2).
    torch.manual_seed(1)
    for name, m in _net(config).named_modules():
        if isinstance(m, MPConv) and not name.startswith("logvar") and m.weight.ndim == 4 and m.in_channels >= 16:
            x = torch.randn(8, m.in_channels, 16, 16)
            rms = m(x).square().mean().sqrt().item()
            assert rms == pytest.approx(expected, rel=0.12), name


def _train_steps(net: torch.nn.Module, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=gen)
        denoised, logvar = net.train()(x, torch.full([4], 1.0), return_logvar=True)
        loss = ((denoised - x * 0.5).square() / logvar.exp() + logvar).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _row_rms(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().flatten(1).square().mean(1).sqrt() for m in net.modules()
                      if isinstance(m, MPConv)])


def test_e_keeps_weight_rows_at_unit_norm_and_d_lets_them_grow():
    d, e = _net("D"), _net("E")
    initial = _row_rms(d)
    for _ in range(3):
        _train_steps(d, 4, 0.05)
        _train_steps(e, 4, 0.05)
        e.train()(torch.randn(1, 3, 16, 16), torch.ones(1), return_logvar=True)  # forced normalization
        assert (_row_rms(e) - 1).abs().max() < 2e-4  # 1 / (1 + eps) of `normalize`
    # D normalizes only on use: its stored rows keep their N(0, 1) spread and grow (updates orthogonal to them).
    assert (_row_rms(d) - 1).abs().max() > 0.05
    assert _row_rms(d).square().mean() > initial.square().mean() * 1.001


def test_f_has_no_group_normalization(monkeypatch):
    calls = []
    real = edm2_net.group_rms_norm
    monkeypatch.setattr(edm2_net, "group_rms_norm", lambda x: calls.append(1) or real(x))
    x = torch.randn(2, 3, 16, 16)
    _net("F")(x, torch.ones(2))
    assert calls == [] and _net("F").unet.emb_hidden is None
    _net("E")(x, torch.ones(2))
    assert calls  # the group norms of C-E


def test_configurations_c_to_f_are_switches_of_one_network():
    # The same modules (but E's second embedding layer) under the official names; G's learned gains only in G.
    names = {c: {n for n, _ in _net(c).named_parameters()} for c in "CDEFG"}
    assert names["C"] == names["D"] == names["E"]
    assert names["E"] - names["F"] == {"unet.emb_hidden.weight"}
    assert {n.rsplit(".", 1)[-1] for n in names["G"] - names["F"]} == {"emb_gain", "out_gain"}


def test_training_setups_follow_the_paper():
    p = get_preset("cpu-digits8")
    a, b, c, d, e = (config_preset(p, x) for x in "ABCDE")
    assert a.edm.loss == "EDMLoss" and a.training.ema_stds == () and a.network.class_name == "EDMPrecond"
    assert (a.training.P_mean, a.training.P_std) == (-1.2, 1.2) and a.edm.adam_betas == (0.9, 0.999)
    assert b.edm is None and b.network["logvar_channels"] == 128 and b.training.P_mean == p.training.P_mean
    assert 4 in a.network["attn_resolutions"]  # attention at half the resolution: A only
    assert [x.training.decay for x in (a, b, c, d)] == [0] * 4 and e.training.decay == p.training.decay
    assert [x.training.lr for x in (a, b, c)] == [p.training.lr / 50] * 3 and d.training.lr == p.training.lr


@pytest.fixture(scope="module")
def ladder_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    runs = {}
    for config in "ABCE":
        runs[config] = train(TrainOptions(outdir=str(root / config), data="digits", preset="cpu-digits8",
                                          config=config, batch=32, duration=256, status=64, snapshot=128,
                                          checkpoint=256, workers=0, device="cpu"), progress=False)
    return root, runs


def test_every_configuration_trains_and_records_magnitudes(ladder_runs):
    root, runs = ladder_runs
    for config, result in runs.items():
        assert result["status"] == "finished" and result["run"]["config"] == config
        nimg, series = read_dynamics(root / config)
        assert nimg == [64, 128, 192, 256]
        assert set(series) == {"act", "weight", "elr"} and "enc.8x8_block0" in series["act"]
        lrs = [json.loads(line)["lr"] for line in (root / config / "stats.jsonl").read_text().splitlines()]
        assert (lrs[-1] == lrs[-2]) == (config in "ABC")  # after the warm-up: constant before E, decaying from E
    assert list((root / "A").glob("snapshot-*traditional*")) or list((root / "A").glob("snapshot-*ema*"))
    assert list((root / "B").glob("snapshot-*-0.100.safetensors"))


def test_instruments_equal_a_direct_computation():
    net = _net("G")
    probe = DynamicsProbe(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x, sigma = torch.randn(2, 3, 16, 16), torch.full([2], 0.7)
    with probe.measuring(opt):
        net.train()(x, sigma).square().mean().backward()
        used = {n: p.detach().clone() for n, p in net.named_parameters()}  # after the forced normalization
        opt.step()
    got = probe.collect()
    stepped = {n: p.detach().clone() for n, p in net.named_parameters()}

    # Weights after the step, and the relative size of the step, from the parameters themselves.
    for name, block in network_blocks(net).items():
        keys = [f"unet.{name}.{n}" for n, p in block.named_parameters() if n.endswith("weight") and p.ndim >= 2]
        old, new = (torch.cat([w[k].flatten() for k in keys]) for w in (used, stepped))
        assert got["weight"][name] == pytest.approx(new.square().mean().sqrt().item(), rel=1e-5)
        assert got["elr"][name] == pytest.approx(((new - old).norm() / old.norm()).item(), rel=1e-4)

    # The activations: the forward again with the weights it used, block by block as UNet.forward runs it.
    net.load_state_dict(used, strict=False)  # the buffers are unchanged
    u = net.unet.eval()
    with torch.no_grad():
        h = torch.cat([x / (net.sigma_data**2 + 0.49) ** 0.5, torch.ones_like(x[:, :1])], dim=1)
        emb = u.emb_noise(u.emb_fourier(sigma.log() / 4))
        emb = edm2_net.mp_silu(edm2_net.mp_sum(emb, u.emb_label(torch.zeros(1, 4)), t=u.label_balance))
        skips, rms = [], {}
        for name, m in u.enc.items():
            h = m(h) if "conv" in name else m(h, emb)
            skips.append(h)
            rms[f"enc.{name}"] = h.square().mean().sqrt().item()
        for name, m in u.dec.items():
            if "block" in name:
                h = edm2_net.mp_cat(h, skips.pop(), t=u.concat_balance)
            h = m(h, emb)
            rms[f"dec.{name}"] = h.square().mean().sqrt().item()
    assert got["act"] == pytest.approx(rms, rel=1e-4)


def test_plot_dynamics_cli(ladder_runs, tmp_path):
    root, _ = ladder_runs
    out = tmp_path / "fig.png"
    r = CliRunner().invoke(main, ["plot", "dynamics", str(root / "C"), str(root / "E"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 10_000
    summary = json.loads(r.output)["growth"]
    assert set(summary) == {"config C", "config E"}
    _, series = read_dynamics(root / "E")
    assert summary["config E"]["weight"] == pytest.approx(growth(series["weight"]))
    assert summary["config E"]["weight"] == pytest.approx(1, abs=1e-3)  # forced weight normalization


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "C", "--preset", "edm-cifar10-ddpmpp-edm"], "EDM (2022) setup"),
    (["train", "--config", "H"], "'H' is not one of"),
    (["train", "--config", "B", "--arch", "adm"], "--config applies to the EDM2 presets"),
])
def test_bad_config(tmp_path, args, message):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, [*args, "--outdir", str(out), "--data", "digits"])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_per_tensor_sweep_naming_no_tensor(ladder_runs):
    root, _ = ladder_runs
    before = sorted(p.name for p in (root / "B").iterdir())
    for pattern in ("unet.nothing.*", " "):
        r = CliRunner().invoke(main, ["ema-sweep", "--run", str(root / "B"), "--per-tensor", pattern])
        assert r.exit_code == 2 and "--per-tensor" in r.output and len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in (root / "B").iterdir()) == before


def test_per_tensor_sweep_changes_only_the_chosen_tensor(ladder_runs, tmp_path):
    from safetensors.torch import load_file

    from edm2.ema.reconstruct import posthoc_reconstruct
    from edm2.ema.sweep import per_tensor_sweep

    root, _ = ladder_runs
    chosen, other = "unet.enc.8x8_block0.conv_res0.weight", "unet.dec.4x4_block0.conv_res1.weight"

    def metric(path):
        t = load_file(str(path))
        return {"chosen": float(t[chosen].double().sum()), "other": float(t[other].double().sum())}

    full = {r.sigma_rel: load_file(str(r.path)) for r in posthoc_reconstruct(root / "E", tmp_path / "full",
                                                                            [0.05, 0.10])}
    result = per_tensor_sweep(root / "E", tmp_path / "sweep", [0.05, 0.10], [chosen], 0.10, metric, key="chosen")
    curve = result.curves[chosen]
    assert [r["sigma_rel"] for r in curve] == [0.05, 0.10]
    for row in curve:  # the chosen tensor at the swept length, every other one at the base length
        assert row["chosen"] == pytest.approx(float(full[row["sigma_rel"]][chosen].double().sum()), rel=1e-6)
        assert row["other"] == pytest.approx(float(full[0.10][other].double().sum()), rel=1e-6)
    assert full[0.05][chosen].double().sum() != full[0.10][chosen].double().sum()
    assert result.plot_path.stat().st_size > 5_000 and json.loads(result.json_path.read_text())["base_std"] == 0.10
    assert not [p for p in (tmp_path / "sweep").glob("*.safetensors") if "pt" in p.name]  # removed once scored


def test_info_config_cli():
    r = CliRunner().invoke(main, ["info", "--preset", "edm2-img512-s", "--config", "C"])
    assert r.exit_code == 0 and "277.82 M" in r.output and "configuration C" in r.output
    r = CliRunner().invoke(main, ["info", "--config", "C"])
    assert r.exit_code == 2 and "name it" in r.output
