"""Multimodal rotary positions (MRoPE) of the Qwen2.5-VL text decoder (hf_reference.md §6).

Shape legend: B batch, L tokens (padded row length), N heads, K kv heads, D head dim,
(t, h, w) grid in patches, m spatial merge size (2).

Every token gets three positions (temporal, height, width). Text tokens get the same number on all
three axes, one more than the token before, so on text MRoPE is plain 1D RoPE. A vision span (a run
of <|image_pad|> or <|video_pad|> tokens, one per merged m x m patch block) that starts at text
position s gets positions s + (temporal id, block row, block col) in (t, row, col) raster order.

Two rules exist for the temporal id of a video and for where the text after a span resumes:
- `rope_index`: the rule the model was trained with (Qwen's own get_rope_index_25, transformers 4.49):
  temporal id = floor(k * second_per_grid_t * tokens_per_second) for temporal group k (images: 0),
  computed in float32 left to right as Qwen's code does (the int64 index k times a float32
  second_per_grid_t, then times tokens_per_second, truncated): the float32 rounding decides a few
  ids that land near a whole number (1.1 s per grid: k = 5 gives 11 in float32, 10 in float64);
  text after a span starts at the largest position so far + 1.
- `rope_index_transformers_v53`: transformers >= 5.3 (read in 5.24): text after a span starts at
  s + max(h, w)/m, ignoring how far the video's temporal ids reach; temporal id =
  floor(k * (tokens_per_second * second_per_grid_t)) in float32 (the processor's dtype); images k.
  The two agree on images (t = 1) and differ after videos whose temporal ids outrun max(h, w)/m.

Both use the same padding convention (transformers v4, training): slots with attention_mask 0 get
position 1, and rope_deltas = max position + 1 - L with L the padded row length, so the token
that follows `start` tokens (padding included) sits at start + delta (`decode_positions`).
transformers v5 instead writes 0 at padded slots and uses the unpadded length in rope_deltas.
"""

from __future__ import annotations

import math

import torch

PAD_POSITION = 1  # what padded slots get (transformers v4 / training); they are masked anyway


