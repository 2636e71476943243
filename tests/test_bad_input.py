"""The bad-input matrix: every command times every class of bad input (missing, empty, corrupt, truncated, lying
metadata, wrong dtype/rank/range, huge, non-finite, foreign file, directory for file, unwritable, concurrent). Each
row asserts exit code 2, one line of message without a traceback, and the output location byte-identical before
and after (a refused command leaves the file system as it was, so the corrected command runs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from edm2.cli import main
from edm2.files import RunLock
from edm2.training import TrainOptions, train


@pytest.fixture(scope="module")
def f(tmp_path_factory) -> dict[str, Path]:
    """Good and bad inputs, made once: a tiny run and its snapshot, images, and the hostile variants."""
    root = tmp_path_factory.mktemp("bad-input")
    train(TrainOptions(outdir=str(root / "run"), data="digits", preset="cpu-tiny8", batch=16, duration=64, status=32,
                       snapshot=32, checkpoint=32, workers=0, device="cpu"), progress=False)
    snap = sorted((root / "run").glob("snapshot-*-0.100.safetensors"))[-1]
    p = {"run": root / "run", "snap": snap, "dir": root / "a-folder", "empty": root / "empty.safetensors",
         "corrupt": root / "corrupt.safetensors", "truncated": root / "truncated.safetensors",
         "png": root / "image.png", "text": root / "notes.txt", "missing": root / "missing.safetensors",
         "nan": root / "nan.safetensors", "lying": root / "lying.safetensors", "images": root / "images",
         "npz_float": root / "float.npz", "npz_rank": root / "rank.npz", "npz_nan_labels": root / "nanlab.npz",
         "empty_dir": root / "empty-dir", "a_file": root / "a-file"}
    p["dir"].mkdir()
    p["empty_dir"].mkdir()
    p["empty"].write_bytes(b"")
    p["corrupt"].write_bytes(np.random.default_rng(0).bytes(4096))
    p["truncated"].write_bytes(snap.read_bytes()[: snap.stat().st_size // 2])
    p["text"].write_text("not a model\n")
    p["a_file"].write_text("a file where a folder should be\n")
    Image.fromarray(np.zeros([8, 8], np.uint8)).save(p["png"])
    _rewrite(snap, p["nan"], lambda t, m: ({k: v.fill_(float("nan")) if k.endswith("out_conv.weight") else v
                                            for k, v in t.items()}, m))
    _rewrite(snap, p["lying"], lambda t, m: (t, _lie(m)))
    p["images"].mkdir()
    for i in range(8):
        Image.fromarray(np.full([8, 8], 30 * i, np.uint8)).save(p["images"] / f"{i}.png")
    np.savez(p["npz_float"], x=np.zeros([4, 8, 8, 1], np.float32))
    np.savez(p["npz_rank"], x=np.zeros([4, 8], np.uint8))
    np.savez(p["npz_nan_labels"], x=np.zeros([4, 8, 8, 1], np.uint8), y=np.array([0, 1, np.nan, 2]))
    return p


def _rewrite(src: Path, dst: Path, change) -> None:
    from safetensors import safe_open

    with safe_open(str(src), "pt") as g:
        meta = g.metadata()
    tensors, meta = change({k: v.clone() for k, v in load_file(str(src)).items()}, meta)
    save_file(tensors, str(dst), metadata=meta)


def _lie(meta: dict) -> dict:
    """Metadata whose network is absurdly large (model_channels 10**7), the tensors as they were."""
    for key, value in meta.items():
        try:
            d = json.loads(value)
        except ValueError:
            continue
        if isinstance(d, dict) and isinstance(d.get("network"), dict):
            d["network"]["model_channels"] = 10**7
            meta[key] = json.dumps(d)
    return meta


def tree(path: Path) -> dict[str, str] | None:
    """Everything under `path` (names and contents), or None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


O = "OUT"  # stands for the row's output location (a fresh path under tmp_path, or an existing one)

