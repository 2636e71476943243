"""Encoders: the map between pixels and the space the network is trained in, with the official class names.

Pixels are uint8 [N, C, H, W]. A dataset stores *raw latents* (what `encode_pixels` returns); the network sees
*final latents* (`encode_latents`); `decode` goes from final latents back to pixels.

- `StandardRGBEncoder`: raw latents are the pixels; final = pixels / 127.5 - 1.
- `StabilityVAEEncoder`: raw latents are the mean and standard deviation of the Stable Diffusion VAE's posterior
  for pixels scaled to [0, 1] (2C channels); a final latent is a sample of that posterior standardised per
  channel, (sample - raw_mean) / raw_std * final_std + final_mean; decoding inverts the standardisation, runs the
  VAE decoder and clamps its output to [0, 1] before scaling to uint8.

An encoder is recorded in snapshot metadata as {"class": name, "kwargs": {...}} (`to_dict`) and rebuilt with
`encoder_from_dict`. The VAE (`diffusers.AutoencoderKL`, the optional `vae` extra) is loaded on first use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["Encoder", "StandardRGBEncoder", "StabilityVAEEncoder", "load_stability_vae", "encoder_from_dict",
           "default_encoder", "SD_VAE", "SD_RAW_MEAN", "SD_RAW_STD", "VAE_PRECISIONS"]

SD_VAE = "stabilityai/sd-vae-ft-mse"
SD_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)  # per-channel statistics of sd-vae-ft-mse latents of ImageNet (EDM2)
SD_RAW_STD = (4.17, 4.62, 3.71, 3.28)
VAE_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Encoder:
    """Pixels <-> the network's space (the official `training.encoders.Encoder` interface)."""

    stochastic = False  # whether `encode_latents` draws noise

    def init(self, device: torch.device | str) -> None:
        """Load what the encoder needs onto `device` now (instead of at first use)."""

    def to_dict(self) -> dict:
        """{"class": official class name, "kwargs": constructor arguments}, as stored in snapshots."""
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Encoder) and self.to_dict() == other.to_dict()

    __hash__ = None  # equal encoders are interchangeable, not hashable keys

    def network_channels(self, raw_channels: int) -> int:
        """Channels of the final latents for raw latents of `raw_channels` channels."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> final latents."""
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> raw latents (what a dataset stores)."""
        raise NotImplementedError

    def encode_latents(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Raw latents -> final latents (the network's input). `noise`: the standard normal sample a stochastic
        encoder uses, shaped like the result (None: drawn with torch.randn_like)."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents -> uint8 pixels."""
        raise NotImplementedError

    def pixel_resolution(self, resolution: int) -> int:
        """Resolution of the decoded images for latents of `resolution` (after `init` for a VAE)."""
        return resolution


