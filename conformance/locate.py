"""Say what the worst coordinate of a failing stage is, in the model's own terms."""

from __future__ import annotations

import torch

from ..spec.config import Qwen25VLConfig
from ..spec.windows import vision_rotary_positions


def locate(stage: str, worst: list[int], inputs: dict, config: Qwen25VLConfig) -> str:
    """Say what the worst coordinate is: for a vision stage the item, frame, patch (row, col) and
    whether it sits on a window edge; for a text stage the token and whether it is a vision pad.
    config: the checkpoint's (window size in patches, the pad token ids)."""
    try:
        if stage.startswith("vision.") and stage != "vision.merger":
            window = config.vision.window_size // config.vision.patch_size  # patches per window side
            grids = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]
            grid = torch.cat(grids)
            p = worst[0]
            sizes = (grid[:, 0] * grid[:, 1] * grid[:, 2]).tolist()
            item, start = 0, 0
            while p >= start + sizes[item]:
                start += sizes[item]
                item += 1
            t, h, w = grid[item].tolist()
            frame = (p - start) // (h * w)
            row, col = vision_rotary_positions(grid[item : item + 1])[p - start].tolist()
            edge = row % window in (0, window - 1) or col % window in (0, window - 1) or row == h - 1 or col == w - 1
            return f" = item {item} frame {frame} patch (row {row}, col {col}) of a {h}x{w} grid" + (
                ", on a window edge" if edge else ", inside a window"
            )
        if stage.startswith("text.") or stage == "logits":
            b, tok = worst[0], worst[1]
            tid = int(inputs["input_ids"][b, tok])
            kind = {config.image_token_id: "an image pad", config.video_token_id: "a video pad"}.get(
                tid, "a text token"
            )
            return f" = row {b} token {tok} (id {tid}, {kind})"
    except (IndexError, KeyError, ValueError, RuntimeError):
        pass
    return ""
