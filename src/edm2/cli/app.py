"""The `edm2` command group and its error handling: every error is one line on stderr with exit code 2."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
import time
import warnings

import click

from edm2 import __version__

__all__ = ["main", "friendly_errors", "one_voice", "one_line_warnings", "error_line"]

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def error_line(e: BaseException) -> str:
    """The one line an error is reported as: an OSError as '<what>: <file>' (a full disk with what to do), any
    other error's text with its line breaks folded."""
    if isinstance(e, OSError) and e.strerror:
        what = e.strerror[:1].lower() + e.strerror[1:]
        where = f": {e.filename}" if e.filename is not None else ""
        hint = "; free some space or write elsewhere" if e.errno in _DISK_FULL else ""
        return f"{what}{where}{hint}"
    text = str(e) or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) if "\n" in text else text


def friendly_errors(fn):
    """Report ValueError/OSError as one line on stderr with exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            click.echo(f"edm2: error: {error_line(e)}", err=True)
            sys.exit(2)

    return wrapper


@contextlib.contextmanager
def one_line_warnings():
    """Show the library's warnings raised in the block (an official pickle converted on the fly, weights with
    NaN values loaded as asked) as one line each, 'edm2: warning: ...', on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                click.echo(f"edm2: warning: {' '.join(str(w.message).split())}", err=True)


@contextlib.contextmanager
def one_voice():
    """Under torchrun, a configuration error (ValueError) is usually the same in every process. The other
    ranks report it a few seconds after rank 0, by which time torchrun has normally stopped them, so the
    user reads it once; an error of one rank alone is still reported."""
    try:
        yield
    except ValueError:
        if int(os.environ.get("RANK", "0")) != 0:
            time.sleep(3)
        raise


class _UsageError(click.ClickException):
    """A command-line usage error reported like every other error: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"edm2: error: {self.format_message()}", err=True)


class _Group(click.Group):
    """Turns click's multi-line usage errors (unknown option, bad value, missing option) into one line."""

    @staticmethod
    def _one_line(e: click.UsageError) -> _UsageError:
        where = f" (see '{e.ctx.command_path} -h')" if e.ctx is not None else ""
        return _UsageError(" ".join(e.format_message().split()) + where)

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise self._one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise self._one_line(e) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edm2")
def main() -> None:
    """Train, sample and evaluate EDM2 diffusion models."""
