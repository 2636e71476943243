"""Image output of `edm2.generate`: grids and PNG files (sampling itself is tested in test_sampling and
test_cli)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from edm2.generate import make_grid, save_png


def test_grid_places_tiles_row_by_row_with_gaps():
    images = torch.arange(5, dtype=torch.float32).reshape(5, 1, 1, 1).expand(5, 3, 2, 2) / 10  # tile k = k/10
    grid = make_grid(images, cols=3, scale=2, gap=1, gap_value=-0.5)
    assert grid.shape == (3, 2 * 4 + 1, 3 * 4 + 2)  # 2 rows x 3 cols of 4x4 tiles, 1-pixel gaps
    for k in range(6):
        r, c = divmod(k, 3)
        tile = grid[:, r * 5:r * 5 + 4, c * 5:c * 5 + 4]
        expected = k / 10 if k < 5 else -0.5  # the sixth cell is empty
        assert torch.equal(tile, torch.full_like(tile, expected)), k
    assert (grid[:, 4, :] == -0.5).all() and (grid[:, :, 4] == -0.5).all() and (grid[:, :, 9] == -0.5).all()


def test_grid_without_gap_is_plain_tiling():
    images = torch.randn(4, 1, 3, 3)
    grid = make_grid(images)
    assert torch.equal(grid[0, :3, 3:], images[1, 0]) and torch.equal(grid[0, 3:, :3], images[2, 0])


def test_save_png_round_trip(tmp_path):
    image = torch.tensor([[[-1.0, 0.0], [1.0, 0.5]]])
    save_png(tmp_path / "a.png", image)
    with Image.open(tmp_path / "a.png") as img:
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), [[0, 128], [255, 191]])
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left
