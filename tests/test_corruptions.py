"""Corruptions: the regenerated CIFAR-10-C types (vhmn.corruptions) and the occlusion patch.

Every type x severity is run on synthetic "natural-looking" images (smooth colour fields with sharp
shapes, so these tests never all skip) and, where the data are present, on real CIFAR-10 test
images read through vhmn.data.load_arrays ($VHMN_DATA). The formulas that have a closed form
(brightness, contrast, frost's blend weights, noise statistics, zoom blur, glass blur's pixel
moves, the motion-blur kernel, pixelate, JPEG) are checked against direct references of the
original make_cifar_c.py; the rest through output contracts, determinism and the growth of the
deviation from the clean image with severity.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vhmn import corruptions as C
from vhmn.corruptions import CORRUPTIONS, OCCLUSION_SIDES, SEVERITY_PARAMS, STOCHASTIC, SUBSTITUTED, corrupt, occlude
from vhmn.data import DatasetNotFoundError, load_arrays

from _slice import real_root, one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

SEVERITIES = (1, 2, 3, 4, 5)


def synthetic(n: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth colour fields with rectangles and a disc of flat colour and a little texture noise."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(n, 32, 32, 3)), sigma=(0, 4, 4, 0))
    field = (field - field.mean(axis=(1, 2), keepdims=True)) / (field.std(axis=(1, 2), keepdims=True) + 1e-8)
    img = 120 + 40 * field + rng.normal(0, 4, (n, 32, 32, 3))
    rr, cc = np.mgrid[:32, :32]
    for i in range(n):
        for _ in range(3):
            r0, c0 = rng.integers(0, 28, 2)
            h, w = rng.integers(4, 16, 2)
            img[i, r0:r0 + h, c0:c0 + w] = rng.uniform(20, 235, 3)
        cy, cx, rad = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(3, 8)
        img[i][(rr - cy) ** 2 + (cc - cx) ** 2 < rad**2] = rng.uniform(20, 235, 3)
    return np.clip(img, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def cifar_test() -> np.ndarray:
    root = real_root()
    if root is None:
        pytest.skip("real CIFAR-10 not available (set VHMN_DATA to the data root holding cifar10/test.npz)")
    try:
        images, _ = load_arrays("cifar10", "test", root, download=False)
    except DatasetNotFoundError as e:
        pytest.skip(f"real CIFAR-10 test split not available: {e}")
    return images[:128]


@pytest.fixture(scope="module", params=["synthetic", "cifar10"])
def images(request) -> np.ndarray:
    if request.param == "synthetic":
        return synthetic(64)
    return request.getfixturevalue("cifar_test")


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


# ----------------------------------------------------------------------------- contracts


def test_module_constants():
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15
    assert set(SEVERITY_PARAMS) == set(CORRUPTIONS)
    assert all(len(v) == 5 for v in SEVERITY_PARAMS.values())
    assert set(SUBSTITUTED) == {"frost", "motion_blur", "snow"}
    assert STOCHASTIC < set(CORRUPTIONS)
    # a few CIFAR-10-C values from make_cifar_c.py, to catch the ImageNet-C values sneaking in
    assert SEVERITY_PARAMS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert SEVERITY_PARAMS["glass_blur"][0] == (0.05, 1, 1)
    assert SEVERITY_PARAMS["jpeg_compression"] == (80, 65, 58, 50, 40)
    assert len(SEVERITY_PARAMS["zoom_blur"][0]) == 7 and len(SEVERITY_PARAMS["zoom_blur"][4]) == 26


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_severity_returns_changed_uint8_batch(images, name):
    x = images[:16]
    before = x.copy()
    for s in SEVERITIES:
        y = corrupt(x, name, s)
        assert y.dtype == np.uint8 and y.shape == x.shape
        changed = (y != x).reshape(len(x), -1).any(axis=1)
        assert changed.all(), f"{name} severity {s} left images {np.flatnonzero(~changed)} unchanged"
    np.testing.assert_array_equal(x, before)  # the input is not modified


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_seed_determinism(name):
    x = synthetic(6, seed=1)
    x[1] = x[0]  # the same image twice in the batch
    a = corrupt(x, name, 3, seed=7)
    np.testing.assert_array_equal(a, corrupt(x, name, 3, seed=7))
    b = corrupt(x, name, 3, seed=8)
    if name in STOCHASTIC:
        assert (a != b).any(), f"{name}: seed has no effect"
        assert (a[0] != a[1]).any(), f"{name}: identical images in a batch got identical draws"
    else:
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a[0], a[1])


def test_empty_batch():
    x = np.zeros((0, 32, 32, 3), np.uint8)
    for name in CORRUPTIONS:
        assert corrupt(x, name, 1).shape == (0, 32, 32, 3)
    assert occlude(x, 1).shape == (0, 32, 32, 3)


# ----------------------------------------------------------------------------- severity ordering

# Adjacent severities whose original parameters do not make the deviation grow:
#  glass_blur 2->3 and 4->5: a larger blur sigma at the same shuffle both blurs and smooths the
#      shuffled pixels back toward the clean image, so the deviation stays about flat;
#  motion_blur 3->4: both use sigma 2; radius 6 -> 8 only adds taps of weight < exp(-18);
#  frost 3->4, 4->5: blends (0.9, 0.4) -> (0.85, 0.4) -> (0.75, 0.45) of image and frost lower the
#      total brightness added, so |c0 x + c1 F - x| shrinks though the frost dominates more;
#  elastic_transform: the random affine shrinks with severity (2.56 -> 0.96 px) while the smooth
#      local field grows, and the deviation decreases from severity 1 to 5.
FLAT_PAIRS = {"glass_blur": {(2, 3), (4, 5)}, "motion_blur": {(3, 4)}}  # allowed within 5 %
FREE_PAIRS = {"frost": {(3, 4), (4, 5)}, "elastic_transform": {(1, 2), (2, 3), (3, 4), (4, 5)}}


def test_severity_increases_deviation(images):
    x = images
    failures = []
    for name in CORRUPTIONS:
        d = [mad(corrupt(x, name, s), x) for s in SEVERITIES]
        for s in range(1, 5):
            pair = (s, s + 1)
            if pair in FREE_PAIRS.get(name, ()):
                continue
            floor = 0.95 * d[s - 1] if pair in FLAT_PAIRS.get(name, ()) else d[s - 1]
            if not d[s] > floor:
                failures.append(f"{name} {pair}: {d[s - 1]:.2f} -> {d[s]:.2f}")
        if name != "elastic_transform" and not d[4] > d[0]:
            failures.append(f"{name}: severity 5 ({d[4]:.2f}) not beyond severity 1 ({d[0]:.2f})")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- closed-form references


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_matches_hsv_value_shift(severity):
    # HSV with V' = min(V + c, 1) and H, S kept is rgb * V' / V (and grey V' for black pixels).
    c = SEVERITY_PARAMS["brightness"][severity - 1]
    x = synthetic(4, seed=2)
    x[0, :2, :2] = 0  # some black pixels
    x[0, 2, :2] = 255  # and saturated ones
    f = x / 255.0
    v = f.max(axis=-1, keepdims=True)
    v2 = np.minimum(v + c, 1)
    ref = np.where(v > 0, f * v2 / np.where(v > 0, v, 1), v2)
    ref = np.where(f == v, v2, ref)  # the max channel is V' itself (c * 255 is often a whole number)
    ref = (np.clip(ref, 0, 1) * 255).astype(np.uint8)  # np.uint8(...) truncation of the original
    y = corrupt(x, "brightness", severity)
    diff = np.abs(y.astype(int) - ref)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    np.testing.assert_array_equal(y[0, :2, :2], ref[0, :2, :2])


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_matches_original_formula(severity):
    c = SEVERITY_PARAMS["contrast"][severity - 1]
    x = synthetic(4, seed=3)
    y = corrupt(x, "contrast", severity)
    for i in range(len(x)):
        f = x[i] / 255.0
        means = f.mean(axis=(0, 1), keepdims=True)
        for r, col in [(0, 0), (5, 17), (31, 31), (16, 3)]:
            ref = np.uint8(np.clip((f[r, col] - means[0, 0]) * c + means[0, 0], 0, 1) * 255)
            assert np.abs(y[i, r, col].astype(int) - ref).max() <= 1


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_noise_std_on_mid_grey(severity):
    c = SEVERITY_PARAMS["gaussian_noise"][severity - 1]
    x = np.full((16, 32, 32, 3), 128, np.uint8)  # 0.5: clipping at >= 5 sigma, negligible
    noise = (corrupt(x, "gaussian_noise", severity).astype(np.float64) - x) / 255
    assert noise.std() == pytest.approx(c, rel=0.02)
    assert abs(noise.mean()) < 0.004  # truncation to uint8 shifts by half a level, 0.002


def test_shot_and_impulse_noise_statistics():
    x = np.full((16, 32, 32, 3), 128, np.uint8)
    p = 128 / 255
    for s in SEVERITIES:
        c = SEVERITY_PARAMS["shot_noise"][s - 1]
        y = corrupt(x, "shot_noise", s).astype(np.float64) / 255
        assert y.std() == pytest.approx(np.sqrt(p / c), rel=0.05)  # Poisson(p c) / c
        amount = SEVERITY_PARAMS["impulse_noise"][s - 1]
        y = corrupt(x, "impulse_noise", s)
        changed = y != 128
        assert changed.mean() == pytest.approx(amount, rel=0.1)  # per channel value, as skimage s&p
        assert set(np.unique(y[changed])) <= {0, 255}
        assert (y[changed] == 255).mean() == pytest.approx(0.5, abs=0.05)


def test_zoom_blur_matches_scipy_clipped_zoom():
    def clipped_zoom(img, z):  # the original helper, one image (H, W, C)
        h = img.shape[0]
        ch = int(np.ceil(h / z))
        top = (h - ch) // 2
        img = ndimage.zoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
        trim = (img.shape[0] - h) // 2
        return img[trim:trim + h, trim:trim + h]

    x = synthetic(3, seed=4)
    for s in (1, 5):
        zs = SEVERITY_PARAMS["zoom_blur"][s - 1]
        ref = []
        for im in x:
            f = (im / 255.0).astype(np.float32)
            out = np.zeros_like(f)
            for z in zs:
                out += clipped_zoom(f, z)
            ref.append((np.clip((f + out) / (len(zs) + 1), 0, 1) * 255).astype(np.uint8))
        assert np.abs(corrupt(x, "zoom_blur", s).astype(int) - np.stack(ref)).max() <= 1


def test_glass_blur_moves_pixels_like_the_original_loop():
    # Severity 1: sigma 0.05 is an identity blur, and each visited pixel (rows/cols 31..2) takes the
    # value of its neighbour at offset (dy, dx) in randint(-1, 1) = {-1, 0}: the original's tuple
    # "swap" of NumPy views copies. Rows and columns 0 and 1 are never visited.
    x = synthetic(4, seed=5)
    y = corrupt(x, "glass_blur", 1)
    np.testing.assert_array_equal(y[:, :2], x[:, :2])
    np.testing.assert_array_equal(y[:, :, :2], x[:, :, :2])
    candidates = np.stack([x[:, 2 + dy:32 + dy, 2 + dx:32 + dx] for dy in (-1, 0) for dx in (-1, 0)])
    matches = (candidates == y[None, :, 2:, 2:]).all(axis=-1).any(axis=0)
    assert matches.all()
    assert (y[:, 2:, 2:] != x[:, 2:, 2:]).any(axis=-1).mean() > 0.3


def test_motion_blur_kernel_is_imagemagick_half_gaussian():
    x = np.zeros((2, 32, 32, 1))
    x[:, 16, 16] = 1.0
    radius, sigma = 6, 2.0
    out = C._motion_blur(x, radius, sigma, np.array([0.0, -90.0]))
    i = np.arange(2 * radius + 1)
    k = np.exp(-(i**2) / (2 * sigma**2))
    k /= k.sum()
    # angle 0: out[r, c] = sum_i k_i x[r, c + i], so the impulse spreads to the left of (16, 16)
    np.testing.assert_allclose(out[0, 16, 16 - i, 0], k)
    # angle -90: offsets (-i, 0) rows, the impulse spreads downwards
    np.testing.assert_allclose(out[1, 16 + i, 16, 0], k)
    assert out.sum() == pytest.approx(2.0)


def test_frost_uses_the_original_blend_weights():
    # Same seed and severity, so the same frost texture F: out = clip(c0 x + c1 F) (truncated).
    x = synthetic(8, seed=6) // 2  # no clipping at 255
    zero = np.zeros_like(x)
    for s in SEVERITIES:
        c0, c1 = SEVERITY_PARAMS["frost"][s - 1]
        f_part = corrupt(zero, "frost", s, seed=3).astype(np.float64)  # floor(c1 F)
        y = corrupt(x, "frost", s, seed=3).astype(np.float64)
        assert np.abs(y - (c0 * x + f_part)).max() <= 1.0 + 1e-9
        assert f_part.mean() / c1 == pytest.approx(0.5 * 255, rel=0.15)  # a bright, frost-like layer


def test_defocus_kernels():
    for c in SEVERITY_PARAMS["defocus_blur"]:
        k = C._disk_kernel(*c)
        assert k.sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(k, k.T, atol=1e-7)
    np.testing.assert_allclose(C._disk_kernel(1.5, 0.1), np.full((3, 3), 1 / 9), atol=1e-6)


def test_fog_plasma_fractal_range():
    p = C._plasma_fractal(np.random.default_rng(0), 5, wibbledecay=2.5)
    assert p.shape == (5, 32, 32)
    np.testing.assert_allclose(p.min(axis=(1, 2)), 0)
    np.testing.assert_allclose(p.max(axis=(1, 2)), 1)
    assert (p[0] != p[1]).any()


def test_pixelate_and_jpeg_match_pillow():
    x = synthetic(3, seed=7)
    for s in (1, 5):
        side = int(32 * SEVERITY_PARAMS["pixelate"][s - 1])
        ref = [np.asarray(Image.fromarray(im).resize((side, side), Image.BOX).resize((32, 32), Image.BOX)) for im in x]
        np.testing.assert_array_equal(corrupt(x, "pixelate", s), np.stack(ref))
        ref = []
        for im in x:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, "JPEG", quality=SEVERITY_PARAMS["jpeg_compression"][s - 1])
            ref.append(np.asarray(Image.open(buf)))
        np.testing.assert_array_equal(corrupt(x, "jpeg_compression", s), np.stack(ref))


def test_elastic_transform_keeps_constant_images_and_mean_colour():
    const = np.full((4, 32, 32, 3), 77, np.uint8)
    x = synthetic(16, seed=8)
    for s in SEVERITIES:
        assert np.abs(corrupt(const, "elastic_transform", s).astype(int) - 77).max() <= 1
        y = corrupt(x, "elastic_transform", s)
        assert np.abs(y.mean(axis=(0, 1, 2)) - x.mean(axis=(0, 1, 2))).max() < 3


# ----------------------------------------------------------------------------- occlusion


@pytest.mark.parametrize("severity", SEVERITIES)
def test_occlude_sets_one_grey_square(severity):
    side = OCCLUSION_SIDES[severity - 1]
    x = synthetic(24, seed=9)
    x[x == 128] = 127  # so that "== 128" marks exactly the patch
    y = occlude(x, severity, seed=1)
    tops = set()
    for i in range(len(x)):
        grey = (y[i] == 128).all(axis=-1)
        rows, cols = np.nonzero(grey)
        assert grey.sum() == side * side
        assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
        outside = ~grey
        np.testing.assert_array_equal(y[i][outside], x[i][outside])
        assert not (y[i][outside] == 128).all(axis=-1).any()
        tops.add((rows.min(), cols.min()))
    assert len(tops) > 1  # a random position per image
    np.testing.assert_array_equal(y, occlude(x, severity, seed=1))
    assert (y != occlude(x, severity, seed=2)).any()


# ----------------------------------------------------------------------------- bad input


def test_bad_images_raise_helpful_errors():
    import torch

    good = np.zeros((2, 32, 32, 3), np.uint8)
    bad = [
        good.astype(np.float32) / 255,  # float
        np.zeros((2, 3, 32, 32), np.uint8),  # channels first
        good[0],  # single image
        np.zeros((2, 28, 28, 3), np.uint8),  # wrong size
        torch.zeros(2, 3, 32, 32),  # a torch batch
        good.tolist(),  # a list
    ]
    for b in bad:
        for fn in (lambda v: corrupt(v, "fog", 1), lambda v: occlude(v, 1)):
            with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\).*uint8") as e:
                fn(b)
            msg = str(e.value)
            assert "got" in msg and "permute(0, 2, 3, 1)" in msg
    with pytest.raises(ValueError, match=r"shape \(2, 3, 32, 32\) and dtype float32"):
        corrupt(np.zeros((2, 3, 32, 32), np.float32), "fog", 1)
    with pytest.raises(ValueError, match="torch.Tensor"):
        corrupt(torch.zeros(2, 3, 32, 32), "fog", 1)


def test_bad_name_severity_seed():
    x = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown corruption 'gaussian_blur'; known: gaussian_noise, shot_noise") as e:
        corrupt(x, "gaussian_blur", 1)
    assert all(n in str(e.value) for n in CORRUPTIONS)
    for s in (0, 6, 2.0, True, "3", None):
        with pytest.raises(ValueError, match="severity must be an integer in 1..5"):
            corrupt(x, "contrast", s)
        with pytest.raises(ValueError, match="severity must be an integer in 1..5"):
            occlude(x, s)
    assert corrupt(x, "contrast", np.int64(2)).shape == x.shape
    for seed in (-1, 1.5, None):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            corrupt(x, "fog", 1, seed=seed)
