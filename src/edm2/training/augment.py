"""Non-leaky augmentation (EDM paper, Appendix B.6 / config F): `AugmentPipe` with the official options.

Each image gets random geometric (and optionally colour) transforms; the network sees the transform's
parameters as an augment-label vector, so it learns to produce augmented images only when asked, and at
sampling time the labels are zero (no augmentation). Options are probability multipliers (0: off, 1: on with
probability `p`) and strengths, as in the official pipe (which builds on the ADA pipeline of Karras et al. 2020).

A call draws the per-image parameters (`sample`) and applies them (`apply`); a training loop can draw the
parameters of a whole global batch from one generator and apply slices of them per micro-batch, so that the
augmentation of an image never depends on how the batch is split. Draws follow the official order, so with
the global generator the pipe draws what the official one does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edm2.training.augment_geometry import (
    apply_color,
    apply_geometric,
    rotate2d_inv,
    rotate_int,
    scale2d_inv,
    translate2d_inv,
    translate_int,
)

__all__ = ["AugmentPipe", "AugmentParams", "EDM_AUGMENT_KWARGS"]

# What the official train.py enables with --augment p (the EDM setups): 9 augment labels.
EDM_AUGMENT_KWARGS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

# (option, number of augment labels), in the official order of draws and labels.
_TRANSFORMS = (("xflip", 1), ("yflip", 1), ("rotate_int", 2), ("translate_int", 2), ("scale", 1),
               ("rotate_frac", 2), ("aniso", 2), ("translate_frac", 2), ("brightness", 1), ("contrast", 1),
               ("lumaflip", 1), ("hue", 2), ("saturation", 1))
_GEOMETRIC = ("scale", "rotate_frac", "aniso", "translate_frac")
_COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")


@dataclass
class AugmentParams:
    """Per-image random parameters of the enabled transforms: name -> tensor with the batch as first axis."""

    values: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0

    def __getitem__(self, index: slice) -> AugmentParams:
        """The parameters of a slice of the batch (a micro-batch)."""
        return AugmentParams({k: v[index] for k, v in self.values.items()})


class AugmentPipe:
    """The official augmentation pipe. Calling it on images [N, C, H, W] returns (augmented images,
    augment labels [N, label_dim]); disabled transforms contribute no labels, so the EDM configuration
    (`EDM_AUGMENT_KWARGS`) gives 9."""

    def __init__(self, p: float = 1, xflip: float = 0, yflip: float = 0, rotate_int: float = 0,
                 translate_int: float = 0, translate_int_max: float = 0.125, scale: float = 0,
                 rotate_frac: float = 0, aniso: float = 0, translate_frac: float = 0, scale_std: float = 0.2,
                 rotate_frac_max: float = 1, aniso_std: float = 0.2, aniso_rotate_prob: float = 0.5,
                 translate_frac_std: float = 0.125, brightness: float = 0, contrast: float = 0,
                 lumaflip: float = 0, hue: float = 0, saturation: float = 0, brightness_std: float = 0.2,
                 contrast_std: float = 0.5, hue_max: float = 1, saturation_std: float = 1) -> None:
        options = dict(locals())
        options.pop("self")
        bad = sorted(k for k, v in options.items() if not np.isfinite(v) or v < 0)
        if bad:
            raise ValueError(f"AugmentPipe options must be finite and non-negative: {bad}")
        for name, value in options.items():
            setattr(self, name, float(value))
        self.init_kwargs = {k: float(v) for k, v in options.items()}

    @property
    def enabled(self) -> tuple[str, ...]:
        """The transforms with a non-zero probability multiplier, in the official order."""
        return tuple(name for name, _ in _TRANSFORMS if getattr(self, name) > 0)

    @property
    def label_dim(self) -> int:
        """Width of the augment-label vector (the network's augment_dim)."""
        return sum(n for name, n in _TRANSFORMS if getattr(self, name) > 0)

    def __call__(self, images: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(images, self.sample(images.shape[0], images.device, generator))

    def sample(self, n: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> AugmentParams:
        """Random parameters of `n` images, drawn in the official order from `generator` (or the global one).
        A transform not chosen for an image (probability 1 - multiplier * p) gets its identity parameters."""
        g = dict(device=device, generator=generator)
        values: dict[str, torch.Tensor] = {}

        def chosen(prob: float, shape: list[int]) -> torch.Tensor:
            return torch.rand(shape, **g) < prob * self.p

        for name in ("xflip", "yflip"):
            if getattr(self, name) > 0:
                w = torch.randint(2, [n, 1, 1, 1], **g)
                values[name] = torch.where(chosen(getattr(self, name), [n, 1, 1, 1]), w, 0).flatten()
        if self.rotate_int > 0:
            w = torch.randint(4, [n, 1, 1, 1], **g)
            values["rotate_int"] = torch.where(chosen(self.rotate_int, [n, 1, 1, 1]), w, 0).flatten()
        if self.translate_int > 0:
            w = torch.rand([2, n, 1, 1, 1], **g) * 2 - 1
            values["translate_int"] = torch.where(chosen(self.translate_int, [1, n, 1, 1, 1]), w, 0).reshape(2, n).T
        if self.scale > 0:
            w = torch.randn([n], **g)
            values["scale"] = torch.where(chosen(self.scale, [n]), w, 0)
        if self.rotate_frac > 0:
            w = (torch.rand([n], **g) * 2 - 1) * (np.pi * self.rotate_frac_max)
            values["rotate_frac"] = torch.where(chosen(self.rotate_frac, [n]), w, 0)
        if self.aniso > 0:
            w, r = torch.randn([n], **g), (torch.rand([n], **g) * 2 - 1) * np.pi
            w = torch.where(chosen(self.aniso, [n]), w, 0)
            r = torch.where(torch.rand([n], **g) < self.aniso_rotate_prob, r, 0)
            values["aniso"] = torch.stack([w, r], dim=1)
        if self.translate_frac > 0:
            w = torch.randn([2, n], **g)
            values["translate_frac"] = torch.where(chosen(self.translate_frac, [1, n]), w, 0).T
        values.update(self._sample_color(n, g, chosen))
        return AugmentParams(values)

    def _sample_color(self, n: int, g: dict, chosen) -> dict[str, torch.Tensor]:
        values = {}
        for name in ("brightness", "contrast"):
            if getattr(self, name) > 0:
                w = torch.randn([n], **g)
                values[name] = torch.where(chosen(getattr(self, name), [n]), w, 0)
        if self.lumaflip > 0:
            w = torch.randint(2, [n, 1, 1], **g)
            values["lumaflip"] = torch.where(chosen(self.lumaflip, [n, 1, 1]), w, 0).flatten()
        if self.hue > 0:
            w = (torch.rand([n], **g) * 2 - 1) * (np.pi * self.hue_max)
            values["hue"] = torch.where(chosen(self.hue, [n]), w, 0)
        if self.saturation > 0:
            w = torch.randn([n, 1, 1], **g)
            values["saturation"] = torch.where(chosen(self.saturation, [n, 1, 1]), w, 0).flatten()
        return values

    def apply(self, images: torch.Tensor, params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment `images` [N, C, H, W] with per-image `params` (from `sample`); returns (images, labels)."""
        if images.ndim != 4 or len(params) not in (0, images.shape[0]) or set(params.values) != set(self.enabled):
            raise ValueError(f"augmentation parameters for {len(params)} images of transforms "
                             f"{sorted(params.values)} do not fit {list(images.shape)} images and this pipe's "
                             f"transforms {list(self.enabled)}")
        n, _, h, w = images.shape
        v = params.values
        labels: list[torch.Tensor] = []
        for name in ("xflip", "yflip"):
            if name in v:
                images = torch.where(v[name].reshape(n, 1, 1, 1) == 1, images.flip(3 if name == "xflip" else 2),
                                     images)
                labels.append(v[name])
        if "rotate_int" in v:
            images = rotate_int(images, v["rotate_int"])
            labels += [(v["rotate_int"] == 1) | (v["rotate_int"] == 2), (v["rotate_int"] == 2) | (v["rotate_int"] == 3)]
        if "translate_int" in v:
            tx = (v["translate_int"][:, 0] * (w * self.translate_int_max)).round().to(torch.int64)
            ty = (v["translate_int"][:, 1] * (h * self.translate_int_max)).round().to(torch.int64)
            images = translate_int(images, tx, ty)
            labels += [tx / (w * self.translate_int_max), ty / (h * self.translate_int_max)]
        images, geo_labels = self._geometric(images, v)
        images, color_labels = self._color(images, v)
        labels = [x.to(torch.float32).reshape(n, -1) for x in labels + geo_labels + color_labels]
        return images, torch.cat(labels, dim=1) if labels else images.new_zeros([n, 0], dtype=torch.float32)

    def _geometric(self, images: torch.Tensor, v: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Compose the inverse transforms of the geometric augmentations (official order) and resample."""
        n, _, h, w = images.shape
        G_inv = torch.eye(3, device=images.device).expand(n, 3, 3)
        labels: list[torch.Tensor] = []
        if "scale" in v:
            s = v["scale"].mul(self.scale_std).exp2()
            G_inv = G_inv @ scale2d_inv(s, s)
            labels.append(v["scale"])
        if "rotate_frac" in v:
            G_inv = G_inv @ rotate2d_inv(-v["rotate_frac"])
            labels += [v["rotate_frac"].cos() - 1, v["rotate_frac"].sin()]
        if "aniso" in v:
            a, r = v["aniso"][:, 0], v["aniso"][:, 1]
            s = a.mul(self.aniso_std).exp2()
            G_inv = G_inv @ rotate2d_inv(r) @ scale2d_inv(s, 1 / s) @ rotate2d_inv(-r)
            labels += [a * r.cos(), a * r.sin()]
        if "translate_frac" in v:
            t = v["translate_frac"]
            G_inv = G_inv @ translate2d_inv(t[:, 0].mul(w * self.translate_frac_std),
                                            t[:, 1].mul(h * self.translate_frac_std))
            labels += [t[:, 0], t[:, 1]]
        if labels and bool((torch.stack(labels) != 0).any()):  # all-identity batches stay exactly as they are
            images = apply_geometric(images, G_inv)
        return images, labels

    def _color(self, images: torch.Tensor, v: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Compose the colour transforms as 4x4 matrices on (R, G, B, 1) and apply them."""
        if not any(name in v for name in _COLOR):
            return images, []
        return apply_color(images, v, self.brightness_std, self.contrast_std, self.saturation_std)
