"""The feature networks of FID and FD_DINOv2: the same features as independent implementations given the same
weights, the stated preprocessing, strict loading of weight files in the published layouts, clear errors.

Golden features (tests/data/metrics/, made by make_golden.py there): Inception-v3 by torch-fidelity's port of the
TensorFlow FID graph, DINOv2 by the official facebookresearch/dinov2 code (at a reduced width and depth, same
code), both with the seeded random weights of tests/detector_weights.py in the published layouts.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from detector_weights import load_layout, random_weights, shrink_dinov2
from PIL import Image
from safetensors.torch import save_file

from edm2.metrics.detectors import DETECTOR_DIR_ENV, DETECTORS, load_detector
from edm2.metrics.dinov2 import IMAGENET_MEAN, IMAGENET_STD, DinoVisionTransformer, dinov2_preprocess
from edm2.metrics.inception import InceptionV3, inception_preprocess, tf1_resize_bilinear

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "metrics")


def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(GOLDEN, f"{name}_golden.npz")) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
    """The published Inception layout (with the BatchNorm counters a torch module saves) as a .pth file."""
    folder = tmp_path_factory.mktemp("det")
    torch.save(random_weights(load_layout("inception")), folder / DETECTORS["fid"].filename)
    return folder


def test_inception_features_match_torch_fidelity(inception_dir):
    det = load_detector("fid", inception_dir)
    assert det.feature_dim == 2048
    ref = golden("inception")
    cases = ("small", "large")  # 48 and 200 pixels: resized up and down; one forward pass for both (CPU time)
    x = torch.cat([inception_preprocess(torch.from_numpy(ref[f"{c}/images"])) for c in cases])
    with torch.no_grad():
        features = det.net.features(x).numpy()
    expected = np.concatenate([ref[f"{c}/features"] for c in cases])
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-4)
    assert np.abs(expected).max() > 1  # the random network does not collapse the features
    for c in cases:  # torch-fidelity's TensorFlow-1-exact bilinear resize (a corner of the 299x299 output)
        resized = tf1_resize_bilinear(torch.from_numpy(ref[f"{c}/images"]).float(), 299)[:, :, :40, :40]
        np.testing.assert_allclose(resized.numpy(), ref[f"{c}/resized"], rtol=0, atol=1e-4)


def test_dinov2_features_match_the_official_code(tmp_path):
    layout = shrink_dinov2(load_layout("dinov2_vitl14"), 192, 3)
    save_file(random_weights(layout), str(tmp_path / "dinov2_vitl14_pretrain.safetensors"))
    det = load_detector("fd_dinov2", tmp_path)
    assert det.feature_dim == 192 and len(det.net.blocks) == 3 and det.net.blocks[0].attn.num_heads == 3
    ref = golden("dinov2")
    for case in ("small", "large", "exact"):
        features = det(torch.from_numpy(ref[f"{case}/images"])).numpy()
        np.testing.assert_allclose(features, ref[f"{case}/features"], rtol=1e-5, atol=1e-5)


def test_published_layouts_build_with_strict_names():
    """The real networks (ViT-L/14 read off the layout itself) have exactly the published names and shapes."""
    for name, build in (("inception", lambda state: InceptionV3()),
                        ("dinov2_vitl14", DinoVisionTransformer.from_state_dict)):
        layout = {k: s for k, s in load_layout(name) if not k.endswith("num_batches_tracked")}
        with torch.device("meta"):
            net = build({k: torch.empty(s, device="meta") for k, s in layout.items()})
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == layout
    assert (net.feature_dim, len(net.blocks), net.blocks[0].attn.num_heads, net.patch_size) == (1024, 24, 16, 14)


def test_dinov2_preprocessing_matches_pil_bicubic():
    """Bicubic antialiased resize to 224 (PIL's float resampling as the independent reference), /255, ImageNet
    mean and std; up- and downsampling and the identity size."""
    g = torch.Generator().manual_seed(0)
    for size in (64, 300, 224):
        img = torch.randint(0, 256, [1, 3, size, size], generator=g, dtype=torch.uint8)
        ours = dinov2_preprocess(img)[0].numpy()
        ref = np.stack([np.asarray(Image.fromarray(img[0, c].numpy().astype(np.float32), mode="F").resize(
            (224, 224), Image.Resampling.BICUBIC)) for c in range(3)])
        ref = (ref / 255 - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
        np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_inception_resize_is_tensorflow1_bilinear():
    """Source coordinate = output index x in/out, no half-pixel offset, clamped at the border (float64 loops)."""
    g = torch.Generator().manual_seed(1)
    for h, w in ((5, 7), (40, 33)):
        img = torch.randint(0, 256, [1, 2, h, w], generator=g).to(torch.float32)
        ours = tf1_resize_bilinear(img, 9).numpy()[0]
        src = img.numpy()[0].astype(np.float64)
        ref = np.zeros_like(ours, dtype=np.float64)
        for i in range(9):
            y = i * h / 9
            y0, dy = int(np.floor(y)), y - np.floor(y)
            for j in range(9):
                x = j * w / 9
                x0, dx = int(np.floor(x)), x - np.floor(x)
                y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                top = src[:, y0, x0] * (1 - dx) + src[:, y0, x1] * dx
                bottom = src[:, y1, x0] * (1 - dx) + src[:, y1, x1] * dx
                ref[:, i, j] = top * (1 - dy) + bottom * dy
        np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_grayscale_images_are_measured_as_rgb(tmp_path):
    layout = shrink_dinov2(load_layout("dinov2_vitl14"), 64, 1)
    torch.save(random_weights(layout), tmp_path / "dinov2_vitl14_pretrain.pth")
    det = load_detector("fd_dinov2", tmp_path)
    gray = torch.randint(0, 256, [2, 1, 32, 32], dtype=torch.uint8)
    torch.testing.assert_close(det(gray), det(gray.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="uint8"):
        det(gray.float())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weight_file_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(DETECTOR_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match=f"--detector-dir DIR or set {DETECTOR_DIR_ENV}"):
        load_detector("fid")
    with pytest.raises(ValueError, match="pt_inception-2015-12-05-6726825d.pth in .* published at https://"):
        load_detector("fid", tmp_path)
    monkeypatch.setenv(DETECTOR_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="dinov2_vitl14_pretrain.pth in .* published at https://dl.fbaipublicfiles"):
        load_detector("fd_dinov2")
    # The other network's weights under this name: refused with the names that differ.
    torch.save(random_weights(shrink_dinov2(load_layout("dinov2_vitl14"), 64, 1)),
               tmp_path / DETECTORS["fid"].filename)
    with pytest.raises(ValueError, match="not the Inception-v3 .* weights: names differ"):
        load_detector("fid")
    # A weight file that would run code when unpickled is refused by torch.load(weights_only=True).
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / DETECTORS["fd_dinov2"].filename).write_bytes(pickle.dumps({"w": RunsCode()}))
    with pytest.raises(ValueError, match="not a readable weight file"):
        load_detector("fd_dinov2")
    assert not marker.exists()
    with pytest.raises(ValueError, match="unknown metric"):
        load_detector("is50k")