# (command, class, arguments with O for the output, fragment of the message)
ROWS = [
    # generate
    ("generate", "missing", ["generate", "--net", "{missing}", "--outdir", O], "no such file"),
    ("generate", "empty", ["generate", "--net", "{empty}", "--outdir", O], ""),
    ("generate", "corrupt", ["generate", "--net", "{corrupt}", "--outdir", O], ""),
    ("generate", "truncated", ["generate", "--net", "{truncated}", "--outdir", O], ""),
    ("generate", "lying metadata", ["generate", "--net", "{lying}", "--outdir", O], ""),
    ("generate", "non-finite", ["generate", "--net", "{nan}", "--outdir", O], "finite"),
    ("generate", "foreign file", ["generate", "--net", "{png}", "--outdir", O], ""),
    ("generate", "directory for file", ["generate", "--net", "{dir}", "--outdir", O], "folder"),
    ("generate", "range", ["generate", "--net", "{snap}", "--class", "10", "--outdir", O], "class"),
    ("generate", "huge", ["generate", "--net", "{snap}", "--seeds", "0-99999999999", "--outdir", O], "seeds"),
    ("generate", "wrong value", ["generate", "--net", "{snap}", "--seeds", "a-b", "--outdir", O], "seed"),
    ("generate", "non-finite option", ["generate", "--net", "{snap}", "--guidance", "nan", "--outdir", O], "finite"),
    ("generate", "range option", ["generate", "--net", "{snap}", "--steps", "0", "--outdir", O], "steps"),
    ("generate", "unwritable", ["generate", "--net", "{snap}", "--outdir", "{a_file}/sub"], ""),
    # convert
    ("convert", "missing", ["convert", "{missing}", O], ""),
    ("convert", "corrupt", ["convert", "{corrupt}", O], ""),
    ("convert", "foreign file", ["convert", "{text}", O], ""),
    ("convert", "directory for file", ["convert", "{dir}", O], ""),
    # reconstruct
    ("reconstruct", "missing", ["reconstruct", "--indir", "{missing}", "--outdir", O, "--std", "0.1"], ""),
    ("reconstruct", "empty", ["reconstruct", "--indir", "{empty_dir}", "--outdir", O, "--std", "0.1"], ""),
    ("reconstruct", "range", ["reconstruct", "--indir", "{run}", "--outdir", O, "--std", "0.5"], ""),
    ("reconstruct", "non-finite option", ["reconstruct", "--indir", "{run}", "--outdir", O, "--std", "nan"], ""),
    ("reconstruct", "foreign file", ["reconstruct", "--indir", "{png}", "--outdir", O, "--std", "0.1"], ""),
    ("reconstruct", "unwritable", ["reconstruct", "--indir", "{run}", "--outdir", "{a_file}/x", "--std", "0.1"], ""),
    # train
    ("train", "missing", ["train", "--outdir", O, "--data", "{missing}"], ""),
    ("train", "empty", ["train", "--outdir", O, "--data", "{empty_dir}"], ""),
    ("train", "wrong dtype", ["train", "--outdir", O, "--data", "{npz_float}"], ""),
    ("train", "wrong rank", ["train", "--outdir", O, "--data", "{npz_rank}"], ""),
    ("train", "non-finite labels", ["train", "--outdir", O, "--data", "{npz_nan_labels}"], ""),
    ("train", "foreign file", ["train", "--outdir", O, "--data", "{text}"], ""),
    ("train", "range", ["train", "--outdir", O, "--data", "digits", "--batch", "0"], "batch"),
    ("train", "non-finite option", ["train", "--outdir", O, "--data", "digits", "--lr", "nan"], "lr"),
    ("train", "huge", ["train", "--outdir", O, "--data", "digits", "--channels", "100000000"], ""),
    ("train", "unknown preset", ["train", "--outdir", O, "--data", "digits", "--preset", "edm2-img512-q"], "preset"),
    ("train", "unwritable", ["train", "--outdir", "{a_file}/run", "--data", "digits"], ""),
    ("train", "concurrent", ["train", "--outdir", "{run}", "--data", "digits", "--preset", "cpu-tiny8", "--batch",
                             "16", "--duration", "128", "--status", "32", "--snapshot", "32", "--checkpoint", "32",
                             "--workers", "0", "--device", "cpu"], "another"),
    ("train", "different run", ["train", "--outdir", "{run}", "--data", "digits", "--preset", "cpu-digits8"], ""),
    # ema-sweep, guidance-sweep
    ("ema-sweep", "missing", ["ema-sweep", "--run", "{missing}", "--outdir", O], ""),
    ("ema-sweep", "range", ["ema-sweep", "--run", "{run}", "--outdir", O, "--samples", "1"], "samples"),
    ("guidance-sweep", "missing", ["guidance-sweep", "--net", "{missing}", "--gnet", "{snap}", "--outdir", O], ""),
    ("guidance-sweep", "non-finite option", ["guidance-sweep", "--net", "{snap}", "--gnet", "{snap}", "--guidance",
                                             "inf", "--outdir", O], "finite"),
    ("guidance-sweep", "non-finite", ["guidance-sweep", "--net", "{nan}", "--gnet", "{snap}", "--outdir", O], ""),
    # dataset
    ("dataset convert", "missing", ["dataset", "convert", "--source", "{missing}", "--dest", O], ""),
    ("dataset convert", "empty", ["dataset", "convert", "--source", "{empty_dir}", "--dest", O], ""),
    ("dataset convert", "foreign file", ["dataset", "convert", "--source", "{text}", "--dest", O], ""),
    ("dataset convert", "wrong dtype", ["dataset", "convert", "--source", "{npz_float}", "--dest", O], ""),
    ("dataset convert", "non-finite labels", ["dataset", "convert", "--source", "{npz_nan_labels}", "--dest", O],
     ""),
    ("dataset convert", "range option", ["dataset", "convert", "--source", "{images}", "--dest", O,
                                         "--resolution", "0"], ""),
    ("dataset convert", "unwritable", ["dataset", "convert", "--source", "{images}", "--dest", "{a_file}/d.zip"],
     ""),
    ("dataset stats", "missing", ["dataset", "stats", "--source", "{missing}", "--dest", O], ""),
    ("dataset encode", "missing", ["dataset", "encode", "--source", "{missing}", "--dest", O], ""),
    ("dataset decode", "missing", ["dataset", "decode", "--source", "{missing}", "--dest", O], ""),
    # metrics, judge
    ("metrics ref", "missing", ["metrics", "ref", "--data", "{missing}", "--dest", O], ""),
    ("metrics ref", "empty", ["metrics", "ref", "--data", "{empty_dir}", "--dest", O], ""),
    ("metrics calc", "missing", ["metrics", "calc", "--images", "{images}", "--ref", "{missing}"], ""),
    ("metrics calc", "corrupt", ["metrics", "calc", "--images", "{images}", "--ref", "{corrupt}"], ""),
    ("metrics gen", "missing", ["metrics", "gen", "--net", "{missing}", "--ref", "{corrupt}"], ""),
    ("metrics gen", "non-finite", ["metrics", "gen", "--net", "{nan}", "--ref", "{corrupt}"], ""),
    ("metrics gen", "huge", ["metrics", "gen", "--net", "{snap}", "--ref", "{corrupt}", "--num", "100000000000"],
     "split"),
    ("metrics gen", "huge repeats", ["metrics", "gen", "--net", "{snap}", "--ref", "{corrupt}", "--num", "1000",
                                     "--repeats", "100000000"], "split"),
    ("judge train", "missing", ["judge", "train", "--data", "{missing}", "--out", O], ""),
    ("judge train", "range", ["judge", "train", "--data", "digits", "--images", "0", "--out", O], ""),
    ("info", "unknown preset", ["info", "--preset", "edm2-img512-q"], "preset"),
    ("toy train", "range", ["toy", "train", "--outdir", O, "--steps", "0"], ""),
    ("toy plot", "missing", ["toy", "plot", "--rundir", "{missing}"], ""),
]


