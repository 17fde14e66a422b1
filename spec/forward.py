"""The whole model, prompt to logits, with every stage on request (capture).

    pixel rows -> vision tower (images then videos, one call) -> merged features
    input_ids  -> embeddings, features scattered over the pad tokens -> MRoPE positions
               -> decoder layers -> final norm -> LM head -> logits

`forward` works in the dtype of `params` (load with dtype=torch.float64 for the oracle); pixel
values are cast to it. The stage names it can return are `stage_names(config)`, the one list the
conformance harness imports. `precision_profile` measures how far a float32 or bfloat16 run drifts
from float64, stage by stage. `prefill(..., prefill_chunk=N)` runs the decoder over the prompt N
tokens at a time through the cache (`decoder_stack_in_chunks`), as serving engines do: the same
result up to rounding, and the definition of what each chunk must be given.

Shapes: B batch, L tokens, P patches (pixel_values rows), C hidden, V vocab, (t, h, w) grid.
"""

from __future__ import annotations

import torch

from . import text
from .mrope import mrope_cos_sin, rope_index
from .vision import check_pixel_values, vision_encoder

INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)


def model_stage_names(vision_depth: int, text_layers: int) -> list[str]:
    """Every stage `forward` can capture for a tower of `vision_depth` blocks and `text_layers`
    decoder layers, in the order the data flows (docs/INTERFACES.md). The one list of stage names:
    the conformance harness imports it."""
    return (
        ["vision.patch_embed"]
        + [f"vision.block.{i}" for i in range(vision_depth)]
        + ["vision.merger"]
        + ["text.inputs_embeds", "text.position_ids", "text.rope_deltas"]
        + [f"text.layer.{i}" for i in range(text_layers)]
        + ["text.norm", "logits"]
    )


def stage_names(config) -> list[str]:
    """`model_stage_names` for one config."""
    return model_stage_names(config.vision.depth, config.num_hidden_layers)


def select_stages(config, capture) -> set[str]:
    """capture: () -> none; "all" -> every stage; a list of names or prefixes ("vision.block", "text")
    -> the stages equal to one of them or below it. An entry that matches nothing is an error."""
    names = stage_names(config)
    if capture == "all":
        return set(names)
    if isinstance(capture, str):
        capture = [capture]
    chosen = set()
    for entry in capture:
        hits = {n for n in names if n == entry or n.startswith(entry.rstrip(".") + ".")}
        if not hits:
            raise ValueError(
                f"capture entry {entry!r} names no stage; stages are {names[0]} .. {names[-1]} "
                f"(see stage_names(config))"
            )
        chosen |= hits
    return chosen


def check_inputs(config, inputs: dict) -> None:
    """Reject model inputs that cannot work together, before any compute, naming the input and the limit."""
    if not isinstance(inputs, dict):
        raise TypeError(f"inputs must be the model-inputs dict of build_inputs, got {type(inputs).__name__}")
    unknown = set(inputs) - set(INPUT_KEYS)
    if unknown:
        raise ValueError(f"inputs has unknown keys {sorted(unknown)}; known keys are {list(INPUT_KEYS)}")
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.ndim != 2:
        raise TypeError(
            f"inputs['input_ids'] must be an int64 tensor [B, L], got "
            f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}"
        )
    mask = inputs.get("attention_mask")
    if mask is not None:
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(
                f"inputs['attention_mask'] has shape {tuple(mask.shape)}, input_ids has {tuple(ids.shape)}: "
                "they must be equal"
            )
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("inputs['attention_mask'] must hold only 0 (padding) and 1 (token)")
    for pixels_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        pixels, grid = inputs.get(pixels_key), inputs.get(grid_key)
        if (pixels is None) != (grid is None):
            raise ValueError(f"inputs['{pixels_key}'] and inputs['{grid_key}'] must be given together")
        if pixels is None:
            continue
        try:
            check_pixel_values(config, pixels, grid)
        except (TypeError, ValueError) as e:
            raise type(e)(f"inputs['{pixels_key}'] / inputs['{grid_key}']: {e}") from None


