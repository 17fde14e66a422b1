"""Choosing the resized image size (smart_resize) and the bicubic resampler itself.

Legend: H, W input height/width in pixels; h, w output height/width; C channels.

`smart_resize` picks an output size whose sides are multiples of `factor` (patch 14 x merge 2 = 28) and whose
area lies inside [min_pixels, max_pixels], keeping the aspect ratio roughly. Two published rules exist:
  - `smart_resize`: transformers >= 4.52 (the default here): round, then floor-with-clamp above the budget,
    ceil below it. Tiny sides (< 14) round to 0 and are rescued by the ceil branch.
  - `smart_resize_qwen_vl_utils`: qwen-vl-utils 0.0.8 .. 0.0.14: the first rounding is clamped to >= factor,
    the floor branch is not, so it can return a 0 side (31 x 639 with max_pixels = 20*28*28 -> (0, 560)).
Both use Python's round-half-to-even and float64 arithmetic on the ORIGINAL size, in the order written.

`resize_bicubic` is Pillow 12's antialiased bicubic (libImaging/Resample.c) written out in numpy, bit-exact:
separable passes, the kernel support widened by the shrink factor, weights normalised in float64 then turned
into 22-bit fixed point, integer accumulation with a +0.5 bias, floor shift and clip to 0..255 after each pass.
"""

import math

import numpy as np

# Sides and budgets above this are refused: with sides <= 2**24 every product h*w (<= 2**48) and every
# intermediate of the rule is an exact float64 / int64 value, so a C or Rust port computes the same numbers.
MAX_SIDE = 2**24
MAX_BUDGET = 2**48
MAX_ASPECT_RATIO = 200


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _check_resize_args(height, width, factor, min_pixels, max_pixels):
    height = _check_int("height", height, 1, MAX_SIDE)
    width = _check_int("width", width, 1, MAX_SIDE)
    factor = _check_int("factor", factor, 1, MAX_SIDE)
    min_pixels = _check_int("min_pixels", min_pixels, 1, MAX_BUDGET)
    max_pixels = _check_int("max_pixels", max_pixels, 1, MAX_BUDGET)
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must be <= max_pixels ({max_pixels})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:  # exactly 200 passes, as in both references
        raise ValueError(
            f"aspect ratio of height={height}, width={width} is {ratio:.6g}, must be <= {MAX_ASPECT_RATIO}"
        )
    return height, width, factor, min_pixels, max_pixels


def smart_resize(height, width, *, factor=28, min_pixels=3136, max_pixels=12845056):
    """Output size (h, w) for an H x W image, transformers >= 4.52 rule (the default).

    h, w are multiples of `factor` and >= factor. The area is brought under max_pixels (except when a thin
    side is clamped to factor) or over min_pixels (the ceil can overshoot max_pixels when the two budgets are
    close: 1 x 2 with both 785 gives (28, 56)). Raises ValueError for sides outside [1, 2**24], ratio > 200,
    min_pixels > max_pixels; TypeError for non-int arguments.
    """
    height, width, factor, min_pixels, max_pixels = _check_resize_args(height, width, factor, min_pixels, max_pixels)
    h = round(height / factor) * factor  # Python round: half to even (42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2)
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        # the clamp keeps a thin image from collapsing to a 0 side
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def smart_resize_qwen_vl_utils(height, width, *, factor=28, min_pixels=3136, max_pixels=12845056):
    """Output size (h, w), qwen-vl-utils 0.0.8 .. 0.0.14 rule (named variant).

    Differs from `smart_resize` in two places: the first rounding is clamped to >= factor (so 10 x 1000 stays
    thin: (28, 1008) instead of (28, 560)), and the max_pixels branch is not clamped (so 31 x 639 with
    max_pixels = 15680 gives (0, 560), a size no image can have; HF gives (28, 560)).
    """
    height, width, factor, min_pixels, max_pixels = _check_resize_args(height, width, factor, min_pixels, max_pixels)
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


# ---------------------------------------------------------------------------------------------------------
# Bicubic resampling, Pillow 12 (libImaging/Resample.c, Image.resize with BICUBIC and reducing_gap=None)

PRECISION_BITS = 32 - 8 - 2  # 22 fractional bits; 2 spare bits because weights can sum above 1 or go negative
BICUBIC_SUPPORT = 2.0


def _bicubic_kernel(x):
    """Keys cubic with a = -0.5, evaluated in the same operation order as Pillow (bit-exact float64)."""
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def bicubic_coefficients(in_size, out_size):
    """Fixed-point taps for one axis: (first int64 [out], weights int32 [out, K]); K = taps per output sample.

    Output sample i reads inputs first[i] .. first[i] + K - 1 (weights past the window are 0 and the index is
    clamped, so they read a valid pixel and add nothing).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # widen the kernel when shrinking: this is the antialiasing
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C casts (int)(v + 0.5) truncate toward zero; a negative start is clamped to 0 either way
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    count = stop - first
    taps = np.arange(ksize)
    valid = taps[None, :] < count[:, None]
    weights = _bicubic_kernel((taps[None, :] + first[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(valid, weights, 0.0)
    total = np.zeros(out_size)
    for t in range(ksize):  # left-to-right sum as in C (numpy's pairwise sum may round differently)
        total = total + weights[:, t]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    # round half away from zero into 22-bit fixed point, as normalize_coeffs_8bpc does
    fixed = np.trunc(weights * (1 << PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5)).astype(np.int32)
    return first, fixed


def _resample_axis(image, out_size, axis):
    """One pass along `axis` (0 rows, 1 columns) of a uint8 [H, W, C] image -> uint8, that axis resized."""
    in_size = image.shape[axis]
    first, fixed = bicubic_coefficients(in_size, out_size)
    ksize = fixed.shape[1]
    acc = np.full(image.shape[:axis] + (out_size,) + image.shape[axis + 1 :], 1 << (PRECISION_BITS - 1), np.int32)
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    for t in range(ksize):
        index = np.minimum(first + t, in_size - 1)
        weight = fixed[:, t]
        if not weight.any():
            continue
        taken = np.take(image, index, axis=axis).astype(np.int32)
        acc += taken * weight.reshape(shape)
    # floor shift then clip, the clip8 lookup of Pillow
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


def resize_bicubic(image, size):
    """Resize uint8 [H, W, C] to uint8 [h, w, C] (size = (h, w)) exactly as Pillow 12 BICUBIC does.

    Pass order is Pillow 12's: horizontal then vertical, except when the input is more than 100 times taller
    than wide and the height shrinks, where Image.resize runs the vertical pass first. A pass whose size does
    not change is skipped (so it neither rounds nor clips), and an unchanged size returns a copy.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy uint8 array [H, W, C], got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be uint8 [H, W, C] with H, W >= 1, got {image.dtype} {tuple(image.shape)}")
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise TypeError(f"size must be a pair (h, w), got {size!r}")
    out_h = _check_int("size[0] (height)", size[0], 1, MAX_SIDE)
    out_w = _check_int("size[1] (width)", size[1], 1, MAX_SIDE)
    in_h, in_w = image.shape[:2]
    vertical_first = in_h > in_w * 100 and out_h < in_h
    out = image
    for axis in (0, 1) if vertical_first else (1, 0):
        target = out_h if axis == 0 else out_w
        if target != out.shape[axis]:
            out = _resample_axis(out, target, axis)
    return out.copy() if out is image else out
