"""How `inception_golden.npz`, `dinov2_golden.npz` and the two layout files were made (not run by the tests).

Independent implementations, installed outside the project:
- Inception: torch-fidelity 0.4.0 (`FeatureExtractorInceptionV3`, its TF1-exact bilinear resize; installed with
  --no-deps, its package __init__ bypassed because it imports torchvision), feature '2048';
- DINOv2: the official facebookresearch/dinov2 code: the layout of `dinov2.hub.backbones.dinov2_vitl14`, and
  features of its `DinoVisionTransformer` with the same arguments at width 192 and depth 3 (so that the tests
  stay cheap), with the preprocessing of the EDM2 metric (torch bicubic antialiased resize to 224, ImageNet
  mean/std).
Both run on the weights of `tests/detector_weights.random_weights` (seed 0) for their layouts.

    PYTHONPATH=/path/to/torch_fidelity_site:/path/to/dinov2_checkout python tests/data/metrics/make_golden.py
"""

import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))
from detector_weights import random_weights, shrink_dinov2  # noqa: E402


def images(seed: int, n: int, size: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, [n, 3, size, size], generator=g, dtype=torch.uint8).numpy()


def inception() -> None:
    site = next(Path(p) for p in sys.path if (Path(p) / "torch_fidelity").is_dir())
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = [str(site / "torch_fidelity")]
    sys.modules["torch_fidelity"] = pkg
    fe = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    layout = [(k, list(v.shape)) for k, v in _inception_modules(fe).state_dict().items()]
    (HERE / "inception_layout.json").write_text(json.dumps(layout))
    net = _inception_modules(fe)
    net.load_state_dict(random_weights([(k, tuple(s)) for k, s in layout]), strict=True)
    out = {}
    for name, imgs in (("small", images(1, 1, 48)), ("large", images(2, 1, 200))):
        x = torch.from_numpy(imgs)
        resized = fe.interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        with torch.no_grad():
            out[f"{name}/features"] = net(x)[0].numpy()
        out[f"{name}/images"] = imgs
        out[f"{name}/resized"] = resized[:, :, :40, :40].numpy()  # a corner, to keep the file small
    np.savez_compressed(HERE / "inception_golden.npz", **out)


def _inception_modules(fe):
    m = fe.FeatureExtractorInceptionV3.__new__(fe.FeatureExtractorInceptionV3)
    fe.FeatureExtractorBase.__init__(m, "inception-v3-compat", ["2048"])
    m.feature_extractor_internal_dtype = torch.float32
    for name, mod in [("Conv2d_1a_3x3", fe.BasicConv2d(3, 32, kernel_size=3, stride=2)),
                      ("Conv2d_2a_3x3", fe.BasicConv2d(32, 32, kernel_size=3)),
                      ("Conv2d_2b_3x3", fe.BasicConv2d(32, 64, kernel_size=3, padding=1)),
                      ("MaxPool_1", torch.nn.MaxPool2d(kernel_size=3, stride=2)),
                      ("Conv2d_3b_1x1", fe.BasicConv2d(64, 80, kernel_size=1)),
                      ("Conv2d_4a_3x3", fe.BasicConv2d(80, 192, kernel_size=3)),
                      ("MaxPool_2", torch.nn.MaxPool2d(kernel_size=3, stride=2)),
                      ("Mixed_5b", fe.InceptionA(192, pool_features=32)), ("Mixed_5c", fe.InceptionA(256, 64)),
                      ("Mixed_5d", fe.InceptionA(288, 64)), ("Mixed_6a", fe.InceptionB(288)),
                      ("Mixed_6b", fe.InceptionC(768, 128)), ("Mixed_6c", fe.InceptionC(768, 160)),
                      ("Mixed_6d", fe.InceptionC(768, 160)), ("Mixed_6e", fe.InceptionC(768, 192)),
                      ("Mixed_7a", fe.InceptionD(768)), ("Mixed_7b", fe.InceptionE_1(1280)),
                      ("Mixed_7c", fe.InceptionE_2(2048)),
                      ("AvgPool", torch.nn.AdaptiveAvgPool2d((1, 1))), ("fc", torch.nn.Linear(2048, 1008))]:
        setattr(m, name, mod)
    return m.eval()


def dinov2() -> None:
    """The layout of the real ViT-L/14; features from the same code at a reduced width and depth (cheap tests)."""
    import warnings
    from functools import partial

    warnings.filterwarnings("ignore")
    from dinov2.hub.backbones import dinov2_vitl14
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    from dinov2.models.vision_transformer import DinoVisionTransformer

    full = dinov2_vitl14(pretrained=False)
    layout = [(k, list(v.shape)) for k, v in full.state_dict().items()]
    (HERE / "dinov2_vitl14_layout.json").write_text(json.dumps(layout))
    del full
    # dinov2_vitl14's constructor arguments, at width 192 (3 heads) and depth 3.
    model = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=192, depth=3, num_heads=3, mlp_ratio=4,
                                  init_values=1.0, ffn_layer="mlp", block_chunks=0, num_register_tokens=0,
                                  interpolate_antialias=False, interpolate_offset=0.1,
                                  block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention)).eval()
    small_layout = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert small_layout == shrink_dinov2([(k, tuple(s)) for k, s in layout], 192, 3)
    model.load_state_dict(random_weights(small_layout), strict=True)
    out = {}
    for name, imgs in (("small", images(4, 2, 64)), ("large", images(5, 1, 256)), ("exact", images(6, 1, 224))):
        x = torch.nn.functional.interpolate(torch.from_numpy(imgs).float(), size=(224, 224), mode="bicubic",
                                            antialias=True) / 255
        x = (x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, -1, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).reshape(1, -1, 1, 1)
        with torch.no_grad():
            out[f"{name}/features"] = model(x).numpy()
        out[f"{name}/images"] = imgs
    np.savez_compressed(HERE / "dinov2_golden.npz", **out)


if __name__ == "__main__":
    inception()
    dinov2()
