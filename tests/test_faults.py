"""Every writer survives SIGKILL and a full disk. Each writer runs in a child process that is killed at seeded
points (inside a temporary write: at an `os.fsync` or `os.replace` call, and at a random time), then run again: the
result equals an uninterrupted run's and no temporary is left. A full disk (ENOSPC injected at the sync of the
atomic writer, or a real small tmpfs where this machine allows mounting one) is one line, exit 2, no temporary and
no torn file. More kill points per writer: benchmarks/bench_faults.py."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from fault_harness import (
    LATENT_NAMES,
    NAMES,
    Writer,
    kill_then_finish,
    latent_writers,
    make_inputs,
    make_latent_inputs,
    run,
    stats_counts,
    temps,
    writers,
)

from edm2.cli import main

SEED = 1234


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault-inputs")
    return make_latent_inputs(root, make_inputs(root))


def every_writer(inputs: dict[str, Path]) -> dict[str, Writer]:
    return {**writers(inputs), **latent_writers(inputs)}


ALL = NAMES + LATENT_NAMES
# The random-moment kill for the writers that start quickly; the slower ones (a sweep samples and judges, the VAE
# jobs load diffusers) get their random moments in benchmarks/bench_faults.py, which kills every writer at four
# seeded points, to keep this file near two minutes.
QUICK = [n for n in ALL if n not in ("ema-sweep", "guidance-sweep", "dataset encode", "dataset decode")]


@pytest.fixture(scope="module")
def references(inputs, tmp_path_factory) -> dict[str, dict]:
    """Each writer's uninterrupted result and its wall time."""
    result = {}
    for name, w in every_writer(inputs).items():
        out = tmp_path_factory.mktemp("ref")
        code, err, seconds = run(w, out)
        assert code == 0, f"{name}: {err}"
        result[name] = {"digest": w.digest(out), "seconds": seconds}
    return result


@pytest.mark.parametrize("name", ALL)
def test_sigkill_inside_a_temporary_write_then_rerun(name, inputs, references, tmp_path):
    w = every_writer(inputs)[name]
    rng = random.Random(f"{SEED}-{name}")
    mode, n = rng.choice([("fsync", 1), ("replace", 1), ("fsync", 2), ("replace", 2)])
    r = kill_then_finish(w, tmp_path / "out", mode, n)
    assert r["exit"] == 0, r
    assert r["digest"] == references[name]["digest"], f"{name} killed at {mode} #{n}"
    assert r["temps"] == []


@pytest.mark.parametrize("name", QUICK)
def test_sigkill_at_a_random_moment_then_rerun(name, inputs, references, tmp_path):
    w = every_writer(inputs)[name]
    total = references[name]["seconds"]
    kill_after = random.Random(f"{SEED}-t-{name}").uniform(0.3 * total, 0.95 * total)
    r = kill_then_finish(w, tmp_path / "out", kill_after=kill_after)
    assert r["exit"] == 0, r
    assert r["digest"] == references[name]["digest"], f"{name} killed after {kill_after:.1f} s"
    assert r["temps"] == []
    if name == "train":  # the records continue where the checkpoint stands: image counts only grow
        counts = stats_counts(tmp_path / "out" / "run")
        assert counts == sorted(set(counts)) and counts[-1] == 192


# ----------------------------------------------------------------------------------------------------
# A full disk.


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("name", ALL)
def test_a_full_disk_is_one_line_and_leaves_no_temporary(name, inputs, tmp_path, monkeypatch):
    w = every_writer(inputs)[name]
    out = tmp_path / "out"
    monkeypatch.setattr(os, "fsync", _full_disk)  # the atomic writer syncs every file before renaming it
    result = CliRunner().invoke(main, [str(a) for a in w.argv(out)])
    lines = result.output.strip().splitlines()  # a progress bar may stand above the message
    errors = [line for line in lines if line.startswith("edm2: error:")]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(errors) == 1 and errors[0] == lines[-1] and "no space left on device" in errors[0].lower(), lines
    assert temps(out) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 200 KiB tmpfs, where this machine lets the tests mount one (root with CAP_SYS_ADMIN)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the injected ENOSPC tests cover every writer")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_generate_onto_a_really_full_disk(inputs, small_tmpfs):
    w = writers(inputs)["generate"]
    many = Writer("generate", lambda o: [*w.argv(o)[:3], "--seeds", "0-2999", *w.argv(o)[5:]], w.digest)
    code, err, _ = run(many, small_tmpfs / "out")
    errors = [line for line in err.splitlines() if line.startswith("edm2:")]
    assert code == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and "no space left on device" in errors[0].lower(), err
    assert temps(small_tmpfs) == []
