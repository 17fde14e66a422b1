"""Qwen25VLConfig: the numbers that define one Qwen2.5-VL checkpoint, read from its config.json.

Two frozen dataclasses, the vision tower's and the whole model's. Fields keep the names of the
Hugging Face config.json so that a reader can match them line by line; derived sizes (head_dim,
kv groups) are computed once here and validated, never overwritten.

Hub config.json files are "flat" (text fields at the top level, `vision_config` nested); transformers
v5 writes a nested `text_config`. Both are read.

A field missing from config.json gets the default transformers 5.24 gives it (Qwen2_5_VLTextConfig,
Qwen2_5_VLVisionConfig, Qwen2_5_VLConfig in configuration_qwen2_5_vl.py: the TRANSFORMERS_DEFAULTS
table), and is reported: `config.defaulted` names it and a ConfigDefaultWarning says which value was
used. The dataclass defaults below are the 7B checkpoint's and are used only when a config is built
in code. Two exceptions:
  - REQUIRED fields raise ConfigError naming the field: sizes whose transformers default fits no
    published checkpoint (3B, 7B, 72B), so a guess could only end as a list of wrongly shaped tensors.
  - pad_token_id (absent from every published config.json; transformers' default is None) quietly
    takes bos_token_id, as every published generation_config.json does (151643).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """A config.json field is missing, has the wrong type, or the sizes it gives cannot work together."""


class ConfigDefaultWarning(UserWarning):
    """config.json lacks a field, and transformers' default was used for it."""


# config.json key (vision keys as vision_config.<key>) -> transformers 5.24's default for it. mrope_section has
# no config default: Qwen2_5_VLRotaryEmbedding falls back to [16, 24, 24] (modeling_qwen2_5_vl.py).
TRANSFORMERS_DEFAULTS: dict[str, object] = {
    "vocab_size": 152064,
    "hidden_size": 8192,  # the text defaults are the 72B checkpoint's
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,  # every published checkpoint says 1e-6
    "rope_theta": 1_000_000.0,
    "rope_scaling.mrope_section": (16, 24, 24),
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,  # published: 128000
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_config.depth": 32,
    "vision_config.intermediate_size": 3420,
    "vision_config.num_heads": 16,
    "vision_config.in_chans": 3,  # transformers reads in_channels; hub files write in_chans
    "vision_config.out_hidden_size": 3584,
    "vision_config.patch_size": 14,
    "vision_config.temporal_patch_size": 2,
    "vision_config.spatial_merge_size": 2,
    "vision_config.window_size": 112,
    "vision_config.fullatt_block_indexes": (7, 15, 23, 31),
    "vision_config.tokens_per_second": 4,  # published: 2
    "vision_config.hidden_act": "silu",
}
# transformers' vision hidden_size default is 3584; every published vision tower is 1280 wide.
REQUIRED = ("vision_config.hidden_size",)


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_chans: int = 3
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2
    rms_norm_eps: float = 1e-6  # hard-coded in the reference vision tower, not read from config.json
    hidden_act: str = "silu"

    def __post_init__(self):
        _check_types(self, "vision_config")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.head_dim % 4:
            raise ConfigError(
                f"vision head_dim {self.head_dim} must be a multiple of 4 (2D rotary splits it into row and column halves)"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(
                f"vision_config.fullatt_block_indexes {list(self.fullatt_block_indexes)} has blocks outside 0..{self.depth - 1}: {bad}"
            )
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit:
            raise ConfigError(
                f"vision_config.window_size {self.window_size} is not a multiple of patch_size*spatial_merge_size = {unit}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * temporal_patch_size * patch_size**2 (1176)."""
        return self.in_chans * self.temporal_patch_size * self.patch_size**2

    @property
    def window_units(self) -> int:
        """Side of one attention window in merged tokens (112 / 14 / 2 = 4)."""
        return self.window_size // (self.patch_size * self.spatial_merge_size)


@dataclass(frozen=True)
class Qwen25VLConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision: VisionConfig = field(default_factory=VisionConfig)
    # config.json keys that were missing and took TRANSFORMERS_DEFAULTS; not part of equality
    defaulted: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        _check_types(self, "config")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        if len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.head_dim:
            raise ConfigError(
                f"rope_scaling.mrope_section {list(self.mrope_section)} must be three sections summing to head_dim/2 = {self.head_dim // 2}"
            )
        if self.vision.out_hidden_size != self.hidden_size:
            raise ConfigError(
                f"vision_config.out_hidden_size {self.vision.out_hidden_size} must equal hidden_size {self.hidden_size}"
            )
        if self.hidden_act != "silu" or self.vision.hidden_act != "silu":
            raise ConfigError(
                f"hidden_act must be 'silu' (text {self.hidden_act!r}, vision {self.vision.hidden_act!r})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_groups(self) -> int:
        """Query heads served by one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def defaults_note(self) -> str:
        """One line naming the defaulted fields and their values; empty when config.json gave every field."""
        return _defaults_note(self.defaulted)

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config") -> Qwen25VLConfig:
        return _parse(raw, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Qwen25VLConfig:
        """Read a config.json file, or the config.json inside a checkpoint folder."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return _parse(raw, path)

    def to_dict(self) -> dict:
        """The flat hub layout of config.json (what make_tiny_checkpoint writes)."""
        skip = ("vision", "mrope_section", "defaulted")
        text = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        vision = {f.name: getattr(self.vision, f.name) for f in fields(self.vision) if f.name != "rms_norm_eps"}
        vision["fullatt_block_indexes"] = list(self.vision.fullatt_block_indexes)
        vision["spatial_patch_size"] = self.vision.patch_size
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            **text,
            "vision_token_id": 151654,
            "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "torch_dtype": "bfloat16",
            "vision_config": vision,
        }


def _check_types(obj, where: str) -> None:
    for f in fields(obj):
        if f.name == "defaulted":
            continue
        value = getattr(obj, f.name)
        expected = f.type if isinstance(f.type, str) else f.type.__name__
        if expected == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{where}.{f.name} must be an integer, got {value!r}")
        if expected == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ConfigError(f"{where}.{f.name} must be a number, got {value!r}")
        if expected == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where}.{f.name} must be true or false, got {value!r}")
        if expected.startswith("tuple") and not (
            isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"{where}.{f.name} must be a list of integers, got {shown!r}")
        if expected in ("int", "float") and value <= 0 and f.name not in ("bos_token_id", "pad_token_id"):
            raise ConfigError(f"{where}.{f.name} must be positive, got {value!r}")


def _pick(raw: dict, cls) -> dict:
    """Keep the config.json fields of `cls` that `raw` sets; lists become tuples."""
    names = {f.name for f in fields(cls)} - {"vision", "defaulted"}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names}


