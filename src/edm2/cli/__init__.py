"""The `edm2` command. It only parses arguments and calls the library; errors become one line, exit 2.

One module per group of commands; importing them registers the commands with `main`.
"""

from edm2.cli import convert, dataset, ema, generate, guidance, judge, metrics, plot, toy, train  # noqa: F401  (registers)
from edm2.cli.app import main
from edm2.cli.params import parse_nimg, parse_seeds, parse_std_for, parse_std_list

__all__ = ["main", "parse_nimg", "parse_seeds", "parse_std_list", "parse_std_for"]
