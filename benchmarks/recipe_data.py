"""Synthetic class-conditional datasets with a known structure, for the recipe sweep and benchmark.

- `glyphs`: grey digits 0-9 (white on black, MNIST-like), drawn from the 20 text fonts matplotlib ships (DejaVu
  Sans/Serif/Mono, STIX, Computer Modern in their weights and slants) with random size, rotation, position and
  stroke blur. Ten classes, one per digit.
- `shapes`: colour shapes on a coloured ground, ten classes (circle, square, triangle, diamond, plus, star, ring,
  hexagon, cross, crescent), random colours (hue, saturation, value), size, rotation, position and a shading
  gradient of the ground.

Both are drawn at 2x and box-filtered down (anti-aliased edges), deterministic in (count, seed, resolution), and
saved as the `.npz` layout `edm2 train --data` reads (`x` uint8 [N, H, W, C], `y` labels). Import from the
benchmarks folder: `python benchmarks/recipe_data.py glyphs 32 60000 out.npz` writes one.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

DIGIT_FONTS = ["DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSansMono",
               "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique", "DejaVuSerif",
               "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "STIXGeneral", "STIXGeneralBol",
               "STIXGeneralItalic", "STIXGeneralBolIta", "cmr10", "cmb10", "cmss10", "cmtt10"]
SHAPES = ["circle", "square", "triangle", "diamond", "plus", "star", "ring", "hexagon", "cross", "crescent"]


def _fonts(size: int) -> list:
    import matplotlib
    from PIL import ImageFont

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [ImageFont.truetype(str(folder / f"{name}.ttf"), size) for name in DIGIT_FONTS]


def _downsample(canvas: np.ndarray, factor: int) -> np.ndarray:
    h, w = canvas.shape[:2]
    blocks = canvas.reshape(h // factor, factor, w // factor, factor, -1).astype(np.float32)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def glyphs(count: int, seed: int = 0, resolution: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Grey digits: (uint8 [N, R, R, 1], labels [N])."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([seed, 1])
    big = 2 * resolution
    fonts = {s: _fonts(s) for s in range(int(0.55 * big), int(0.95 * big) + 1, 2)}
    labels = rng.integers(0, 10, count)
    out = np.empty([count, resolution, resolution, 1], np.uint8)
    for i, digit in enumerate(labels):
        size = int(rng.choice(list(fonts)))
        font = fonts[size][rng.integers(len(DIGIT_FONTS))]
        tile = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(tile)
        box = draw.textbbox((0, 0), str(digit), font=font)
        x = (big - (box[2] - box[0])) / 2 - box[0] + rng.normal(0, 0.06 * big)
        y = (big - (box[3] - box[1])) / 2 - box[1] + rng.normal(0, 0.06 * big)
        draw.text((x, y), str(digit), fill=int(rng.integers(200, 256)), font=font)
        tile = tile.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        if rng.random() < 0.5:
            tile = tile.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
        out[i] = _downsample(np.asarray(tile)[:, :, None], 2)
    return out, labels.astype(np.int64)


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline of a polygonal shape (radius r, rotated by `angle` radians)."""
    if kind in ("square", "diamond", "triangle", "hexagon"):
        n, offset = {"square": (4, math.pi / 4), "diamond": (4, 0.0), "triangle": (3, -math.pi / 2),
                     "hexagon": (6, 0.0)}[kind]
        radii = [r] * n
    elif kind == "star":
        n, offset, radii = 10, -math.pi / 2, [r if k % 2 == 0 else 0.45 * r for k in range(10)]
    else:  # plus and cross: a 12-gon with arms of width 0.36 r
        a = 0.36 * r
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a),
               (-a, r)]
        rot = angle + (math.pi / 4 if kind == "cross" else 0.0)
        return [(cx + px * math.cos(rot) - py * math.sin(rot), cy + px * math.sin(rot) + py * math.cos(rot))
                for px, py in pts]
    return [(cx + radii[k] * math.cos(offset + angle + 2 * math.pi * k / n),
             cy + radii[k] * math.sin(offset + angle + 2 * math.pi * k / n)) for k in range(n)]


def _colour(rng: np.random.Generator, value: tuple[float, float]) -> tuple[int, int, int]:
    import colorsys

    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(*value))
    return tuple(int(255 * c) for c in rgb)


