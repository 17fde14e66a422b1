"""tools/generate_fixtures.py reproduces the committed fixtures.

Exact cases: byte for byte (every file's sha256). The numeric case model_image: every file's sha256
matches on the machine that made the fixtures (float64 single-threaded, deterministic algorithms);
a float64 BLAS on another CPU may round differently, so a file whose hash differs is accepted when
its integers are equal and its floats agree within 1e-6 relative (stated in fixtures/FORMAT.md).
"""

import json
from pathlib import Path

import torch
from qwen25vl.conformance.fixtures import load_case, sha256_file
from qwen25vl.tools import generate_fixtures
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _regenerate(tmp_path, only):
    (tmp_path / "checkpoints").symlink_to(FIXTURES / "checkpoints")  # the shared checkpoint, checked below
    generate_fixtures.generate(tmp_path, only)
    return tmp_path


def test_exact_cases_regenerate_bit_for_bit(tmp_path):
    out = _regenerate(tmp_path, "exact")
    for name in generate_fixtures.EXACT_CASES:
        assert load_case(out / name).manifest["files"] == load_case(FIXTURES / name).manifest["files"], name


def test_numeric_case_regenerates(tmp_path):
    out = _regenerate(tmp_path, "model_image")
    new, old = load_case(out / "model_image"), load_case(FIXTURES / "model_image")
    assert set(new.manifest["files"]) == set(old.manifest["files"])
    for name, digest in old.manifest["files"].items():
        if new.manifest["files"][name] == digest:
            continue
        assert name.endswith(".safetensors"), f"{name} differs and is not a float file"
        a, b = load_file(str(out / "model_image" / name)), load_file(str(FIXTURES / "model_image" / name))
        for k in b:
            if b[k].is_floating_point():
                rel = ((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)).item()
                assert rel < 1e-6, (name, k, rel)
            else:
                assert torch.equal(a[k], b[k]), (name, k)
    assert json.loads((out / "model_image" / "generate.json").read_text()) == json.loads(
        (FIXTURES / "model_image" / "generate.json").read_text()
    )


def test_the_shared_checkpoint_regenerates(tmp_path):
    from qwen25vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "tiny", seed=0)
    committed = json.loads((FIXTURES / "checkpoints" / "tiny" / "manifest.json").read_text())["files"]
    for name in ("model.safetensors", "config.json", "vocab.json", "merges.txt"):
        assert sha256_file(folder / name) == committed[name], name
