"""`edm2 generate`."""

from __future__ import annotations

import dataclasses

import click
from click.core import ParameterSource

from edm2.cli.app import friendly_errors, main, one_line_warnings, one_voice
from edm2.cli.params import parse_seeds, sampler_options
from edm2.sampling import SamplerSettings


def published_models(preset: str | None, net_path: str | None, gnet_path: str | None,
                     settings: SamplerSettings) -> tuple[str, str | None, SamplerSettings, object]:
    """The network, guide and sampler settings of a command: those of `--preset` (a published model by name, as
    the official generate_images.py: its networks by URL, guidance weight and interval; a --guidance or
    --guidance-interval given on the command line wins), or the user's --net/--gnet."""
    from edm2.published import generation_preset

    if preset is None:
        if net_path is None:
            raise ValueError("give --net NETWORK or --preset NAME ('edm2 info --generation' lists the presets)")
        return net_path, gnet_path, settings, None
    p = generation_preset(preset)
    if net_path is not None or gnet_path is not None:
        raise ValueError(f"--preset {preset} names its networks itself; give --preset or --net/--gnet, not both")
    ctx = click.get_current_context()
    chosen = {field: getattr(p, field) for field in ("guidance", "guidance_interval")
              if ctx.get_parameter_source(field) in (ParameterSource.DEFAULT, None)}
    return p.net_url, p.gnet_url, dataclasses.replace(settings, **chosen), p


@main.command()
@click.option("--net", "--network", "net_path", type=click.Path(),
              help="Snapshot file (.safetensors), official pickle (.pkl), or a URL of either.")
@click.option("--preset", help="A published model by name, e.g. edm2-img512-s-autog-fid ('edm2 info --generation' "
                               "lists them): its networks (downloaded once), guidance and EMA, as the official "
                               "generate_images.py --preset.")
@click.option("--outdir", type=click.Path(file_okay=False), help="Folder for one PNG per seed.")
@click.option("--subdirs", is_flag=True, help="One subfolder of --outdir per 1000 seeds (000000, 001000, ...).")
@click.option("--seeds", default="0-63", show_default=True, help="Seeds, e.g. 0-63 or 1,5,10-20.")
@click.option("--class", "class_idx", type=int, help="Class for all images.  [default: random per seed]")
@click.option("--gnet", "gnet_path", type=click.Path(),
              help="Guide snapshot: a small unconditional model, or a smaller, shorter-trained one (autoguidance).")
@click.option("--batch", "batch_size", type=int, default=64, show_default=True, help="Images per batch.")
@click.option("--grid", type=click.Path(dir_okay=False),
              help="Also write the first images (at most 64, edm2.generate.GRID_SIZE) as one grid PNG.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="U-Net precision: fp32, bf16 (also on CPU) or fp16 (CUDA).  "
                   "[default: fp16 on CUDA for networks with use_fp16, else fp32]")
@click.option("--compile", "compile_net", is_flag=True, help="torch.compile the network (slow start, faster steps).")
@click.option("--allow-tf32", is_flag=True, help="TF32 in CUDA convolutions and matrix products.")
@click.option("--vae", help="For latent models: the VAE to decode with (a local folder or hub name).  "
                            "[default: the one the snapshot records]")
@click.option("--allow-nonfinite", is_flag=True,
              help="Sample a network whose weights hold NaN or Inf values (refused otherwise), with a warning.")
@friendly_errors
@sampler_options()
def generate(net_path, preset, outdir, subdirs, seeds, class_idx, gnet_path, batch_size, grid, device, precision,
             compile_net, allow_tf32, vae, allow_nonfinite, settings) -> None:
    """Generate images from a snapshot; an image depends only on its seed. Latent models are decoded with the
    snapshot's encoder (the VAE). Each batch is written and dropped, so memory does not grow with the number of
    seeds. Under torchrun, the seeds are split over the processes. Networks of the EDM (2022) release sample
    with the defaults of its generate.py (18 steps) unless --steps is given."""
    from tqdm import tqdm

    from edm2.data import StandardRGBEncoder, encoder_from_dict
    from edm2.files import load_network
    from edm2.generate import SamplingSession, generate_with
    from edm2.runtime import distributed, resolve_device, resolve_precision

    if outdir is None and grid is None:
        raise ValueError("nothing to write: give --outdir and/or --grid")
    net_path, gnet_path, settings, _ = published_models(preset, net_path, gnet_path, settings)
    seed_list = parse_seeds(seeds)
    with one_voice(), distributed(device) as (rank, _):
        device = resolve_device(device)
        with one_line_warnings():  # an official pickle converted on the fly, NaN weights loaded as asked
            net, snap = load_network(net_path, device, allow_nonfinite)
            gnet, gsnap = load_network(gnet_path, device, allow_nonfinite) if gnet_path else (None, None)
        encoder = encoder_from_dict(snap.encoder, vae_name=vae)
        if vae is not None and isinstance(encoder, StandardRGBEncoder):
            raise ValueError(f"--vae applies to latent models; {net_path} generates pixels")
        session = SamplingSession(net, gnet, settings.for_network(net), encoder, batch_size, device,
                                  resolve_precision(precision, device, net.use_fp16), compile_net, allow_tf32,
                                  (snap.encoder, gsnap.encoder) if gsnap is not None else None)
        session.check(seed_list, class_idx)  # a guide of another space, a bad class, ... before the VAE loads
        bar = None  # created at the first finished batch, so that an early error stays a single line

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if rank == 0:
                bar = bar or tqdm(total=total, unit="img")
                bar.update(done - bar.n)

        try:  # the session loads a latent model's VAE before any image is made or folder written
            generate_with(session, seed_list, outdir, grid, progress, class_idx, return_images=False, subdirs=subdirs)
        finally:
            if bar is not None:
                bar.close()
    where = (f" to {outdir}" if outdir else "") + (f", grid {grid}" if grid else "")
    if rank == 0:
        click.echo(f"wrote {len(seed_list)} images{where}")
