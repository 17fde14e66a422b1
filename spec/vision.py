"""The Qwen2.5-VL vision encoder (ViT + patch merger), as pure functions over hub-named params.

Shape legend: P patches (pixel_values rows), Cv vision width, N heads, D head dim (Cv/N),
Iv vision MLP width, C text width (merger output), m merge size, (t, h, w) grid in patches.

Data flow (hf_reference.md §5):
  pixel_values [P, 1176] --patch_embed--> [P, Cv]
  --reorder into window order (units of m*m rows), cos/sin reordered the same way-->
  blocks 0..depth-1: x + attn(norm1 x), x + mlp(norm2 x); a block listed in fullatt_block_indexes
    attends within each frame, every other block within each 8x8-patch window
  --merger: RMSNorm, m*m rows -> one token, Linear, GELU (exact), Linear--> [P/m², C]
  --undo the window order--> tokens in item order (the order the text placeholders expect).
Attention never crosses a frame or an item, so packing many images and videos in one call is exact.

Everything runs in the dtype of the params (float64 for the oracle); float32 and bfloat16 follow
the reference's roundings (RMSNorm and softmax in float32, rotary in float32 with q/k upcast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mrope import check_grid_thw
from .norms import rms_norm
from .norms import work_dtype as _work_dtype
from .windows import (
    apply_vision_rotary,
    vision_rotary_cos_sin,
    vision_rotary_positions,
    window_partition,
    window_row_order,
)

VISION_ROPE_THETA = 10000.0  # fixed in the reference ViT, not read from config.json


def patch_embed(params: dict, config, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values [P, c*tp*p*p] -> [P, Cv].

    The reference's Conv3d has kernel = stride = (tp, p, p), so it sees each row alone: it is one
    matmul with the filter bank flattened in the row's (channel, frame, y, x) order.
    Rows are cast to the weight dtype first, as the reference does.
    """
    w = params["visual.patch_embed.proj.weight"]  # [Cv, c, tp, p, p]
    return pixel_values.to(w.dtype) @ w.reshape(w.shape[0], -1).T


