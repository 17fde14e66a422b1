"""Every ```python block of README.md runs as written (from the repository root), so the documented
examples cannot rot. Blocks fenced as ```text or ```bash are not run."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_readme_opens_with_the_two_commands_that_ci_runs():
    with open(README, encoding="utf-8") as f:
        head = f.read(1500)
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    commands = re.findall(r"```bash\n(.*?)\n```", head, re.S)
    assert len(commands) >= 2, "README must open with two bash commands: set up + main job, then the tests"
    assert "qwen25vl conform" in commands[0]
    assert commands[1].strip() in ci, "the README's test command must be the exact command .ci/run calls"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index):
    block = python_blocks()[index]
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"README python block {index} failed:\n{block}\n--- stderr ---\n{done.stderr[-3000:]}"


# The public spec functions the work orders name: each one appears as a call in a runnable example.
DOCUMENTED = [
    "smart_resize",
    "smart_resize_qwen_vl_utils",
    "preprocess_image",
    "resize_bicubic",
    "load_image",
    "patchify",
    "unpatchify",
    "read_video",
    "sample_frame_indices",
    "sample_video",
    "video_frame_size",
    "preprocess_video",
    "render_chat",
    "load_tokenizer",
    "expand_vision_tokens",
    "build_inputs",
    "vision_rotary_positions",
    "window_partition",
    "rope_index",
    "rope_index_transformers_v53",
    "decode_positions",
    "mrope_cos_sin",
    "apply_mrope",
    "load_checkpoint",
    "vision_encoder",
    "forward",
    "generate_greedy",
    "precision_profile",
    "make_tiny_checkpoint",
]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_public_function_has_a_runnable_example(name):
    assert any(re.search(rf"(?<![\w.]){name}\(", block) for block in python_blocks()), (
        f"no ```python block of README.md calls {name}(...)"
    )
