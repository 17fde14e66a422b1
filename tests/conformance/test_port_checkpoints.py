"""The bundled checkpoint loads, unchanged, in the two most used local ports' own loaders.

mlx-vlm: its `load` on the folder (it refused the v1 checkpoint, whose vision_config carried a
model_type the published config.json does not have). llama.cpp: its own converter
(convert_hf_to_gguf.py, text model and --mmproj vision projector) from the source tree that
llama-cpp-python's sdist vendors; .ci/run downloads that sdist and points QWEN25VL_LLAMA_CPP_SRC at
it. The GGUF metadata the converter writes is read back with its own gguf-py: the head counts, MRoPE
sections and layer counts a port runs with are the checkpoint's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parents[2] / "fixtures" / "checkpoints" / "tiny"
LLAMA_CPP_SRC = os.environ.get("QWEN25VL_LLAMA_CPP_SRC", "")
CONFIG = json.loads((TINY / "config.json").read_text())


@pytest.mark.skipif(
    importlib.util.find_spec("mlx_vlm") is None, reason='mlx-vlm is not installed (pip install -e ".[mlx]")'
)
def test_mlx_vlm_loads_the_bundled_checkpoint_unchanged(tmp_path):
    code = (
        "import json, sys\n"
        "from mlx_vlm import load\n"
        "model, processor = load(sys.argv[1])\n"
        "text = model.language_model.args if hasattr(model.language_model, 'args') else model.config.text_config\n"
        "c = model.config\n"
        "print(json.dumps({'kv': c.text_config.num_key_value_heads, 'heads': c.text_config.num_attention_heads,"
        " 'vision_heads': c.vision_config.num_heads, 'depth': c.vision_config.depth}))\n"
    )
    # its own process: mlx is not thread-safe across pytest-xdist workers' other imports
    proc = subprocess.run([sys.executable, "-c", code, str(TINY)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {
        "kv": CONFIG["num_key_value_heads"],
        "heads": CONFIG["num_attention_heads"],
        "vision_heads": CONFIG["vision_config"]["num_heads"],
        "depth": CONFIG["vision_config"]["depth"],
    }


@pytest.mark.skipif(
    not (Path(LLAMA_CPP_SRC) / "convert_hf_to_gguf.py").is_file(),
    reason="no llama.cpp source: set QWEN25VL_LLAMA_CPP_SRC to a tree with convert_hf_to_gguf.py "
    "(.ci/run takes it from the llama-cpp-python 0.3.36 sdist)",
)
def test_llama_cpp_converter_converts_the_bundled_checkpoint_unchanged(tmp_path):
    src = Path(LLAMA_CPP_SRC)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    text, mmproj = tmp_path / "tiny.gguf", tmp_path / "tiny-mmproj.gguf"
    for extra, out in (([], text), (["--mmproj"], mmproj)):
        proc = subprocess.run(
            [sys.executable, str(src / "convert_hf_to_gguf.py"), str(TINY), "--outfile", str(out), *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    reader = (
        "import json, sys\n"
        "from gguf import GGUFReader\n"
        "out = []\n"
        "for path in sys.argv[1:]:\n"
        "    r = GGUFReader(path)\n"
        "    keep = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith('tokenizer.')}\n"
        "    out.append({'fields': keep, 'tensors': len(r.tensors)})\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", reader, str(text), str(mmproj)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text_meta, vision_meta = json.loads(proc.stdout.strip().splitlines()[-1])
    t, v = text_meta["fields"], vision_meta["fields"]
    arch = t["general.architecture"]
    assert t[f"{arch}.attention.head_count"] == CONFIG["num_attention_heads"]
    assert t[f"{arch}.attention.head_count_kv"] == CONFIG["num_key_value_heads"]
    assert t[f"{arch}.block_count"] == CONFIG["num_hidden_layers"]
    assert t[f"{arch}.rope.dimension_sections"] == CONFIG["rope_scaling"]["mrope_section"] + [0]
    assert v["clip.vision.attention.head_count"] == CONFIG["vision_config"]["num_heads"]
    assert v["clip.vision.block_count"] == CONFIG["vision_config"]["depth"]
    assert v["clip.vision.feed_forward_length"] == CONFIG["vision_config"]["intermediate_size"]
    # every text tensor: embedding, output, final norm, and 12 per layer (q/k/v with biases, o, 3 MLP, 2 norms)
    assert text_meta["tensors"] == 3 + 12 * CONFIG["num_hidden_layers"]
