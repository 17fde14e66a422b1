"""smart_resize (both rules) and resize_bicubic against hand vectors, transformers and Pillow 12."""

import math
import time

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image
from qwen25vl.spec.resize import (
    MAX_SIDE,
    PRECISION_BITS,
    bicubic_coefficients,
    resize_bicubic,
    smart_resize,
    smart_resize_qwen_vl_utils,
)

# image_processing_qwen2_vl needs torchvision (not installed); its smart_resize is copied verbatim into the PIL module
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

CKPT = dict(min_pixels=3136, max_pixels=12845056)  # hub preprocessor_config.json of Qwen2.5-VL
HF_CLASS = dict(min_pixels=3136, max_pixels=1003520)  # transformers' class default
VIDEO = dict(min_pixels=100352, max_pixels=602112)  # transformers' video processor default, per frame

# hf_reference.md §1.4: (h, w) -> (HF ckpt budget, HF class default, qwen-vl-utils image default)
VECTORS = [
    ((1080, 1920), (1092, 1932), (728, 1316), (1092, 1932)),
    ((480, 640), (476, 644), (476, 644), (476, 644)),
    ((224, 224), (224, 224), (224, 224), (224, 224)),
    ((20, 20), (56, 56), (56, 56), (56, 56)),
    ((1, 1), (56, 56), (56, 56), (56, 56)),
    ((42, 42), (56, 56), (56, 56), (56, 56)),  # 42/28 = 1.5 rounds to 2 (half to even)
    ((70, 70), (56, 56), (56, 56), (56, 56)),  # 70/28 = 2.5 rounds to 2 (half to even)
    ((98, 98), (112, 112), (112, 112), (112, 112)),  # 3.5 rounds to 4
    ((10, 1000), (28, 560), (28, 560), (28, 1008)),
    ((13, 2600), (28, 812), (28, 812), (28, 2604)),
    ((10, 2000), (28, 812), (28, 812), (28, 1988)),  # ratio exactly 200 passes
    ((4000, 3000), (4004, 2996), (1148, 840), (4004, 2996)),
    ((8000, 6000), (4116, 3080), (1148, 840), (4116, 3080)),
    ((100, 20000), (112, 19992), (56, 14140), (112, 19992)),
]


@pytest.mark.parametrize("size, ckpt, hf_class, qvu", VECTORS, ids=[f"{h}x{w}" for (h, w), *_ in VECTORS])
def test_reference_vectors(size, ckpt, hf_class, qvu):
    assert smart_resize(*size, **CKPT) == ckpt
    assert smart_resize(*size, **HF_CLASS) == hf_class
    assert smart_resize_qwen_vl_utils(*size, **CKPT) == qvu


@pytest.mark.parametrize(
    "size, expected",
    [((1080, 1920), (560, 1008)), ((720, 1280), (560, 1008)), ((360, 640), (364, 644)), ((240, 320), (280, 392))],
)
def test_video_budget_vectors(size, expected):
    assert smart_resize(*size, **VIDEO) == expected
    assert smart_resize_qwen_vl_utils(*size, **VIDEO) == expected


def test_variants_differ_zero_side_bug():
    # QwenLM/Qwen3-VL PR #1145: qwen-vl-utils returns a 0 side, transformers clamps it to the factor
    assert smart_resize_qwen_vl_utils(31, 639, min_pixels=3136, max_pixels=20 * 28 * 28) == (0, 560)
    assert smart_resize(31, 639, min_pixels=3136, max_pixels=20 * 28 * 28) == (28, 560)


@pytest.mark.parametrize("fn", [smart_resize, smart_resize_qwen_vl_utils])
@pytest.mark.parametrize("size", [(0, 100), (100, 0), (0, 0), (-5, 10)])
def test_non_positive_side_raises(fn, size):
    with pytest.raises(ValueError, match="height|width"):
        fn(*size)