def _args(row_args: list[str], f: dict[str, Path], out: Path) -> tuple[list[str], Path]:
    """The command line with the fixture paths filled in, and the location whose state must not change."""
    watched = out
    args = []
    for a in row_args:
        if a == O:
            args.append(str(out))
            continue
        filled = a.format(**{k: str(v) for k, v in f.items()})
        args.append(filled)
        if a in ("{run}",) and "--outdir" in row_args[row_args.index(a) - 1:row_args.index(a)]:
            watched = f["run"]
    return args, watched


@pytest.mark.parametrize("command, kind, row_args, needle", ROWS, ids=[f"{r[0]}: {r[1]}" for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_nothing_changes(command, kind, row_args, needle, f, tmp_path):
    out = tmp_path / "out"
    args, watched = _args(row_args, f, out)
    before = tree(watched), tree(f["run"])
    lock = RunLock(f["run"]) if kind == "concurrent" else None
    if lock is not None:
        lock.acquire()
    try:
        result = CliRunner().invoke(main, args)
    finally:
        if lock is not None:
            lock.release()
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, f"{command} {kind}: exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError,))
    errors = [line for line in lines if line.startswith("edm2: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.output
    assert needle.lower() in errors[0].lower(), errors[0]
    assert (tree(watched), tree(f["run"])) == before, f"{command} {kind} changed {watched}"


def test_the_matrix_covers_every_command_and_class():
    commands = {r[0] for r in ROWS}
    assert commands >= {"generate", "convert", "reconstruct", "train", "ema-sweep", "guidance-sweep",
                        "dataset convert", "dataset stats", "dataset encode", "dataset decode", "metrics ref",
                        "metrics calc", "metrics gen", "judge train", "info", "toy train", "toy plot"}
    kinds = {r[1] for r in ROWS}
    assert kinds >= {"missing", "empty", "corrupt", "truncated", "lying metadata", "wrong dtype", "wrong rank",
                     "range", "huge", "non-finite", "foreign file", "directory for file", "unwritable", "concurrent"}


def test_nan_fixture_really_holds_nan(f):
    assert torch.isnan(load_file(str(f["nan"]))["unet.out_conv.weight"]).all()