def vision_features(params: dict, config, inputs: dict, dtype: torch.dtype, captured: dict | None):
    """Run the vision tower ONCE over the images followed by the videos; split its output back.

    Returns (image_feats [n_image_tokens, C] | None, video_feats [n_video_tokens, C] | None). Packing
    is exact: the tower never attends across two frames, so one call equals one call per item.
    """
    pixels = [inputs[k] for k in ("pixel_values", "pixel_values_videos") if inputs.get(k) is not None]
    if not pixels:
        return None, None
    grids = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]
    device = params["model.embed_tokens.weight"].device
    merged = vision_encoder(
        params, config, torch.cat(pixels).to(device=device, dtype=dtype), torch.cat(grids), capture=captured
    )  # [P/4, C]
    image_grid = inputs.get("image_grid_thw")
    n_image = 0 if image_grid is None else int(image_grid.prod(-1).sum()) // config.vision.spatial_merge_size**2
    image_feats = merged[:n_image] if image_grid is not None else None
    video_feats = merged[n_image:] if inputs.get("video_grid_thw") is not None else None
    return image_feats, video_feats


def decoder_stack(
    params: dict,
    config,
    x: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: list | None = None,
    *,
    captured: dict | None = None,
    wanted: set = frozenset(),
) -> tuple[torch.Tensor, list]:
    """Every decoder layer, for a prompt (cache None) or a decode step: x [B, L, C] -> (x [B, L, C]
    before the final norm, cache: one (k, v) per layer, each [B, K, S, D]).

    position_ids int64 [3, B, L] place the L new tokens; their MRoPE angles are computed in float64
    and rounded once to x's dtype. attention_mask int [B, S] covers the cached and the new tokens.
    `text.layer.{i}` in `wanted` stores that layer's output in `captured`.
    """
    cos, sin = mrope_cos_sin(
        position_ids,
        head_dim=config.head_dim,
        theta=config.rope_theta,
        mrope_section=config.mrope_section,
        dtype=torch.float64,
    )
    cos, sin = cos.to(device=x.device, dtype=x.dtype), sin.to(device=x.device, dtype=x.dtype)
    new_cache = []
    for i in range(config.num_hidden_layers):
        x, layer_cache = text.decoder_layer(
            params, config, i, x, cos, sin, attention_mask, None if cache is None else cache[i]
        )
        new_cache.append(layer_cache)
        if f"text.layer.{i}" in wanted:
            captured[f"text.layer.{i}"] = x
    return x, new_cache


def check_prefill_chunk(chunk) -> None:
    """Refuse a prefill chunk that is neither None nor a positive int, before any compute."""
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive integer or None, got {chunk!r}")


