"""`edm2 train`'s options come from one table, the `Option` metadata of the `TrainOptions` fields: the command and
the dataclass cannot drift, and the command hands the library the TrainOptions a Python caller would build."""

from __future__ import annotations

import ast
import dataclasses
import json

import click
from click.testing import CliRunner

import edm2.training.options as options_module
from edm2.cli import main
from edm2.cli import train as cli_train
from edm2.data import open_dataset
from edm2.training.options import Option, RunConfig, TrainOptions, option_fields, resolve_run


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def train_params() -> list[click.Parameter]:
    """The options of `edm2 train` other than the command's own --dry-run."""
    return [p for p in main.commands["train"].params if p.name != "dry_run"]


def test_every_field_is_an_option_and_every_option_a_field():
    fields = option_fields()
    assert [f.name for f in fields] == [f.name for f in dataclasses.fields(TrainOptions)]
    assert all(isinstance(f.metadata.get("option"), Option) and f.metadata["option"].help for f in fields)
    assert [p.name for p in train_params()] == [f.name for f in fields]
    assert "dry_run" not in {f.name for f in fields}


def test_options_keep_their_spellings_defaults_and_flags():
    params = {p.name: p for p in train_params()}
    for f in option_fields():
        p, spec = params[f.name], f.metadata["option"]
        assert "/".join(p.opts + p.secondary_opts) == spec.spelling(f.name)
        assert p.help == spec.help
        if f.default is dataclasses.MISSING:
            assert p.required and p.default is None
        else:
            assert p.default == f.default and not p.required
        assert p.is_flag == (spec.kind is bool)
    assert params["P_mean"].opts == ["--P-mean"] and params["P_std"].opts == ["--P-std"]
    assert params["compile"].opts == ["--compile"] and params["ema_stds"].opts == ["--ema-stds"]
    assert (params["cond"].opts, params["cond"].secondary_opts, params["cond"].default) == (["--cond"], ["--uncond"],
                                                                                            True)
    assert params["outdir"].required and params["budget_clock"].show_default and not params["lr"].show_default
    assert isinstance(params["workers"].type, click.IntRange) and params["workers"].type.min == 0
    assert list(params["precision"].type.choices) == ["fp32", "bf16", "fp16"]


def test_help_lists_every_option_in_table_order_with_its_help():
    text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    positions = [text.index(f.metadata["option"].spelling(f.name).replace("/", " / ") + " ")
                 for f in option_fields()]
    assert positions == sorted(positions)
    assert text.index("--dry-run") > positions[-1]
    for f in option_fields():
        assert " ".join(f.metadata["option"].help.split()) in text, f.name
    assert "[default: digits]" in text and "[default: cond]" in text and "[required]" in text
    assert "--ema-stds TEXT" in text and "--workers INTEGER RANGE" in text and "--precision [fp32|bf16|fp16]" in text


def test_dry_run_hands_the_library_the_options_a_caller_would_build(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli_train, "_dry_run", lambda opts, rank: seen.append(opts))
    result = invoke("train", "--outdir", tmp_path / "run", "--dry-run", "--data", "digits", "--preset",
                    "cpu-digits8", "--uncond", "--duration", "2Ki", "--budget", "15min", "--budget-clock", "cpu",
                    "--rampup", "1Ki", "--batch", "64", "--batch-gpu", "32", "--lr", "0.02", "--P-mean", "-0.5",
                    "--P-std", "1.2", "--status", "1Ki", "--snapshot", "1Mi", "--checkpoint", "1.5Ki", "--ema-stds",
                    "0.04,0.09", "--seed", "5", "--device", "cpu", "--precision", "bf16", "--compile", "--xflip",
                    "--max-size", "100", "--workers", "0")
    assert result.exit_code == 0, result.output
    expected = TrainOptions(outdir=str(tmp_path / "run"), data="digits", preset="cpu-digits8", cond=False,
                            duration=2048, budget=900.0, budget_clock="cpu", rampup=1024, batch=64, batch_gpu=32,
                            lr=0.02, P_mean=-0.5, P_std=1.2, status=1024, snapshot=1 << 20, checkpoint=1536,
                            ema_stds=(0.04, 0.09), seed=5, device="cpu", precision="bf16", compile=True, xflip=True,
                            max_size=100, workers=0)
    assert seen == [expected]
    assert isinstance(seen[0].ema_stds, tuple)


