"""tools/generate_fixtures.py reproduces the committed fixtures, on any CPU.

No float is compared by hash across machines: vectorised cos/sin and BLAS round differently per SIMD
path, so the same code gives 1-ulp differences on an AVX-512 Xeon and an AVX2 EPYC. Every regenerated
file is compared with the committed one by `content_difference` (conformance/fixtures.py, rule in
fixtures/FORMAT.md): integers, strings and bytes exact, floats within a stated relative budget.
CI runs this file under ATEN_CPU_CAPABILITY=default, =avx2 and the machine's own default.
"""

import json
from pathlib import Path

import pytest
import torch
from qwen25vl.conformance.fixtures import REGEN_RTOL, content_difference, load_case
from qwen25vl.tools import generate_fixtures
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _regenerate(tmp_path, only):
    (tmp_path / "checkpoints").symlink_to(FIXTURES / "checkpoints")  # the shared checkpoint, checked below
    generate_fixtures.generate(tmp_path, only)
    return tmp_path


def _differences(new_case: Path, old_case: Path) -> list[str]:
    new, old = load_case(new_case), load_case(old_case)
    out = []
    if set(new.manifest["files"]) != set(old.manifest["files"]):
        out.append(
            f"{old_case.name}: file lists differ: {sorted(set(new.manifest['files']) ^ set(old.manifest['files']))}"
        )
    for name in sorted(set(new.manifest["files"]) & set(old.manifest["files"])):
        d = content_difference(new_case / name, old_case / name)
        if d:
            out.append(f"{old_case.name}/{d}")
    return out


def test_exact_cases_regenerate(tmp_path):
    out = _regenerate(tmp_path, "exact")
    problems = [d for name in generate_fixtures.EXACT_CASES for d in _differences(out / name, FIXTURES / name)]
    assert not problems, "\n".join(problems)


# an image, text only on the tied checkpoint, a video file (compared by its decoded frames), and image files
# with alpha, a transparency key and EXIF (PNG bytes, compared byte for byte)
@pytest.mark.parametrize("case", ["model_image", "model_text", "model_video_file", "model_media_forms"])
def test_numeric_case_regenerates(tmp_path, case):
    out = _regenerate(tmp_path, case)
    problems = _differences(out / case, FIXTURES / case)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name, tied", [("tiny", False), ("tiny_tied", True)])
def test_the_shared_checkpoints_regenerate(tmp_path, name, tied):
    from qwen25vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / name, seed=0, tied=tied)
    committed = json.loads((FIXTURES / "checkpoints" / name / "manifest.json").read_text())["files"]
    for file in ("model.safetensors", "config.json", "vocab.json", "merges.txt"):
        assert file in committed
        assert content_difference(folder / file, FIXTURES / "checkpoints" / name / file) is None, file


# The rule itself: what it lets through and what it stops.


def _pair(tmp_path, name, a: dict, b: dict):
    save_file(a, str(tmp_path / f"new_{name}"))
    save_file(b, str(tmp_path / name))
    return tmp_path / f"new_{name}", tmp_path / name


def test_one_ulp_of_float64_passes_and_a_real_change_does_not(tmp_path):
    x = torch.linspace(0, 50, 4608, dtype=torch.float64).sin()
    ulp = x.clone()
    ulp[::90] = torch.nextafter(ulp[::90], torch.tensor(2.0, dtype=torch.float64))  # 1 ulp on 52 values
    assert not torch.equal(ulp, x)
    assert content_difference(*_pair(tmp_path, "tensors.safetensors", {"s": ulp}, {"s": x})) is None
    bug = x.clone()
    bug[7] += 1e-3
    d = content_difference(*_pair(tmp_path, "tensors.safetensors", {"s": bug}, {"s": x}))
    assert d and "relative difference" in d


def test_integers_stay_exact(tmp_path):
    a, b = torch.arange(10), torch.arange(10)
    a[3] = 4
    d = content_difference(*_pair(tmp_path, "inputs.safetensors", {"ids": a}, {"ids": b}))
    assert d and "integer values differ" in d


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_control_file_gets_its_dtypes_budget(tmp_path, dtype):
    torch.manual_seed(0)
    g = torch.randn(64, 64, dtype=torch.float64)
    rounding = g * (1 + REGEN_RTOL[dtype] / 4 * torch.randn_like(g).sign())
    ok = content_difference(*_pair(tmp_path, f"control_{dtype}.safetensors", {"t": rounding}, {"t": g}))
    assert ok is None
    far = g * (1 + 3 * REGEN_RTOL[dtype])
    d = content_difference(*_pair(tmp_path, f"control_{dtype}.safetensors", {"t": far}, {"t": g}))
    assert d and dtype in d
    assert content_difference(*_pair(tmp_path, "golden.safetensors", {"t": rounding}, {"t": g})) is not None


