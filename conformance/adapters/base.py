"""The adapter protocol: how the harness reaches an implementation under test.

An adapter is a small class. Every method is optional: the base raises `NotCovered`, and a stage
whose method raises it is reported "not covered", never "failed". Subclass `Adapter` and implement
what your port exposes:

  describe()                    -> {"name", "version", "dtype", "device"}: what is being judged
  prepare(checkpoint, dtype=, device=)   load the weights of a Hugging Face checkpoint folder
  begin_case(case)              hook, called before each fixture case (the file exchange uses it)

  exact-stage functions, one per `fn.*` stage; same arguments as the spec function named in
  conformance/stages.py (tensors are torch int64/float; a port may return numpy arrays or lists):
    smart_resize(height, width, *, factor, min_pixels, max_pixels) -> (h, w)  (ValueError when refused)
    resize_bicubic(image uint8 [H, W, 3], size (h, w)) -> uint8 [h, w, 3]
    sample_frame_indices(total_frames, video_fps, *, fps, min_frames, max_frames, nframes) -> list[int]
    patchify(frames [T, C, H, W], *, patch_size, temporal_patch_size, merge_size) -> (pixel_values, grid_thw)
    preprocess_image(image uint8 [H, W, 3], *, min_pixels, max_pixels) -> (pixel_values [P, 1176], grid_thw [1, 3])
    vision_rotary_positions(grid_thw [k, 3], *, merge_size) -> int [P, 2]
    window_partition(grid_thw, *, window_size, patch_size, merge_size) -> (window_index, cu_window_seqlens, cu_seqlens)
    render_chat(messages, *, add_generation_prompt, add_vision_id) -> str
    expand_vision_tokens(texts, image_grid_thw, video_grid_thw, *, merge_size) -> list[str]
    tokenize(text, *, tokenizer_dir) -> list[int]
    rope_index(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config: dict)
        -> (position_ids [3, B, L], rope_deltas [B, 1])
    decode_positions(rope_deltas [B, 1], start, steps) -> [3, B, steps]
    mrope_cos_sin(position_ids [3, B, L], *, head_dim, theta, mrope_section) -> (cos, sin) [B, L, D]

  the model (after prepare):
    build_inputs(conversations, images, videos, *, tokenizer_dir, options) -> model-inputs dict
        (docs/INTERFACES.md: input_ids, attention_mask, pixel_values, image_grid_thw, ...)
    run(inputs, *, capture: list[str]) -> {stage name: tensor}   free-running, end to end; a stage
        missing from the dict is not covered
    run_stage(stage, feeds) -> tensor   one stage teacher-forced: feeds = model inputs plus "hidden",
        the golden output of the previous stage (float32), and "position_ids" for text layers
    generate(inputs, *, max_new_tokens, eos_token_id) -> tokens int [B, n], or (tokens, topk int [B, n, k])

Stage outputs are in the canonical order of docs/INTERFACES.md ("Stage names"): vision stages in
pixel_values row order, text stages [B, L, C] including padded positions (they are masked out).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


class NotCovered(Exception):
    """The port does not expose this stage (reported as 'not covered', never as a failure)."""


class PortRefusal(Exception):
    """The port raised ValueError/TypeError for an item: its refusal of that input (some items expect one)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class MalformedResult(Exception):
    """The port's answer does not have the layout of the stage's result (e.g. three values for (h, w))."""


