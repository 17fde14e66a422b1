"""Where each vision patch sits, and which patches attend to each other (Qwen2.5-VL ViT, §5 steps 2-6).

Shape legend: P patches, N heads, D head dim, (t, h, w) grid in patches, m merge size (2),
F frames (temporal groups) over all items, W windows over all items.

pixel_values rows come in merge-block order: within one temporal group, 2x2 blocks of patches in
raster order, each block read top-left, top-right, bottom-left, bottom-right. Every position here is
given in that row order, so row i of pixel_values has rotary position `vision_rotary_positions(...)[i]`.

The ViT's window attention works on merged units (one unit = one m x m block = m*m consecutive rows).
Windows are `window_size / (patch_size * m)` = 4 units on a side (8x8 patches, 112x112 pixels),
laid out per frame from the top-left corner; the last row and column of windows may be partial.
The encoder permutes its units into window order (`window_index`), runs the window blocks on the
`cu_window_seqlens` segments, runs the full-attention blocks on the per-frame `cu_seqlens`
segments (a frame's patches stay contiguous after the permutation), and undoes the permutation
after the merger with `argsort(window_index)`.

The index tensors are built on the CPU from grid_thw (a few integers); callers move them.
"""

from __future__ import annotations

import torch

from .mrope import apply_rotary, check_grid_thw


def vision_rotary_positions(grid_thw, merge_size: int = 2) -> torch.Tensor:
    """(row, col) of every patch, in pixel_values row order.

    grid_thw int [k, 3] -> int64 [P, 2], P = sum(t*h*w). Within a frame the rows come in merge-block
    order (block row, block col, row in block, col in block); every temporal group of an item repeats
    the same 2D positions, since the ViT has no temporal rotary.
    Example, grid (1, 4, 6): (0,0) (0,1) (1,0) (1,1) (0,2) (0,3) (1,2) (1,3) (0,4) ...
    """
    m = merge_size
    out = []
    for t, h, w in check_grid_thw(grid_thw, m):
        # [h/m, w/m, m, m]: block row, block col, row in block, col in block
        rows = torch.arange(h).view(h // m, 1, m, 1).expand(h // m, w // m, m, m)
        cols = torch.arange(w).view(1, w // m, 1, m).expand(h // m, w // m, m, m)
        frame = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)  # [h*w, 2]
        out.append(frame.repeat(t, 1))
    if not out:
        return torch.zeros(0, 2, dtype=torch.int64)
    return torch.cat(out).to(torch.int64)


def vision_rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """2D rotary tables of the ViT: positions int [P, 2] (row, col) -> (cos, sin), each [P, D] in `dtype`.

    inv_freq_j = theta^(-j / (D/4)) for j = 0..D/4-1 (the reference writes it as
    1/theta^(arange(0, D/2, 2) / (D/2))); the D/2 angles are [row * inv_freq | col * inv_freq],
    duplicated to D so that `rotate_half` pairs dimension i with i + D/2.
    Everything is computed in `dtype`; float32 reproduces the reference's float32 tables bit for bit.
    """
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 4:
        raise ValueError(
            f"head_dim must be a positive multiple of 4 (row and column halves, each rotated in pairs), got {head_dim!r}"
        )
    positions = torch.as_tensor(positions)
    if positions.dim() != 2 or positions.shape[1] != 2:
        raise ValueError(f"positions must have shape [P, 2] (row, col), got shape {list(positions.shape)}")
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=dtype) / half))  # [D/4]
    angles = positions.to(dtype)[:, :, None] * inv_freq.to(positions.device)  # [P, 2, D/4]
    angles = angles.reshape(len(positions), half)  # [P, D/2]: row angles, then column angles
    angles = torch.cat([angles, angles], dim=-1)  # [P, D]
    return angles.cos(), angles.sin()


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [P, N, D] by the 2D angles of `vision_rotary_cos_sin` (cos, sin [P, D]) -> [P, N, D].

    x * cos + rotate_half(x) * sin, with rotate_half over the full D (pairs i and i + D/2).
    Computed in the wider of x's and cos's dtypes (the reference upcasts bf16 q/k to float32),
    returned in x's dtype.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape [P, N, D], got shape {list(x.shape)}")
    P, _, D = x.shape
    if cos.shape != (P, D) or sin.shape != (P, D):
        raise ValueError(f"cos and sin must have shape [P, D] = {[P, D]}, got {list(cos.shape)} and {list(sin.shape)}")
    return apply_rotary(x, cos[:, None, :], sin[:, None, :])  # broadcast over heads