def shapes(count: int, seed: int = 0, resolution: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Colour shapes: (uint8 [N, R, R, 3], labels [N])."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, 2])
    big = 2 * resolution
    labels = rng.integers(0, 10, count)
    ramp = np.linspace(0, 1, big, dtype=np.float32)
    out = np.empty([count, resolution, resolution, 3], np.uint8)
    for i, label in enumerate(labels):
        kind = SHAPES[label]
        ground = np.array(_colour(rng, (0.15, 0.6)), np.float32)
        shade = rng.uniform(0.6, 1.0)
        grad = ramp if rng.random() < 0.5 else ramp[:, None]
        canvas = ground * (shade + (1 - shade) * np.broadcast_to(grad, (big, big)))[:, :, None]
        tile = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(tile)
        r = rng.uniform(0.25, 0.42) * big
        cx, cy = (big / 2 + rng.normal(0, 0.06 * big) for _ in range(2))
        fill = _colour(rng, (0.75, 1.0))
        if kind in ("circle", "ring", "crescent"):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            if kind != "circle":
                hole = 0.55 * r if kind == "ring" else 0.85 * r
                dx = 0.0 if kind == "ring" else 0.45 * r
                a = rng.uniform(0, 2 * math.pi)
                hx, hy = cx + dx * math.cos(a), cy + dx * math.sin(a)
                draw.ellipse([hx - hole, hy - hole, hx + hole, hy + hole], fill=tuple(int(c) for c in ground))
        else:
            draw.polygon(_shape_polygon(kind, cx, cy, r, rng.uniform(-0.3, 0.3)), fill=fill)
        out[i] = _downsample(np.asarray(tile), 2)
    return out, labels.astype(np.int64)


# Ten public colour photographs that ship with scikit-image (`pip install scikit-image`: public domain / CC0 images)
# and scikit-learn (china.jpg, flower.jpg: CC BY 2.0); one class per photograph.
PHOTOS = [("skimage", "astronaut.png"), ("skimage", "chelsea.png"), ("skimage", "coffee.png"),
          ("skimage", "hubble_deep_field.jpg"), ("skimage", "ihc.png"), ("skimage", "motorcycle_left.png"),
          ("skimage", "retina.jpg"), ("skimage", "rocket.jpg"), ("sklearn", "china.jpg"), ("sklearn", "flower.jpg")]


def _photo(package: str, name: str) -> np.ndarray:
    from PIL import Image

    if package == "skimage":
        import skimage

        folder = Path(skimage.__file__).parent / "data"
    else:
        import sklearn

        folder = Path(sklearn.__file__).parent / "datasets" / "images"
    return np.asarray(Image.open(folder / name).convert("RGB"))


def photos(count: int, seed: int = 0, resolution: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Real photographs: random square crops (20 % to 60 % of the short side, anywhere, mirrored at random) of the
    ten `PHOTOS`, resized with a Lanczos filter; the label is the photograph. (uint8 [N, R, R, 3], labels [N])."""
    from PIL import Image

    rng = np.random.default_rng([seed, 3])
    sources = [_photo(package, name) for package, name in PHOTOS]
    labels = rng.integers(0, len(sources), count)
    out = np.empty([count, resolution, resolution, 3], np.uint8)
    for i, label in enumerate(labels):
        img = sources[label]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.2, 0.6) * min(h, w))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[y:y + side, x:x + side]).resize((resolution, resolution), Image.LANCZOS)
        out[i] = np.asarray(crop)[:, ::-1] if rng.random() < 0.5 else np.asarray(crop)
    return out, labels


MAKERS = {"glyphs": glyphs, "shapes": shapes, "photos": photos}


def dataset_file(kind: str, resolution: int, count: int, folder: str | Path, seed: int = 0) -> Path:
    """The `.npz` of `count` images of `kind` at `resolution` in `folder`, made on first use."""
    from edm2.files import atomic_output

    path = Path(folder) / f"{kind}{resolution}-{count}-seed{seed}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        x, y = MAKERS[kind](count, seed, resolution)
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, x=x, y=y)
    return path


if __name__ == "__main__":
    kind, res, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    x, y = MAKERS[kind](n, 0, res)
    np.savez(out, x=x, y=y)
    print(f"wrote {n} {kind} at {res}x{res} to {os.path.abspath(out)}")
