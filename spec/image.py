"""One image -> (pixel_values, grid_thw): load, to RGB, smart_resize, bicubic resize, rescale, normalize, patchify.

Legend: H, W input pixels; h, w resized pixels (multiples of 28); T frames; P patches = h*w/196;
grid_thw = (1, h/14, w/14).

Colour rule (transformers v5, qwen-vl-utils >= 0.0.10 for RGBA): an image with an alpha band (RGBA, LA, PA) or
a palette/transparency key is composited over opaque white,
    out = round((c * a + 255 * (255 - a)) / 255)      (c, a in 0..255; 255 is odd so there is never a tie)
which is bit-identical to Pillow's alpha_composite onto white. Every other mode goes through Pillow's
convert("RGB"): L and 1 are repeated to 3 channels, CMYK uses Pillow's naive conversion, and 16/32-bit
integer modes (I;16, I) are CLIPPED to 255, not rescaled (that is what transformers does too).
Decoded files (path or bytes) are turned upright by their EXIF orientation (as transformers' load_image);
a PIL image or an array is taken as it is.
"""

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from .patches import patchify
from .resize import resize_bicubic, smart_resize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE = 1 / 255


def composite_on_white(rgba):
    """uint8 [..., 4] -> uint8 [..., 3]: alpha-blend over opaque white, rounded to nearest (see module doc)."""
    rgba = rgba.astype(np.int32)
    c, a = rgba[..., :3], rgba[..., 3:]
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def pil_to_rgb(image):
    """PIL image of any mode -> uint8 [H, W, 3] by the colour rule of the module doc."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"image has size {width}x{height} (width x height); both sides must be >= 1")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        return composite_on_white(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB")).copy()


def _decode(data, what):
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a truncated file fails here, not later
            im = ImageOps.exif_transpose(im)
            return pil_to_rgb(im)
    except (
        Image.UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        EOFError,
        ValueError,
    ) as e:
        raise ValueError(f"{what} ({len(data)} bytes) could not be decoded as an image: {e}") from None


def load_image(image):
    """path | bytes | PIL image | uint8 array [H, W, 3] -> uint8 array [H, W, 3] (a fresh copy)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(f"image path {path!r} does not exist or is not a file")
        with open(path, "rb") as f:
            return _decode(f.read(), f"image file {path!r}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("image bytes are empty (0 bytes)")
        return _decode(data, "image bytes")
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image array must have dtype uint8, got {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"image array must be [H, W, 3] with H, W >= 1, got shape {image.shape}")
        return np.array(image, copy=True, order="C")
    raise TypeError(f"image must be a path, bytes, PIL image or uint8 array [H, W, 3], got {type(image).__name__}")


def normalize(frames, *, image_mean=CLIP_MEAN, image_std=CLIP_STD):
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W]: x / 255 (in float64, then float32), then (x - mean) / std.

    The float64-then-float32 rescale and the float32 normalise are transformers' PIL/numpy backend order, so
    the values match it bit for bit (its torchvision backend fuses the two and differs by ~1 float32 ulp).
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise TypeError(
            f"frames must be a uint8 numpy array [T, H, W, 3], got {type(frames).__name__} "
            f"{getattr(frames, 'dtype', '')}"
        )
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {frames.shape}")
    mean = np.asarray(image_mean, dtype=np.float32)
    std = np.asarray(image_std, dtype=np.float32)
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise ValueError(f"image_mean and image_std must hold 3 values, std > 0; got {image_mean}, {image_std}")
    x = (frames.astype(np.float64) * RESCALE).astype(np.float32)
    x = (x - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def preprocess_image(
    image,
    *,
    min_pixels=3136,
    max_pixels=12845056,
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
):
    """One image -> (pixel_values float32 [P, 3*tp*p*p] = [P, 1176], grid_thw int64 [1, 3] = (1, h/14, w/14)).

    Equals transformers' Qwen2VLImageProcessorPil under Pillow 12 (same smart_resize rule, same bicubic).
    """
    rgb = load_image(image)
    height, width = rgb.shape[:2]
    size = smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = resize_bicubic(rgb, size)
    frames = normalize(resized[None], image_mean=image_mean, image_std=image_std)  # [1, 3, h, w]
    return patchify(frames, patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size)
