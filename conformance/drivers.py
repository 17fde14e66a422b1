"""Item drivers of the fn.* stages: one fixture item -> one adapter call -> the plain expected layout.

A driver asks the port (`ask`: a ValueError/TypeError raised inside the port is its refusal of the
input, which some items expect) and reads the answer (`reading`: any failure to read it is a
malformed result, an error that says what was expected and what came back). The two are kept apart
so that the harness's own unpacking of a malformed answer is never taken for the port refusing.
Each driver is named by its row in the stage registry (stages.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


class PortRefusal(Exception):
    """The port raised ValueError/TypeError for an item: its refusal of that input (some items expect one)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class MalformedResult(Exception):
    """The port's answer does not have the layout of the stage's result (e.g. three values for (h, w))."""


def ask(method, *args, **kwargs):
    """Call the port. A ValueError/TypeError raised inside it is its refusal of this input."""
    try:
        return method(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise PortRefusal("ValueError" if isinstance(e, ValueError) else "TypeError") from e


def show(x, n: int = 160) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__} of shape {list(x.shape)} and dtype {x.dtype}"
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


@contextmanager
def reading(expected: str, answer):
    """Read the port's answer; any failure to do so says what was expected and what came back."""
    try:
        yield
    except MalformedResult:
        raise
    except Exception as e:
        raise MalformedResult(f"expected {expected}, got {show(answer)} ({type(e).__name__}: {e})") from None


def as_grid(x):
    if x is None:
        return None
    t = torch.as_tensor(x, dtype=torch.int64)
    return t.reshape(-1, 3)


def _t(x, dtype=torch.int64):
    return None if x is None else torch.as_tensor(x).to(dtype) if not isinstance(x, torch.Tensor) else x


def as_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.array(x))  # a copy: the port's array may be read-only


