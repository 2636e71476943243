"""The feature networks of the two metrics of the EDM2 paper, their weight files, and loading them safely.

`fid`: Inception-v3 of TensorFlow's 2015-12-05 release (2048 features); `fd_dinov2`: DINOv2 ViT-L/14 (1024
features). Weights come from a folder the user names (`--detector-dir`, or the environment variable
EDM2_DETECTOR_DIR): the published files as they are (read with `torch.load(weights_only=True)`, which runs no
code) or the same tensors as `.safetensors`. Without such a folder, or when it lacks the file, the published file
is downloaded once into the download cache (`edm2.files.download`; EDM2_OFFLINE=1 forbids it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edm2.files.download import download
from edm2.metrics.dinov2 import DinoVisionTransformer
from edm2.metrics.inception import InceptionV3

__all__ = ["DETECTOR_DIR_ENV", "DetectorSpec", "DETECTORS", "METRICS", "Detector", "detector_dir",
           "find_weights", "weights_file", "read_weights", "load_detector"]

DETECTOR_DIR_ENV = "EDM2_DETECTOR_DIR"


@dataclass(frozen=True)
class DetectorSpec:
    """One metric's feature network: its published weight file and how to build the network from it."""

    metric: str
    name: str
    feature_dim: int
    filename: str
    url: str
    build: Callable[[dict[str, torch.Tensor]], torch.nn.Module]


def _build_inception(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    return InceptionV3()


DETECTORS: dict[str, DetectorSpec] = {
    "fid": DetectorSpec(
        "fid", "Inception-v3 (TensorFlow 2015-12-05, the FID network)", 2048,
        "pt_inception-2015-12-05-6726825d.pth",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        _build_inception),
    "fd_dinov2": DetectorSpec(
        "fd_dinov2", "DINOv2 ViT-L/14", 1024, "dinov2_vitl14_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
        DinoVisionTransformer.from_state_dict),
}
METRICS = tuple(DETECTORS)


def detector_dir(path: str | Path | None = None) -> Path:
    """The folder of detector weights: `path`, else $EDM2_DETECTOR_DIR; ValueError when neither names one."""
    path = path or os.environ.get(DETECTOR_DIR_ENV)
    if not path:
        raise ValueError(f"no folder of detector weights: pass --detector-dir DIR or set {DETECTOR_DIR_ENV} "
                         "(docs/metrics.md lists the files)")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"detector folder {path} does not exist")
    return path


def find_weights(metric: str, folder: Path) -> Path:
    """The weight file of `metric` in `folder` (the published name, or the same stem with .safetensors)."""
    spec = DETECTORS[metric]
    for name in (spec.filename, Path(spec.filename).stem + ".safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{metric} needs {spec.filename} in {folder}; it is published at {spec.url}")


def weights_file(metric: str, folder: str | Path | None = None) -> Path:
    """The weight file of `metric`: in `folder` (else $EDM2_DETECTOR_DIR) when it holds it, otherwise the
    published file from the download cache (downloaded once). A named folder that does not exist is an error."""
    named = folder or os.environ.get(DETECTOR_DIR_ENV)
    try:
        return find_weights(metric, detector_dir(named))
    except ValueError as e:
        if named and not Path(named).is_dir():
            raise
        missing = str(e)
    try:
        return download(DETECTORS[metric].url)
    except ValueError as e:
        raise ValueError(f"{missing}; downloading it failed too: {e}") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file, without running code: safetensors, or torch.load(weights_only=True)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # any reader error: damaged, truncated, or holding more than tensors
        raise ValueError(f"{path}: not a readable weight file ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no dict of tensors")
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


class Detector:
    """A metric's feature network in eval mode: uint8 images [N, C, H, W] (C = 1 or 3) -> float32 features."""

    def __init__(self, spec: DetectorSpec, net: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.metric = spec.metric
        self.net = net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.feature_dim = int(getattr(net, "feature_dim", spec.feature_dim))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"detectors take uint8 images [N, 1 or 3, H, W], got {images.dtype} "
                             f"{list(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images.to(self.device)).to(torch.float32)


def load_detector(metric: str, folder: str | Path | None = None, device: torch.device | str = "cpu") -> Detector:
    """The feature network of `metric` ('fid' or 'fd_dinov2') with its weights from `folder` or the download
    cache (`weights_file`; strict names)."""
    if metric not in DETECTORS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    spec = DETECTORS[metric]
    path = weights_file(metric, folder)
    state = read_weights(path)
    try:
        net = spec.build(state)
        ours = net.state_dict()
        missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        if missing or unexpected:
            raise ValueError(f"names differ from the published layout (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]})")
        bad = [k for k in ours if ours[k].shape != state[k].shape]
        if bad:
            raise ValueError(f"{bad[0]} has shape {list(state[bad[0]].shape)}, expected {list(ours[bad[0]].shape)}")
        net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    except ValueError as e:
        raise ValueError(f"{path}: not the {spec.name} weights: {e}") from None
    return Detector(spec, net, device)
