"""docs/migrating.md: every `edm2` command line beside an official one parses (its command exists, every option
is known and every value has its type), so the migration guide cannot drift from the command line."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import click
import pytest

from edm2.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "migrating.md"


def ours() -> list[str]:
    """The edm2 column of the tables: the first code span of each row's second cell."""
    lines = []
    for row in DOC.read_text().splitlines():
        cells = row.split(" | ")
        if row.startswith("| `") and len(cells) >= 2:
            span = re.search(r"`([^`]+)`", cells[1])
            if span:
                lines.append(span.group(1))
    return lines


def parse(line: str) -> dict:
    """The parameters click gives the command of `line` (torchrun's launcher prefix dropped)."""
    args = shlex.split(line)
    args = args[args.index("edm2.cli") + 1:] if "edm2.cli" in args else args[1:]
    ctx = main.make_context("edm2", args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # click's protected_args, read as click 8 documents
        rest = [*ctx.protected_args, *ctx.args]
        name, cmd, rest = main.resolve_command(ctx, rest)
        while isinstance(cmd, click.Group):
            ctx = cmd.make_context(name, rest, parent=ctx)
            name, cmd, rest = cmd.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
    return cmd.make_context(name, rest, parent=ctx).params


def test_the_guide_lists_every_official_script():
    text = DOC.read_text()
    for script in ("generate_images.py", "calculate_metrics.py", "reconstruct_phema.py", "dataset_tool.py",
                   "train_edm2.py", "generate.py", "fid.py", "train.py"):
        assert f"{script}" in text
    assert len(ours()) >= 20


@pytest.mark.parametrize("line", ours())
def test_every_edm2_line_of_the_guide_parses(line):
    assert line.startswith(("edm2 ", "torchrun "))
    params = parse(line)
    assert params  # a command with its parameters


def test_a_line_with_an_unknown_option_is_caught():
    with pytest.raises(click.UsageError, match="--imagez"):
        parse("edm2 metrics calc --imagez=out --ref=r.pkl")