@pytest.mark.parametrize("fn", [smart_resize, smart_resize_qwen_vl_utils])
def test_bad_arguments(fn):
    with pytest.raises(ValueError, match="aspect ratio.*10.*2001"):
        fn(10, 2001)
    with pytest.raises(ValueError, match="aspect ratio"):
        fn(2001, 10)
    with pytest.raises(ValueError, match=r"min_pixels \(5000\).*max_pixels \(4000\)"):
        fn(100, 100, min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match=f"height.*{MAX_SIDE}"):
        fn(MAX_SIDE + 1, MAX_SIDE)
    with pytest.raises(ValueError, match="max_pixels"):
        fn(100, 100, max_pixels=2**60)
    with pytest.raises(TypeError, match="height"):
        fn(10.0, 100)
    with pytest.raises(TypeError, match="width"):
        fn(10, True)
    with pytest.raises(ValueError, match="factor"):
        fn(10, 10, factor=0)
    assert fn(MAX_SIDE, MAX_SIDE)[0] % 28 == 0  # the limit itself is accepted


sides = st.integers(1, 20000)
budgets = st.tuples(st.integers(1, 2_000_000), st.integers(1, 20_000_000)).map(sorted)


@given(sides, sides, budgets, st.sampled_from([28, 28, 32, 14]))
def test_smart_resize_equals_transformers(h, w, budget, factor):
    assume(max(h, w) / min(h, w) <= 200)
    lo, hi = budget
    assert smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi) == hf_smart_resize(
        h, w, factor=factor, min_pixels=lo, max_pixels=hi
    )


@given(sides, sides, budgets)
def test_smart_resize_properties(h, w, budget):
    assume(max(h, w) / min(h, w) <= 200)
    lo, hi = budget
    f = 28
    for fn in (smart_resize, smart_resize_qwen_vl_utils):
        rh, rw = fn(h, w, min_pixels=lo, max_pixels=hi)
        assert rh % f == 0 and rw % f == 0
        if fn is smart_resize:
            assert rh >= f and rw >= f
            rounded = (round(h / f) * f, round(w / f) * f)
        else:
            rounded = (max(f, round(h / f) * f), max(f, round(w / f) * f))
        if rounded[0] * rounded[1] > hi:  # shrunk into the budget (HF: unless a side was clamped to f)
            assert rh * rw <= hi or (fn is smart_resize and min(rh, rw) == f)
            scale = math.sqrt(hi / (h * w))
        elif rounded[0] * rounded[1] < lo:  # grown to at least min_pixels (may overshoot max_pixels, see below)
            assert rh * rw >= lo
            scale = math.sqrt(lo / (h * w))
        else:
            assert (rh, rw) == rounded
            scale = 1.0
        # aspect kept: the same scale maps both sides to within one factor (sides clamped to f excepted)
        assert all(abs(r - o * scale) <= f or r == f for r, o in ((rh, h), (rw, w)))


@pytest.mark.parametrize("fn", [smart_resize, smart_resize_qwen_vl_utils])
def test_ceil_branch_can_overshoot_max_pixels(fn):
    # with min_pixels close to max_pixels, ceiling both sides overshoots: 28*56 = 1568 > 785
    assert fn(1, 2, min_pixels=785, max_pixels=785) == (28, 56)


# ------------------------------------------------------------------------------------------------
# resize_bicubic


def pil_bicubic(img, size):
    h, w = size
    mode = "L" if img.shape[2] == 1 else "RGB"
    out = np.asarray(Image.fromarray(img[..., 0] if mode == "L" else img, mode).resize((w, h), Image.BICUBIC))
    return out.reshape(h, w, -1)


def noise(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


@given(
    st.integers(1, 70),
    st.integers(1, 70),
    st.integers(1, 90),
    st.integers(1, 90),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 3]),
)
def test_resize_bicubic_equals_pillow(in_h, in_w, out_h, out_w, seed, channels):
    img = noise(np.random.default_rng(seed), in_h, in_w, channels)
    np.testing.assert_array_equal(resize_bicubic(img, (out_h, out_w)), pil_bicubic(img, (out_h, out_w)))


