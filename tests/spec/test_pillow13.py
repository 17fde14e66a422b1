"""Pillow 13.0.0 changed BICUBIC output: shown against resize_bicubic (= Pillow 12) in a side venv.

transformers' PIL image processor calls Image.resize, so its pixel_values depend on the Pillow version.
Pillow 13 runs the vertical pass first whenever the width grows and the height shrinks (and in some shrink-both
cases), where Pillow 12 runs horizontal first; the uint8 rounding between passes then lands elsewhere.
"""

import os
import subprocess
import textwrap

import numpy as np
import pytest
from PIL import Image
from qwen25vl.spec.resize import _resample_axis, resize_bicubic

PILLOW13 = os.environ.get("QWEN25VL_PILLOW13_PYTHON")
pytestmark = pytest.mark.skipif(
    not PILLOW13,
    reason="QWEN25VL_PILLOW13_PYTHON is not set; create the side venv with: python3 -m venv .venv-pillow13 && "
    ".venv-pillow13/bin/pip install pillow==13.0.0 numpy && "
    "export QWEN25VL_PILLOW13_PYTHON=$PWD/.venv-pillow13/bin/python (.ci/run does this)",
)

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import PIL
    from PIL import Image
    assert PIL.__version__ == "13.0.0", PIL.__version__
    data = np.load(sys.argv[1])
    out = {}
    for name in data.files:
        if name.startswith("img_"):
            key = name[4:]
            h, w = data["size_" + key]
            out[key] = np.asarray(Image.fromarray(data[name]).resize((int(w), int(h)), Image.BICUBIC))
    np.savez(sys.argv[2], **out)
""")

CASES = {  # name: (input H, W), (output h, w); the sizes come from smart_resize of common photos
    "vga_mixed": ((480, 640), (476, 644)),  # width grows, height shrinks: default budget on a 640x480 photo
    "small_mixed": ((60, 40), (30, 80)),
    "shrink_both": ((2048, 1536), (1092, 812)),
    "grow_both": ((1080, 1920), (1092, 1932)),
}


@pytest.fixture(scope="module")
def pillow13_outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pillow13")
    rng = np.random.default_rng(0)
    arrays, images = {}, {}
    for name, (in_size, out_size) in CASES.items():
        images[name] = rng.integers(0, 256, (*in_size, 3), dtype=np.uint8)  # noise: worst case for rounding
        arrays["img_" + name] = images[name]
        arrays["size_" + name] = np.array(out_size)
    np.savez(folder / "in.npz", **arrays)
    (folder / "run.py").write_text(SCRIPT)
    subprocess.run(
        [PILLOW13, str(folder / "run.py"), str(folder / "in.npz"), str(folder / "out.npz")],
        check=True,
        timeout=120,
        capture_output=True,
    )
    with np.load(folder / "out.npz") as out:
        return images, {name: out[name] for name in out.files}


def pillow12(img, size):
    return np.asarray(Image.fromarray(img).resize(size[::-1], Image.BICUBIC))


@pytest.mark.parametrize("name", ["vga_mixed", "small_mixed"])
def test_pillow13_differs_when_width_grows_and_height_shrinks(pillow13_outputs, name):
    images, p13 = pillow13_outputs
    out_size = CASES[name][1]
    ours = resize_bicubic(images[name], out_size)
    np.testing.assert_array_equal(ours, pillow12(images[name], out_size))
    diff = np.abs(p13[name].astype(int) - ours)
    # measured with this seed: vga_mixed max 22 levels, small_mixed max 17; about 30% of values differ
    assert {"vga_mixed": 22, "small_mixed": 17}[name] == diff.max()
    assert 0.2 < (diff > 0).mean() < 0.4
    # the change is the pass order: vertical first, then horizontal, reproduces Pillow 13 exactly
    vertical_first = _resample_axis(_resample_axis(images[name], out_size[0], axis=0), out_size[1], axis=1)
    np.testing.assert_array_equal(p13[name], vertical_first)


@pytest.mark.parametrize("name", ["shrink_both", "grow_both"])
def test_pillow13_agrees_elsewhere(pillow13_outputs, name):
    images, p13 = pillow13_outputs
    np.testing.assert_array_equal(p13[name], resize_bicubic(images[name], CASES[name][1]))


def test_side_python_is_separate():
    # the oracle of the main env stays Pillow 12 (resize_bicubic's reference)
    import PIL

    assert PIL.__version__.startswith("12."), PIL.__version__
