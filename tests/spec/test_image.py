"""load_image / preprocess_image against transformers' PIL image processor (Pillow 12), modes, bad input."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from qwen25vl.spec.image import CLIP_MEAN, CLIP_STD, composite_on_white, load_image, normalize, preprocess_image
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


def hf_preprocess(pil, min_pixels, max_pixels):
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = processor(images=pil, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def noise(seed, h, w, c=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def png_bytes(pil, fmt="PNG", **kw):
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **kw)
    return buf.getvalue()


@given(
    st.integers(1, 150),
    st.integers(1, 150),
    st.integers(0, 2**32 - 1),
    st.sampled_from([(3136, 12845056), (3136, 20000), (20000, 60000), (784, 784 * 8)]),
)
def test_preprocess_equals_transformers(h, w, seed, budget):
    img = noise(seed, h, w)
    pixel_values, grid = preprocess_image(img, min_pixels=budget[0], max_pixels=budget[1])
    ref_values, ref_grid = hf_preprocess(Image.fromarray(img), *budget)
    assert pixel_values.dtype == torch.float32 and grid.dtype == torch.int64
    assert grid.tolist() == ref_grid.tolist()
    assert pixel_values.shape == ref_values.shape
    assert np.abs(pixel_values.numpy() - ref_values).max() <= 1e-6


@pytest.mark.parametrize("size", [(480, 640), (300, 2), (19, 1000), (1, 1)])
def test_preprocess_fixed_sizes_equal_transformers(size):
    img = noise(sum(size), *size)
    pixel_values, grid = preprocess_image(img)
    ref_values, ref_grid = hf_preprocess(Image.fromarray(img), 3136, 12845056)
    assert grid.tolist() == ref_grid.tolist()
    assert np.abs(pixel_values.numpy() - ref_values).max() <= 1e-6
    assert pixel_values.shape[0] == grid.prod().item() and pixel_values.shape[1] == 1176


def make_mode_images():
    rgb = noise(1, 23, 31)
    rgba = np.concatenate([rgb, noise(2, 23, 31, 1)], axis=2)
    rgba[0, :4, 3] = [0, 255, 1, 128]  # fully transparent, opaque and edge alphas present
    p_transparent = Image.fromarray(rgb).quantize(16)
    p_transparent.info["transparency"] = 3
    i16 = Image.fromarray(np.random.default_rng(3).integers(0, 1024, (23, 31), dtype=np.uint16))
    return {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "LA": Image.fromarray(rgba[..., [0, 3]], "LA"),
        "P": Image.fromarray(rgb).quantize(16),
        "P+transparency": p_transparent,
        "PA": Image.fromarray(rgba, "RGBA").convert("PA"),
        "L": Image.fromarray(rgb[..., 0]),
        "1": Image.fromarray(rgb[..., 0]).convert("1"),
        "I;16": i16,
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
    }


MODE_IMAGES = make_mode_images()


@pytest.mark.parametrize("mode", list(MODE_IMAGES))
def test_modes_match_transformers(mode):
    pil = MODE_IMAGES[mode]
    rgb = load_image(pil)
    assert rgb.dtype == np.uint8 and rgb.shape == (23, 31, 3)
    np.testing.assert_array_equal(rgb, hf_convert_to_rgb(pil, return_numpy=True))
    pixel_values, grid = preprocess_image(pil)
    ref_values, ref_grid = hf_preprocess(pil, 3136, 12845056)
    assert grid.tolist() == ref_grid.tolist()
    assert np.abs(pixel_values.numpy() - ref_values).max() <= 1e-6


def test_mode_rules_by_hand():
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [100, 100, 100, 128]]], np.uint8), "RGBA")
    # transparent -> white, opaque -> unchanged, 128 -> round((100*128 + 255*127)/255) = round(177.196) = 177
    assert load_image(rgba).tolist() == [[[255, 255, 255], [10, 20, 30], [177, 177, 177]]]
    assert load_image(Image.fromarray(np.array([[7, 200]], np.uint8))).tolist() == [[[7, 7, 7], [200, 200, 200]]]
    # 16-bit grey is clipped to 255, not rescaled
    i16 = Image.fromarray(np.array([[0, 200, 256, 65535]], np.uint16))
    assert load_image(i16)[..., 0].tolist() == [[0, 200, 255, 255]]


def test_composite_on_white_exhaustive_against_pillow():
    c, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([c, 255 - c, c // 2, a], axis=-1).astype(np.uint8)
    white = Image.new("RGBA", (256, 256), (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB"))
    np.testing.assert_array_equal(composite_on_white(rgba), expected)


def test_load_sources(tmp_path):
    img = noise(5, 17, 29)
    data = png_bytes(Image.fromarray(img))
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for source in (img, Image.fromarray(img), data, bytearray(data), memoryview(data), str(path), path):
        out = load_image(source)
        np.testing.assert_array_equal(out, img)
    assert load_image(img) is not img  # a copy: the caller's array is never aliased
    jpeg = png_bytes(Image.fromarray(img), "JPEG", quality=95)
    np.testing.assert_array_equal(load_image(jpeg), np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))


def test_exif_orientation_applied_to_files():
    img = Image.fromarray(noise(6, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = png_bytes(img, "JPEG", exif=exif.tobytes(), quality=100)
    assert load_image(data).shape == (20, 10, 3)


def test_normalize_by_hand():
    frames = np.array([0, 255, 128], np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=3)  # [T=1, H=1, W=3, 3]
    out = normalize(frames)
    assert out.shape == (1, 3, 1, 3) and out.dtype == torch.float32
    for c in range(3):
        expected = [(v / 255 - CLIP_MEAN[c]) / CLIP_STD[c] for v in (0, 255, 128)]
        np.testing.assert_allclose(out[0, c, 0].numpy(), expected, rtol=0, atol=1e-6)


def test_bad_input(tmp_path):
    good = png_bytes(Image.fromarray(noise(0, 40, 40)))
    with pytest.raises(ValueError, match="image bytes.*could not be decoded"):
        load_image(b"definitely not an image")
    with pytest.raises(ValueError, match=r"image bytes \(\d+ bytes\) could not be decoded"):
        load_image(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="empty"):
        load_image(b"")
    bad_file = tmp_path / "broken.jpg"
    bad_file.write_bytes(b"\xff\xd8\xff\xe0 nope")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(str(bad_file))
    with pytest.raises(ValueError, match="no_such.png.*does not exist"):
        load_image(str(tmp_path / "no_such.png"))
    with pytest.raises(ValueError, match="0x5"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match=r"\(0, 5, 3\)"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8.*float32"):
        load_image(np.zeros((5, 5, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(5, 5, 4\)"):
        load_image(np.zeros((5, 5, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(5, 5\)"):
        load_image(np.zeros((5, 5), np.uint8))
    with pytest.raises(TypeError, match="int"):
        load_image(42)
    with pytest.raises(ValueError, match="aspect ratio.*height=1, width=201"):
        preprocess_image(np.zeros((1, 201, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        normalize(np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        normalize(np.zeros((2, 2, 3), np.uint8))
