"""`qwen25vl fixtures --real-dims`: the model cases on a checkpoint at the real head dims (text 128 with
MRoPE sections (16, 24, 24), vision 80), made from integers so every CPU draws the same bits.

The bundled tiny checkpoints (head_dim 8 and 16) cannot show what depends on the head size: a kernel
specialised on it, a constant that only differs from the head size at 128. These tests build the folder
once per test session (shared by the xdist workers under a file lock), hold the fast path and
transformers to it, and show a mistake the bundled fixtures cannot show being caught there.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from filelock import FileLock
from qwen25vl.conformance import runner
from qwen25vl.conformance.cli import conform
from qwen25vl.conformance.mistakes import by_name
from qwen25vl.spec.config import Qwen25VLConfig
from qwen25vl.tools import fixtures_from_checkpoint as ffc
from qwen25vl.tools.make_tiny_checkpoint import make_random_params, real_dims_config

from .test_mistakes import up_to

pytestmark = pytest.mark.whole_runs  # .ci/run: not rerun on the scalar path (docs/testing.md)

CASES = ("model_image", "model_video")  # windowed vision at head_dim 80, then temporal MRoPE sections


@pytest.fixture(scope="module")
def real_dims(tmp_path_factory):
    """The fixtures folder `qwen25vl fixtures --real-dims --cases model_image model_video` writes."""
    # under xdist, the parent of a worker's basetemp is this session's, shared by all its workers; alone,
    # basetemp is (its parent holds earlier sessions' folders)
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    out = shared / "real_dims_fixtures"
    with FileLock(str(shared / "real_dims_fixtures.lock")):
        if not out.exists():
            assert ffc.main(["--real-dims", "--out", str(out), "--cases", *CASES]) == 0
    return out


def test_the_checkpoint_has_the_real_head_dims(real_dims):
    config = Qwen25VLConfig.from_file(real_dims / ffc.REAL_DIMS_CHECKPOINT)
    assert config == real_dims_config()
    assert config.head_dim == 128 and config.mrope_section == (16, 24, 24)
    assert config.vision.head_dim == 80  # 20 row and 20 column frequencies: not a power of two
    for case in CASES:
        manifest = json.loads((real_dims / case / "manifest.json").read_text("utf-8"))
        assert manifest["checkpoint"] == "../checkpoints/real_dims"


_DRAW = """
import hashlib, sys, torch
from qwen25vl.tools.make_tiny_checkpoint import make_random_params, real_dims_config
params = make_random_params(real_dims_config(), draw=sys.argv[1], prefixes=("visual.blocks.0.mlp.", "model.norm"))
digest = hashlib.sha256()
for key in sorted(params):
    digest.update(params[key].contiguous().view(torch.uint8).numpy().tobytes())
print(digest.hexdigest())
"""


def test_the_integer_draw_gives_the_same_bits_on_another_cpu_path():
    """The checkpoint is made where it is used, so its bits must not depend on the CPU: the integer draw is
    the same under ATEN_CPU_CAPABILITY=default (no vector path) as on this CPU's own. Both runs are on this
    machine (no float crosses machines)."""

    def draw(capability: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        done = subprocess.run([sys.executable, "-c", _DRAW, "uniform-int"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert draw("default") == draw(None)
    here = make_random_params(real_dims_config(), draw="uniform-int", prefixes=("model.norm",))["model.norm.weight"]
    std = 0.1  # a norm weight: mean 1, std 0.1 (make_tiny_checkpoint._init_std)
    assert abs(float(here.float().mean()) - 1.0) < 0.02 and abs(float(here.float().std()) - std) < 0.02
    assert float((here.float() - 1).abs().max()) <= std * 3**0.5 * (1 + 2**-7)  # uniform: bounded by sqrt(3) std


@pytest.mark.parametrize("target", ["impl", "transformers"])
def test_the_fast_path_and_transformers_pass_at_the_real_dims(real_dims, target, tmp_path, capsys):
    """impl's kernels at head_dim 128 and 80; transformers, an implementation nobody here wrote, agrees
    with the spec at the real dims too."""
    # transformers' model_video differs from the spec in its text positions, at any size (its expectation)
    cases = CASES if target == "impl" else ("model_image",)
    if target == "transformers":
        pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")
    report = tmp_path / "report.json"
    rc = conform(
        ["--target", target, "--fixtures", str(real_dims), "--cases", f"^({'|'.join(cases)})$", "--json", str(report)]
    )
    assert rc == 0, capsys.readouterr().out[-3000:]
    results = json.loads(report.read_text("utf-8"))["results"]
    assert {r["case"] for r in results} == set(cases)
    assert all(r["status"] == "pass" for r in results), [
        (r["case"], r["stage"], r["status"]) for r in results if r["status"] != "pass"
    ]
    for case in cases:
        assert {(case, s) for s in ("vision.block.0", "vision.merger", "text.layer.0", "logits")} <= {
            (r["case"], r["stage"]) for r in results
        }


def test_a_mistake_the_bundled_fixtures_cannot_show_is_caught_and_named(real_dims):
    """text_rotary_dim_64 is the spec at head_dim 8 (a declared blind spot of the bundled fixtures,
    test_mistakes checks that it passes them); at 128 half of each head keeps no position."""
    m = by_name("text_rotary_dim_64")
    assert m.blind_spot
    paths = runner.select_cases(real_dims, "^model_image$")
    _, results = runner.run_suite(
        paths, runner.SuiteOptions(only_stages=up_to("text.layer.{i}")), adapter=m.adapter("float32")
    )
    first = runner.first_divergence(results)
    assert first is not None and first.stage == "text.layer.0", first
    assert first.status == "fail" and m.description in first.note, first.note
    # everything before the decoder layers (vision at head_dim 80 included) still agrees
    assert all(r.status == "pass" for r in results if r.stage.startswith(("vision.", "preprocess.")))


def test_real_dims_refuses_a_checkpoint_beside_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ffc.main(["--real-dims", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--real-dims makes its own checkpoint"):
        ffc.fixtures_from_checkpoint(tmp_path, tmp_path / "y", real_dims=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_an_unwritable_out_is_a_clear_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: no folder can refuse it
        locked = tmp_path / "a_file"
        locked.write_text("not a folder")
    assert ffc.main(["--real-dims", "--out", str(locked / "rd"), "--cases", "model_image"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen25vl fixtures: ") and "nothing was written to --out" in err and "Traceback" not in err
    assert not (locked.is_dir() and any(locked.iterdir()))


def test_the_uniform_draw_is_refused_by_name():
    with pytest.raises(ValueError, match="draw must be one of"):
        make_random_params(real_dims_config(), draw="uniform", prefixes=("model.norm",))
    assert torch.equal(
        make_random_params(real_dims_config(), prefixes=("model.norm",))["model.norm.weight"],
        make_random_params(real_dims_config(), draw="normal", prefixes=("model.norm",))["model.norm.weight"],
    )