def _defaults_note(defaulted: tuple[str, ...]) -> str:
    if not defaulted:
        return ""
    used = ", ".join(
        f"{k}={list(v) if isinstance(v, tuple) else v!r}" for k in defaulted for v in [TRANSFORMERS_DEFAULTS[k]]
    )
    return f"config.json has no {', '.join(defaulted)}; transformers' defaults were used: {used}"


def _fill_defaults(text_fields: dict, vision_fields: dict, source: str) -> tuple[str, ...]:
    """Put TRANSFORMERS_DEFAULTS into the missing fields (in place); return their config.json keys."""
    for key in REQUIRED:
        if key.rsplit(".", 1)[-1] not in vision_fields:
            raise ConfigError(
                f"{source}: {key} is missing; it sets the width of every vision tensor, and transformers' "
                "default (3584) fits no published checkpoint (all are 1280 wide)"
            )
    defaulted = []
    for key, value in TRANSFORMERS_DEFAULTS.items():
        fields_ = vision_fields if key.startswith("vision_config.") else text_fields
        name = key.rsplit(".", 1)[-1]
        if name not in fields_:
            fields_[name] = value
            defaulted.append(key)
    text_fields.setdefault("pad_token_id", text_fields["bos_token_id"])  # generation_config.json's pad id
    return tuple(defaulted)


def _parse(raw: dict, source: str) -> Qwen25VLConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    text = dict(raw)
    nested = raw.get("text_config")
    if nested is not None and not isinstance(nested, dict):
        raise ConfigError(f"{source}: 'text_config' must be an object, got {type(nested).__name__} {nested!r:.80}")
    text.update(nested or {})  # transformers v5 nests the text fields
    vision_raw = raw.get("vision_config")
    if not isinstance(vision_raw, dict):
        raise ConfigError(f"{source}: 'vision_config' is missing or not an object")
    for key in ("rope_scaling", "rope_parameters"):
        if text.get(key) is not None and not isinstance(text[key], dict):
            raise ConfigError(
                f"{source}: {key!r} must be an object such as "
                f'{{"type": "mrope", "mrope_section": [16, 24, 24]}}, got {text[key]!r:.80}'
            )
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    if "mrope_section" in rope:
        text["mrope_section"] = rope["mrope_section"]
    if "rope_theta" in rope and "rope_theta" not in raw:
        text["rope_theta"] = rope["rope_theta"]
    if isinstance(text.get("eos_token_id"), list):  # generation-style list: the first is <|im_end|>
        if not text["eos_token_id"]:
            raise ConfigError(f"{source}: config.eos_token_id is an empty list; give at least one token id")
        text["eos_token_id"] = text["eos_token_id"][0]
    if text.get("pad_token_id") is None:
        text.pop("pad_token_id", None)
    vision_fields = _pick(vision_raw, VisionConfig)
    if "in_channels" in vision_raw:  # the name transformers reads (it ignores the hub's in_chans)
        if "in_chans" in vision_fields and vision_fields["in_chans"] != vision_raw["in_channels"]:
            raise ConfigError(
                f"{source}: vision_config.in_chans {vision_fields['in_chans']!r} and vision_config.in_channels "
                f"{vision_raw['in_channels']!r} disagree (transformers reads in_channels)"
            )
        vision_fields["in_chans"] = vision_raw["in_channels"]
    text_fields = _pick(text, Qwen25VLConfig)
    defaulted = _fill_defaults(text_fields, vision_fields, source)
    note = _defaults_note(defaulted)
    try:
        vision = VisionConfig(**vision_fields)
        config = Qwen25VLConfig(**text_fields, vision=vision, defaulted=defaulted)
    except ConfigError as e:
        raise ConfigError(f"{source}: {note}; with those: {e}" if note else f"{source}: {e}") from None
    if note:
        warnings.warn(f"{source}: {note}", ConfigDefaultWarning, stacklevel=3)
    return config