class Adapter:
    name = "adapter"
    dtype = "float32"
    device = "cpu"

    def describe(self) -> dict:
        return {"name": self.name, "version": "", "dtype": self.dtype, "device": self.device}

    def prepare(self, checkpoint: str, *, dtype: str, device: str) -> None:
        raise NotCovered("prepare: this adapter does not load checkpoints")

    def begin_case(self, case) -> None:
        pass

    # exact-stage functions
    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        raise NotCovered("smart_resize")

    def resize_bicubic(self, image, size):
        raise NotCovered("resize_bicubic")

    def sample_frame_indices(self, total_frames, video_fps, *, fps, min_frames, max_frames, nframes):
        raise NotCovered("sample_frame_indices")

    def patchify(self, frames, *, patch_size, temporal_patch_size, merge_size):
        raise NotCovered("patchify")

    def preprocess_image(self, image, *, min_pixels, max_pixels):
        raise NotCovered("preprocess_image")

    def vision_rotary_positions(self, grid_thw, *, merge_size):
        raise NotCovered("vision_rotary_positions")

    def window_partition(self, grid_thw, *, window_size, patch_size, merge_size):
        raise NotCovered("window_partition")

    def render_chat(self, messages, *, add_generation_prompt, add_vision_id):
        raise NotCovered("render_chat")

    def expand_vision_tokens(self, texts, image_grid_thw, video_grid_thw, *, merge_size):
        raise NotCovered("expand_vision_tokens")

    def tokenize(self, text, *, tokenizer_dir):
        raise NotCovered("tokenize")

    def rope_index(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        raise NotCovered("rope_index")

    def decode_positions(self, rope_deltas, start, steps):
        raise NotCovered("decode_positions")

    def mrope_cos_sin(self, position_ids, *, head_dim, theta, mrope_section):
        raise NotCovered("mrope_cos_sin")

    # the model
    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        raise NotCovered("build_inputs")

    def run(self, inputs, *, capture):
        raise NotCovered("run")

    def run_stage(self, stage, feeds):
        raise NotCovered(f"run_stage {stage}")

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        raise NotCovered("generate")

    # the item table of an exact stage; the file exchange overrides this to read a port's files
    def run_items(self, stage: str, items: list[dict], *, tokenizer_dir=None) -> list:
        """Call the function of `stage` once per item; returns one plain result per item.
        A ValueError/TypeError raised by the port is a result ({"error": "ValueError"}), since some
        items expect a refusal; NotCovered on some items leaves those out of the comparison, on every
        item makes the whole stage not covered."""
        call = ITEM_CALLS[stage]
        out, uncovered = [], None
        for item in items:
            try:
                out.append(call(self, item, tokenizer_dir))
            except NotCovered as e:  # this item only (a port may cover still images but not videos)
                out.append({"not_covered": str(e)})
                uncovered = e
            except PortRefusal as e:
                out.append({"error": e.kind})
            except MalformedResult as e:  # the port answered, in the wrong layout: never a refusal
                out.append({"error": "malformed", "malformed": str(e)})
            except Exception as e:  # a crash on one item is that item's result; the table goes on
                out.append({"error": type(e).__name__, "crash": str(e)[:200]})
        if uncovered is not None and all(isinstance(o, dict) and "not_covered" in o for o in out):
            raise uncovered
        return out


# ----------------------------------------------------------------- item drivers
# Each turns one fixture item (JSON inputs; tensors already loaded) into one adapter call (`_ask`) and
# the port's answer into the plain layout of the fixture's expected value (`_reading`). The two are
# kept apart so that the harness's own unpacking of a malformed answer is never taken for the port
# refusing the input.


def _ask(method, *args, **kwargs):
    """Call the port. A ValueError/TypeError raised inside it is its refusal of this input."""
    try:
        return method(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise PortRefusal("ValueError" if isinstance(e, ValueError) else "TypeError") from e


def _show(x, n: int = 160) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__} of shape {list(x.shape)} and dtype {x.dtype}"
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


@contextmanager
def _reading(expected: str, answer):
    """Read the port's answer; any failure to do so says what was expected and what came back."""
    try:
        yield
    except MalformedResult:
        raise
    except Exception as e:
        raise MalformedResult(f"expected {expected}, got {_show(answer)} ({type(e).__name__}: {e})") from None


def _grid(x):
    if x is None:
        return None
    t = torch.as_tensor(x, dtype=torch.int64)
    return t.reshape(-1, 3)


def _t(x, dtype=torch.int64):
    return None if x is None else torch.as_tensor(x).to(dtype) if not isinstance(x, torch.Tensor) else x


def _np(x):
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.array(x))  # a copy: the port's array may be read-only