def window_row_order(window_index: torch.Tensor, merge_size: int = 2) -> torch.Tensor:
    """The unit order of `window_partition` expanded to patch rows: window_index int64 [P/m²] -> int64 [P].

    Unit u is rows m²u .. m²u+m²-1 of pixel_values (one m x m block), so place i of the window order
    holds rows m²·window_index[i] + 0 .. m²-1. `x[order]` puts rows [P, ...] in window order and
    `argsort(order)` undoes it. On the device of window_index.
    Example, m = 2, window_index [1, 0]: [4, 5, 6, 7, 0, 1, 2, 3].
    """
    m2 = merge_size**2
    return (window_index[:, None] * m2 + torch.arange(m2, device=window_index.device)).reshape(-1)


def window_partition(
    grid_thw, *, window_size: int = 112, patch_size: int = 14, merge_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window order of the merged units, and the attention segments of the ViT.

    grid_thw int [k, 3] -> (window_index int64 [P/m²], cu_window_seqlens int64 [W+1], cu_seqlens int64 [F+1]).

    window_index: the unit order the encoder runs in. Unit u (rows m²u .. m²u+m²-1 of pixel_values,
      units numbered item by item, t-major, then unit row, then unit col) is at place i when
      window_index[i] = u. Windows are ordered (item, t, window row, window col), units inside a
      window row-major.
    cu_window_seqlens: patch boundaries of the windows in that order, [0, ..., P], strictly increasing.
      The reference pads each frame by ws - (L mod ws) units per side, which adds a whole empty row
      (column) of windows when L is a multiple of ws; those empty windows only repeat a boundary and
      the reference removes the repeats (unique_consecutive). Here only non-empty windows are made,
      so the result is the same list.
    cu_seqlens: patch boundaries of the frames, [0, h*w, 2*h*w, ...] over items: the full-attention
      blocks still never attend across frames.
    Example, grid (1, 8, 12) (units 4x6, windows 4x4 and 4x2): window_index
    [0,1,2,3, 6,7,8,9, 12,13,14,15, 18,19,20,21, 4,5, 10,11, 16,17, 22,23], cu_window_seqlens [0, 64, 96].
    """
    m = merge_size
    grid = check_grid_thw(grid_thw, m)
    if not isinstance(window_size, int) or not isinstance(patch_size, int) or patch_size < 1 or window_size < 1:
        raise ValueError(f"window_size and patch_size must be positive integers, got {window_size!r}, {patch_size!r}")
    if window_size % (patch_size * m):
        raise ValueError(f"window_size {window_size} is not a multiple of patch_size*merge_size = {patch_size * m}")
    ws = window_size // (patch_size * m)  # window side in units

    window_index, window_sizes, frame_sizes = [], [], []
    offset = 0
    for t, h, w in grid:
        Lh, Lw = h // m, w // m
        nh, nw = -(-Lh // ws), -(-Lw // ws)  # windows per column and per row of a frame (ceil)
        # window number of every unit, units in raster order [t, Lh, Lw]
        win = (torch.arange(t).view(t, 1, 1) * nh + (torch.arange(Lh) // ws).view(1, Lh, 1)) * nw + (
            torch.arange(Lw) // ws
        ).view(1, 1, Lw)
        win = win.reshape(-1)
        # a stable sort keeps raster (row-major) order inside each window
        window_index.append(torch.argsort(win, stable=True) + offset)
        window_sizes.append(torch.bincount(win, minlength=t * nh * nw) * m * m)  # every window non-empty
        frame_sizes.append(torch.full((t,), h * w, dtype=torch.int64))
        offset += t * Lh * Lw

    zero = torch.zeros(1, dtype=torch.int64)
    if not grid:
        return torch.zeros(0, dtype=torch.int64), zero, zero
    cu_window_seqlens = torch.cat([zero, torch.cat(window_sizes).cumsum(0)])
    cu_seqlens = torch.cat([zero, torch.cat(frame_sizes).cumsum(0)])
    return torch.cat(window_index).to(torch.int64), cu_window_seqlens.to(torch.int64), cu_seqlens
