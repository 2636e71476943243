"""Shared test fixtures: golden reference archives produced by the official EDM2 implementation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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