class StandardRGBEncoder(Encoder):
    """uint8 pixels <-> [-1, 1]."""

    def to_dict(self) -> dict:
        return {"class": "StandardRGBEncoder", "kwargs": {}}

    def network_channels(self, raw_channels: int) -> int:
        return raw_channels

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_latents(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


class StabilityVAEEncoder(Encoder):
    """The Stable Diffusion VAE with per-channel standardisation of its latents (official constructor arguments;
    `precision` selects the VAE's dtype: fp32, bf16 or fp16)."""

    stochastic = True

    def __init__(self, vae_name: str = SD_VAE, raw_mean=SD_RAW_MEAN, raw_std=SD_RAW_STD, final_mean: float = 0,
                 final_std: float = 0.5, batch_size: int = 8, precision: str = "fp32") -> None:
        raw_mean, raw_std = [float(v) for v in np.atleast_1d(raw_mean)], [float(v) for v in np.atleast_1d(raw_std)]
        if len(raw_mean) != len(raw_std) or not all(s > 0 for s in raw_std) or not final_std > 0:
            raise ValueError(f"latent statistics need one mean and one positive std per channel, got raw_mean "
                             f"{raw_mean}, raw_std {raw_std}, final_std {final_std}")
        if precision not in VAE_PRECISIONS:
            raise ValueError(f"unknown VAE precision {precision!r}; choose one of {', '.join(VAE_PRECISIONS)}")
        if batch_size < 1:
            raise ValueError(f"VAE batch size must be positive, got {batch_size}")
        self.vae_name = str(vae_name)
        self.raw_mean, self.raw_std = raw_mean, raw_std
        self.final_mean, self.final_std = float(final_mean), float(final_std)
        # In float32, as the official encoder computes them: final = raw * scale + bias.
        self.scale = np.float32(final_std) / np.array(raw_std, dtype=np.float32)
        self.bias = np.float32(final_mean) - np.array(raw_mean, dtype=np.float32) * self.scale
        self.batch_size = int(batch_size)
        self.precision = precision
        self._vae = None

    def to_dict(self) -> dict:
        return {"class": "StabilityVAEEncoder", "kwargs": {
            "vae_name": self.vae_name, "raw_mean": self.raw_mean, "raw_std": self.raw_std,
            "final_mean": self.final_mean, "final_std": self.final_std}}

    def network_channels(self, raw_channels: int) -> int:
        if raw_channels != 2 * len(self.raw_mean):
            raise ValueError(f"raw latents have {raw_channels} channels, but the latent statistics are for "
                             f"{len(self.raw_mean)} channels (mean and std: {2 * len(self.raw_mean)} channels); "
                             "measure them with `edm2 dataset stats` and pass --latent-stats")
        return len(self.raw_mean)

    def pixel_resolution(self, resolution: int) -> int:
        if self._vae is None:
            raise ValueError("the VAE's resolution is known once it is loaded: call init(device) first")
        return resolution * 2 ** (len(self._vae.config.block_out_channels) - 1)

    def init(self, device: torch.device | str) -> None:
        if self._vae is None:
            self._vae = load_stability_vae(self.vae_name, device, self.precision)
        else:
            self._vae.to(device)

    def _const(self, values: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)

    def _vae_input(self, x: torch.Tensor) -> torch.Tensor:
        self.init(x.device)
        return x.to(VAE_PRECISIONS[self.precision])

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        x = self._vae_input(x.to(torch.float32) / 255)
        parts = []
        with torch.no_grad():
            for batch in x.split(self.batch_size):
                dist = self._vae.encode(batch)["latent_dist"]
                parts.append(torch.cat([dist.mean, dist.std], dim=1).to(torch.float32))
        return torch.cat(parts)

    def encode_latents(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        noise = torch.randn_like(mean) if noise is None else noise.to(mean.device, torch.float32)
        x = mean + noise * std
        x = x * self._const(self.scale, x)
        return x + self._const(self.bias, x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        x = (x - self._const(self.bias, x)) / self._const(self.scale, x)
        x = self._vae_input(x)
        with torch.no_grad():
            x = torch.cat([self._vae.decode(batch)["sample"].to(torch.float32) for batch in x.split(self.batch_size)])
        return x.clamp(0, 1).mul(255).to(torch.uint8)  # truncating to uint8, as the official decoder


def default_encoder(latents: bool) -> dict:
    """The encoder of a dataset that records none: the official choice (the SD VAE with the published statistics
    for latents, standard RGB for pixels)."""
    return (StabilityVAEEncoder() if latents else StandardRGBEncoder()).to_dict()


_ENCODERS = {"StandardRGBEncoder": StandardRGBEncoder, "StabilityVAEEncoder": StabilityVAEEncoder}
_ENCODER_KWARGS = {"StandardRGBEncoder": set(), "StabilityVAEEncoder": {"vae_name", "raw_mean", "raw_std",
                                                                         "final_mean", "final_std"}}


def encoder_from_dict(spec: dict | None, **runtime) -> Encoder:
    """The encoder a snapshot or dataset records ({"class": ..., "kwargs": {...}}; None: standard RGB).
    `runtime` (StabilityVAEEncoder only): `batch_size`, `precision`, or `vae_name` to override the recorded one."""
    if spec is None:
        spec = {"class": "StandardRGBEncoder", "kwargs": {}}
    if not isinstance(spec, dict) or spec.get("class") not in _ENCODERS or not isinstance(spec.get("kwargs", {}), dict):
        raise ValueError(f"unknown encoder {spec!r}; known: {', '.join(_ENCODERS)}")
    name, kwargs = spec["class"], dict(spec.get("kwargs", {}))
    unknown = sorted(set(kwargs) - _ENCODER_KWARGS[name])
    if unknown:
        raise ValueError(f"unknown {name} argument(s) {unknown}")
    if name == "StandardRGBEncoder":
        return StandardRGBEncoder()
    kwargs.update({k: v for k, v in runtime.items() if v is not None})
    return StabilityVAEEncoder(**kwargs)


def _vae_source(vae_name: str) -> tuple[str, bool]:
    """(where to load from, whether it is a local folder). A name that is not an existing folder is a hub name,
    unless it is written as a path."""
    path = Path(vae_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"VAE folder {path} has no config.json; it must hold a diffusers AutoencoderKL "
                             f"(e.g. `huggingface-cli download {SD_VAE} --local-dir {path}`)")
        return str(path), True
    if path.is_absolute() or vae_name.startswith((".", "~")) or path.exists():
        raise ValueError(f"VAE folder {vae_name} does not exist; download it with `huggingface-cli download "
                         f"{SD_VAE} --local-dir {vae_name}` or pass a Hugging Face hub name such as {SD_VAE}")
    return vae_name, False


def load_stability_vae(vae_name: str = SD_VAE, device: torch.device | str = "cpu",
                       precision: str = "fp32") -> torch.nn.Module:
    """`diffusers.AutoencoderKL` from a local folder or a hub name (the cache first), in eval mode on `device`.
    One-line ValueError naming what to install or download."""
    source, local = _vae_source(vae_name)
    try:
        import diffusers
    except ImportError:
        raise ValueError("the Stable Diffusion VAE needs the diffusers package: pip install 'edm2[vae]' "
                         "(or pip install diffusers)") from None
    diffusers.utils.logging.set_verbosity_error()  # no advice about optional accelerators on every load
    try:
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(source, local_files_only=True)
        except Exception:
            if local:
                raise
            vae = diffusers.AutoencoderKL.from_pretrained(source)  # not cached yet: download
    except Exception as e:
        detail = " ".join(str(e).split())[:300]
        fix = ("re-download it" if local else f"check the name, or download it while online "
               f"(`huggingface-cli download {source}`) or pass a local folder")
        raise ValueError(f"cannot load the VAE {vae_name!r} ({e.__class__.__name__}: {detail}); {fix}") from None
    return vae.eval().requires_grad_(False).to(device=device, dtype=VAE_PRECISIONS[precision])
