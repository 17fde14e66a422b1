"""spec/checkpoint.py: the key table against transformers, both layouts, shards, tying, and every refusal."""

import json
import math
import os
import pickle
import shutil

import pytest
import torch
from qwen25vl.spec.checkpoint import CheckpointError, expected_shapes, load_checkpoint, to_hub_key, to_v5_key
from qwen25vl.spec.config import ConfigError, Qwen25VLConfig
from qwen25vl.tools.make_tiny_checkpoint import make_tiny_checkpoint, tiny_config
from safetensors.torch import load_file, save_file

from ..conftest import MODEL_CONFIG_DIR
from .test_vision import CONFIG_3B


def _copy(src, dst, *, skip_weights=False):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors") if skip_weights else None)
    return dst


def _hf_shapes(config_json: dict) -> dict:
    """Key -> shape of transformers' own model built from a config (on the meta device: no memory)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config_json))
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny", "3B", "7B"])
def test_key_table_matches_transformers(name):
    if name == "tiny":
        raw = tiny_config().to_dict()
    elif name == "3B":
        raw = dict(CONFIG_3B)
    else:
        raw = json.loads(open(os.path.join(MODEL_CONFIG_DIR, "config.json")).read())
    config = Qwen25VLConfig.from_dict(raw)
    ours = {to_v5_key(k): s for k, s in expected_shapes(config).items()}
    assert ours == _hf_shapes(raw)


def test_key_table_by_hand():
    shapes = expected_shapes(tiny_config())
    assert len(shapes) == (1 + 4 * 12 + 5) + (1 + 2 * 12 + 2)  # vision, then text + lm_head
    assert shapes["visual.patch_embed.proj.weight"] == (64, 3, 2, 14, 14)
    assert shapes["visual.blocks.3.attn.qkv.weight"] == (192, 64)
    assert shapes["visual.blocks.0.mlp.down_proj.weight"] == (64, 112)
    assert shapes["visual.merger.mlp.0.weight"] == (256, 256)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (16, 32)  # two kv heads of 8
    assert shapes["model.layers.1.self_attn.q_proj.bias"] == (32,)
    assert shapes["lm_head.weight"] == (152064, 32)


def test_key_mapping():
    assert to_hub_key("model.visual.blocks.0.norm1.weight") == "visual.blocks.0.norm1.weight"
    assert to_hub_key("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert to_hub_key("model.norm.weight") == "model.norm.weight"
    assert to_hub_key("lm_head.weight") == "lm_head.weight"
    for key in expected_shapes(tiny_config()):
        assert to_hub_key(to_v5_key(key)) == key


def test_load_hub_untied(tiny_checkpoint):
    config, params = load_checkpoint(tiny_checkpoint)
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert config == tiny_config()
    assert set(params) == set(stored) == set(expected_shapes(config))
    assert all(torch.equal(params[k], stored[k]) for k in stored)
    assert params["lm_head.weight"].dtype == torch.bfloat16
    assert not torch.equal(params["lm_head.weight"], params["model.embed_tokens.weight"])


def test_load_agrees_with_transformers(tiny_checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float64)
    _, params = load_checkpoint(tiny_checkpoint, dtype=torch.float64)
    theirs = model.state_dict()
    assert {to_v5_key(k) for k in params} == set(theirs)
    assert all(torch.equal(params[k], theirs[to_v5_key(k)]) for k in params)


def test_load_v5_layout_equals_hub(tiny_checkpoint, tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "v5", layout="v5")
    stored = load_file(str(folder / "model.safetensors"))
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in stored
    assert "model.visual.merger.ln_q.weight" in stored
    _, hub = load_checkpoint(tiny_checkpoint)
    _, v5 = load_checkpoint(folder)
    assert set(hub) == set(v5)
    assert all(torch.equal(hub[k], v5[k]) for k in hub)


def test_load_tied(tiny_checkpoint_tied):
    assert "lm_head.weight" not in load_file(str(tiny_checkpoint_tied / "model.safetensors"))
    config, params = load_checkpoint(tiny_checkpoint_tied, dtype=torch.float64)
    assert config.tie_word_embeddings
    assert params["lm_head.weight"] is params["model.embed_tokens.weight"]  # one tensor even after the cast
    assert params["lm_head.weight"].dtype == torch.float64
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint_tied, dtype=torch.float64)
    assert torch.equal(model.lm_head.weight, params["lm_head.weight"])


def test_load_tied_with_stored_copy(tiny_checkpoint_tied, tmp_path):
    folder = _copy(tiny_checkpoint_tied, tmp_path / "c", skip_weights=True)
    stored = load_file(str(tiny_checkpoint_tied / "model.safetensors"))
    stored["lm_head.weight"] = stored["model.embed_tokens.weight"].clone()
    save_file(stored, str(folder / "model.safetensors"))
    _, params = load_checkpoint(folder)
    assert torch.equal(params["lm_head.weight"], stored["model.embed_tokens.weight"])
    stored["lm_head.weight"][0, 0] += 1
    save_file(stored, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tie_word_embeddings is true but the stored lm_head.weight differs"):
        load_checkpoint(folder)


def _write_shards(folder, tensors, split):
    keys = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": keys[:split], "model-00002-of-00002.safetensors": keys[split:]}
    for name, ks in parts.items():
        save_file({k: tensors[k] for k in ks}, str(folder / name))
    weight_map = {k: name for name, ks in parts.items() for k in ks}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_load_sharded(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "sharded", skip_weights=True)
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))
    _write_shards(folder, {to_v5_key(k): t for k, t in stored.items()}, split=40)  # v5 names, for good measure
    _, params = load_checkpoint(folder, dtype=torch.float32)
    assert set(params) == set(stored)
    assert all(torch.equal(params[k], stored[k].float()) for k in stored)


def test_sharded_index_problems(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "s", skip_weights=True)
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))
    _write_shards(folder, stored, split=40)
    os.remove(folder / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"shard files that are not in the folder: \['model-00002-of-00002"):
        load_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    with pytest.raises(CheckpointError, match="not plain .safetensors file names"):
        load_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        load_checkpoint(folder)


def test_same_tensor_in_two_shards(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "s", skip_weights=True)
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))
    _write_shards(folder, stored, split=40)
    first = load_file(str(folder / "model-00001-of-00002.safetensors"))
    assert "model.norm.weight" in first
    second = load_file(str(folder / "model-00002-of-00002.safetensors"))
    second["model.norm.weight"] = stored["model.norm.weight"]
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensors stored twice: \['model.norm.weight \(in model-00001"):
        load_checkpoint(folder)


def test_all_problems_in_one_error(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "bad", skip_weights=True)
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))
    del stored["model.norm.weight"]
    del stored["visual.blocks.2.attn.qkv.bias"]
    stored["visual.blocks.9.norm1.weight"] = torch.ones(32)
    stored["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    stored["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 32, dtype=torch.int32)
    save_file(stored, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert "missing 2: visual.blocks.2.attn.qkv.bias, model.norm.weight" in msg
    assert "unexpected 1: visual.blocks.9.norm1.weight" in msg
    assert (
        "wrong shape 1: model.layers.0.self_attn.k_proj.weight has shape [32, 32], config says "
        "[num_key_value_heads*head_dim=16 (head_dim = hidden_size/num_attention_heads = 8), hidden_size=32]"
    ) in msg
    assert "visual.blocks.N in the file: N = 0..3, 9; config says vision_config.depth=4" in msg
    assert "not floating point 1: model.layers.1.mlp.up_proj.weight torch.int32" in msg
    assert err.value.problems["missing"] == ["visual.blocks.2.attn.qkv.bias", "model.norm.weight"]


def test_long_lists_are_cut_in_the_message_only(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "wrongcfg")
    raw = json.loads((folder / "config.json").read_text())
    raw["vision_config"]["depth"] = 20  # 16 blocks of 12 tensors missing
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"missing 192: .*\(152 more\)") as err:
        load_checkpoint(folder)
    assert len(err.value.problems["missing"]) == 192


def test_both_layouts_for_one_tensor(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "dup", skip_weights=True)
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))
    stored["model.language_model.norm.weight"] = stored["model.norm.weight"].clone()
    save_file(stored, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="under both key layouts: .*model.language_model.norm.weight"):
        load_checkpoint(folder)


def test_config_disagrees_with_tensors(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "cfg")
    raw = json.loads((folder / "config.json").read_text())
    raw["intermediate_size"] = 96
    raw["vision_config"]["intermediate_size"] = 40
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert "wrong shape 26:" in msg
    assert len(err.value.problems["wrong shape"]) == 26 and set(err.value.problems) == {
        "wrong shape"
    }  # 4 blocks x (3 vision MLP weights + gate/up biases) + 2 layers x 3 text MLP weights
    assert (
        "model.layers.1.mlp.down_proj.weight has shape [32, 64], config says [hidden_size=32, intermediate_size=96]"
        in msg
    )
    assert "visual.blocks.3.mlp.up_proj.bias has shape [112], config says [vision_config.intermediate_size=40]" in msg


def test_no_folder_or_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist or is not a folder"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="has neither model.safetensors nor model.safetensors.index.json"):
        load_checkpoint(tmp_path)


class _Trap:
    """Unpickling this object would create a marker file: the loader must never do it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_only_is_refused_without_unpickling(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "bin", skip_weights=True)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(
        CheckpointError, match=r"only PyTorch pickle files \['pytorch_model.bin'\]; refusing .*executes code"
    ):
        load_checkpoint(folder)
    assert not marker.exists()


def test_corrupt_safetensors(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "corrupt", skip_weights=True)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors as safetensors"):
        load_checkpoint(folder)


def test_missing_or_bad_config(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "nocfg")
    os.remove(folder / "config.json")
    with pytest.raises(ConfigError, match="config file not found"):
        load_checkpoint(folder)


def test_dtype_cast_and_bad_dtype(tiny_checkpoint):
    _, params = load_checkpoint(tiny_checkpoint, dtype=torch.float64)
    assert {t.dtype for t in params.values()} == {torch.float64}
    n = sum(math.prod(t.shape) for t in params.values())
    assert n == sum(math.prod(s) for s in expected_shapes(tiny_config()).values())
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        load_checkpoint(tiny_checkpoint, dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        load_checkpoint(tiny_checkpoint, dtype="float64")
