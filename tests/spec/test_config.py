"""Qwen25VLConfig: the real 3B / 7B / 72B configs, both file layouts, and a clear error for every bad field.

Expected values: the numbers of hf_reference.md §8.1 (the published config.json files) and transformers'
own Qwen2_5_VLConfig parsing the same dicts.
"""

import copy
import json
import os

import pytest
from qwen25vl.spec.config import ConfigError, Qwen25VLConfig
from transformers import Qwen2_5_VLConfig

from tests.conftest import TOKENIZER_DIR

with open(os.path.join(TOKENIZER_DIR, "model_config", "config.json"), encoding="utf-8") as f:
    RAW_7B = json.load(f)


def variant(**text):
    """The 7B file with some top-level fields replaced (vision fields as v_<name>)."""
    raw = copy.deepcopy(RAW_7B)
    for key, value in text.items():
        if key.startswith("v_"):
            raw["vision_config"][key[2:]] = value
        else:
            raw[key] = value
    return raw


RAW_3B = variant(
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    v_out_hidden_size=2048,
)
RAW_72B = variant(
    hidden_size=8192,
    intermediate_size=29568,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    v_out_hidden_size=8192,
    v_intermediate_size=3456,
)

# name: (raw, hidden, layers, heads, kv heads, vocab, tied) from hf_reference.md §8.1
REAL = {
    "3B": (RAW_3B, 2048, 36, 16, 2, 151936, True),
    "7B": (RAW_7B, 3584, 28, 28, 4, 152064, False),
    "72B": (RAW_72B, 8192, 80, 64, 8, 152064, False),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_configs_parse(name):
    raw, hidden, layers, heads, kv, vocab, tied = REAL[name]
    config = Qwen25VLConfig.from_dict(raw)
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
        config.tie_word_embeddings,
    ) == (hidden, layers, heads, kv, vocab, tied)
    assert config.head_dim == 128 and config.kv_groups == heads // kv
    assert config.mrope_section == (16, 24, 24) and config.rope_theta == 1e6 and config.rms_norm_eps == 1e-6
    assert config.vision.out_hidden_size == hidden and config.vision.head_dim == 80
    assert config.vision.fullatt_block_indexes == (7, 15, 23, 31) and config.vision.window_units == 4
    assert (config.image_token_id, config.video_token_id, config.vision_start_token_id) == (151655, 151656, 151652)
    # transformers reads the same dict to the same numbers
    hf = Qwen2_5_VLConfig(**copy.deepcopy(raw))
    text, vision = hf.text_config, hf.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_key_value_heads) == (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_key_value_heads,
    )
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads, vision.window_size) == (
        config.vision.depth,
        config.vision.hidden_size,
        config.vision.intermediate_size,
        config.vision.num_heads,
        config.vision.window_size,
    )
    assert list(vision.fullatt_block_indexes) == list(config.vision.fullatt_block_indexes)


def test_file_and_folder_and_v5_layout_agree(tmp_path):
    from_folder = Qwen25VLConfig.from_file(os.path.join(TOKENIZER_DIR, "model_config"))
    assert from_folder == Qwen25VLConfig.from_dict(RAW_7B)
    nested = Qwen2_5_VLConfig(**copy.deepcopy(RAW_7B)).to_dict()  # transformers v5: text_config + rope_parameters
    assert "text_config" in nested and "hidden_size" not in nested
    assert Qwen25VLConfig.from_dict(nested) == from_folder
    path = tmp_path / "config.json"
    path.write_text(json.dumps(from_folder.to_dict()))
    assert Qwen25VLConfig.from_file(path) == from_folder  # to_dict round trip


def test_generation_style_eos_list_takes_the_first():
    assert Qwen25VLConfig.from_dict(variant(eos_token_id=[151645, 151643])).eos_token_id == 151645


@pytest.mark.parametrize(
    "raw, words",
    [
        (variant(hidden_size="3584"), "config.hidden_size must be an integer, got '3584'"),
        (variant(hidden_size=3584.0), "config.hidden_size must be an integer, got 3584.0"),
        (variant(num_key_value_heads=True), "config.num_key_value_heads must be an integer, got True"),
        (variant(rope_theta="1e6"), "config.rope_theta must be a number, got '1e6'"),
        (variant(tie_word_embeddings="false"), "config.tie_word_embeddings must be true or false, got 'false'"),
        (variant(vocab_size=0), "config.vocab_size must be positive, got 0"),
        (variant(v_tokens_per_second="2"), "vision_config.tokens_per_second must be a number, got '2'"),
        (variant(image_token_id=None), "config.image_token_id must be an integer, got None"),
        # shapes that cannot work
        (
            variant(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 16]}),
            "mrope_section [16, 24, 16] must be three sections summing to head_dim/2 = 64",
        ),
        (variant(rope_scaling={"type": "mrope", "mrope_section": [32, 32]}), "must be three sections"),
        (variant(hidden_size=3585), "hidden_size 3585 is not divisible by num_attention_heads 28"),
        (variant(num_key_value_heads=5), "num_attention_heads 28 is not a multiple of num_key_value_heads 5"),
        (variant(v_out_hidden_size=2048), "vision_config.out_hidden_size 2048 must equal hidden_size 3584"),
        (variant(v_num_heads=15), "vision_config.hidden_size 1280 is not divisible by num_heads 15"),
        (variant(v_fullatt_block_indexes=[7, 32]), "fullatt_block_indexes [7, 32] has blocks outside 0..31: [32]"),
        (variant(v_window_size=100), "window_size 100 is not a multiple of patch_size*spatial_merge_size = 28"),
        (variant(hidden_act="gelu"), "hidden_act must be 'silu'"),
        # containers of the wrong kind (these used to escape as bare TypeError/IndexError from the parser)
        (
            variant(rope_scaling={"type": "mrope", "mrope_section": 64}),
            "config.mrope_section must be a list of integers, got 64",
        ),
        (variant(v_fullatt_block_indexes=7), "vision_config.fullatt_block_indexes must be a list of integers, got 7"),
        (variant(rope_scaling="mrope"), "'rope_scaling' must be an object"),
        (variant(text_config=[1, 2]), "'text_config' must be an object, got list"),
        (variant(eos_token_id=[]), "config.eos_token_id is an empty list"),
        (variant(vision_config=None), "'vision_config' is missing or not an object"),
        ([RAW_7B], "expected a JSON object, got list"),
    ],
)
def test_bad_fields_raise_config_error_naming_the_field(raw, words):
    with pytest.raises(ConfigError) as info:
        Qwen25VLConfig.from_dict(raw, source="cfg.json")
    message = str(info.value)
    assert words in message and message.startswith("cfg.json: "), message
    assert isinstance(info.value, ValueError)  # ConfigError is a ValueError, as the contract asks


def test_bad_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        Qwen25VLConfig.from_file(tmp_path)
    with pytest.raises(ConfigError, match="config file not found"):
        Qwen25VLConfig.from_file(tmp_path / "nothing")
