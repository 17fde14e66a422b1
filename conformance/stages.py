"""The stages the harness judges: their names, order, tolerance class and meaning.

A stage is one junction of the road input -> preprocessing -> vision tower -> text decoder -> tokens
where a port's value can be compared with the spec's golden value. Names are defined here once and
equal the names `spec.forward(..., capture=...)` returns, so one grep finds the spec function, the
fixture key and the report line.

Two families:
  fn.*      exact-stage functions (preprocessing and index arithmetic), judged item by item on a
            table of inputs; a port that only ports preprocessing is judged here.
  model     preprocess.*, vision.*, text.*, logits, generate.tokens: one run of the model on one case.

Tolerance classes (the rule each applies is in conformance/compare.py):
  exact     integers, strings, index tensors: equal, element for element
  pixels    preprocessed pixel values: max |port - spec| <= 1e-5 (float32 arithmetic order only)
  cos_sin   rotary tables: max abs error <= 5e-3 (float32 tables at positions up to ~30k pass,
            bfloat16 tables or interleaved sections do not)
  float     activations: rel_err <= ALPHA * control_rel_err(dtype) + FLOOR[dtype]
  logits    mean KL(spec || port) <= ALPHA * control_kl + KL_FLOOR[dtype], top-1 agreement
  tokens    greedy tokens equal until the first divergence, each side's pick in the other's top-5
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..spec.forward import model_stage_names


@dataclass(frozen=True)
class Stage:
    name: str
    tolerance: str
    read: str  # the spec function that defines the stage
    meaning: str


# Adding a stage = one line here + its spec function + a fixture case in tools/generate_fixtures.py.
_TABLE = [
    # exact-stage functions, in the order data flows through them
    Stage(
        "fn.smart_resize",
        "exact",
        "spec/resize.py: smart_resize",
        "target (h, w) of the resize: round to the factor 28 (ties to even), then floor/ceil into the pixel budget",
    ),
    Stage(
        "fn.resize_bicubic",
        "exact",
        "spec/resize.py: resize_bicubic",
        "uint8 bicubic resize (Pillow's separable kernel, horizontal pass first)",
    ),
    Stage(
        "fn.sample_frame_indices",
        "exact",
        "spec/video.py: sample_frame_indices",
        "which video frames are read for a duration, source fps and target fps (even count, clamped)",
    ),
    Stage(
        "fn.patchify",
        "exact",
        "spec/patches.py: patchify",
        "pixel_values row order: 2x2 merge blocks contiguous, temporal pairs, rows of C*tp*p*p",
    ),
    Stage(
        "fn.preprocess_image",
        "pixels",
        "spec/image.py: preprocess_image",
        "load -> resize -> rescale/normalize (CLIP mean/std) -> patchify, and the grid",
    ),
    Stage(
        "fn.vision_rotary_positions",
        "exact",
        "spec/windows.py: vision_rotary_positions",
        "(row, col) of every patch in pixel_values row order, fed to the 2D vision rotary",
    ),
    Stage(
        "fn.window_partition",
        "exact",
        "spec/windows.py: window_partition",
        "window order of merged units, window boundaries (padding windows de-duplicated) and per-frame boundaries",
    ),
    Stage(
        "fn.render_chat",
        "exact",
        "spec/chat.py: render_chat",
        "the chat template: system prompt, role markers, vision placeholders",
    ),
    Stage(
        "fn.expand_vision_tokens",
        "exact",
        "spec/tokens.py: expand_vision_tokens",
        "each <|image_pad|>/<|video_pad|> repeated prod(grid_thw)/merge_size^2 times",
    ),
    Stage(
        "fn.tokenize",
        "exact",
        "spec/tokens.py: load_tokenizer",
        "token ids of the rendered, expanded prompt (special tokens kept whole)",
    ),
    Stage(
        "fn.rope_index",
        "exact",
        "spec/mrope.py: rope_index",
        "3D MRoPE positions (t, h, w) and rope_deltas: image/video spans, text after a span, left padding",
    ),
    Stage(
        "fn.decode_positions",
        "exact",
        "spec/mrope.py: decode_positions",
        "positions of decode steps: cache length + rope_deltas, the same on the three rows",
    ),
    Stage(
        "fn.mrope_cos_sin",
        "cos_sin",
        "spec/mrope.py: mrope_cos_sin",
        "rotary tables of the text decoder: frequency pairs sectioned [t | h | w] (not interleaved)",
    ),
    # one model run
    Stage(
        "preprocess.input_ids",
        "exact",
        "spec/tokens.py: build_inputs",
        "prompt token ids, left padded with 151643, vision pads expanded",
    ),
    Stage("preprocess.attention_mask", "exact", "spec/tokens.py: build_inputs", "1 on tokens, 0 on left padding"),
    Stage(
        "preprocess.pixel_values", "pixels", "spec/image.py: preprocess_image", "image patches, all images concatenated"
    ),
    Stage(
        "preprocess.image_grid_thw", "exact", "spec/image.py: preprocess_image", "(t, h, w) patch grid of each image"
    ),
    Stage("preprocess.pixel_values_videos", "pixels", "spec/video.py: preprocess_video", "video patches"),
    Stage(
        "preprocess.video_grid_thw", "exact", "spec/video.py: preprocess_video", "(t, h, w) patch grid of each video"
    ),
    Stage(
        "preprocess.second_per_grid_ts",
        "exact",
        "spec/video.py: preprocess_video",
        "seconds per temporal patch: temporal_patch_size / sampled fps",
    ),
    Stage("vision.patch_embed", "float", "spec/vision.py: patch_embed", "Conv3d patch embedding as a matmul [P, Cv]"),
    Stage(
        "vision.block.{i}",
        "float",
        "spec/vision.py: vision_block (windows: spec/windows.py)",
        "vision block i in pixel_values row order: window attention (or full attention in fullatt_block_indexes) "
        "with 2D rotary permuted together with the windows, then the MLP",
    ),
    Stage(
        "vision.merger", "float", "spec/vision.py: patch_merger", "RMSNorm, 2x2 group, MLP; un-permuted to item order"
    ),
    Stage(
        "text.inputs_embeds",
        "float",
        "spec/text.py: embed, scatter_vision_features",
        "token embeddings with vision features scattered into the pad positions",
    ),
    Stage("text.position_ids", "exact", "spec/mrope.py: rope_index", "MRoPE positions used by the model run"),
    Stage("text.rope_deltas", "exact", "spec/mrope.py: rope_index", "offset carried into decode"),
    Stage(
        "text.layer.{i}",
        "float",
        "spec/text.py: decoder_layer (rotary: spec/mrope.py)",
        "decoder layer i: GQA attention with MRoPE, causal + padding mask, SwiGLU MLP",
    ),
    Stage("text.norm", "float", "spec/text.py: final_norm", "final RMSNorm"),
    Stage("logits", "logits", "spec/text.py: lm_head", "LM head over every position"),
    Stage(
        "generate.tokens",
        "tokens",
        "spec/generate.py: generate_greedy",
        "greedy continuation with the KV cache: decode positions carry rope_deltas",
    ),
]

STAGES = {s.name: s for s in _TABLE}
_ORDER = {s.name: k for k, s in enumerate(_TABLE)}
_INDEXED = re.compile(r"^(vision\.block|text\.layer)\.(\d+)$")

FN_STAGES = [s.name for s in _TABLE if s.name.startswith("fn.")]
PREPROCESS_STAGES = [s.name for s in _TABLE if s.name.startswith("preprocess.")]
INPUT_KEYS = [n[len("preprocess.") :] for n in PREPROCESS_STAGES]


def template(name: str) -> str:
    """'vision.block.3' -> 'vision.block.{i}'; other names unchanged."""
    m = _INDEXED.match(name)
    return f"{m.group(1)}.{{i}}" if m else name


def info(name: str) -> Stage:
    """The Stage of a name (block/layer index filled in). KeyError for an unknown name."""
    base = STAGES[template(name)]
    if base.name == name:
        return base
    return Stage(name, base.tolerance, base.read, base.meaning.replace(" i", " " + name.rsplit(".", 1)[1], 1))


def is_known(name: str) -> bool:
    return template(name) in STAGES


def order_key(name: str) -> tuple[int, int]:
    """Position in the data flow; block and layer indices sort numerically."""
    m = _INDEXED.match(name)
    return (_ORDER[template(name)], int(m.group(2)) if m else 0)


# Every capture stage of one model run, in data-flow order: the spec's own list, not a copy.
model_stages = model_stage_names


def previous(name: str, vision_depth: int, text_layers: int | None = None) -> str | None:
    """The stage whose golden output feeds `name` when run teacher-forced (None: fed by the model inputs).
    text.norm is fed by the last decoder layer, so it needs `text_layers`."""
    m = _INDEXED.match(name)
    if m and m.group(1) == "vision.block":
        i = int(m.group(2))
        return "vision.patch_embed" if i == 0 else f"vision.block.{i - 1}"
    if m:  # text.layer.i
        i = int(m.group(2))
        return "text.inputs_embeds" if i == 0 else f"text.layer.{i - 1}"
    return {
        "vision.merger": f"vision.block.{vision_depth - 1}",
        "text.inputs_embeds": "vision.merger",
        "text.norm": f"text.layer.{text_layers - 1}" if text_layers else None,
        "logits": "text.norm",
    }.get(name)