def vision_attention(
    params: dict, config, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Non-causal self-attention of block i, separately inside each cu_seqlens segment.

    x [P, Cv]; cos, sin [P, D] (same row order as x); cu_seqlens int [S+1] with cu_seqlens[-1] = P.
    Returns [P, Cv]. qkv rows are [q | k | v], each head-major; scores scaled by D^-0.5.
    """
    v = config.vision
    P, N, D = x.shape[0], v.num_heads, v.head_dim
    b = f"visual.blocks.{i}.attn"
    qkv = F.linear(x, params[f"{b}.qkv.weight"], params[f"{b}.qkv.bias"])  # [P, 3*Cv]
    q, k, val = qkv.view(P, 3, N, D).unbind(1)  # each [P, N, D]
    q, k = apply_vision_rotary(q, cos, sin), apply_vision_rotary(k, cos, sin)
    work = _work_dtype(x.dtype)
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, val))  # [N, L, D]
        scores = (qs @ ks.transpose(1, 2)) * D**-0.5  # [N, L, L]
        weights = torch.softmax(scores.to(work), dim=-1).to(x.dtype)
        out.append((weights @ vs).transpose(0, 1).reshape(end - start, N * D))  # [L, Cv]
    attn = torch.cat(out) if out else x.new_zeros(0, N * D)
    return F.linear(attn, params[f"{b}.proj.weight"], params[f"{b}.proj.bias"])


def vision_mlp(params: dict, i: int, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU with biases: down(silu(gate(x)) * up(x)). x [P, Cv] -> [P, Cv] (via [P, Iv])."""
    b = f"visual.blocks.{i}.mlp"
    gate = F.linear(x, params[f"{b}.gate_proj.weight"], params[f"{b}.gate_proj.bias"])
    up = F.linear(x, params[f"{b}.up_proj.weight"], params[f"{b}.up_proj.bias"])
    return F.linear(F.silu(gate) * up, params[f"{b}.down_proj.weight"], params[f"{b}.down_proj.bias"])


def vision_block(
    params: dict, config, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Pre-norm transformer block i: x [P, Cv] -> [P, Cv]. cos/sin [P, D], cu_seqlens as in vision_attention."""
    eps = config.vision.rms_norm_eps
    b = f"visual.blocks.{i}"
    x = x + vision_attention(params, config, i, rms_norm(x, params[f"{b}.norm1.weight"], eps), cos, sin, cu_seqlens)
    return x + vision_mlp(params, i, rms_norm(x, params[f"{b}.norm2.weight"], eps))


def patch_merger(params: dict, config, x: torch.Tensor) -> torch.Tensor:
    """x [P, Cv] -> [P/m², C]: each run of m² consecutive rows (one m x m block: TL, TR, BL, BR) becomes one token."""
    v = config.vision
    x = rms_norm(x, params["visual.merger.ln_q.weight"], v.rms_norm_eps)
    x = x.reshape(-1, v.spatial_merge_size**2 * v.hidden_size)  # [P/m², m²*Cv]
    x = F.linear(x, params["visual.merger.mlp.0.weight"], params["visual.merger.mlp.0.bias"])
    x = F.gelu(x)  # exact (erf) GELU, not the tanh approximation
    return F.linear(x, params["visual.merger.mlp.2.weight"], params["visual.merger.mlp.2.bias"])


def check_pixel_values(config, pixel_values, grid_thw) -> list[tuple[int, int, int]]:
    """Validate pixel_values [P, c*tp*p*p] against grid_thw int [k, 3]; return the grid as tuples."""
    v = config.vision
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a floating-point torch tensor, got {type(pixel_values).__name__}"
            + (f" of dtype {pixel_values.dtype}" if isinstance(pixel_values, torch.Tensor) else "")
        )
    if pixel_values.dim() != 2 or pixel_values.shape[1] != v.patch_dim:
        raise ValueError(
            f"pixel_values must have shape [P, {v.patch_dim}] (channels*temporal_patch*patch*patch), "
            f"got {list(pixel_values.shape)}"
        )
    rows = check_grid_thw(grid_thw, v.spatial_merge_size)
    expected = sum(t * h * w for t, h, w in rows)
    if pixel_values.shape[0] != expected:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} rows but grid_thw {[list(r) for r in rows]} "
            f"needs sum(t*h*w) = {expected}"
        )
    return rows


def vision_encoder(
    params: dict, config, pixel_values: torch.Tensor, grid_thw, *, capture: dict | None = None
) -> torch.Tensor:
    """pixel_values [P, c*tp*p*p], grid_thw int [k, 3] -> merged tokens [P/m², C] in item order.

    Items (images, then video clips, in the order of grid_thw) are packed along P. If `capture` is a
    dict, the stages `vision.patch_embed` [P, Cv], `vision.block.{i}` [P, Cv] and `vision.merger`
    [P/m², C] are stored in it, all in pixel_values row / item order (not window order).
    """
    v = config.vision
    check_pixel_values(config, pixel_values, grid_thw)
    grid = torch.as_tensor(grid_thw, dtype=torch.int64)

    x = patch_embed(params, config, pixel_values)  # [P, Cv]
    positions = vision_rotary_positions(grid, v.spatial_merge_size)  # [P, 2], row order
    cos, sin = vision_rotary_cos_sin(positions, v.head_dim, VISION_ROPE_THETA, dtype=_work_dtype(x.dtype))
    cos, sin = cos.to(x.device), sin.to(x.device)
    window_index, cu_window_seqlens, cu_seqlens = window_partition(
        grid, window_size=v.window_size, patch_size=v.patch_size, merge_size=v.spatial_merge_size
    )
    window_index = window_index.to(x.device)

    order = window_row_order(window_index, v.spatial_merge_size)  # [P]: window_index orders units of m² rows
    restore = torch.argsort(order)  # [P], window order -> row order
    if capture is not None:
        capture["vision.patch_embed"] = x
    x, cos, sin = x[order], cos[order], sin[order]

    for i in range(v.depth):
        cu = cu_seqlens if i in v.fullatt_block_indexes else cu_window_seqlens
        x = vision_block(params, config, i, x, cos, sin, cu)
        if capture is not None:
            capture[f"vision.block.{i}"] = x[restore]

    merged = patch_merger(params, config, x)[torch.argsort(window_index)]  # [P/m², C], item order
    if capture is not None:
        capture["vision.merger"] = merged
    return merged
