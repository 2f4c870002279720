"""CIFAR-10-C-style common corruptions, regenerated locally with fixed seeds.

The 15 corruption types and their five severity levels follow

    D. Hendrycks and T. Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions
    and Perturbations", ICLR 2019 (arXiv:1903.12261),

with the CIFAR-specific severity parameters of the authors' generation script
``ImageNet-C/create_c/make_cifar_c.py`` in https://github.com/hendrycks/robustness (see
:data:`SEVERITY_PARAMS`). **These images are regenerated here, not the released CIFAR-10-C files**:
the random draws differ from the released ones, and the original's dependencies (scikit-image,
OpenCV, ImageMagick through Wand, and frost photographs) are replaced by NumPy / SciPy / Pillow /
Matplotlib code. Accuracies measured on these images are therefore comparable in kind, not
digit for digit, with numbers reported on the released CIFAR-10-C.

Faithfulness, type by type:

* Exact re-implementations of the original formulas (up to floating-point details and the random
  draws): gaussian_noise, shot_noise, impulse_noise (salt & pepper, per channel value, as
  ``skimage.util.random_noise(mode="s&p")``), defocus_blur (the original's anti-aliased disk
  kernel), glass_blur, zoom_blur, fog (the original's diamond-square plasma fractal), brightness
  (HSV value shift), contrast, elastic_transform (random affine + smoothed displacement field;
  OpenCV's fixed-point bilinear weights in warpAffine become exact ones),
  pixelate (Pillow BOX resampling) and jpeg_compression (Pillow JPEG).
* Approximations, listed in :data:`SUBSTITUTED`: motion_blur and snow (ImageMagick's motion blur
  re-implemented as a one-sided, Gaussian-weighted line kernel with edge clamping) and frost
  (a procedural, seeded frost texture instead of the frost photographs).

Float results are converted to uint8 by truncation, as ``np.uint8(...)`` did in the original;
motion_blur's output is rounded, as ImageMagick's 8-bit PNG output was.

Randomness comes from a :class:`numpy.random.Generator` seeded with ``(seed, crc32(name),
severity)`` (never the global RNG), drawn for the whole batch at once: each image gets its own
draws, and the result is a function of ``(images, name, severity, seed)``. Corrupting a subset of
a batch therefore gives different noise than subsetting the corrupted batch; to reproduce a set,
corrupt the same array in one call.

:func:`occlude` (a grey square patch) is our own addition and not part of CIFAR-10-C.
"""
from __future__ import annotations

import io
import zlib
from functools import lru_cache

import numpy as np
from scipy import ndimage

__all__ = [
    "CORRUPTIONS",
    "STOCHASTIC",
    "SUBSTITUTED",
    "SEVERITY_PARAMS",
    "OCCLUSION_SIDES",
    "corrupt",
    "occlude",
]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)

#: The types whose output depends on ``seed`` (the others are deterministic functions of the image).
STOCHASTIC: frozenset[str] = frozenset({
    "gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur",
    "snow", "frost", "fog", "elastic_transform",
})

#: Types that approximate, rather than re-implement, the original generation procedure.
SUBSTITUTED: dict[str, str] = {
    "motion_blur": (
        "ImageMagick's MotionBlurImage (via Wand) re-implemented in NumPy: a one-sided line kernel of "
        "2*ceil(radius)+1 taps with half-Gaussian weights exp(-i^2 / (2 sigma^2)), taps at the rounded "
        "offsets (i cos a, i sin a) for a random angle a in [-45, 45) degrees, edge pixels clamped; "
        "output rounded to uint8 like ImageMagick's 8-bit PNG. Not bit-identical to ImageMagick."
    ),
    "snow": (
        "the snow layer's ImageMagick motion blur is replaced by the same NumPy line-kernel motion blur "
        "as motion_blur (angle in [-135, -45) degrees); everything else follows the original."
    ),
    "frost": (
        "the original blends a random crop of one of several frost photographs (not available here); "
        "we blend, with the original's weights, a procedural seeded frost texture: a cloudy "
        "low-frequency field plus bright, slightly blurred crystal streaks with side branches and fine "
        "grain, tinted bluish white (mean intensity about 0.5)."
    ),
}

