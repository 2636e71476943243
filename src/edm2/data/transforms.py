"""The dataset tool's crops and resizes (the official `dataset_tool.py --transform` modes), on uint8 [H, W, C] arrays.

- `resize`: scale to the output size (Lanczos), ignoring the aspect ratio (the official default with --resolution).
- `center-crop`: the largest centred square, then Lanczos to the output size.
- `center-crop-wide`: for wide outputs W x H (H <= W): rows cropped to the aspect ratio, Lanczos to W x H, centred on
  a black W x W canvas; images narrower than W (or too short) are skipped.
- `center-crop-dhariwal`: ADM's ImageNet preprocessing: halve with a box filter while the short side is at least
  twice the output, bicubic to a short side of exactly the output, then the centred square.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

__all__ = ["TRANSFORMS", "make_transform", "parse_resolution", "skips"]

TRANSFORMS = ("center-crop", "center-crop-wide", "center-crop-dhariwal", "resize")


def parse_resolution(text: str | None) -> tuple[int, int] | None:
    """'64' or '64x64' or '512x384' (width x height) -> (width, height); None stays None."""
    if text is None:
        return None
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise ValueError(f"--resolution takes N or WxH with positive integers (e.g. 64 or 512x384), got {text!r}")
    return (size[0], size[0]) if len(size) == 1 else size


def _pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)


def _array(pil) -> np.ndarray:
    arr = np.asarray(pil)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _resize(img: np.ndarray, width: int, height: int, resample) -> np.ndarray:
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return _array(_pil(img).resize((width, height), resample))


def _keep(img: np.ndarray) -> np.ndarray:
    return img


def _resize_to(width: int, img: np.ndarray) -> np.ndarray:
    from PIL import Image

    return _resize(img, width, width, Image.Resampling.LANCZOS)


def _center_crop(width: int, img: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    crop = img[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2]
    return _resize(crop, width, width, Image.Resampling.LANCZOS)


def _wide_skips(width: int, height: int, h: int, w: int) -> bool:
    """Whether center-crop-wide to W x H skips an image of w x h: narrower than W, or too short for H rows at the
    output width."""
    rows = int(np.round(width * h / w))  # rows that keep the aspect ratio at the output width
    return w < width or rows < height


def skips(transform: str | None, resolution: tuple[int, int] | None, width: int, height: int) -> bool:
    """Whether `make_transform(transform, resolution)` skips an image of `width` x `height` (known from its header,
    so that a conversion that would skip every image is refused before anything is written)."""
    if transform != "center-crop-wide" or resolution is None:
        return False
    return _wide_skips(resolution[0], resolution[1], height, width)


def _center_crop_wide(width: int, height: int, img: np.ndarray) -> np.ndarray | None:
    from PIL import Image

    h, w = img.shape[:2]
    rows = int(np.round(width * h / w))  # rows that keep the aspect ratio at the output width
    if _wide_skips(width, height, h, w):
        return None
    band = _resize(img[(h - rows) // 2:(h + rows) // 2], width, height, Image.Resampling.LANCZOS)
    canvas = np.zeros([width, width, img.shape[2]], dtype=np.uint8)
    canvas[(width - height) // 2:(width + height) // 2] = band
    return canvas


def _center_crop_dhariwal(size: int, img: np.ndarray) -> np.ndarray:
    from PIL import Image

    pil = _pil(img)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.Resampling.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.Resampling.BICUBIC)
    arr = _array(pil)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def make_transform(transform: str | None, resolution: tuple[int, int] | None
                   ) -> Callable[[np.ndarray], np.ndarray | None]:
    """The function applied to every image ([H, W, C] uint8 -> square [N, N, C], or None to skip the image; a
    picklable callable, for worker processes). ValueError for a transform without a resolution or a resolution it
    cannot produce as a square image."""
    if transform is not None and transform not in TRANSFORMS:
        raise ValueError(f"unknown --transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if resolution is None:
        if transform is not None:
            raise ValueError(f"--transform {transform} needs --resolution")
        return _keep
    width, height = resolution
    transform = transform or "resize"
    if transform == "center-crop-wide":
        if height > width:
            raise ValueError(f"--transform center-crop-wide makes a {width}x{width} image from a {width}x{height} "
                             "band and needs the height at most the width; pass --resolution WxH with H <= W")
        return functools.partial(_center_crop_wide, width, height)
    if width != height:
        raise ValueError(f"--transform {transform} cannot produce square images from --resolution {width}x{height}; "
                         "pass a square resolution (e.g. 64), or center-crop-wide for WxH")
    if transform == "resize":
        return functools.partial(_resize_to, width)
    if transform == "center-crop":
        return functools.partial(_center_crop, width)
    return functools.partial(_center_crop_dhariwal, width)