def test_a_control_file_beside_a_manifest_gets_twice_the_measured_control(tmp_path):
    """Two CPUs' bfloat16 runs each sit within the stage's control of the golden: within twice it of each other."""
    torch.manual_seed(0)
    g = torch.randn(64, 64, dtype=torch.float64)
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"t": {"control": {"bfloat16": 0.01}}}}))
    moved = g * (1 + 0.015 * torch.randn_like(g).sign())  # 1.5e-2: past two roundoffs (7.8e-3), within 2 x 1e-2
    assert content_difference(*_pair(tmp_path, "control_bfloat16.safetensors", {"t": moved}, {"t": g})) is None
    far = g * (1 + 0.03 * torch.randn_like(g).sign())
    d = content_difference(*_pair(tmp_path, "control_bfloat16.safetensors", {"t": far}, {"t": g}))
    assert d and "relative difference 3.00e-02 > 2.0e-02" in d


def test_json_floats_get_a_tolerance_and_strings_do_not(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"x": [1.0, 2.0000000000001], "s": "abc", "n": 3}))
    (tmp_path / "b.json").write_text(json.dumps({"x": [1.0, 2.0], "s": "abc", "n": 3}))
    assert content_difference(tmp_path / "a.json", tmp_path / "b.json") is None
    (tmp_path / "c.json").write_text(json.dumps({"x": [1.0, 2.0], "s": "abd", "n": 3}))
    assert "'abd'" in content_difference(tmp_path / "c.json", tmp_path / "b.json")
    (tmp_path / "d.json").write_text(json.dumps({"x": [1.0, 2.0], "s": "abc", "n": 3.0}))
    assert content_difference(tmp_path / "d.json", tmp_path / "b.json") is not None  # 3.0 is not the integer 3


def _clip(path, frames, fps, codec="qtrle"):
    import av

    with av.open(str(path), "w", format="mov") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "rgb24"
        for img in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_a_video_is_compared_by_its_decoded_frames_and_rate(tmp_path):
    frames = [generate_fixtures.moving_square(28, 42, k, step=(2, 3)) for k in range(5)]
    committed = tmp_path / "clip.mov"
    committed.write_bytes(generate_fixtures.video_file_bytes(frames, 5))
    # other bytes (another lossless codec, no bit-exact flags), the same frames and rate: the same content
    assert content_difference(_clip(tmp_path / "png.mov", frames, 5, codec="png"), committed) is None
    moved = [f.copy() for f in frames]
    moved[3][0, 0] ^= 1  # one bit of one pixel
    assert content_difference(_clip(tmp_path / "moved.mov", moved, 5), committed) == "clip.mov: decoded frame 3 differs"
    assert "frames per second" in content_difference(_clip(tmp_path / "slow.mov", frames, 4), committed)
    assert "frames [4, 28, 42, 3]" in content_difference(_clip(tmp_path / "short.mov", frames[:4], 5), committed)


def test_the_image_file_forms_hold_what_they_claim():
    """Each form of generate_fixtures.image_file_bytes, read by the spec, is the displayed image; read the naive way
    (Pillow's convert("RGB"), no EXIF) it is not: the fixture tells the two apart."""
    import io

    import numpy as np
    from PIL import Image
    from qwen25vl.spec.image import load_image

    shown = generate_fixtures.synthetic_image(140, 56, 5)
    naive = {}
    for form in ("rgb", "rgba", "palette", "exif6"):
        data = generate_fixtures.image_file_bytes(140, 56, 5, form)
        assert load_image(data).shape == (140, 56, 3), form
        naive[form] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (load_image(generate_fixtures.image_file_bytes(140, 56, 5, "rgb")) == shown).all()
    assert (load_image(generate_fixtures.image_file_bytes(140, 56, 5, "exif6")) == shown).all()
    assert naive["exif6"].shape == (56, 140, 3)  # stored turned: EXIF ignored, another grid
    rgba = load_image(generate_fixtures.image_file_bytes(140, 56, 5, "rgba"))
    assert (rgba[:, :14] == 255).all() and (rgba[:, -14:] == shown[:, -14:]).all()  # alpha 0 -> white; opaque kept
    assert (naive["rgba"][:, :14] == shown[:, :14]).all()  # alpha dropped: the hidden colour
    palette = load_image(generate_fixtures.image_file_bytes(140, 56, 5, "palette"))
    band = slice(140 // 3, 140 // 3 + 35)
    assert (palette[band] == 255).all() and (naive["palette"][band] == (120, 0, 0)).all()  # the tRNS key