#: Severity parameters (levels 1..5) copied from make_cifar_c.py (the CIFAR-10-C settings).
SEVERITY_PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),                      # std of N(0, c) on [0, 1]
    "shot_noise": (500, 250, 100, 75, 50),                                  # Poisson(x c) / c
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),                        # s&p amount
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias blur
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, max_delta, iterations
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),            # radius, sigma
    "zoom_blur": tuple(np.arange(1, stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)),  # zoom factors
    "snow": (                                                               # loc, scale, zoom, threshold, radius, sigma, blend
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),   # image weight, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),          # strength, wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),                              # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                                # (x - mean) c + mean
    "elastic_transform": tuple(                                             # alpha, sigma, affine (pixels)
        (32 * a, 32 * s, 32 * f)
        for a, s, f in ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
    ),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                              # downscale factor (BOX)
    "jpeg_compression": (80, 65, 58, 50, 40),                               # JPEG quality
}

#: Side lengths (pixels) of the grey square of :func:`occlude`, severities 1..5 (our own addition).
OCCLUSION_SIDES: tuple[int, ...] = (6, 9, 12, 15, 18)

_SIZE = 32
_TORCH_HINT = (
    "torch tensors in (N, 3, H, W) float in [0, 1]: (x * 255).round().byte().permute(0, 2, 3, 1).numpy(); "
    "NumPy floats in [0, 1]: (x * 255).round().astype(np.uint8); a single image: images[None]"
)


# ----------------------------------------------------------------------------- validation


def _describe(images) -> str:
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    kind = type(images).__module__.split(".")[0] + "." + type(images).__name__
    if shape is None:
        return kind
    return f"{kind} of shape {tuple(shape)} and dtype {dtype}"


def _check_images(images) -> np.ndarray:
    ok = (
        isinstance(images, np.ndarray)
        and images.dtype == np.uint8
        and images.ndim == 4
        and images.shape[1:] == (_SIZE, _SIZE, 3)
    )
    if not ok:
        raise ValueError(
            f"images must be a NumPy uint8 array of shape (N, {_SIZE}, {_SIZE}, 3) (RGB, channels last, "
            f"the layout of vhmn.data.load_arrays); got {_describe(images)}. To convert: {_TORCH_HINT}"
        )
    return images


def _check_severity(severity) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5; got {severity!r}")
    return int(severity)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    return int(seed)


def _rng(seed: int, name: str, severity: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode()), severity]))


# ----------------------------------------------------------------------------- helpers


