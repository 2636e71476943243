"""The image operations behind `edm2.training.augment.AugmentPipe`: batched 2-D/3-D transform matrices, integer
rotation and translation by pixel indexing, anti-aliased affine resampling (pad, 2x upsample with a wavelet
low-pass filter, bilinear sampling, filtered 2x downsample), and colour matrices."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SYM6", "matrix", "translate2d", "translate2d_inv", "scale2d", "scale2d_inv", "rotate2d",
           "rotate2d_inv", "rotate_int", "translate_int", "apply_geometric", "apply_color"]

# Low-pass decomposition filter of the Symlet-6 wavelet (PyWavelets `Wavelet('sym6').dec_lo`): an orthogonal
# half-band filter, so upsampling then downsampling with it leaves an image unchanged.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)


def matrix(*rows, device: torch.device | str | None = None) -> torch.Tensor:
    """A matrix from rows of numbers and/or [N] tensors: [N, rows, cols] when any entry is a tensor."""
    ref = [e for row in rows for e in row if isinstance(e, torch.Tensor)]
    if not ref:
        return torch.tensor(np.asarray(rows, dtype=np.float32), device=device)
    like = ref[0]
    elems = [e if isinstance(e, torch.Tensor) else torch.full_like(like, e) for row in rows for e in row]
    return torch.stack(elems, dim=-1).reshape(like.shape + (len(rows), -1))


def translate2d(tx, ty, **kw) -> torch.Tensor:
    return matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], **kw)


def translate2d_inv(tx, ty, **kw) -> torch.Tensor:
    return translate2d(-tx, -ty, **kw)


def scale2d(sx, sy, **kw) -> torch.Tensor:
    return matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], **kw)


def scale2d_inv(sx, sy, **kw) -> torch.Tensor:
    return scale2d(1 / sx, 1 / sy, **kw)


def rotate2d(theta: torch.Tensor, **kw) -> torch.Tensor:
    return matrix([theta.cos(), (-theta).sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1], **kw)


def rotate2d_inv(theta: torch.Tensor, **kw) -> torch.Tensor:
    return rotate2d(-theta, **kw)


def _rotate3d(v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotation by theta [N] about the unit axis v (Rodrigues), as a 4x4 homogeneous matrix."""
    vx, vy, vz = (float(c) for c in v[:3])
    s, c = theta.sin(), theta.cos()
    cc = 1 - c
    return matrix([vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
                  [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
                  [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
                  [0, 0, 0, 1])


def rotate_int(images: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rotate each image by w [N] (0..3) quarter turns, by flips and a transpose."""
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"integer rotation needs square images, got {images.shape[2]}x{images.shape[3]}")
    w = w.reshape(-1, 1, 1, 1)
    images = torch.where((w == 1) | (w == 2), images.flip(3), images)
    images = torch.where((w == 2) | (w == 3), images.flip(2), images)
    return torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)


def translate_int(images: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels (tx [N] right in x, ty [N] in y, as the official pipe), reflecting
    at the borders."""
    n, c, h, w = images.shape
    tx, ty = tx.reshape(-1, 1, 1, 1), ty.reshape(-1, 1, 1, 1)
    b, ch, y, x = torch.meshgrid(*(torch.arange(s, device=images.device) for s in images.shape), indexing="ij")
    x = w - 1 - (w - 1 - (x - tx) % (w * 2 - 2)).abs()  # mirror indexing with period 2w - 2
    y = h - 1 - (h - 1 - (y + ty) % (h * 2 - 2)).abs()
    return images.flatten()[(((b * c) + ch) * h + y) * w + x]


def apply_geometric(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
    """Resample images [N, C, H, W] at G_inv [N, 3, 3] (output pixel -> input pixel, origin at the centre):
    reflect-pad, upsample 2x with the SYM6 filter, sample bilinearly, filter and downsample 2x, crop.

    The official pipe pads by what the batch's most extreme transform needs; here always by the most it can
    (H - 1 and W - 1), so that an image's result never depends on the other images of its batch (a batch
    split over processes or accumulation rounds augments the same). The padding only covers more of what is
    never sampled, so results equal the official ones up to float rounding."""
    n, c, h, w = images.shape
    dev = images.device
    Hz = np.asarray(SYM6, dtype=np.float32)
    pad = len(Hz) // 4
    images = torch.nn.functional.pad(input=images, pad=[w - 1, w - 1, h - 1, h - 1], mode="reflect")

    # Upsample: zero-stuff, then the (reversed) low-pass filter along x and along y.
    up = torch.tensor(Hz[::-1].copy(), dtype=images.dtype, device=dev)
    p = (len(Hz) + 1) // 2
    images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(n, c, images.shape[2], -1)[:, :, :, :-1]
    images = _filter_rows(images, up, p)
    images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(n, c, -1, images.shape[3])[:, :, :-1, :]
    images = _filter_rows(images.transpose(2, 3), up, p).transpose(2, 3)
    G_inv = scale2d(2, 2, device=dev) @ G_inv @ scale2d_inv(2, 2, device=dev)
    G_inv = translate2d(-0.5, -0.5, device=dev) @ G_inv @ translate2d_inv(-0.5, -0.5, device=dev)

    # Sample the transformed image at twice the output resolution (plus the filter margin).
    shape = [n, c, (h + pad * 2) * 2, (w + pad * 2) * 2]
    G_inv = scale2d(2 / images.shape[3], 2 / images.shape[2], device=dev) @ G_inv \
        @ scale2d_inv(2 / shape[3], 2 / shape[2], device=dev)
    grid = torch.nn.functional.affine_grid(theta=G_inv[:, :2, :].to(images.dtype), size=shape, align_corners=False)
    images = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                             align_corners=False)

    # Downsample: low-pass filter and stride 2 along x and y, then crop the margin.
    down = torch.tensor(Hz, dtype=images.dtype, device=dev)
    p = (len(Hz) - 1) // 2
    images = _filter_rows(images, down, p, stride=2)[:, :, :, pad:-pad]
    return _filter_rows(images.transpose(2, 3), down, p, stride=2).transpose(2, 3)[:, :, pad:-pad, :]


def _filter_rows(images: torch.Tensor, f: torch.Tensor, padding: int, stride: int = 1) -> torch.Tensor:
    """Correlate every row (last axis) of `images` with the 1-D filter f (zero padding, optional stride)."""
    n, c, h, w = images.shape
    rows = torch.nn.functional.conv1d(images.reshape(n * c * h, 1, w), f.reshape(1, 1, -1), stride=stride,
                                      padding=padding)
    return rows.reshape(n, c, h, -1)


def apply_color(images: torch.Tensor, v: dict[str, torch.Tensor], brightness_std: float, contrast_std: float,
                saturation_std: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Brightness, contrast, luma flip, hue rotation and saturation (those present in `v`) as one 4x4 matrix
    per image on (R, G, B, 1); grayscale images use the mean of its colour rows. Returns (images, labels)."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"colour augmentation needs RGB (3 channels) or grayscale (1) images, got {c} channels; "
                         "turn brightness/contrast/lumaflip/hue/saturation off")
    dev = images.device
    I_4 = torch.eye(4, device=dev)
    luma = torch.tensor(np.asarray([1, 1, 1, 0]) / np.sqrt(3), dtype=torch.float32, device=dev)
    luma_outer = luma.ger(luma)
    M = I_4.expand(n, 4, 4)
    labels: list[torch.Tensor] = []
    if "brightness" in v:
        b = v["brightness"] * brightness_std
        M = matrix([1, 0, 0, b], [0, 1, 0, b], [0, 0, 1, b], [0, 0, 0, 1]) @ M
        labels.append(v["brightness"])
    if "contrast" in v:
        k = v["contrast"].mul(contrast_std).exp2()
        M = matrix([k, 0, 0, 0], [0, k, 0, 0], [0, 0, k, 0], [0, 0, 0, 1]) @ M
        labels.append(v["contrast"])
    if "lumaflip" in v:
        M = (I_4 - 2 * luma_outer * v["lumaflip"].reshape(n, 1, 1)) @ M  # reflect colours through the grey axis
        labels.append(v["lumaflip"])
    if "hue" in v:
        M = _rotate3d(luma, v["hue"]) @ M
        labels += [v["hue"].cos() - 1, v["hue"].sin()]
    if "saturation" in v:
        k = v["saturation"].mul(saturation_std).exp2().reshape(n, 1, 1)
        M = (luma_outer + (I_4 - luma_outer) * k) @ M
        labels.append(v["saturation"])
    images = images.reshape(n, c, h * w)
    if c == 3:
        images = M[:, :3, :3] @ images + M[:, :3, 3:]
    else:
        M = M[:, :3, :].mean(dim=1, keepdim=True)
        images = images * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
    return images.reshape(n, c, h, w), labels
