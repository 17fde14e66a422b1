"""How the transformers target feeds images: in memory, so transparency is composited over white.

transformers 5.24 gives an image two different colour rules depending on how it arrives: a path goes
through image_utils.load_image, which calls convert("RGB") (alpha dropped, transparent pixels keep
their hidden colour); a PIL image in memory goes through the processor's convert_to_rgb (alpha composited
over white, the spec's rule). expectations/transformers.json assumes the second; these tests fail if
the adapter's feeding changes, and pin the two transformers behaviours the README describes.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from qwen25vl.conformance.adapters.transformers import TINY, TransformersAdapter, open_image
from qwen25vl.spec.image import load_image, preprocess_image


@pytest.fixture(scope="module")
def rgba_png(tmp_path_factory):
    """56 x 84 RGBA: random colours; alpha 0 (left third), 128 (middle), 255 (right)."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (56, 84, 4), dtype=np.uint8)
    pixels[:, :28, 3], pixels[:, 28:56, 3], pixels[:, 56:, 3] = 0, 128, 255
    path = tmp_path_factory.mktemp("rgba") / "rgba.png"
    Image.fromarray(pixels, "RGBA").save(path)
    return path, pixels


def test_open_image_keeps_alpha_and_applies_exif(rgba_png, tmp_path):
    path, pixels = rgba_png
    image = open_image(path)
    assert image.mode == "RGBA" and (np.asarray(image) == pixels).all()
    rotated = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.new("RGB", (40, 20), (200, 10, 10)).save(rotated, exif=exif)
    assert open_image(rotated).size == (20, 40)  # upright, as transformers' load_image and spec.load_image


def _processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(TINY))


def test_transformers_composites_in_memory_and_drops_alpha_for_paths(rgba_png):
    path, pixels = rgba_png
    proc = _processor()
    spec_pv, _ = preprocess_image(str(path))
    in_memory = proc(images=[open_image(path)], return_tensors="pt")["pixel_values"]
    by_path = proc(images=[str(path)], return_tensors="pt")["pixel_values"]  # load_image -> convert("RGB")
    dropped = proc(images=[Image.fromarray(pixels[..., :3])], return_tensors="pt")["pixel_values"]
    assert torch.equal(in_memory, spec_pv)
    assert torch.equal(by_path, dropped) and not torch.equal(by_path, spec_pv)
    composited = load_image(str(path))
    assert (composited[:, :28] == 255).all() and (composited[:, 56:] == pixels[:, 56:, :3]).all()


def test_adapter_build_inputs_feeds_images_in_memory(rgba_png):
    path, _ = rgba_png
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    inputs = TransformersAdapter().build_inputs([conversation], [str(path)], [], tokenizer_dir=str(TINY), options={})
    spec_pv, spec_grid = preprocess_image(str(path))
    assert torch.equal(inputs["image_grid_thw"], spec_grid)
    assert torch.equal(inputs["pixel_values"], spec_pv)  # alpha composited on white, as the spec does
