"""A field missing from config.json: transformers' default, reported, or a ConfigError naming the field.

Every field Qwen25VLConfig reads (its dataclass fields, text and vision) is deleted in turn from the
published 7B config.json (/work/shared/qwen2_tokenizer/model_config, see SOURCE.md) and from the tiny
fixture's. Expected values come from transformers 5.24 parsing the same dict, not from our table.
"""

import copy
import json
import os
import warnings
from dataclasses import fields

import pytest
from qwen25vl.spec.checkpoint import CheckpointError, load_checkpoint
from qwen25vl.spec.config import (
    REQUIRED,
    TRANSFORMERS_DEFAULTS,
    ConfigDefaultWarning,
    ConfigError,
    Qwen25VLConfig,
    VisionConfig,
)
from transformers import Qwen2_5_VLConfig

from ..conftest import MODEL_CONFIG_DIR

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY_DIR = os.path.join(ROOT, "fixtures", "checkpoints", "tiny")


def _read(folder):
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


BASES = {"7B": _read(MODEL_CONFIG_DIR), "tiny": _read(TINY_DIR)}

# Every config.json key the parser reads, from the dataclasses themselves (so a new field cannot be forgotten).
TEXT_KEYS = [
    "rope_scaling.mrope_section" if f.name == "mrope_section" else f.name
    for f in fields(Qwen25VLConfig)
    if f.name not in ("vision", "defaulted")
]
VISION_KEYS = ["vision_config." + f.name for f in fields(VisionConfig) if f.name != "rms_norm_eps"]  # not read
ALL_KEYS = TEXT_KEYS + VISION_KEYS


def test_every_field_has_a_decision():
    assert set(ALL_KEYS) == set(TRANSFORMERS_DEFAULTS) | set(REQUIRED) | {"pad_token_id"}
    assert not set(TRANSFORMERS_DEFAULTS) & set(REQUIRED)


def _without(raw: dict, key: str) -> dict:
    raw = copy.deepcopy(raw)
    if key == "rope_scaling.mrope_section":
        raw["rope_scaling"].pop("mrope_section", None)
    elif key.startswith("vision_config."):
        name = key.split(".", 1)[1]
        raw["vision_config"].pop(name, None)
        if name == "in_chans":
            raw["vision_config"].pop("in_channels", None)  # the same field under transformers' name
    else:
        raw.pop(key, None)
    return raw