def _to_uint8(x01: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 by truncation, as ``np.uint8(np.clip(x, 0, 1) * 255)`` in the original."""
    return (np.clip(x01, 0, 1) * 255).astype(np.uint8)


def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian over the two spatial axes of (N, H, W[, C]) (defaults: nearest, 4 sigma)."""
    sig = (0, sigma, sigma) + (0,) * (x.ndim - 3)
    return ndimage.gaussian_filter(x, sigma=sig, mode=mode, truncate=truncate)


def _reflect_index(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    if mode == "mirror":  # ... c b | a b c d | c b ...  (OpenCV BORDER_REFLECT_101, scipy 'mirror')
        period = 2 * n - 2
        i = np.mod(i, period)
        return np.where(i >= n, period - i, i)
    if mode == "reflect":  # ... b a | a b c d | d c ...  (scipy/skimage 'reflect')
        i = np.mod(i, 2 * n)
        return np.where(i >= n, 2 * n - 1 - i, i)
    raise ValueError(mode)


def _bilinear(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """Bilinear samples of img (N, H, W, C) at per-image coordinates rows, cols (N, H', W')."""
    n, h, w, _ = img.shape
    r0 = np.floor(rows)
    c0 = np.floor(cols)
    fr = (rows - r0)[..., None].astype(img.dtype)
    fc = (cols - c0)[..., None].astype(img.dtype)
    r0 = r0.astype(np.int64)
    c0 = c0.astype(np.int64)
    ra, rb = _reflect_index(r0, h, mode), _reflect_index(r0 + 1, h, mode)
    ca, cb = _reflect_index(c0, w, mode), _reflect_index(c0 + 1, w, mode)
    b = np.arange(n).reshape((n,) + (1,) * (rows.ndim - 1))
    top = img[b, ra, ca] * (1 - fc) + img[b, ra, cb] * fc
    bottom = img[b, rb, ca] * (1 - fc) + img[b, rb, cb] * fc
    return top * (1 - fr) + bottom * fr


@lru_cache(maxsize=None)
def _zoom_matrix(zoom_factor: float, size: int = _SIZE) -> np.ndarray:
    """The (size, size) matrix of the original ``clipped_zoom`` along one axis.

    clipped_zoom crops the central ceil(size / z) rows, zooms them with scipy.ndimage.zoom
    (order=1, separable) and trims the centre back to ``size``; applying this matrix to the rows
    and to the columns reproduces it.
    """
    ch = int(np.ceil(size / zoom_factor))
    top = (size - ch) // 2
    zoomed = ndimage.zoom(np.eye(size)[top:top + ch], (zoom_factor, 1), order=1)
    trim = (zoomed.shape[0] - size) // 2
    return np.ascontiguousarray(zoomed[trim:trim + size])


def _clipped_zoom(x: np.ndarray, zoom_factor: float) -> np.ndarray:
    """clipped_zoom of the original, for a batch (N, H, W[, C])."""
    m = _zoom_matrix(float(zoom_factor)).astype(x.dtype)
    y = np.tensordot(m, x, axes=([1], [1]))          # (H', N, W, ...): rows zoomed
    y = np.tensordot(m, y, axes=([1], [2]))          # (W', H', N, ...): columns zoomed
    return np.moveaxis(np.moveaxis(y, 2, 0), 1, 2)   # (N, H', W', ...)


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick-style motion blur of x (N, H, W[, C]), one angle per image (see SUBSTITUTED).

    Output pixel p is sum_i k_i x[p + o_i] with k_i proportional to exp(-i^2 / (2 sigma^2)),
    i = 0 .. 2 ceil(radius), o_i = (ceil(i sin a - 0.5), ceil(i cos a - 0.5)) (row, column),
    coordinates clamped to the image (ImageMagick's default 'edge' virtual pixels).
    """
    n, h, w = x.shape[:3]
    width = int(2 * np.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i**2) / (2 * sigma**2))
    k /= k.sum()
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))[:, None]
    dcol = np.ceil(i * np.cos(a) - 0.5).astype(np.int64)   # (N, width)
    drow = np.ceil(i * np.sin(a) - 0.5).astype(np.int64)
    b = np.arange(n)[:, None, None]
    rr = np.arange(h)[None, :, None]
    cc = np.arange(w)[None, None, :]
    out = np.zeros(x.shape, dtype=np.float64)
    for j in range(width):
        rows = np.clip(rr + drow[:, j, None, None], 0, h - 1)
        cols = np.clip(cc + dcol[:, j, None, None], 0, w - 1)
        out += k[j] * x[b, rows, cols]
    return out


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The original ``disk``: an aliased disk on a 17x17 grid, normalised, then a 3x3 Gaussian
    blur with sigma ``alias_blur`` (cv2.GaussianBlur); cropped to its non-zero support."""
    if radius > 8:  # not reached with the CIFAR parameters (radius <= 1.5)
        raise NotImplementedError("disk radius > 8")
    L = np.arange(-8, 9)
    X, Y = np.meshgrid(L, L)
    d = ((X**2 + Y**2) <= radius**2).astype(np.float64)
    d /= d.sum()
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur**2))
    g /= g.sum()
    d = ndimage.correlate(d, np.outer(g, g), mode="mirror")
    nz = np.nonzero(d)
    return d[nz[0].min():nz[0].max() + 1, nz[1].min():nz[1].max() + 1].astype(np.float32)


def _plasma_fractal(rng: np.random.Generator, n: int, mapsize: int = _SIZE, wibbledecay: float = 3) -> np.ndarray:
    """The original diamond-square plasma fractal (FLHerne/mapgen), for n maps at once, in [0, 1]."""
    assert mapsize & (mapsize - 1) == 0
    a = np.zeros((n, mapsize, mapsize), dtype=np.float64)
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(arr):
        return arr / 4 + wibble * rng.uniform(-wibble, wibble, arr.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: centre = mean of the four corners + wibble
        corner = a[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        sq = corner + np.roll(corner, shift=-1, axis=1)
        sq += np.roll(sq, shift=-1, axis=2)
        a[:, half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(sq)
        # diamonds
        dr = a[:, half:mapsize:stepsize, half:mapsize:stepsize]
        ul = a[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        lt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2)
        a[:, 0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(lt)
        tt = dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1)
        a[:, half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(tt)
        stepsize //= 2
        wibble /= wibbledecay
    a -= a.min(axis=(1, 2), keepdims=True)
    return a / a.max(axis=(1, 2), keepdims=True)


def _frost_texture(rng: np.random.Generator, n: int, size: int = _SIZE) -> np.ndarray:
    """Procedural frost (N, size, size, 3) in [0, 255]: our stand-in for the frost photographs."""
    # cloudy low-frequency field, standardised per image
    cloud = _gaussian(rng.standard_normal((n, size, size)), 3.0, mode="wrap")
    cloud = (cloud - cloud.mean(axis=(1, 2), keepdims=True)) / (cloud.std(axis=(1, 2), keepdims=True) + 1e-8)
    # crystal streaks: straight needles, each with two side branches at +-60 degrees
    n_main, steps = 14, 29
    y0 = rng.uniform(-2, size + 2, (n, n_main))
    x0 = rng.uniform(-2, size + 2, (n, n_main))
    ang = rng.uniform(0, np.pi, (n, n_main))
    length = rng.uniform(4, 14, (n, n_main))
    at = rng.uniform(0.2, 0.8, (n, n_main, 2)) * length[..., None]
    by0 = y0[..., None] + at * np.sin(ang)[..., None]
    bx0 = x0[..., None] + at * np.cos(ang)[..., None]
    bang = ang[..., None] + np.array([np.pi / 3, -np.pi / 3]) * rng.choice([-1, 1], (n, n_main, 1))
    blen = length[..., None] * rng.uniform(0.25, 0.5, (n, n_main, 2))
    sy = np.concatenate([y0, by0.reshape(n, -1)], axis=1)          # (N, S) segment starts ...
    sx = np.concatenate([x0, bx0.reshape(n, -1)], axis=1)
    sa = np.concatenate([ang, bang.reshape(n, -1)], axis=1)
    sl = np.concatenate([length, blen.reshape(n, -1)], axis=1)
    bright = rng.uniform(0.5, 1.0, sl.shape)
    t = np.linspace(0, 1, steps)
    py = np.rint(sy[..., None] + t * sl[..., None] * np.sin(sa)[..., None]).astype(np.int64)
    px = np.rint(sx[..., None] + t * sl[..., None] * np.cos(sa)[..., None]).astype(np.int64)
    inside = (py >= 0) & (py < size) & (px >= 0) & (px < size)
    flat = (np.arange(n)[:, None, None] * size + py) * size + px
    w = np.broadcast_to(bright[..., None], flat.shape)
    streak = np.bincount(flat[inside], weights=w[inside] / 3, minlength=n * size * size).reshape(n, size, size)
    streak = _gaussian(np.minimum(streak, 1.0), 0.5)
    streak /= streak.max(axis=(1, 2), keepdims=True) + 1e-8
    grain = rng.normal(0, 0.05, (n, size, size))
    frost = np.clip(0.5 + 0.08 * cloud + 0.5 * streak + grain, 0, 1)
    tint = np.array([0.88, 0.94, 1.0])
    return frost[..., None] * tint * 255


# ----------------------------------------------------------------------------- corruptions
# Each takes (x uint8 (N, 32, 32, 3), c = severity parameters, rng) and returns uint8.


def _gaussian_noise(x, c, rng):
    x = x / 255.0
    return _to_uint8(x + rng.normal(0.0, c, x.shape))


def _shot_noise(x, c, rng):
    return _to_uint8(rng.poisson(x / 255.0 * c) / c)


def _impulse_noise(x, c, rng):
    # skimage.util.random_noise(mode='s&p', amount=c, salt_vs_pepper=0.5): each channel value is
    # replaced with probability c, by 1 (salt) or 0 (pepper) with equal odds.
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    out = x.copy()
    out[flipped & salted] = 255
    out[flipped & ~salted] = 0
    return out


def _defocus_blur(x, c, rng):
    k = _disk_kernel(*c)
    out = ndimage.correlate(x.astype(np.float32) / 255, k[None, :, :, None], mode="mirror")
    return _to_uint8(out)


def _glass_blur(x, c, rng):
    sigma, delta, iterations = c
    x = (_gaussian(x / 255.0, sigma) * 255).astype(np.uint8)
    n = x.shape[0]
    b = np.arange(n)
    positions = range(_SIZE - delta, delta, -1)
    # The original "swap" x[h, w], x[h', w'] = x[h', w'], x[h, w] acts on NumPy views and so copies
    # x[h', w'] into x[h, w] (leaving x[h', w'] as it was); the visits are sequential, as here,
    # with dx, dy = randint(-delta, delta) drawn per visit (and here per image).
    for _ in range(iterations):
        for h in positions:
            offsets = rng.integers(-delta, delta, size=(len(positions), 2, n))
            for (dx, dy), w in zip(offsets, positions):
                x[:, h, w] = x[b, h + dy, w + dx]
    return _to_uint8(_gaussian(x / 255.0, sigma))


def _motion_blur_type(x, c, rng):
    radius, sigma = c
    angles = rng.uniform(-45, 45, x.shape[0])
    out = _motion_blur(x.astype(np.float64), radius, sigma, angles)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _zoom_blur(x, c, rng):
    x = (x / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    for z in c:
        out += _clipped_zoom(x, z)
    return _to_uint8((x + out) / (len(c) + 1))


def _snow(x, c, rng):
    loc, scale, zoom, threshold, radius, sigma, blend = c
    n = x.shape[0]
    x = x.astype(np.float32) / 255
    layer = rng.normal(loc, scale, (n, _SIZE, _SIZE))
    layer = _clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)                  # the PNG handed to ImageMagick
    angles = rng.uniform(-135, -45, n)
    layer = np.clip(np.rint(_motion_blur(layer.astype(np.float64), radius, sigma, angles)), 0, 255) / 255.0
    layer = layer[..., None]
    grey = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]   # cv2 RGB2GRAY
    x = blend * x + (1 - blend) * np.maximum(x, grey * 1.5 + 0.5)
    return _to_uint8(x + layer + np.rot90(layer, k=2, axes=(1, 2)))


def _frost(x, c, rng):
    frost = _frost_texture(rng, x.shape[0])
    return np.clip(c[0] * x + c[1] * frost, 0, 255).astype(np.uint8)


def _fog(x, c, rng):
    strength, decay = c
    x = x / 255.0
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + strength * _plasma_fractal(rng, x.shape[0], wibbledecay=decay)[..., None]
    return _to_uint8(x * max_val / (max_val + strength))


def _brightness(x, c, rng):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(x / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _to_uint8(hsv_to_rgb(hsv))


def _contrast(x, c, rng):
    x = x / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return _to_uint8((x - means) * c + means)


def _elastic_transform(x, c, rng):
    alpha, sigma, affine = c
    n = x.shape[0]
    img = x.astype(np.float32) / 255
    # random affine (cv2.getAffineTransform + warpAffine, bilinear, BORDER_REFLECT_101)
    centre, half = _SIZE // 2, _SIZE // 3
    pts1 = np.array([[centre + half, centre + half], [centre + half, centre - half], [centre - half, centre - half]],
                    dtype=np.float64)                                      # (x, y) points
    pts2 = pts1 + rng.uniform(-affine, affine, size=(n, 3, 2))
    src_h = np.concatenate([pts1, np.ones((3, 1))], axis=1)                 # rows [x y 1]
    m = np.linalg.solve(src_h[None], pts2).transpose(0, 2, 1)              # (N, 2, 3): [x' y'] = M [x y 1]
    inv = np.linalg.inv(m[:, :, :2])
    rows, cols = np.meshgrid(np.arange(_SIZE, dtype=np.float64), np.arange(_SIZE, dtype=np.float64), indexing="ij")
    dst = np.stack([cols, rows])[None] - m[:, :, 2, None, None]            # (N, 2, H, W) as (x, y)
    src = np.einsum("nij,njhw->nihw", inv, dst)
    img = _bilinear(img, src[:, 1], src[:, 0], mode="mirror")
    # smoothed random displacement field, sampled with scipy map_coordinates(order=1, mode='reflect')
    dx = _gaussian(rng.uniform(-1, 1, (n, _SIZE, _SIZE)), sigma, mode="reflect", truncate=3) * alpha
    dy = _gaussian(rng.uniform(-1, 1, (n, _SIZE, _SIZE)), sigma, mode="reflect", truncate=3) * alpha
    out = _bilinear(img, rows + dy.astype(np.float32), cols + dx.astype(np.float32), mode="reflect")
    return _to_uint8(out)


def _pixelate(x, c, rng):
    from PIL import Image

    s = int(_SIZE * c)
    out = np.empty_like(x)
    for i, im in enumerate(x):
        small = Image.fromarray(im).resize((s, s), Image.BOX)
        out[i] = np.asarray(small.resize((_SIZE, _SIZE), Image.BOX))
    return out


def _jpeg_compression(x, c, rng):
    from PIL import Image

    out = np.empty_like(x)
    for i, im in enumerate(x):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=c)
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out


_FUNCS = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_type,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
assert tuple(_FUNCS) == CORRUPTIONS


# ----------------------------------------------------------------------------- public API


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one CIFAR-10-C corruption at one severity to a batch of images.

    Parameters
    ----------
    images : uint8 array (N, 32, 32, 3), RGB, channels last (``vhmn.data.load_arrays`` layout).
    name : one of :data:`CORRUPTIONS`.
    severity : 1..5, with the parameters of make_cifar_c.py (:data:`SEVERITY_PARAMS`).
    seed : non-negative integer; the random draws come from a Generator seeded with
        ``(seed, crc32(name), severity)``. Ignored by the deterministic types (those not in
        :data:`STOCHASTIC`).

    Returns
    -------
    A new uint8 array of the same shape. Regenerated, not the released CIFAR-10-C images; motion_blur,
    snow and frost are approximations (:data:`SUBSTITUTED`).
    """
    images = _check_images(images)
    if name not in _FUNCS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    severity = _check_severity(severity)
    seed = _check_seed(seed)
    if images.shape[0] == 0:
        return images.copy()
    out = _FUNCS[name](images, SEVERITY_PARAMS[name][severity - 1], _rng(seed, name, severity))
    assert out.dtype == np.uint8 and out.shape == images.shape
    return out


def occlude(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Grey out one random square per image (our own addition, not part of CIFAR-10-C).

    The square has side :data:`OCCLUSION_SIDES` ``[severity - 1]`` (6, 9, 12, 15, 18 pixels), lies
    entirely inside the image at a uniformly random position (drawn per image from a Generator
    seeded with ``(seed, crc32("occlude"), severity)``), and all its pixels are set to 128 in every
    channel. Returns a new uint8 array of the same shape.
    """
    images = _check_images(images)
    severity = _check_severity(severity)
    seed = _check_seed(seed)
    side = OCCLUSION_SIDES[severity - 1]
    n = images.shape[0]
    rng = _rng(seed, "occlude", severity)
    top = rng.integers(0, _SIZE - side + 1, n)
    left = rng.integers(0, _SIZE - side + 1, n)
    ar = np.arange(_SIZE)
    in_rows = (ar >= top[:, None]) & (ar < top[:, None] + side)
    in_cols = (ar >= left[:, None]) & (ar < left[:, None] + side)
    out = images.copy()
    out[in_rows[:, :, None] & in_cols[:, None, :]] = 128
    return out
