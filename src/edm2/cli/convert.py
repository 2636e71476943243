"""`edm2 convert`: an official network pickle -> an edm2 snapshot, without running the pickle's code."""

from __future__ import annotations

import click

from edm2.cli.app import friendly_errors, main, one_line_warnings


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--allow-nonfinite", is_flag=True,
              help="Convert a network whose weights hold NaN or Inf values (refused otherwise), with a warning.")
@friendly_errors
def convert(src, dest, allow_nonfinite) -> None:
    """Convert the official network pickle SRC (EDM2 or EDM network-snapshot-*.pkl, or a post-hoc reconstruction)
    into the edm2 snapshot DEST (.safetensors). The pickle's embedded code is never run; only its data is read."""
    from edm2.files.pickle_convert import convert_pickle

    with one_line_warnings():
        snap = convert_pickle(src, dest, allow_nonfinite)
    net = snap.network
    when = f", {snap.nimg} images, sigma_rel {snap.sigma_rel:.3f}" if snap.sigma_rel is not None else ""
    name = getattr(net, "class_name", "Precond")
    click.echo(f"wrote {dest}: {name} {net.img_resolution}x{net.img_resolution}x{net.img_channels}, "
               f"{net.label_dim} classes, encoder {snap.encoder['class']}{when}")