def _transformers_value(raw: dict, key: str):
    """What transformers 5.24 makes of `key` when parsing `raw`."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    hf = Qwen2_5_VLConfig(**copy.deepcopy(raw))
    name = key.rsplit(".", 1)[-1]
    if key.startswith("vision_config."):
        value = getattr(hf.vision_config, "in_channels" if name == "in_chans" else name)
    elif name == "rope_theta":
        value = hf.text_config.rope_parameters["rope_theta"]
    elif name == "mrope_section":
        value = Qwen2_5_VLRotaryEmbedding(hf.text_config).mrope_section  # its fallback when the config has none
    elif hasattr(Qwen2_5_VLConfig, name) and name not in ("bos_token_id", "eos_token_id"):
        value = getattr(hf, name)  # token ids of the vision markers, tie_word_embeddings
    else:
        value = getattr(hf.text_config, name)
    return tuple(value) if isinstance(value, list) else value


def _ours(config: Qwen25VLConfig, key: str):
    name = key.rsplit(".", 1)[-1]
    return getattr(config.vision if key.startswith("vision_config.") else config, name)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("key", ALL_KEYS)
def test_missing_field_is_defaulted_and_reported_or_named(base, key):
    raw = _without(BASES[base], key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = Qwen25VLConfig.from_dict(raw, source="cfg.json")
        except ConfigError as e:
            message = str(e)
            assert key in message, message  # the error names the missing field ...
            if key in TRANSFORMERS_DEFAULTS:  # ... and the default that did not fit
                assert "transformers' defaults were used" in message, message
            return
    assert key not in REQUIRED, f"{key} is required but {base} without it parsed"
    if key == "pad_token_id":  # quiet: no published config.json has it; generation_config.json's pad id
        assert config.pad_token_id == config.bos_token_id == 151643 and config.defaulted == ()
        return
    assert config.defaulted == (key,)
    assert key in config.defaults_note
    reports = [str(w.message) for w in caught if issubclass(w.category, ConfigDefaultWarning)]
    assert len(reports) == 1 and key in reports[0] and reports[0].startswith("cfg.json: "), reports
    assert _ours(config, key) == _transformers_value(raw, key)


# outcomes by hand for the published 7B file (a real checkpoint's config, one field lost)
@pytest.mark.parametrize(
    "key, words",
    [
        ("hidden_size", "hidden_size=8192; with those: hidden_size 8192 is not divisible by num_attention_heads 28"),
        ("num_key_value_heads", "num_attention_heads 28 is not a multiple of num_key_value_heads 8"),
        ("vision_config.hidden_size", "vision_config.hidden_size is missing"),
    ],
)
def test_7b_outcomes_by_hand(key, words):
    with pytest.raises(ConfigError, match=words):
        Qwen25VLConfig.from_dict(_without(BASES["7B"], key))


def test_7b_defaults_by_hand():
    with pytest.warns(ConfigDefaultWarning, match="vision_config.tokens_per_second=4"):
        config = Qwen25VLConfig.from_dict(_without(BASES["7B"], "vision_config.tokens_per_second"))
    assert config.vision.tokens_per_second == 4 and config.defaulted == ("vision_config.tokens_per_second",)
    with pytest.warns(ConfigDefaultWarning, match="rms_norm_eps=1e-05"):
        assert Qwen25VLConfig.from_dict(_without(BASES["7B"], "rms_norm_eps")).rms_norm_eps == 1e-5
    assert Qwen25VLConfig.from_dict(BASES["7B"]).defaulted == ()  # the published file lacks nothing we read


def test_issue_example_tiny_without_hidden_size_names_it():
    with pytest.raises(ConfigError) as info:
        Qwen25VLConfig.from_dict(_without(BASES["tiny"], "hidden_size"), source="tiny")
    assert str(info.value).startswith("tiny: config.json has no hidden_size; transformers' defaults were used: ")


def test_in_chans_and_in_channels_must_agree():
    raw = copy.deepcopy(BASES["tiny"])
    raw["vision_config"]["in_channels"] = 1
    with pytest.raises(ConfigError, match="vision_config.in_chans 3 and vision_config.in_channels 1 disagree"):
        Qwen25VLConfig.from_dict(raw)


def test_defaulted_is_not_part_of_equality_nor_of_to_dict():
    with pytest.warns(ConfigDefaultWarning):
        config = Qwen25VLConfig.from_dict(_without(BASES["7B"], "max_position_embeddings"))
    assert "defaulted" not in config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Qwen25VLConfig.from_dict(config.to_dict())  # the default is now written down: no report
    assert again == config and again.defaulted == ()


def _tiny_copy(tmp_path, key):
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(TINY_DIR, folder)
    (folder / "config.json").write_text(json.dumps(_without(BASES["tiny"], key)))
    return folder


def test_defaulted_layer_count_is_named_by_the_shape_check(tmp_path):
    folder = _tiny_copy(tmp_path, "num_hidden_layers")
    with pytest.warns(ConfigDefaultWarning), pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    message = str(info.value)
    assert "missing 936:" in message  # layers 2..79, 12 tensors each
    assert "model.layers.N in the file: N = 0..1; config says num_hidden_layers=80" in message
    assert "config.json has no num_hidden_layers; transformers' defaults were used: num_hidden_layers=80" in message


def test_wrong_shape_names_the_config_fields(tmp_path):
    folder = _tiny_copy(tmp_path, "nothing")
    (folder / "config.json").write_text(json.dumps({**BASES["tiny"], "vocab_size": 1000}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    assert info.value.problems["wrong shape"] == [
        "model.embed_tokens.weight has shape [152064, 32], config says [vocab_size=1000, hidden_size=32]",
        "lm_head.weight has shape [152064, 32], config says [vocab_size=1000, hidden_size=32]",
    ]