def _int(x) -> int:
    """An integer the port returned (Python, numpy or a one-element tensor); a float is not one."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        if x.dtype.is_floating_point if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"a float value {x}")
        return int(x.item())
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{x!r} is not an integer")
    return int(x)


def _ints(x):
    return [_int(v) for v in (x.tolist() if hasattr(x, "tolist") else x)]


def _pair(answer, what: str):
    """A 2-tuple answer (pixel_values, grid), read strictly."""
    with _reading(what, answer):
        if isinstance(answer, (str, bytes, dict)) or len(answer) != 2:
            raise ValueError(f"{len(answer) if hasattr(answer, '__len__') else 'no'} values")
        return answer[0], answer[1]


def _smart_resize(a, it, _):
    got = _ask(
        a.smart_resize,
        it["height"],
        it["width"],
        factor=it["factor"],
        min_pixels=it["min_pixels"],
        max_pixels=it["max_pixels"],
    )
    h, w = _pair(got, "(h, w): two integers")
    with _reading("(h, w): two integers", got):
        return [_int(h), _int(w)]


def _resize_bicubic(a, it, _):
    got = _ask(a.resize_bicubic, it["image"].numpy(), tuple(it["size"]))
    with _reading("a uint8 image [h, w, 3]", got):
        return _np(got)


def _frames(a, it, _):
    got = _ask(
        a.sample_frame_indices,
        it["total_frames"],
        it["video_fps"],
        fps=it["fps"],
        min_frames=it["min_frames"],
        max_frames=it["max_frames"],
        nframes=it["nframes"],
    )
    with _reading("a list of frame indices", got):
        return _ints(got)


def _patchify(a, it, _):
    got = _ask(
        a.patchify,
        it["frames"],
        patch_size=it["patch_size"],
        temporal_patch_size=it["temporal_patch_size"],
        merge_size=it["merge_size"],
    )
    pv, grid = _pair(got, "(pixel_values, grid_thw)")
    with _reading("(pixel_values, grid_thw)", got):
        return {"pixel_values": _np(pv), "grid_thw": _np(grid).tolist()}


def _preprocess_image(a, it, _):
    got = _ask(a.preprocess_image, it["image"].numpy(), min_pixels=it["min_pixels"], max_pixels=it["max_pixels"])
    pv, grid = _pair(got, "(pixel_values [P, 1176], grid_thw [1, 3])")
    with _reading("(pixel_values [P, 1176], grid_thw [1, 3])", got):
        return {"pixel_values": _np(pv), "grid_thw": _np(grid).tolist()}


def _rotary(a, it, _):
    got = _ask(a.vision_rotary_positions, _grid(it["grid_thw"]), merge_size=it["merge_size"])
    with _reading("an integer tensor [P, 2]", got):
        return _np(got)


def _windows(a, it, _):
    got = _ask(
        a.window_partition,
        _grid(it["grid_thw"]),
        window_size=it["window_size"],
        patch_size=it["patch_size"],
        merge_size=it["merge_size"],
    )
    what = "(window_index, cu_window_seqlens, cu_seqlens)"
    with _reading(what, got):
        if isinstance(got, (str, bytes, dict)) or len(got) != 3:
            raise ValueError("not three values")
        wi, cw, cu = got
        return {"window_index": _np(wi), "cu_window_seqlens": _ints(cw), "cu_seqlens": _ints(cu)}


def _chat(a, it, _):
    got = _ask(
        a.render_chat,
        it["messages"],
        add_generation_prompt=it["add_generation_prompt"],
        add_vision_id=it["add_vision_id"],
    )
    with _reading("a string", got):
        if not isinstance(got, str):
            raise TypeError("not a str")
        return got


def _expand(a, it, _):
    got = _ask(
        a.expand_vision_tokens,
        it["texts"],
        _grid(it["image_grid_thw"]),
        _grid(it["video_grid_thw"]),
        merge_size=it["merge_size"],
    )
    with _reading("a list of strings", got):
        if isinstance(got, str) or not all(isinstance(t, str) for t in got):
            raise TypeError("not a list of str")
        return list(got)


def _tokenize(a, it, tokenizer_dir):
    got = _ask(a.tokenize, it["text"], tokenizer_dir=tokenizer_dir)
    with _reading("a list of token ids", got):
        return _ints(got)


def _rope_index(a, it, _):
    spg = it["second_per_grid_ts"]
    got = _ask(
        a.rope_index,
        _t(it["input_ids"]),
        _grid(it["image_grid_thw"]),
        _grid(it["video_grid_thw"]),
        None if spg is None else torch.tensor(spg, dtype=torch.float64),
        _t(it["attention_mask"]),
        config=it["config"],
    )
    pos, deltas = _pair(got, "(position_ids [3, B, L], rope_deltas [B, 1])")
    with _reading("(position_ids [3, B, L], rope_deltas [B, 1])", got):
        return {"position_ids": _np(pos), "rope_deltas": _np(deltas)}


def _decode(a, it, _):
    got = _ask(a.decode_positions, _t(it["rope_deltas"]), it["start"], it["steps"])
    with _reading("an integer tensor [3, B, steps]", got):
        return _np(got)


def _cos_sin(a, it, _):
    got = _ask(
        a.mrope_cos_sin,
        _t(it["position_ids"]),
        head_dim=it["head_dim"],
        theta=it["theta"],
        mrope_section=tuple(it["mrope_section"]),
    )
    cos, sin = _pair(got, "(cos, sin) [B, L, D]")
    with _reading("(cos, sin) [B, L, D]", got):
        return {"cos": _np(cos), "sin": _np(sin)}


ITEM_CALLS = {
    "fn.smart_resize": _smart_resize,
    "fn.resize_bicubic": _resize_bicubic,
    "fn.sample_frame_indices": _frames,
    "fn.patchify": _patchify,
    "fn.preprocess_image": _preprocess_image,
    "fn.vision_rotary_positions": _rotary,
    "fn.window_partition": _windows,
    "fn.render_chat": _chat,
    "fn.expand_vision_tokens": _expand,
    "fn.tokenize": _tokenize,
    "fn.rope_index": _rope_index,
    "fn.decode_positions": _decode,
    "fn.mrope_cos_sin": _cos_sin,
}
