"""A checkpoint with a NaN or an infinity in its weights is refused at load, naming every such tensor.

Checked three ways: spec.load_checkpoint, impl's Qwen25VL.from_pretrained (which loads through it), and
the `python -m qwen25vl generate` command (non-zero exit, the tensor's name on stderr).
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from qwen25vl.spec.checkpoint import CheckpointError, check_weights_finite, load_checkpoint
from safetensors.torch import load_file, save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY_DIR = os.path.join(ROOT, "fixtures", "checkpoints", "tiny")  # has the tokenizer, so generate gets to loading
Q = "model.layers.0.self_attn.q_proj.weight"
MLP = "visual.blocks.1.mlp.down_proj.bias"


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """The tiny fixture checkpoint with one NaN in a q_proj and two infinities in a vision bias."""
    folder = tmp_path_factory.mktemp("nonfinite") / "tiny"
    shutil.copytree(TINY_DIR, folder)
    stored = load_file(str(folder / "model.safetensors"))
    stored[Q][3, 5] = float("nan")
    stored[MLP][0], stored[MLP][1] = float("inf"), float("-inf")
    save_file(stored, str(folder / "model.safetensors"))
    return folder


def test_spec_names_every_tensor_with_counts(broken):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(broken)
    message = str(info.value)
    assert "holds non-finite weights in 2 tensor(s)" in message
    assert f"{MLP} (0 NaN, 2 inf of 64 values)" in message
    assert f"{Q} (1 NaN, 0 inf of 1024 values)" in message
    assert sorted(info.value.problems["not finite"]) == [
        f"{Q} (1 NaN, 0 inf of 1024 values)",
        f"{MLP} (0 NaN, 2 inf of 64 values)",
    ]
    assert "check_finite=False" in message  # the opt-out is named


def test_opt_out_loads_the_file_as_it_is(broken):
    _, params = load_checkpoint(broken, check_finite=False)
    assert torch.isnan(params[Q][3, 5]) and int(torch.isinf(params[MLP]).sum()) == 2


def test_check_weights_finite_alone():
    check_weights_finite({"a": torch.ones(3), "ids": torch.arange(3)})  # integer tensors are skipped
    with pytest.raises(CheckpointError, match=r"params holds non-finite weights in 1 tensor\(s\): b \(1 NaN"):
        check_weights_finite({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, source="params")


def test_impl_from_pretrained_surfaces_it(broken):
    from qwen25vl.impl.model import Qwen25VL

    with pytest.raises(CheckpointError, match=f"non-finite weights .*{Q} \\(1 NaN"):
        Qwen25VL.from_pretrained(broken, device="cpu", dtype=torch.float32)


def test_cli_generate_exits_nonzero_naming_the_tensor(broken):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(
        [sys.executable, "-m", "qwen25vl", "generate", "--checkpoint", str(broken), "--prompt", "hi"]
        + ["--max-new-tokens", "2", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode != 0, run.stdout
    assert Q in run.stderr and MLP in run.stderr, run.stderr
    assert "!!" not in run.stdout
