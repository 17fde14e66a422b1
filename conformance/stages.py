"""The stage registry: every stage the harness judges, one row each (in the manner of onnx's op list).

A stage is one junction of the road input -> preprocessing -> vision tower -> text decoder -> tokens
where a port's value can be compared with the spec's golden value. A row carries everything about
its stage: the name (equal to what `spec.forward(..., capture=...)` returns, so one grep finds the
spec function, the fixture key and the report line), the spec function(s) that define it (`read`,
the "which code to read" line of a report, is derived from them, so renaming a spec function breaks
this file at import), the tolerance object that judges it (tolerances.py), its meaning, and for a
`fn.*` stage the adapter method, its call signature and the item driver (drivers.py).

Two families:
  fn.*      exact-stage functions (preprocessing and index arithmetic), judged item by item on a
            table of inputs; a port that only ports preprocessing is judged here.
  model     preprocess.*, vision.*, text.*, logits, generate.tokens: one run of the model on one case.

Adding an exact stage = its spec function + one row here (+ its driver in drivers.py when no existing
driver fits) + its fixture items (tools/generate_fixtures.py). The adapter protocol gets a method
that raises NotCovered, and the spec adapter one that calls the spec function, from the row
(tests/conformance/test_registry.py adds a stage that way). docs/INTERFACES.md's stage list is
checked against this table by that test.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..spec import chat as spec_chat
from ..spec import forward as spec_forward
from ..spec import generate as spec_generate
from ..spec import image, mrope, patches, resize, text, tokens, video, vision, windows
from ..spec.forward import INPUT_KEYS as MODEL_INPUT_KEYS
from ..spec.forward import model_stage_names
from . import drivers
from .tolerances import COS_SIN, EXACT, FLOAT, LOGITS, PIXELS, TOKENS, Tolerance


@dataclass(frozen=True)
class Stage:
    name: str
    spec: tuple[Callable, ...]  # the spec function(s) that define the stage
    tolerance: Tolerance
    meaning: str
    # fn.* stages: the adapter method, its signature (documentation), the item driver, and whether
    # the spec adapter may call the spec function with the adapter's arguments unchanged
    call: str = ""
    driver: Callable | None = None
    direct: bool = False
    # text stages: which axes the attention mask covers ("BL": [B, L, ...], "3BL": [3, B, L])
    masked: str | None = None
    # applied to an item's expected value and the port's answer before comparing (inputs, value) -> value
    normalize: Callable | None = None

    @property
    def read(self) -> str:
        """'spec/text.py: embed, scatter_vision_features' (grouped by module, in row order)."""
        by_module: dict[str, list[str]] = {}
        for fn in self.spec:
            by_module.setdefault(fn.__module__.rsplit(".", 1)[-1], []).append(fn.__name__)
        return "; ".join(f"spec/{m}.py: {', '.join(names)}" for m, names in by_module.items())

    @property
    def method(self) -> str:
        """The adapter method of a fn.* stage: its name without 'fn.'."""
        return self.name[len("fn.") :] if self.name.startswith("fn.") else ""


def fn_stage(name, spec, tolerance, meaning, call, driver, *, direct=True, normalize=None) -> Stage:
    return Stage(name, (spec,), tolerance, meaning, call=call, driver=driver, direct=direct, normalize=normalize)


_TABLE = [
    # exact-stage functions, in the order data flows through them
    fn_stage(
        "fn.smart_resize",
        resize.smart_resize,
        EXACT,
        "target (h, w) of the resize: round to the factor 28 (ties to even), then floor/ceil into the pixel budget",
        "smart_resize(height, width, *, factor, min_pixels, max_pixels) -> (h, w)  (ValueError when refused)",
        drivers.smart_resize,
    ),
    fn_stage(
        "fn.resize_bicubic",
        resize.resize_bicubic,
        EXACT,
        "uint8 bicubic resize (Pillow's separable kernel, horizontal pass first)",
        "resize_bicubic(image uint8 [H, W, 3], size (h, w)) -> uint8 [h, w, 3]",
        drivers.resize_bicubic,
    ),
    fn_stage(
        "fn.sample_frame_indices",
        video.sample_frame_indices,
        EXACT,
        "which video frames are read for a duration, source fps and target fps (even count, clamped)",
        "sample_frame_indices(total_frames, video_fps, *, fps, min_frames, max_frames, nframes) -> list[int]",
        drivers.sample_frame_indices,
    ),
    fn_stage(
        "fn.patchify",
        patches.patchify,
        EXACT,
        "pixel_values row order: 2x2 merge blocks contiguous, temporal pairs, rows of C*tp*p*p",
        "patchify(frames [T, C, H, W], *, patch_size, temporal_patch_size, merge_size) -> (pixel_values, grid_thw)",
        drivers.patchify,
    ),
    fn_stage(
        "fn.preprocess_image",
        image.preprocess_image,
        PIXELS,
        "load -> resize -> rescale/normalize (CLIP mean/std) -> patchify, and the grid",
        "preprocess_image(image uint8 [H, W, 3], *, min_pixels, max_pixels) -> (pixel_values [P, 1176], grid_thw [1, 3])",
        drivers.preprocess_image,
    ),
    fn_stage(
        "fn.vision_rotary_positions",
        windows.vision_rotary_positions,
        EXACT,
        "(row, col) of every patch in pixel_values row order, fed to the 2D vision rotary",
        "vision_rotary_positions(grid_thw [k, 3], *, merge_size) -> int [P, 2]",
        drivers.vision_rotary_positions,
    ),
    fn_stage(
        "fn.window_partition",
        windows.window_partition,
        EXACT,
        "window order of merged units, window boundaries (padding windows de-duplicated) and per-frame boundaries",
        "window_partition(grid_thw, *, window_size, patch_size, merge_size) -> (window_index, cu_window_seqlens, cu_seqlens)",
        drivers.window_partition,
    ),
    fn_stage(
        "fn.render_chat",
        spec_chat.render_chat,
        EXACT,
        "the chat template: system prompt, role markers, vision placeholders",
        "render_chat(messages, *, add_generation_prompt, add_vision_id) -> str",
        drivers.render_chat,
    ),
    fn_stage(
        "fn.expand_vision_tokens",
        tokens.expand_vision_tokens,
        EXACT,
        "each <|image_pad|>/<|video_pad|> repeated prod(grid_thw)/merge_size^2 times",
        "expand_vision_tokens(texts, image_grid_thw, video_grid_thw, *, merge_size) -> list[str]",
        drivers.expand_vision_tokens,
    ),
    fn_stage(
        "fn.tokenize",
        tokens.load_tokenizer,
        EXACT,
        "token ids of the rendered, expanded prompt (special tokens kept whole)",
        "tokenize(text, *, tokenizer_dir) -> list[int]",
        drivers.tokenize,
        direct=False,
    ),
    fn_stage(
        "fn.rope_index",
        mrope.rope_index,
        EXACT,
        "3D MRoPE positions (t, h, w) and rope_deltas: image/video spans, text after a span, left padding",
        "rope_index(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config: dict)"
        " -> (position_ids [3, B, L], rope_deltas [B, 1])",
        drivers.rope_index,
        direct=False,
    ),
    fn_stage(
        "fn.decode_positions",
        mrope.decode_positions,
        EXACT,
        "positions of decode steps: cache length + rope_deltas, the same on the three rows",
        "decode_positions(rope_deltas [B, 1], start, steps) -> [3, B, steps]",
        drivers.decode_positions,
    ),
    fn_stage(
        "fn.mrope_cos_sin",
        mrope.mrope_cos_sin,
        COS_SIN,
        "rotary tables of the text decoder: frequency pairs sectioned [t | h | w] (not interleaved)",
        "mrope_cos_sin(position_ids [3, B, L], *, head_dim, theta, mrope_section) -> (cos, sin) [B, L, D]",
        drivers.mrope_cos_sin,
        direct=False,
    ),
    # one model run
    Stage(
        "preprocess.input_ids",
        (tokens.build_inputs,),
        EXACT,
        "prompt token ids, left padded with 151643, vision pads expanded",
    ),
    Stage("preprocess.attention_mask", (tokens.build_inputs,), EXACT, "1 on tokens, 0 on left padding"),
    Stage("preprocess.pixel_values", (image.preprocess_image,), PIXELS, "image patches, all images concatenated"),
    Stage("preprocess.image_grid_thw", (image.preprocess_image,), EXACT, "(t, h, w) patch grid of each image"),
    Stage("preprocess.pixel_values_videos", (video.preprocess_video,), PIXELS, "video patches"),
    Stage("preprocess.video_grid_thw", (video.preprocess_video,), EXACT, "(t, h, w) patch grid of each video"),
    Stage(
        "preprocess.second_per_grid_ts",
        (video.preprocess_video,),
        EXACT,
        "seconds per temporal patch: temporal_patch_size / sampled fps",
    ),
    Stage("vision.patch_embed", (vision.patch_embed,), FLOAT, "Conv3d patch embedding as a matmul [P, Cv]"),
    Stage(
        "vision.block.{i}",
        (vision.vision_block, windows.window_partition),
        FLOAT,
        "vision block i in pixel_values row order: window attention (or full attention in fullatt_block_indexes) "
        "with 2D rotary permuted together with the windows, then the MLP",
    ),
    Stage("vision.merger", (vision.patch_merger,), FLOAT, "RMSNorm, 2x2 group, MLP; un-permuted to item order"),
    Stage(
        "text.inputs_embeds",
        (text.embed, text.scatter_vision_features),
        FLOAT,
        "token embeddings with vision features scattered into the pad positions",
        masked="BL",
    ),
    Stage("text.position_ids", (mrope.rope_index,), EXACT, "MRoPE positions used by the model run", masked="3BL"),
    Stage("text.rope_deltas", (mrope.rope_index,), EXACT, "offset carried into decode"),
    Stage(
        "text.layer.{i}",
        (text.decoder_layer, mrope.apply_mrope),
        FLOAT,
        "decoder layer i: GQA attention with MRoPE, causal + padding mask, SwiGLU MLP",
        masked="BL",
    ),
    Stage("text.norm", (text.final_norm,), FLOAT, "final RMSNorm", masked="BL"),
    Stage("logits", (text.lm_head,), LOGITS, "LM head over every position", masked="BL"),
    Stage(
        "generate.tokens",
        (spec_generate.generate_greedy,),
        TOKENS,
        "greedy continuation with the KV cache: decode positions carry rope_deltas",
    ),
    # not a junction of the model but a property of the port, judged on every model case it ran
    Stage(
        "state.repeat",
        (spec_forward.forward, spec_generate.generate_greedy),
        EXACT,
        "the same request gives the same outputs whatever ran before it in the same process "
        "(no positions, rope_deltas or prefix caches kept from an earlier request)",
    ),
    Stage(
        "state.chunked",
        (spec_forward.decoder_stack_in_chunks, spec_generate.generate_greedy),
        TOKENS,
        "the prompt prefilled in chunks, a boundary inside a vision span, gives the golden generation "
        "(each chunk takes the whole prompt's positions and vision features at its own offset)",
    ),
]

# Data flow inside preprocessing, which the table's rows (the spec's INPUT_KEYS order) do not follow: the resize
# and the frame sampling decide each grid, and the grid decides the pixel rows and the number of vision pads in
# the prompt. A wrong grid is the cause of a wrong input_ids (and of its mask), so it is the first divergence.
_PREPROCESS_FLOW = (
    "preprocess.image_grid_thw",
    "preprocess.pixel_values",
    "preprocess.video_grid_thw",
    "preprocess.pixel_values_videos",
    "preprocess.second_per_grid_ts",
    "preprocess.input_ids",
    "preprocess.attention_mask",
)


def _flow(rows: list[Stage]) -> list[str]:
    """The stage names in data-flow order: the table's, with the preprocess rows in _PREPROCESS_FLOW's order."""
    names = [s.name for s in rows]
    pre = [n for n in names if n.startswith("preprocess.")]
    assert sorted(pre) == sorted(_PREPROCESS_FLOW), f"_PREPROCESS_FLOW must list {pre}"
    flow = iter(_PREPROCESS_FLOW)
    return [next(flow) if n.startswith("preprocess.") else n for n in names]


STAGES = {s.name: s for s in _TABLE}
_ORDER = {name: k for k, name in enumerate(_flow(_TABLE))}
_INDEXED = re.compile(r"^(vision\.block|text\.layer)\.(\d+)$")

FN_STAGES = [s.name for s in _TABLE if s.name.startswith("fn.")]
FN_ROWS = [s for s in _TABLE if s.name.startswith("fn.")]
PREPROCESS_STAGES = [s.name for s in _TABLE if s.name.startswith("preprocess.")]
INPUT_KEYS = list(MODEL_INPUT_KEYS)  # the spec's own list; a preprocess.* row each (tests/conformance/test_registry.py)

_LISTENERS: list[Callable[[Stage], None]] = []  # the adapter classes, which make a method per fn.* row


def on_register(listener: Callable[[Stage], None]) -> None:
    """Call `listener(row)` for every fn.* row, those already here and those registered later."""
    _LISTENERS.append(listener)
    for row in FN_ROWS:
        listener(row)


def register(row: Stage) -> None:
    """Add a fn.* stage after the built-in ones (a port's own extra stage, or a test). The table above
    is the place for the project's own stages; this is the same thing at run time."""
    if not row.name.startswith("fn.") or row.driver is None or not row.call:
        raise ValueError(f"stage {row.name!r}: register() takes fn.* rows with a driver and a call signature")
    if row.name in STAGES:
        raise ValueError(f"stage {row.name!r} is already registered")
    last_fn = max(_ORDER[n] for n in FN_STAGES)
    for name, k in _ORDER.items():  # keep data-flow order: after the last fn.* stage, before the model
        if k > last_fn:
            _ORDER[name] = k + 1
    _TABLE.insert(last_fn + 1, row)
    STAGES[row.name], _ORDER[row.name] = row, last_fn + 1
    FN_STAGES.append(row.name)
    FN_ROWS.append(row)
    for listener in _LISTENERS:
        listener(row)


def template(name: str) -> str:
    """'vision.block.3' -> 'vision.block.{i}'; other names unchanged."""
    m = _INDEXED.match(name)
    return f"{m.group(1)}.{{i}}" if m else name


def info(name: str) -> Stage:
    """The Stage of a name (block/layer index filled in). KeyError for an unknown name."""
    base = STAGES[template(name)]
    if base.name == name:
        return base
    return replace(base, name=name, meaning=base.meaning.replace(" i", " " + name.rsplit(".", 1)[1], 1))


def is_known(name: str) -> bool:
    """Whether `name` is a stage (a port's answer may carry keys of any type: those are not)."""
    return isinstance(name, str) and template(name) in STAGES


def order_key(name: str) -> tuple[int, int]:
    """Position in the data flow; block and layer indices sort numerically."""
    m = _INDEXED.match(name)
    return (_ORDER[template(name)], int(m.group(2)) if m else 0)


# Every capture stage of one model run, in data-flow order: the spec's own list, not a copy.
model_stages = model_stage_names


def previous(name: str, vision_depth: int, text_layers: int | None = None, *, vision: bool = True) -> str | None:
    """The stage whose golden output feeds `name` when run teacher-forced (None: fed by the model inputs).
    text.norm is fed by the last decoder layer, so it needs `text_layers`. vision False: a text-only
    request, whose text.inputs_embeds is the embedding of the input ids alone."""
    m = _INDEXED.match(name)
    if m and m.group(1) == "vision.block":
        i = int(m.group(2))
        return "vision.patch_embed" if i == 0 else f"vision.block.{i - 1}"
    if m:  # text.layer.i
        i = int(m.group(2))
        return "text.inputs_embeds" if i == 0 else f"text.layer.{i - 1}"
    return {
        "vision.merger": f"vision.block.{vision_depth - 1}",
        "text.inputs_embeds": "vision.merger" if vision else None,
        "text.norm": f"text.layer.{text_layers - 1}" if text_layers else None,
        "logits": "text.norm",
    }.get(name)


def protocol_lines() -> list[str]:
    """The fn.* methods of the adapter protocol, one line each, from the rows."""
    return [f"{row.call}\n    {row.meaning}" for row in FN_ROWS]


def markdown_table() -> str:
    """Every stage as a markdown table (name | tolerance | spec | meaning), as docs/INTERFACES.md holds it."""
    lines = ["| stage | tolerance | spec | meaning |", "|---|---|---|---|"]
    lines += [f"| `{s.name}` | {s.tolerance.name} | {s.read} | {s.meaning} |" for s in _TABLE]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(markdown_table() if "--markdown" in sys.argv else "\n".join(protocol_lines()))
