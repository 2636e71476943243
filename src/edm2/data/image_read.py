"""Reading image files: the one function every reader of pixels uses (the dataset tool, training folders and zips,
the metrics' image folders), so that one file means the same 8-bit pixels everywhere.

An image becomes uint8 [H, W, C] with C = 1 (grey) or 3 (RGB), by its PIL mode:

- `1`, `L`: grey (`1` as 0 or 255). `I;16`, `I;16B`, `I` (16-bit greyscale PNGs): grey, scaled to 8 bits by
  keeping the high byte (v >> 8: 65535 -> 255, and an 8-bit value v stored as v * 257 reads back as v; never
  clipped to white), as PIL reads 16-bit colour PNGs; `I` values outside 0..65535 are clipped to that range first.
- `LA`, `RGBA` (and `La`, `RGBa`, `PA`, `RGBX`): the alpha channel is dropped, as the official dataset tool's
  `.convert('RGB')` drops it: transparent pixels keep the colour they store. A 16-bit grey-and-alpha PNG (which PIL
  opens as RGBA) is grey.
- `P` (palette, with or without transparency): each index looked up in the palette (transparency dropped): grey
  when every entry of the palette is grey, RGB otherwise.
- `RGB`, `CMYK`, `YCbCr` and any other mode PIL converts to RGB: RGB. `F` (floating point) is refused.

`channels` asks for a channel count: grey becomes RGB by repeating the channel, RGB becomes grey as PIL computes
luma (ITU-R 601-2). Every problem is a one-line ValueError naming the file.
"""

from __future__ import annotations

import io
from typing import IO, NamedTuple

import numpy as np

__all__ = ["ImageHeader", "read_image", "image_header", "image_to_array", "to_channels", "mode_channels"]

_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"}
_SIXTEEN_BIT = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_REFUSED_MODES = {"F"}


class ImageHeader(NamedTuple):
    """What an image file's header says: the channels it is read with (1 or 3), its size and PIL mode."""

    channels: int
    height: int
    width: int
    mode: str


def _palette(img) -> np.ndarray:
    """The palette of a `P`/`PA` image as uint8 [256, 3] (missing entries black)."""
    flat = np.array(img.getpalette("RGB") or [], dtype=np.uint8)[:768]
    out = np.zeros([256, 3], dtype=np.uint8)
    out[:len(flat) // 3] = flat[:len(flat) // 3 * 3].reshape(-1, 3)
    return out


def _grey_alpha_png(img) -> bool:
    """A 16-bit grey-and-alpha PNG, which PIL opens as RGBA (raw mode `LA;16B`)."""
    try:
        return img.format == "PNG" and img.mode == "RGBA" and str(img.tile[0][3]).startswith("LA")
    except (IndexError, TypeError, AttributeError):
        return False


def mode_channels(img) -> int:
    """The channels (1 or 3) an opened PIL image is read with (a palette image's palette is read for it)."""
    if img.mode in _REFUSED_MODES:
        raise ValueError(f"PIL mode {img.mode} (floating point) is not supported; save the image as an 8- or "
                         "16-bit PNG")
    if img.mode in _GREY_MODES or _grey_alpha_png(img):
        return 1
    if img.mode in ("P", "PA"):
        pal = _palette(img)
        return 1 if bool((pal[:, 0] == pal[:, 1]).all() and (pal[:, 1] == pal[:, 2]).all()) else 3
    return 3


def _natural(img) -> np.ndarray:
    """The image in its own channels (`mode_channels`), uint8 [H, W, C]."""
    mode = img.mode
    channels = mode_channels(img)
    if mode in _SIXTEEN_BIT:
        value = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return (value >> 8).astype(np.uint8)[:, :, None]
    if mode == "1":
        return np.asarray(img.convert("L"))[:, :, None]
    if mode in ("P", "PA"):
        index = np.asarray(img)
        rgb = _palette(img)[index[:, :, 0] if index.ndim == 3 else index]
        return rgb[:, :, :channels]
    if mode in ("L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX"):
        arr = np.asarray(img)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return np.ascontiguousarray(arr[:, :, :channels])
    return np.asarray(img.convert("RGB"))  # CMYK, YCbCr, HSV, ...


def to_channels(arr: np.ndarray, channels: int | None) -> np.ndarray:
    """uint8 [H, W, C] (C = 1, 3 or 4; a fourth channel is alpha and dropped) as `channels` (1 or 3; None: 1 stays
    1, otherwise 3): grey repeated to RGB, RGB to grey as PIL's luma."""
    from PIL import Image

    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if channels is None or arr.shape[2] == channels:
        return np.ascontiguousarray(arr)
    if channels == 3:
        return np.repeat(arr, 3, axis=2)
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr)).convert("L"))[:, :, None]


def image_to_array(img, channels: int | None = None) -> np.ndarray:
    """An opened PIL image as uint8 [H, W, C]: its own channels (module docstring), or `channels` (1 or 3)."""
    return to_channels(_natural(img), channels)


def read_image(data: bytes, where: str, channels: int | None = None) -> np.ndarray:
    """PNG/JPEG/BMP/WebP bytes -> uint8 [H, W, C], C = 1 or 3 (see the module docstring; `channels` forces one);
    ValueError naming `where` for an unreadable or unsupported image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return image_to_array(img, channels)
    except Exception as e:  # noqa: BLE001 - any decoder error (truncated, bomb, unknown format) is a bad image
        raise ValueError(f"{where}: not a readable image ({e.__class__.__name__}: {e})") from None


def image_header(file: IO[bytes], where: str) -> ImageHeader:
    """Channels (as `read_image` reads it), size and mode from an image file's header (a palette image is
    decoded to read its palette)."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            w, h = img.size
            return ImageHeader(mode_channels(img), h, w, img.mode)
    except Exception as e:  # noqa: BLE001 - any decoder error is a bad image
        raise ValueError(f"{where}: not a readable image ({e.__class__.__name__}: {e})") from None