@pytest.mark.parametrize(
    "in_size, out_size",
    [
        ((64, 48), (32, 24)),  # shrink both
        ((20, 30), (61, 97)),  # grow both
        ((60, 20), (30, 50)),  # width grows, height shrinks
        ((20, 60), (50, 30)),  # width shrinks, height grows
        ((1, 1), (28, 56)),
        ((1, 40), (28, 28)),
        ((40, 1), (28, 28)),
        ((30, 30), (1, 1)),  # 1-pixel sides
        ((300, 2), (150, 4)),
        ((1000, 5), (28, 56)),
        ((250, 2), (249, 2)),  # >100x taller, height shrinks
        ((2, 300), (4, 150)),  # >100x wider: no special order
        ((37, 53), (37, 53)),
        ((37, 53), (37, 80)),
        ((37, 53), (10, 53)),  # one or no pass
        ((333, 257), (28, 28)),  # heavy shrink: wide kernels
    ],
)
def test_resize_bicubic_fixed_cases(in_size, out_size):
    rng = np.random.default_rng(sum(in_size) * 1000 + sum(out_size))
    img = noise(rng, *in_size)
    np.testing.assert_array_equal(resize_bicubic(img, out_size), pil_bicubic(img, out_size))
    smooth = np.clip(np.add.outer(np.arange(in_size[0]), np.arange(in_size[1])) * 3, 0, 255).astype(np.uint8)
    smooth = np.repeat(smooth[..., None], 3, axis=2)
    np.testing.assert_array_equal(resize_bicubic(smooth, out_size), pil_bicubic(smooth, out_size))


def test_tall_image_pass_order_matters():
    # the Pillow 12 special case (vertical pass first) is visible: the other order gives other bytes
    from qwen25vl.spec.resize import _resample_axis

    img = noise(np.random.default_rng(7), 300, 2)
    horizontal_first = _resample_axis(_resample_axis(img, 4, axis=1), 150, axis=0)
    assert not np.array_equal(horizontal_first, pil_bicubic(img, (150, 4)))
    np.testing.assert_array_equal(resize_bicubic(img, (150, 4)), pil_bicubic(img, (150, 4)))


def test_resize_bicubic_large_image_is_fast_and_exact():
    img = noise(np.random.default_rng(0), 2048, 1536)
    start = time.perf_counter()
    out = resize_bicubic(img, (1092, 812))
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(out, pil_bicubic(img, (1092, 812)))
    assert elapsed < 3.0, f"resize_bicubic 2048x1536 -> 1092x812 took {elapsed:.2f}s"


def test_same_size_is_a_copy():
    img = noise(np.random.default_rng(1), 5, 6)
    out = resize_bicubic(img, (5, 6))
    np.testing.assert_array_equal(out, img)
    assert out is not img


@given(st.integers(1, 400), st.integers(1, 400))
def test_coefficients_sum_to_one(in_size, out_size):
    first, fixed = bicubic_coefficients(in_size, out_size)
    assert first.min() >= 0 and first.max() < in_size
    # each row sums to 1.0 in 22-bit fixed point, up to one rounding per tap
    total = fixed.astype(np.int64).sum(axis=1)
    assert np.all(np.abs(total - (1 << PRECISION_BITS)) <= fixed.shape[1])


def test_resize_bicubic_bad_input():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8 \\[H, W, C\\].*float32"):
        resize_bicubic(img.astype(np.float32), (2, 2))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        resize_bicubic(img[..., 0], (2, 2))
    with pytest.raises(ValueError, match=r"\(0, 4, 3\)"):
        resize_bicubic(img[:0], (2, 2))
    with pytest.raises(TypeError, match="list"):
        resize_bicubic(img.tolist(), (2, 2))
    with pytest.raises(ValueError, match="height"):
        resize_bicubic(img, (0, 2))
    with pytest.raises(TypeError, match="pair"):
        resize_bicubic(img, 2)
