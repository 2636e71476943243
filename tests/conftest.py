"""Shared test fixtures: golden reference archives produced by the official EDM2 implementation."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
_CACHE_NUMBER = itertools.count()


@pytest.fixture(scope="session")
def _cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edm2-caches")


@pytest.fixture(autouse=True)
def _no_network(_cache_root, monkeypatch) -> None:
    """No test reaches the network or the user's cache: downloads are refused (EDM2_OFFLINE=1) and the cache is
    a fresh folder of its own (not created until used). Tests of downloads undo EDM2_OFFLINE themselves."""
    monkeypatch.setenv("EDM2_CACHE", str(_cache_root / f"cache-{next(_CACHE_NUMBER)}"))
    monkeypatch.setenv("EDM2_OFFLINE", "1")
    monkeypatch.delenv("EDM2_MIRROR", raising=False)


def load_golden(name: str) -> dict[str, np.ndarray]:
    """All arrays of tests/data/<name>.npz as a dict (meta_json decoded under 'meta')."""
    with np.load(DATA / f"{name}.npz") as d:
        out = {k: d[k] for k in d.files}
    if "meta_json" in out:
        out["meta"] = json.loads(str(out.pop("meta_json")))
    return out


@pytest.fixture(scope="session")
def golden_ops() -> dict[str, np.ndarray]:
    return load_golden("ops")


@pytest.fixture(scope="session")
def golden_net() -> dict[str, np.ndarray]:
    return load_golden("net_cond")


@pytest.fixture(scope="session")
def golden_phema() -> dict[str, np.ndarray]:
    return load_golden("phema_lr")


@pytest.fixture(scope="session")
def golden_sampler() -> dict[str, np.ndarray]:
    return load_golden("sampler")


# ----------------------------------------------------------------------------------------------------
# A stand-in for the Stable Diffusion VAE (tests/test_encoders.py, test_latent_pipeline.py): a tiny
# diffusers AutoencoderKL with random weights, saved with save_pretrained; nothing is downloaded.


def save_tiny_vae(folder: Path, blocks: int = 3) -> Path:
    """An AutoencoderKL (4 latent channels, 2**(blocks-1) times downsampling) written to `folder`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(8,) * blocks,
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")