def chunk_spans(length: int, chunk: int | None) -> list[tuple[int, int]]:
    """The token ranges [start, end) of a prompt of `length` tokens prefilled `chunk` tokens at a time
    (None: the whole prompt at once)."""
    check_prefill_chunk(chunk)
    if chunk is None:
        return [(0, length)]
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def chunk_positions(position_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The positions of prompt tokens start..end-1: int64 [3, B, L] -> [3, B, end - start].

    They are the whole prompt's, cut at the chunk's own offset: rope_index needs every token (a
    vision span's positions follow its grid, the text after it resumes past the span's largest
    position), so a chunk cannot compute its own, and the first chunk's or the last chunk's
    positions are not a later chunk's."""
    return position_ids[..., start:end]


def decoder_stack_in_chunks(
    params: dict,
    config,
    x: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    chunk: int,
    *,
    captured: dict,
    wanted: set = frozenset(),
) -> tuple[torch.Tensor, list]:
    """decoder_stack over the prompt `chunk` tokens at a time (chunked prefill, how serving engines
    and mlx-vlm run long prompts): each chunk attends to the cache the chunks before it wrote and,
    causally, to itself. Same arguments and result as decoder_stack without a cache; equal to it up
    to rounding. The embeddings (vision features already scattered) and positions are the whole
    prompt's, sliced per chunk: a chunk boundary may fall inside a vision span."""
    outputs, layer_parts, cache = [], {}, None
    for start, end in chunk_spans(x.shape[1], chunk):
        got: dict = {}
        h, cache = decoder_stack(
            params,
            config,
            x[:, start:end],
            chunk_positions(position_ids, start, end),
            attention_mask[:, :end],
            cache,
            captured=got,
            wanted=wanted,
        )
        outputs.append(h)
        for name, value in got.items():
            layer_parts.setdefault(name, []).append(value)
    captured.update({name: torch.cat(parts, dim=1) for name, parts in layer_parts.items()})
    return torch.cat(outputs, dim=1), cache


def prefill(params: dict, config, inputs: dict, *, capture=(), rope_rule=rope_index, prefill_chunk=None):
    """Everything up to the final norm: (hidden [B, L, C], captured, cache, rope_deltas int64 [B, 1]).

    Generation needs the cache (one (k, v) per layer, each [B, K, L, D]) and rope_deltas, and the
    logits of the last position only. rope_rule: the position rule, spec.mrope.rope_index
    (training-time, the default) or a named variant with the same signature. prefill_chunk: None
    (the prompt at once) or a token count (decoder_stack_in_chunks; the vision tower still runs once).
    """
    check_prefill_chunk(prefill_chunk)
    check_inputs(config, inputs)
    wanted = select_stages(config, capture)
    table = params["model.embed_tokens.weight"]
    dtype, device = table.dtype, table.device  # the working dtype and device are those of params
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(torch.int64)
    captured: dict[str, torch.Tensor] = {}

    x = text.embed(params, ids.to(device))  # [B, L, C]; checks the vocabulary before the costly vision tower
    vision_captured = {} if any(n.startswith("vision.") for n in wanted) else None
    image_feats, video_feats = vision_features(params, config, inputs, dtype, vision_captured)
    captured.update({k: v for k, v in (vision_captured or {}).items() if k in wanted})
    x = text.scatter_vision_features(x, ids.to(device), image_feats, video_feats, config)

    position_ids, rope_deltas = rope_rule(
        ids,
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        inputs.get("second_per_grid_ts"),
        mask,
        config=config,
    )
    mask = mask.to(device)
    stages = {"text.inputs_embeds": x, "text.position_ids": position_ids, "text.rope_deltas": rope_deltas}
    captured.update({k: v for k, v in stages.items() if k in wanted})
    if prefill_chunk is None:
        x, cache = decoder_stack(params, config, x, position_ids, mask, captured=captured, wanted=wanted)
    else:
        x, cache = decoder_stack_in_chunks(
            params, config, x, position_ids, mask, prefill_chunk, captured=captured, wanted=wanted
        )
    x = text.final_norm(params, config, x)
    if "text.norm" in wanted:
        captured["text.norm"] = x
    return x, captured, cache, rope_deltas


def forward(params: dict, config, inputs: dict, *, capture=(), rope_rule=rope_index):
    """Model inputs (spec.tokens.build_inputs) -> (logits [B, L, V], captured: dict name -> tensor).

    capture: () for none, "all", or a list of stage names / prefixes (see stage_names). Vision stages
    are in pixel_values row order; text stages include padded positions (compare only where
    attention_mask is 1). rope_rule: see prefill.
    """
    hidden, captured, _, _ = prefill(params, config, inputs, capture=capture, rope_rule=rope_rule)
    logits = text.lm_head(params, hidden)
    if "logits" in select_stages(config, capture):
        captured["logits"] = logits
    return logits, captured


def precision_profile(params: dict, config, inputs: dict, dtype: torch.dtype, *, rope_rule=rope_index) -> dict:
    """How far a run in `dtype` drifts from float64, stage by stage.

    Both runs cast the same params (and pixels) from whatever dtype they are stored in, so the only
    difference is the arithmetic. Returns {stage: {"max_abs": float, "rel": float}} in stage order,
    where rel = max_abs / max |float64 value|; text stages are measured on real tokens only.
    """
    _, ref = forward(
        {k: v.to(torch.float64) for k, v in params.items()}, config, inputs, capture="all", rope_rule=rope_rule
    )
    _, low = forward({k: v.to(dtype) for k, v in params.items()}, config, inputs, capture="all", rope_rule=rope_rule)
    mask = inputs.get("attention_mask")
    real = torch.ones_like(inputs["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
    profile = {}
    for name in stage_names(config):
        if name not in ref:
            continue  # no vision input: no vision stages
        a, b = ref[name], low[name]
        r = real.to(a.device)
        if not name.startswith("vision.") and a.ndim == 3 and a.shape[:2] == r.shape:  # [B, L, ...]
            a, b = a[r], b[r]
        elif name == "text.position_ids":
            a, b = a[:, r], b[:, r]
        err = (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()
        scale = a.to(torch.float64).abs().max().item()
        profile[name] = {"max_abs": err, "rel": err / scale if scale else err}
    return profile
