"""Non-leaky augmentation (`AugmentPipe`): the augment labels encode the transform applied, each transform does
what its geometry says (checked against torch.flip/rot90, integer shifts and moments of a blob), probability 0
is the identity with zero labels, images stay in range, draws are deterministic per seed and independent of how
a batch is split, and bad input is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edm2.augment import EDM_AUGMENT_KWARGS, AugmentParams, AugmentPipe
from edm2.augment_geometry import SYM6

H = W = 32
YY, XX = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
ALL = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
           brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)


def blob(cx: float, cy: float, s: float) -> torch.Tensor:
    return torch.exp(-((XX - cx) ** 2 + (YY - cy) ** 2) / (2 * s**2)) * 2 - 1


def smooth_images(n: int = 1) -> torch.Tensor:
    """Band-limited RGB images in [-1, 1]."""
    img = torch.stack([blob(12, 14, 4), blob(18, 15, 5), torch.sin(XX / 5) * torch.cos(YY / 6)])
    return img[None].repeat(n, 1, 1, 1)


def params(**values) -> AugmentParams:
    return AugmentParams({k: torch.as_tensor(v) for k, v in values.items()})


def test_the_edm_configuration_has_nine_augment_labels():
    pipe = AugmentPipe(p=0.12, **EDM_AUGMENT_KWARGS)
    assert pipe.label_dim == 9 and pipe.enabled == ("xflip", "yflip", "scale", "rotate_frac", "aniso",
                                                    "translate_frac")
    assert AugmentPipe(**ALL).label_dim == 19 and AugmentPipe().label_dim == 0


def test_xflip_twice_is_the_identity_and_the_label_says_which_images_flipped():
    pipe = AugmentPipe(xflip=1)
    images = torch.randn(3, 3, H, W)
    flip = params(xflip=[1, 0, 1])
    once, labels = pipe.apply(images, flip)
    assert labels.tolist() == [[1.0], [0.0], [1.0]]
    assert torch.equal(once[0], images[0].flip(2)) and torch.equal(once[1], images[1])
    twice, _ = pipe.apply(once, flip)
    assert torch.equal(twice, images)


def test_probability_zero_is_the_identity_with_zero_labels():
    images = torch.rand(8, 3, H, W) * 2 - 1
    for kwargs in (ALL, EDM_AUGMENT_KWARGS):
        out, labels = AugmentPipe(p=0, **kwargs)(images, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, images) and labels.shape == (8, AugmentPipe(**kwargs).label_dim)
        assert not labels.any()


@pytest.mark.parametrize("w, k", [(1, 1), (2, 2), (3, -1)])
def test_integer_rotation_turns_by_quarter_turns(w, k):
    images = torch.randn(1, 2, H, W)
    out, labels = AugmentPipe(rotate_int=1).apply(images, params(rotate_int=[w]))
    assert torch.equal(out, torch.rot90(images, k, dims=(2, 3)))
    assert labels.tolist() == [[float(w in (1, 2)), float(w in (2, 3))]]


def test_integer_translation_shifts_whole_pixels_and_reflects_at_the_border():
    images = torch.randn(1, 1, H, W)
    pipe = AugmentPipe(translate_int=1)  # translate_int_max 0.125: up to 4 pixels
    out, labels = pipe.apply(images, params(translate_int=[[3 / 4, -2 / 4]]))
    assert labels.tolist() == [[0.75, -0.5]]
    # x moves right by 3 pixels; y reads 2 rows above (the official sign convention).
    assert torch.equal(out[..., 2:, 3:], images[..., :-2, :-3])
    assert torch.equal(out[..., 2:, 0], images[..., :-2, 3])  # mirrored at the left border
    assert sorted(out.flatten().tolist()) != [] and set(out.flatten().tolist()) <= set(images.flatten().tolist())


def test_fractional_translation_by_a_whole_pixel_equals_the_integer_shift():
    images = smooth_images()
    one_pixel = 1 / (W * 0.125)  # translate_frac_std 0.125 of the width
    frac, labels = AugmentPipe(translate_frac=1).apply(images, params(translate_frac=[[one_pixel, 0.0]]))
    shifted, _ = AugmentPipe(translate_int=1).apply(images, params(translate_int=[[1 / 4, 0.0]]))
    assert labels.tolist() == [[pytest.approx(one_pixel), 0.0]]
    torch.testing.assert_close(frac[..., 4:-4, 4:-4], shifted[..., 4:-4, 4:-4], rtol=0, atol=1e-5)


def test_arbitrary_rotation_by_a_quarter_turn_matches_rot90():
    images = smooth_images()
    out, labels = AugmentPipe(rotate_frac=1).apply(images, params(rotate_frac=[np.pi / 2]))
    assert labels.tolist() == [[pytest.approx(-1.0), pytest.approx(1.0)]]  # cos - 1, sin
    assert (out - torch.rot90(images, 1, dims=(2, 3)))[..., 4:-4, 4:-4].abs().max() < 0.05


def _std(image: torch.Tensor, axis: torch.Tensor) -> float:
    w = (image + 1) / 2
    w = w / w.sum()
    mean = (w * axis).sum()
    return float((w * (axis - mean) ** 2).sum().sqrt())


def test_isotropic_and_anisotropic_scaling_scale_a_blob():
    image = blob(15.5, 15.5, 4)[None, None]
    s = 2**0.2  # one standard deviation of the log2 scale (scale_std = aniso_std = 0.2)
    out, labels = AugmentPipe(scale=1).apply(image, params(scale=[1.0]))
    assert labels.tolist() == [[1.0]]
    assert _std(out[0, 0], XX) / _std(image[0, 0], XX) == pytest.approx(s, rel=0.01)
    out, labels = AugmentPipe(aniso=1).apply(image, params(aniso=[[1.0, 0.0]]))  # w = 1, frame rotation 0
    assert labels.tolist() == [[1.0, 0.0]]  # w cos r, w sin r
    assert _std(out[0, 0], XX) / _std(image[0, 0], XX) == pytest.approx(s, rel=0.01)
    assert _std(out[0, 0], YY) / _std(image[0, 0], YY) == pytest.approx(1 / s, rel=0.02)


def test_labels_encode_the_sampled_parameters():
    pipe = AugmentPipe(p=1, **EDM_AUGMENT_KWARGS)
    p = pipe.sample(16, generator=torch.Generator().manual_seed(1))
    _, labels = pipe.apply(smooth_images(16), p)
    v = p.values
    a, r = v["aniso"][:, 0], v["aniso"][:, 1]
    expected = torch.stack([v["xflip"].float(), v["yflip"].float(), v["scale"], v["rotate_frac"].cos() - 1,
                            v["rotate_frac"].sin(), a * r.cos(), a * r.sin(), v["translate_frac"][:, 0],
                            v["translate_frac"][:, 1]], dim=1)
    torch.testing.assert_close(labels, expected)
    assert labels.any(dim=0).all()  # with p = 1 every transform happened to some image


def test_images_stay_in_range():
    images = smooth_images(32)
    out, _ = AugmentPipe(p=1, **EDM_AUGMENT_KWARGS)(images, generator=torch.Generator().manual_seed(2))
    # The resampling filter may ring by a fraction of a percent at sharp features (the official pipe does not clip).
    assert out.min() >= -1.01 and out.max() <= 1.01
    noise = torch.rand(8, 3, H, W) * 2 - 1  # integer transforms permute pixels (or mirror them): same values
    out, _ = AugmentPipe(p=1, xflip=1, yflip=1, rotate_int=1, translate_int=1)(noise)
    assert set(out.flatten().tolist()) <= set(noise.flatten().tolist())


def test_a_batch_is_augmented_deterministically_per_seed_and_independently_of_its_split():
    pipe = AugmentPipe(p=0.5, **ALL)
    images = smooth_images(12)
    a, la = pipe(images, generator=torch.Generator().manual_seed(7))
    b, lb = pipe(images, generator=torch.Generator().manual_seed(7))
    c, _ = pipe(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    p = pipe.sample(12, generator=torch.Generator().manual_seed(7))
    halves = [pipe.apply(images[s], p[s]) for s in (slice(0, 5), slice(5, 12))]
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), a, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([h[1] for h in halves]), la)


def test_colour_transforms():
    images = smooth_images(1)
    out, labels = AugmentPipe(brightness=1).apply(images, params(brightness=[1.5]))
    torch.testing.assert_close(out, images + 1.5 * 0.2)  # brightness_std 0.2
    out, _ = AugmentPipe(contrast=1).apply(images, params(contrast=[1.0]))
    torch.testing.assert_close(out, images * 2**0.5)  # contrast_std 0.5 (log2)
    # Hue rotation and saturation act about the grey axis: the mean of R, G, B is kept.
    out, labels = AugmentPipe(hue=1, saturation=1).apply(images, params(hue=[0.7], saturation=[0.8]))
    torch.testing.assert_close(out.mean(dim=1), images.mean(dim=1), rtol=0, atol=1e-5)
    assert not torch.allclose(out, images) and labels.shape == (1, 3)
    gray = images[:, :1]
    out, _ = AugmentPipe(lumaflip=1).apply(gray, params(lumaflip=[1]))
    torch.testing.assert_close(out, -gray, rtol=0, atol=1e-6)  # a luma flip inverts a grayscale image


def test_sym6_is_an_orthogonal_half_band_filter():
    h = np.asarray(SYM6)
    assert h.sum() == pytest.approx(np.sqrt(2))
    auto = np.correlate(h, h, mode="full")[len(h) - 1:]
    np.testing.assert_allclose(auto[0::2], [1] + [0] * (len(auto[0::2]) - 1), atol=1e-12)


@pytest.mark.parametrize("make, fragment", [
    (lambda: AugmentPipe(brightness=1)(torch.zeros(2, 4, H, W)), "RGB"),
    (lambda: AugmentPipe(rotate_int=1).apply(torch.zeros(1, 3, 8, 16), params(rotate_int=[1])), "square"),
    (lambda: AugmentPipe(xflip=1).apply(torch.zeros(2, 3, 8, 8), params(xflip=[1, 0, 1])), "do not fit"),
    (lambda: AugmentPipe(xflip=1).apply(torch.zeros(1, 3, 8, 8), params(yflip=[1])), "do not fit"),
    (lambda: AugmentPipe(xflip=-1), "non-negative"),
])
def test_bad_input_is_a_clear_error(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()