# ---------------------------------------------------------------------------------------------
# Rotary application


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1), halves of D; pairs dimension i with i + D/2."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, the rotation of both towers; cos, sin broadcast against x [..., D].

    Computed in the wider of x's and cos's dtypes, returned in x's dtype.
    """
    dt = torch.promote_types(x.dtype, cos.dtype)
    xf = x.to(dt)
    return (xf * cos.to(dt) + rotate_half(xf) * sin.to(dt)).to(x.dtype)


def mrope_cos_sin(
    position_ids: torch.Tensor, *, head_dim: int, theta: float, mrope_section, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sectioned MRoPE tables: position_ids int [3, B, L] -> (cos, sin), each [B, L, D] in `dtype`.

    inv_freq_j = theta^(-2j/D), j = 0..D/2-1. Frequency slot j takes its angle from the temporal
    axis for j < s0, the height axis for s0 <= j < s0+s1 and the width axis after (mrope_section
    (s0, s1, s2) = (16, 24, 24) for D = 128); the D/2 angles are duplicated to D for rotate_half.
    Sectioned, not interleaved (Qwen3-VL interleaves; this model does not).
    Everything is computed in `dtype`; float32 reproduces the reference's tables bit for bit
    (the reference then casts them to the activation dtype before use).
    """
    section = [int(s) for s in mrope_section]
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer, got {head_dim!r}")
    if len(section) != 3 or min(section) < 0 or 2 * sum(section) != head_dim:
        raise ValueError(f"mrope_section {section} must be three sizes summing to head_dim/2 = {head_dim // 2}")
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must have shape [3, B, L], got shape {list(position_ids.shape)}")
    # inv_freq on the CPU, as the reference builds it, then moved: the device's pow may round differently
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))  # [D/2]
    angles = position_ids.to(dtype)[..., None] * inv_freq.to(position_ids.device)  # [3, B, L, D/2]
    bounds = [0, section[0], section[0] + section[1], head_dim // 2]
    picked = torch.cat([angles[axis, ..., bounds[axis] : bounds[axis + 1]] for axis in range(3)], dim=-1)  # [B, L, D/2]
    picked = torch.cat([picked, picked], dim=-1)  # [B, L, D]
    return picked.cos(), picked.sin()


def apply_mrope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, N, L, D] and k [B, K, L, D] by cos, sin [B, L, D] -> (q, k), same shapes.

    x * cos + rotate_half(x) * sin, shared by all heads. Computed in the wider of x's and cos's
    dtypes and returned in x's dtype; the reference casts cos/sin to bf16 first, so pass bf16
    tables to reproduce it.
    """
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, heads, L, D], got shape {list(x.shape)}")
    B, _, L, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (L, D):
        raise ValueError(f"k shape {list(k.shape)} does not match q shape {list(q.shape)} in B, L, D")
    if cos.shape != (B, L, D) or sin.shape != (B, L, D):
        raise ValueError(
            f"cos and sin must have shape [B, L, D] = {[B, L, D]}, got {list(cos.shape)} and {list(sin.shape)}"
        )
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, L, D], broadcast over heads
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


# ---------------------------------------------------------------------------------------------
# Position indices


def check_grid_thw(grid_thw, merge_size: int, name: str = "grid_thw") -> list[tuple[int, int, int]]:
    """grid_thw int [k, 3] (tensor or nested list) -> list of k (t, h, w) ints, each positive, h and w
    multiples of merge_size. Raises ValueError naming `name`, the row and the limit."""
    if not isinstance(merge_size, int) or isinstance(merge_size, bool) or merge_size < 1:
        raise ValueError(f"merge_size must be a positive integer, got {merge_size!r}")
    grid = torch.as_tensor(grid_thw)
    if grid.numel() == 0:
        return []
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"{name} must have shape [k, 3] (rows t, h, w), got shape {list(grid.shape)}")
    if grid.is_floating_point() or grid.is_complex() or grid.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {grid.dtype}")
    rows = [tuple(int(v) for v in row) for row in grid.tolist()]
    for i, (t, h, w) in enumerate(rows):
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"{name}[{i}] = {[t, h, w]} must be positive in every entry")
        if h % merge_size or w % merge_size:
            raise ValueError(f"{name}[{i}] = {[t, h, w]}: h and w must be multiples of merge_size {merge_size}")
    return rows


def _pad_runs(ids: torch.Tensor, image_id: int, video_id: int) -> list[tuple[int, int, str]]:
    """Maximal runs of image or video pad ids in a 1-D row: [(start, end, "image"|"video"), ...]."""
    kind = (ids == image_id).to(torch.int8) + 2 * (ids == video_id).to(torch.int8)
    if len(kind) == 0:
        return []
    new_run = torch.ones(len(kind), dtype=torch.bool)
    new_run[1:] = kind[1:] != kind[:-1]
    starts = torch.nonzero(new_run).flatten().tolist()
    ends = starts[1:] + [len(kind)]
    kinds = kind[starts].tolist()
    return [(s, e, "image" if k == 1 else "video") for s, e, k in zip(starts, ends, kinds) if k]


def _vision_block(s: int, temporal: torch.Tensor, lh: int, lw: int) -> torch.Tensor:
    """Positions of one vision span starting at s: temporal int64 [t] offsets -> int64 [3, t*lh*lw]."""
    t = len(temporal)
    tt = (s + temporal).view(t, 1, 1).expand(t, lh, lw)
    hh = (s + torch.arange(lh)).view(1, lh, 1).expand(t, lh, lw)
    ww = (s + torch.arange(lw)).view(1, 1, lw).expand(t, lh, lw)
    return torch.stack([tt, hh, ww]).reshape(3, -1)


def _temporal_training(kind: str, t: int, second_per_grid_t: float, tokens_per_second: float) -> torch.Tensor:
    if kind == "image":  # a still image spans no time
        return torch.zeros(t, dtype=torch.int64)
    # int64 tensor * float32 tensor -> float32, as in Qwen's get_rope_index_25 (float64 differs near integers)
    time = torch.arange(t) * torch.tensor(second_per_grid_t, dtype=torch.float32) * tokens_per_second
    return time.to(torch.int64)  # truncation; the ids are non-negative


def _temporal_v53(kind: str, t: int, second_per_grid_t: float, tokens_per_second: float) -> torch.Tensor:
    if kind == "image":
        return torch.arange(t, dtype=torch.int64)
    interval = torch.tensor(tokens_per_second, dtype=torch.float32) * torch.tensor(
        second_per_grid_t, dtype=torch.float32
    )
    return torch.floor(torch.arange(t) * interval).to(torch.int64)


def _text_after_training(s: int, block: torch.Tensor, lh: int, lw: int) -> int:
    return int(block.max()) + 1  # the block's max is the largest position so far


def _text_after_v53(s: int, block: torch.Tensor, lh: int, lw: int) -> int:
    return s + max(lh, lw)


def _check_inputs(input_ids, attention_mask, second_per_grid_ts, n_videos):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be an integer tensor of shape [B, L], got {getattr(input_ids, 'shape', type(input_ids))}"
        )
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integers, got dtype {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = torch.as_tensor(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {list(attention_mask.shape)} does not match input_ids shape {list(input_ids.shape)}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1 (packed-sequence masks are not supported)")
    if second_per_grid_ts is None:
        spgt = [1.0] * n_videos  # no timing given: one second per temporal patch
    else:
        spgt = [float(v) for v in torch.as_tensor(second_per_grid_ts, dtype=torch.float64).flatten().tolist()]
        if len(spgt) != n_videos:
            raise ValueError(f"second_per_grid_ts has {len(spgt)} values but video_grid_thw has {n_videos} rows")
        bad = [v for v in spgt if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise ValueError(f"second_per_grid_ts must be finite and >= 0, got {bad}")
    return attention_mask.bool(), spgt


def _rope_index(
    input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config, temporal_ids, text_after
):
    """Shared walk of `rope_index` and its variant; the two rules come in as functions."""
    m = config.vision.spatial_merge_size
    tps = float(config.vision.tokens_per_second)
    grids = {
        "image": check_grid_thw(image_grid_thw if image_grid_thw is not None else [], m, "image_grid_thw"),
        "video": check_grid_thw(video_grid_thw if video_grid_thw is not None else [], m, "video_grid_thw"),
    }
    mask, spgt = _check_inputs(input_ids, attention_mask, second_per_grid_ts, len(grids["video"]))
    device = input_ids.device
    input_ids, mask = input_ids.cpu(), mask.cpu()  # index bookkeeping: cheap on the CPU, whatever the model's device
    B, L = input_ids.shape
    used = {"image": 0, "video": 0}  # grids are consumed in flattened (row, position) order
    position_ids = torch.full((3, B, L), PAD_POSITION, dtype=torch.int64)
    deltas = torch.zeros(B, 1, dtype=torch.int64)
    for b in range(B):
        ids = input_ids[b][mask[b]]
        pieces, pos, cursor = [], 0, 0  # pos: next text position; cursor: next token index
        for start, end, kind in _pad_runs(ids, config.image_token_id, config.video_token_id):
            i = used[kind]
            if i >= len(grids[kind]):
                n_runs = sum(
                    1
                    for r in range(B)
                    for run in _pad_runs(input_ids[r][mask[r]], config.image_token_id, config.video_token_id)
                    if run[2] == kind
                )
                raise ValueError(
                    f"input_ids has {n_runs} {kind} pad runs but {kind}_grid_thw has {len(grids[kind])} rows "
                    f"(row {b} has run {i + 1} at token {start})"
                )
            t, h, w = grids[kind][i]
            if end - start != t * h * w // (m * m):
                raise ValueError(
                    f"input_ids row {b}: {kind} pad run at tokens {start}..{end - 1} has {end - start} tokens, "
                    f"but {kind}_grid_thw[{i}] = {[t, h, w]} needs t*h*w/{m * m} = {t * h * w // (m * m)}"
                )
            used[kind] += 1
            pieces.append((pos + torch.arange(start - cursor)).expand(3, -1))  # text before the span
            pos += start - cursor
            temporal = temporal_ids(kind, t, spgt[i] if kind == "video" else 0.0, tps)
            block = _vision_block(pos, temporal, h // m, w // m)
            pieces.append(block)
            pos = text_after(pos, block, h // m, w // m)
            cursor = end
        pieces.append((pos + torch.arange(len(ids) - cursor)).expand(3, -1))
        row = torch.cat(pieces, dim=1)  # [3, unpadded length]
        position_ids[:, b, mask[b]] = row
        deltas[b, 0] = (int(row.max()) + 1 if row.numel() else 0) - L
    for kind in ("image", "video"):
        if used[kind] != len(grids[kind]):
            raise ValueError(
                f"{kind}_grid_thw has {len(grids[kind])} rows but input_ids has {used[kind]} {kind} pad runs"
            )
    return position_ids.to(device), deltas.to(device)


def rope_index(
    input_ids: torch.Tensor, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config
) -> tuple[torch.Tensor, torch.Tensor]:
    """MRoPE positions by the training-time rule: input_ids int [B, L] -> (position_ids int64 [3, B, L],
    rope_deltas int64 [B, 1]).

    image_grid_thw int [n_img, 3] | None, video_grid_thw int [n_vid, 3] | None, in the order their
    pad runs appear (row by row); second_per_grid_ts float [n_vid] | None (1.0 each when None);
    attention_mask 0/1 [B, L] | None (left padding). config: Qwen25VLConfig (pad ids, merge size,
    tokens_per_second). Each maximal run of image (video) pad ids is one item and must hold
    t*h*w/m² tokens. Text after a span starts at 1 + the largest position so far; video temporal
    ids are floor(k * second_per_grid_t * tokens_per_second) in float32 (Qwen's own arithmetic); padded slots get 1;
    rope_deltas = max + 1 - L (L padded). Computed on the CPU, returned on input_ids' device.
    Example: 4 text tokens, an image (1, 4, 6), 3 text tokens -> t [0,1,2,3, 4,4,4,4,4,4, 7,8,9],
    h [0,1,2,3, 4,4,4,5,5,5, 7,8,9], w [0,1,2,3, 4,5,6,4,5,6, 7,8,9], delta 10 - 13 = -3.
    """
    return _rope_index(
        input_ids,
        image_grid_thw,
        video_grid_thw,
        second_per_grid_ts,
        attention_mask,
        config,
        _temporal_training,
        _text_after_training,
    )


def rope_index_transformers_v53(
    input_ids: torch.Tensor, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_index` with the rule of transformers >= 5.3: text after a span starting at s resumes at
    s + max(h, w)/m, and video temporal ids are floor(k * (tokens_per_second * second_per_grid_t)) in
    float32. Same shapes, same padding convention (1 at padded slots, delta against padded L).
    Example: 4 text, video (4, 4, 4) at 1 s per grid, 3 text -> trailing text at 6, 7, 8 (training
    rule: 11, 12, 13, past the video's temporal ids 4, 6, 8, 10).
    """
    return _rope_index(
        input_ids,
        image_grid_thw,
        video_grid_thw,
        second_per_grid_ts,
        attention_mask,
        config,
        _temporal_v53,
        _text_after_v53,
    )


def decode_positions(rope_deltas: torch.Tensor, start: int, steps: int) -> torch.Tensor:
    """Positions of the tokens generated after a prompt: rope_deltas int [B, 1] -> int64 [3, B, steps].

    The token that follows `start` tokens (padding included; start = L for the first new token)
    sits at start + delta on all three axes, then one more per step.
    """
    rope_deltas = torch.as_tensor(rope_deltas)
    if rope_deltas.dim() != 2 or rope_deltas.shape[1] != 1:
        raise ValueError(f"rope_deltas must have shape [B, 1], got shape {list(rope_deltas.shape)}")
    for name, v in (("start", start), ("steps", steps)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    steps_ = torch.arange(steps, dtype=torch.int64, device=rope_deltas.device)
    pos = start + steps_[None, :] + rope_deltas.to(torch.int64)  # [B, steps]
    return pos[None].expand(3, -1, -1).clone()
