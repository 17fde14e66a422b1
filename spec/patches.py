"""Cutting frames into the flat patch rows the vision tower eats, and back.

Legend: T frames, C channels, H, W pixels (multiples of patch_size * merge_size), p patch side (14),
tp temporal patch (2), m merge side (2), (t, h, w) grid in patches: t = T/tp, h = H/p, w = W/p, P = t*h*w.

Row order: temporal group t, then 2x2 merge blocks in raster order, then inside a block top-left, top-right,
bottom-left, bottom-right; so the 4 patches the merger later fuses into one token are consecutive rows.
Column order inside a row (C*tp*p*p = 1176 values): channel, then time inside the group, then y, then x.
"""

import numpy as np
import torch


def _as_tensor(frames, name):
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(frames).__name__}")
    return frames


def _check_sizes(patch_size, temporal_patch_size, merge_size):
    for name, value in (
        ("patch_size", patch_size),
        ("temporal_patch_size", temporal_patch_size),
        ("merge_size", merge_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def patchify(frames, *, patch_size=14, temporal_patch_size=2, merge_size=2):
    """Frames [T, C, H, W] -> (pixel_values [P, C*tp*p*p], grid_thw int64 [1, 3]).

    A single image is T = 1: it is repeated to fill the temporal patch. An odd T (not a multiple of tp) is
    padded by repeating the last frame, as transformers v5 and qwen-vl-utils do. dtype is kept.
    """
    _check_sizes(patch_size, temporal_patch_size, merge_size)
    x = _as_tensor(frames, "frames")
    if x.ndim != 4 or min(x.shape) < 1:
        raise ValueError(f"frames must be [T, C, H, W] with every size >= 1, got shape {tuple(x.shape)}")
    T, C, H, W = x.shape
    side = patch_size * merge_size
    if H % side or W % side:
        raise ValueError(f"frames height {H} and width {W} must be multiples of patch_size*merge_size = {side}")
    pad = -T % temporal_patch_size
    if pad:
        x = torch.cat([x, x[-1:].expand(pad, C, H, W)], dim=0)
    tp, p, m = temporal_patch_size, patch_size, merge_size
    gt, gh, gw = x.shape[0] // tp, H // p, W // p
    x = x.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p)
    # -> (gt, block row, block col, row in block, col in block, C, tp, y, x)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(gt * gh * gw, C * tp * p * p)
    grid_thw = torch.tensor([[gt, gh, gw]], dtype=torch.int64)
    return pixel_values, grid_thw


def unpatchify(pixel_values, grid_thw, *, channels=3, patch_size=14, temporal_patch_size=2, merge_size=2):
    """Inverse of patchify for one item: pixel_values [P, C*tp*p*p], grid_thw [1, 3] -> frames [t*tp, C, H, W].

    Returns every frame including the padded ones (an image comes back as 2 identical frames).
    """
    _check_sizes(patch_size, temporal_patch_size, merge_size)
    x = _as_tensor(pixel_values, "pixel_values")
    grid = _as_tensor(grid_thw, "grid_thw").reshape(-1).tolist()
    if len(grid) != 3:
        raise ValueError(f"grid_thw must hold one (t, h, w) row, got {grid_thw!r}")
    gt, gh, gw = grid
    tp, p, m, C = temporal_patch_size, patch_size, merge_size, channels
    if gh % m or gw % m or min(grid) < 1:
        raise ValueError(f"grid_thw {grid} must be positive with h, w multiples of merge_size {m}")
    if tuple(x.shape) != (gt * gh * gw, C * tp * p * p):
        raise ValueError(
            f"pixel_values shape {tuple(x.shape)} does not match grid {grid}: "
            f"expected ({gt * gh * gw}, {C * tp * p * p})"
        )
    x = x.reshape(gt, gh // m, gw // m, m, m, C, tp, p, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # back to (gt, tp, C, block row, row, y, block col, col, x)
    return x.reshape(gt * tp, C, gh * p, gw * p)
