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

Decompression bombs: a file or bytes whose header declares more than `max_decoded_pixels` pixels (default
MAX_DECODED_PIXELS = 89,478,485, the size at which Pillow starts to warn) is refused BEFORE it is decoded.
max_decoded_pixels=None opts in to large images; Pillow's own hard limit (2 x PIL.Image.MAX_IMAGE_PIXELS,
178,956,970 pixels by default) still applies and is reported the same way.
"""

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from .patches import patchify
from .resize import resize_bicubic, smart_resize, smart_resize_qwen_vl_utils

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE = 1 / 255
MAX_DECODED_PIXELS = 89_478_485  # Pillow's DecompressionBombWarning threshold (PIL.Image.MAX_IMAGE_PIXELS default)


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


def check_decoded_pixels(max_decoded_pixels):
    """None (no limit of ours) or an int >= 1; anything else is refused by name."""
    if max_decoded_pixels is None:
        return None
    if isinstance(max_decoded_pixels, bool) or not isinstance(max_decoded_pixels, (int, np.integer)):
        raise TypeError(f"max_decoded_pixels must be an int or None, got {type(max_decoded_pixels).__name__}")
    if max_decoded_pixels < 1:
        raise ValueError(f"max_decoded_pixels must be >= 1 or None, got {max_decoded_pixels}")
    return int(max_decoded_pixels)


def _decode(data, what, max_decoded_pixels):
    try:
        with warnings.catch_warnings():
            # We apply our own limit below, before decoding; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if max_decoded_pixels is not None and width * height > max_decoded_pixels:
                    raise ValueError(
                        f"{what} ({len(data)} bytes) declares {width}x{height} = {width * height:,} pixels "
                        f"({width * height * 3 / 1e9:.2f} GB as RGB), over the limit of {max_decoded_pixels:,} "
                        "decoded pixels (a decompression bomb?); if you trust it, raise max_decoded_pixels or "
                        "pass max_decoded_pixels=None (CLI: --allow-large-images)"
                    )
                im.load()  # a truncated file fails here, not later
                im = ImageOps.exif_transpose(im)
                return pil_to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"{what} ({len(data)} bytes) is over Pillow's hard decompression-bomb limit: {e} "
            "(raise PIL.Image.MAX_IMAGE_PIXELS yourself if you really mean it)"
        ) from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError) as e:
        if str(e).startswith(what):
            raise
        raise ValueError(f"{what} ({len(data)} bytes) could not be decoded as an image: {e}") from None


def load_image(image, *, max_decoded_pixels=MAX_DECODED_PIXELS):
    """path | bytes | PIL image | uint8 array [H, W, 3] -> uint8 array [H, W, 3] (a fresh copy).

    Paths and bytes are refused when they declare more than max_decoded_pixels pixels (module doc).
    """
    limit = check_decoded_pixels(max_decoded_pixels)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(f"image path {path!r} does not exist or is not a file")
        with open(path, "rb") as f:
            return _decode(f.read(), f"image file {path!r}", limit)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("image bytes are empty (0 bytes)")
        return _decode(data, "image bytes", limit)
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


def fixed_size(resized_height, resized_width, factor):
    """qwen-vl-utils' resized_height/resized_width rule -> (h, w), or None when neither is given."""
    if resized_height is None and resized_width is None:
        return None
    if resized_height is None or resized_width is None:
        raise ValueError(
            f"give both resized_height and resized_width or neither, got {resized_height} and {resized_width}"
        )
    h, w = smart_resize_qwen_vl_utils(resized_height, resized_width, factor=factor)
    if h < factor or w < factor:
        raise ValueError(f"resized_height x resized_width = {resized_height}x{resized_width} rounds to {h}x{w}")
    return h, w


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
    resized_height=None,
    resized_width=None,
    max_decoded_pixels=MAX_DECODED_PIXELS,
):
    """One image -> (pixel_values float32 [P, 3*tp*p*p] = [P, 1176], grid_thw int64 [1, 3] = (1, h/14, w/14)).

    Equals transformers' Qwen2VLImageProcessorPil under Pillow 12 (same smart_resize rule, same bicubic).
    resized_height + resized_width (both or neither): qwen-vl-utils' per-part fixed size, rounded by its
    smart_resize (defaults 3136..12845056, factor 28); min_pixels/max_pixels then do not apply.
    """
    rgb = load_image(image, max_decoded_pixels=max_decoded_pixels)
    height, width = rgb.shape[:2]
    factor = patch_size * merge_size
    fixed = fixed_size(resized_height, resized_width, factor)
    size = fixed or smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = resize_bicubic(rgb, size)
    frames = normalize(resized[None], image_mean=image_mean, image_std=image_std)  # [1, 3, h, w]
    return patchify(frames, patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size)