def integer(x) -> int:
    """An integer the port returned (Python, numpy or a one-element tensor); a float is not one."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        if x.dtype.is_floating_point if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"a float value {x}")
        return int(x.item())
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{x!r} is not an integer")
    return int(x)


def ints(x):
    return [integer(v) for v in (x.tolist() if hasattr(x, "tolist") else x)]


def pair(answer, what: str):
    """A 2-tuple answer (pixel_values, grid), read strictly."""
    with reading(what, answer):
        if isinstance(answer, (str, bytes, dict)) or len(answer) != 2:
            raise ValueError(f"{len(answer) if hasattr(answer, '__len__') else 'no'} values")
        return answer[0], answer[1]


def smart_resize(a, it, _):
    got = ask(
        a.smart_resize,
        it["height"],
        it["width"],
        factor=it["factor"],
        min_pixels=it["min_pixels"],
        max_pixels=it["max_pixels"],
    )
    h, w = pair(got, "(h, w): two integers")
    with reading("(h, w): two integers", got):
        return [integer(h), integer(w)]


def resize_bicubic(a, it, _):
    got = ask(a.resize_bicubic, it["image"].numpy(), tuple(it["size"]))
    with reading("a uint8 image [h, w, 3]", got):
        return as_tensor(got)


def sample_frame_indices(a, it, _):
    got = ask(
        a.sample_frame_indices,
        it["total_frames"],
        it["video_fps"],
        fps=it["fps"],
        min_frames=it["min_frames"],
        max_frames=it["max_frames"],
        nframes=it["nframes"],
    )
    with reading("a list of frame indices", got):
        return ints(got)


def patchify(a, it, _):
    got = ask(
        a.patchify,
        it["frames"],
        patch_size=it["patch_size"],
        temporal_patch_size=it["temporal_patch_size"],
        merge_size=it["merge_size"],
    )
    pv, grid = pair(got, "(pixel_values, grid_thw)")
    with reading("(pixel_values, grid_thw)", got):
        return {"pixel_values": as_tensor(pv), "grid_thw": as_tensor(grid).tolist()}


def preprocess_image(a, it, _):
    got = ask(a.preprocess_image, it["image"].numpy(), min_pixels=it["min_pixels"], max_pixels=it["max_pixels"])
    pv, grid = pair(got, "(pixel_values [P, 1176], grid_thw [1, 3])")
    with reading("(pixel_values [P, 1176], grid_thw [1, 3])", got):
        return {"pixel_values": as_tensor(pv), "grid_thw": as_tensor(grid).tolist()}


def vision_rotary_positions(a, it, _):
    got = ask(a.vision_rotary_positions, as_grid(it["grid_thw"]), merge_size=it["merge_size"])
    with reading("an integer tensor [P, 2]", got):
        return as_tensor(got)


def window_partition(a, it, _):
    got = ask(
        a.window_partition,
        as_grid(it["grid_thw"]),
        window_size=it["window_size"],
        patch_size=it["patch_size"],
        merge_size=it["merge_size"],
    )
    what = "(window_index, cu_window_seqlens, cu_seqlens)"
    with reading(what, got):
        if isinstance(got, (str, bytes, dict)) or len(got) != 3:
            raise ValueError("not three values")
        wi, cw, cu = got
        return {"window_index": as_tensor(wi), "cu_window_seqlens": ints(cw), "cu_seqlens": ints(cu)}


def render_chat(a, it, _):
    got = ask(
        a.render_chat,
        it["messages"],
        add_generation_prompt=it["add_generation_prompt"],
        add_vision_id=it["add_vision_id"],
    )
    with reading("a string", got):
        if not isinstance(got, str):
            raise TypeError("not a str")
        return got


def expand_vision_tokens(a, it, _):
    got = ask(
        a.expand_vision_tokens,
        it["texts"],
        as_grid(it["image_grid_thw"]),
        as_grid(it["video_grid_thw"]),
        merge_size=it["merge_size"],
    )
    with reading("a list of strings", got):
        if isinstance(got, str) or not all(isinstance(t, str) for t in got):
            raise TypeError("not a list of str")
        return list(got)


def tokenize(a, it, tokenizer_dir):
    got = ask(a.tokenize, it["text"], tokenizer_dir=tokenizer_dir)
    with reading("a list of token ids", got):
        return ints(got)


def rope_index(a, it, _):
    spg = it["second_per_grid_ts"]
    got = ask(
        a.rope_index,
        _t(it["input_ids"]),
        as_grid(it["image_grid_thw"]),
        as_grid(it["video_grid_thw"]),
        None if spg is None else torch.tensor(spg, dtype=torch.float64),
        _t(it["attention_mask"]),
        config=it["config"],
    )
    pos, deltas = pair(got, "(position_ids [3, B, L], rope_deltas [B, 1])")
    with reading("(position_ids [3, B, L], rope_deltas [B, 1])", got):
        return {"position_ids": as_tensor(pos), "rope_deltas": as_tensor(deltas)}


def decode_positions(a, it, _):
    got = ask(a.decode_positions, _t(it["rope_deltas"]), it["start"], it["steps"])
    with reading("an integer tensor [3, B, steps]", got):
        return as_tensor(got)


def mrope_cos_sin(a, it, _):
    got = ask(
        a.mrope_cos_sin,
        _t(it["position_ids"]),
        head_dim=it["head_dim"],
        theta=it["theta"],
        mrope_section=tuple(it["mrope_section"]),
    )
    cos, sin = pair(got, "(cos, sin) [B, L, D]")
    with reading("(cos, sin) [B, L, D]", got):
        return {"cos": as_tensor(cos), "sin": as_tensor(sin)}


def rope_padding_zeroed(inputs: dict, value):
    """Positions at left padding are never used (masked in attention); ports fill them with 0 or 1.
    Zero them on both sides before the exact comparison."""
    if not isinstance(value, dict) or "position_ids" not in value or inputs.get("attention_mask") is None:
        return value
    try:
        pos = torch.as_tensor(value["position_ids"]).clone()
        mask = torch.as_tensor(inputs["attention_mask"]).bool()
        pos[:, ~mask] = 0
    except (TypeError, ValueError, RuntimeError, IndexError):
        return value  # a malformed answer is judged as it is
    return {**value, "position_ids": pos}