def test_defaults_of_the_command_are_those_of_the_dataclass(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli_train, "_dry_run", lambda opts, rank: seen.append(opts))
    assert invoke("train", "--outdir", tmp_path / "run", "--dry-run").exit_code == 0
    assert seen == [TrainOptions(outdir=str(tmp_path / "run"))]


def test_dry_run_prints_the_run_of_the_same_options(tmp_path):
    result = invoke("train", "--outdir", tmp_path / "run", "--dry-run", "--preset", "cpu-digits8", "--uncond",
                    "--duration", "2Ki", "--P-mean", "-0.5", "--ema-stds", "0.04,0.09", "--compile", "--device", "cpu",
                    "--batch", "64", "--seed", "3")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    opts = TrainOptions(outdir=str(tmp_path / "run"), preset="cpu-digits8", cond=False, duration=2048, P_mean=-0.5,
                        ema_stds=(0.04, 0.09), compile=True, device="cpu", batch=64, seed=3)
    run = resolve_run(opts, open_dataset("digits", progress=False))
    assert {k: v for k, v in printed.items() if k not in ("parameters", "gflops")} == json.loads(
        json.dumps(run.to_dict()))
    assert not (tmp_path / "run").exists()


def test_bad_ema_stds_is_a_one_line_usage_error(tmp_path):
    result = invoke("train", "--outdir", tmp_path / "run", "--ema-stds", "0.05,x")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error: ") and "--ema-stds" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_may_change_the_options_marked_mutable():
    stored = {f.name for f in dataclasses.fields(RunConfig)}
    mutable = {f.name for f in option_fields() if f.metadata["option"].mutable}
    assert mutable <= stored
    assert set(RunConfig.MUTABLE) == {"duration", "status", "snapshot", "checkpoint", "batch_gpu", "precision",
                                      "compile", "processes", "allow_tf32", "provenance", "budget", "workers"}
    assert set(RunConfig.MUTABLE) == mutable | {"processes", "provenance"}


def test_the_library_table_does_not_import_click():
    tree = ast.parse(open(options_module.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "click" not in imported


def test_the_run_holds_typed_objects_and_stores_plain_json():
    from edm2.data import StabilityVAEEncoder, encoder_from_dict
    from edm2.networks import EDMNetworkConfig, NetworkConfig
    from edm2.presets import EDMRecipe

    data = open_dataset("digits")
    edm2_run = resolve_run(TrainOptions(outdir="x", preset="cpu-tiny8", device="cpu"), data, world=1)
    edm_run = resolve_run(TrainOptions(outdir="x", preset="cpu-edm-tiny8", device="cpu", augment=0), data, world=1)
    assert isinstance(edm2_run.network, NetworkConfig) and edm2_run.edm is None and edm2_run.encoder is None
    assert isinstance(edm_run.network, EDMNetworkConfig) and isinstance(edm_run.edm, EDMRecipe)
    assert edm_run.edm.augment == 0 and edm_run.network.kwargs["augment_dim"] == 0  # attributes, not string keys
    for run in (edm2_run, edm_run):
        d = run.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert d["network"] == run.network.to_dict() and d["network_class"] == run.network_class
    assert edm_run.to_dict()["edm"] == edm_run.edm.to_dict() and edm_run.to_dict()["network_class"] == "EDMPrecond"
    vae = {"class": "StabilityVAEEncoder", "kwargs": {"vae_name": "v", "raw_mean": [1.0, 2.0, 3.0, 4.0]}}
    latent_run = dataclasses.replace(edm2_run, encoder=encoder_from_dict(vae))  # a run on latents
    assert isinstance(latent_run.encoder, StabilityVAEEncoder)
    assert latent_run.to_dict()["encoder"] == encoder_from_dict(vae).to_dict()
    assert latent_run.encoder == encoder_from_dict(vae) != encoder_from_dict(None)
