"""Regenerate the golden fixtures of the conformance harness, bit for bit.

    python -m qwen25vl.tools.generate_fixtures --out fixtures            every case + the tiny checkpoint
    python -m qwen25vl.tools.generate_fixtures --out DIR --only exact    the exact (integer/string) cases
    python -m qwen25vl.tools.generate_fixtures --out DIR --only model_image

Every value comes from the spec: exact cases from its preprocessing and index functions, numeric
cases from a float64 run on the tiny checkpoint (stored as float32), together with the spec's own
bfloat16 and float32 runs as the controls the tolerances are scaled by (fixtures/FORMAT.md).
Torch runs single-threaded with deterministic algorithms so float64 results repeat bit for bit on
one machine; across CPUs vectorised cos/sin and BLAS round differently, so a regenerated case is
compared with the committed one by conformance.fixtures.content_difference (floats within a stated
budget, integers and strings exact), never by sha256 (fixtures/FORMAT.md, "Reproducibility").
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import re
import sys
from pathlib import Path

import numpy as np
import torch

from ..conformance import compare, stages
from ..conformance.adapters.spec import SpecAdapter
from ..conformance.fixtures import dump_json, request_media, sha256_file, write_case
from ..conformance.precision import COMPUTE
from ..conformance.reference import Reference
from ..spec.checkpoint import stop_token_ids
from ..spec.config import Qwen25VLConfig
from ..spec.generate import generate_greedy

CHECKPOINT = "checkpoints/tiny"
TIED_CHECKPOINT = "checkpoints/tiny_tied"  # the 3B layout: tie_word_embeddings, no lm_head.weight stored
IMG, VID, VS, VE = 151655, 151656, 151652, 151653  # image pad, video pad, vision start, vision end
MAX_NEW_TOKENS = 6
TOPK_STORED = 20


def versions() -> dict:
    import PIL
    import safetensors
    import tokenizers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "machine": platform.machine(),
        "generator": "tools/generate_fixtures.py",
        "spec": "qwen25vl.spec 0.1.0",
    }
    try:
        import av

        out["av"] = av.__version__
    except ImportError:
        pass
    return out


class deterministic:
    """Single-threaded torch with deterministic algorithms inside the block; the caller's settings after."""

    def __enter__(self):
        self.saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved[0])
        torch.use_deterministic_algorithms(self.saved[1])


def rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """uint8 [h, w, 3]: smooth colour ramps plus seeded noise (edges and texture for the resize)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255.0 / max(w - 1, 1), y * 255.0 / max(h - 1, 1), (x + y) * 127.0 / max(h + w - 2, 1)], -1)
    noise = rng(seed).integers(-40, 41, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def moving_square(h: int, w: int, k: int, step: tuple[int, int] = (8, 15), seed: int = 7) -> np.ndarray:
    """uint8 [h, w, 3] frame k of a clip: a red square moving `step` (down, right) pixels a frame over a
    fixed background, something for the temporal patches to see and for a wrong frame index to change."""
    img = synthetic_image(h, w, seed)
    dy, dx = step
    img[20 + dy * k : 50 + dy * k, 10 + dx * k : 40 + dx * k] = (255, 40, 40)
    return img


def video_file_bytes(frames: list[np.ndarray], fps: int) -> bytes:
    """A QuickTime file of these RGB frames at `fps`: QuickTime RLE (lossless in RGB, so every decoder that
    reads the file gets the frames back exactly, and inter-coded, so reading frame k means decoding from a
    key frame), written bit-exact (no encoder version or random id in the file). The file holds its frame
    count and rate, as a camera's does."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mov", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("qtrle", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "rgb24"
        for img in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def png_bytes(img: np.ndarray) -> bytes:
    """PNG with stored (level 0) deflate blocks: byte-identical whatever zlib the machine has."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def image_file_bytes(h: int, w: int, seed: int, form: str = "rgb") -> bytes:
    """A PNG of synthetic_image(h, w, seed) as displayed, in one of the forms a user's file comes in (the spec
    reads each to uint8 [h, w, 3], spec/image.py):
      rgb      plain RGB;
      rgba     RGBA, alpha 0 on the left quarter, a ramp 0..255 across the middle half, opaque on the right:
               composited over white, so a port that drops alpha sees the hidden colour;
      palette  'P' with a transparency key (tRNS): 16 colours, index 3 transparent (a dark red, white when
               composited) on a band of rows;
      exif6    RGB stored rotated, w x h, with EXIF orientation 6 (an eXIf chunk): turned upright it is h x w,
               so a port that ignores EXIF sees a w x h image, another grid."""
    from PIL import Image

    img = synthetic_image(h, w, seed)
    if form == "rgb":
        return png_bytes(img)
    buf = io.BytesIO()
    if form == "rgba":
        alpha = np.clip((np.arange(w) - w / 4) * 255.0 / (w / 2), 0, 255).round().astype(np.uint8)
        rgba = np.concatenate([img, np.broadcast_to(alpha[None, :, None], (h, w, 1))], -1)
        Image.fromarray(np.ascontiguousarray(rgba), "RGBA").save(buf, format="PNG", compress_level=0)
    elif form == "palette":
        palette = rng(seed).integers(0, 256, size=(16, 3)).astype(np.uint8)
        palette[3] = (120, 0, 0)  # the transparent entry: far from white
        index = (img.astype(np.int64).sum(-1) * 16 // (3 * 256)).astype(np.uint8)
        index[h // 3 : h // 3 + max(h // 4, 1)] = 3
        pal = Image.fromarray(index, "P")
        pal.putpalette(palette.reshape(-1).tolist())
        pal.save(buf, format="PNG", compress_level=0, transparency=3)
    elif form == "exif6":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
        stored = np.ascontiguousarray(np.rot90(img, k=1))  # [w, h, 3]: the display turned back
        Image.fromarray(stored).save(buf, format="PNG", compress_level=0, exif=exif.tobytes())
    else:
        raise ValueError(f"image form {form!r} is not one of rgb, rgba, palette, exif6")
    return buf.getvalue()


def ref(name: str) -> dict:
    return {"$tensor": name}


def _call(fn):
    """A spec result, or the refusal it raises (some items are meant to be refused)."""
    try:
        return fn()
    except ValueError:
        return {"error": "ValueError"}
    except TypeError:
        return {"error": "TypeError"}


# ------------------------------------------------------------------------- exact cases


def case_exact_resize(spec: SpecAdapter):
    sizes = [
        (28, 28),
        (56, 56),
        (42, 42),
        (70, 70),
        (98, 98),
        (126, 126),
        (154, 154),
        (210, 210),
        (70, 126),
        (14, 14),
        (1, 1),
        (23, 3),
        (26, 28),
        (10, 10),
        (3, 600),
        (0, 10),
        (28, 5600),
        (28, 5628),
        (1, 200),
        (1, 201),
        (100, 20000),
        (480, 640),
        (720, 1280),
        (1080, 1920),
        (2048, 1536),
        (4032, 3024),
        (10000, 10000),
        (20000, 30),
    ]
    budgets = [(3136, 12845056), (3136, 1003520), (100352, 602112), (200704, 200704)]
    items = []
    for k, (h, w) in enumerate(sizes):
        for lo, hi in budgets if k % 3 == 0 or h * w >= 10**6 else budgets[:1]:
            inp = {"height": h, "width": w, "factor": 28, "min_pixels": lo, "max_pixels": hi}
            out = _call(lambda: list(spec.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)))
            items.append({"label": f"{h}x{w} pixels [{lo}, {hi}]", "inputs": inp, "expected": out})
    tensors, bic = {}, []
    for k, ((h, w), size) in enumerate(
        [((37, 53), (28, 56)), ((100, 60), (56, 28)), ((20, 30), (56, 84)), ((70, 70), (56, 56))]
    ):
        img = synthetic_image(h, w, 100 + k)
        tensors[f"bicubic.{k}.image"] = torch.from_numpy(img)
        tensors[f"bicubic.{k}.out"] = torch.from_numpy(np.ascontiguousarray(spec.resize_bicubic(img, size)))
        bic.append(
            {
                "label": f"{h}x{w} -> {size[0]}x{size[1]}",
                "inputs": {"image": ref(f"bicubic.{k}.image"), "size": list(size)},
                "expected": ref(f"bicubic.{k}.out"),
            }
        )
    return {
        "description": "resize targets over a table of sizes and budgets (ties at 14 x odd, tiny, ratio 200/201, "
        "huge) and the uint8 bicubic kernel",
        "stages": {"fn.smart_resize": items, "fn.resize_bicubic": bic},
        "tensors": tensors,
    }


def case_exact_video_frames(spec: SpecAdapter):
    rows = [
        (10, 30.0, 2.0, None),
        (300, 30.0, 2.0, None),
        (301, 30.0, 1.0, None),
        (90, 30.0, 4.0, None),
        (31, 30.0, 30.0, None),
        (25, 25.0, 30.0, None),
        (1000, 24.0, 2.0, None),
        (7, 7.0, 1.0, None),
        (15, 30.0, 2.0, None),
        (33, 29.97, 4.0, None),
        (100, 25.0, None, 9),
        (100, 25.0, None, 10),
        (1, 30.0, 2.0, None),
        (0, 30.0, 2.0, None),
        (12001, 30.0, 30.0, None),
        # the smallest clips where float32 linspace (the spec, qwen-vl-utils) and float64 pick another frame
        # (one index each; found by scanning T for n = 768 and 512): 411 s at 30 fps, fps 2 -> 768 frames
        (12342, 30.0, 2.0, None),
        (16481, 25.0, None, 512),
        (3600, 60.0, 1.0, None),
        (45, 15.0, 2.0, None),
    ]
    items = []
    for total, vfps, fps, nframes in rows:
        inp = {
            "total_frames": total,
            "video_fps": vfps,
            "fps": fps,
            "min_frames": 4,
            "max_frames": 768,
            "nframes": nframes,
        }
        out = _call(
            lambda: [
                int(i)
                for i in spec.sample_frame_indices(total, vfps, fps=fps, min_frames=4, max_frames=768, nframes=nframes)
            ]
        )
        items.append(
            {"label": f"{total} frames at {vfps} fps, fps={fps}, nframes={nframes}", "inputs": inp, "expected": out}
        )
    return {
        "description": "video frame indices for several durations and rates (fps 1, 2, 4, 30; odd counts)",
        "stages": {"fn.sample_frame_indices": items},
        "tensors": {},
    }


def case_exact_patches(spec: SpecAdapter):
    tensors, patch_items = {}, []
    for k, (T, H, W) in enumerate([(1, 28, 28), (2, 56, 84), (3, 28, 56), (4, 56, 56)]):
        frames = (torch.arange(T * 3 * H * W) % 251).to(torch.float32).reshape(T, 3, H, W)
        pv, grid = spec.patchify(frames, patch_size=14, temporal_patch_size=2, merge_size=2)
        tensors[f"patchify.{k}.frames"], tensors[f"patchify.{k}.pixel_values"] = frames, pv
        patch_items.append(
            {
                "label": f"frames {T}x3x{H}x{W}",
                "inputs": {
                    "frames": ref(f"patchify.{k}.frames"),
                    "patch_size": 14,
                    "temporal_patch_size": 2,
                    "merge_size": 2,
                },
                "expected": {"pixel_values": ref(f"patchify.{k}.pixel_values"), "grid_thw": grid.tolist()},
            }
        )
    pre = []
    for k, (h, w, lo, hi) in enumerate(
        [
            (70, 70, 3136, 12845056),
            (45, 123, 3136, 12845056),
            (150, 100, 3136, 12845056),
            (300, 200, 3136, 12544),
            (28, 700, 3136, 12845056),
            (9, 9, 3136, 12845056),
        ]
    ):
        img = synthetic_image(h, w, 200 + k)
        tensors[f"preprocess.{k}.image"] = torch.from_numpy(img)
        res = _call(lambda: spec.preprocess_image(img, min_pixels=lo, max_pixels=hi))
        if isinstance(res, tuple):
            tensors[f"preprocess.{k}.pixel_values"] = res[0]
            res = {"pixel_values": ref(f"preprocess.{k}.pixel_values"), "grid_thw": res[1].tolist()}
        pre.append(
            {
                "label": f"image {h}x{w} pixels [{lo}, {hi}]",
                "inputs": {"image": ref(f"preprocess.{k}.image"), "min_pixels": lo, "max_pixels": hi},
                "expected": res,
            }
        )
    rot = []
    for grid in ([[1, 2, 2]], [[1, 4, 6]], [[2, 4, 4], [1, 2, 6]], [[1, 10, 14]]):
        out = spec.vision_rotary_positions(torch.tensor(grid), merge_size=2)
        rot.append({"label": f"grid {grid}", "inputs": {"grid_thw": grid, "merge_size": 2}, "expected": out.tolist()})
    return {
        "description": "pixel_values row order (merge blocks, temporal pairs, odd frame counts), whole image "
        "preprocessing, vision rotary positions",
        "stages": {"fn.patchify": patch_items, "fn.preprocess_image": pre, "fn.vision_rotary_positions": rot},
        "tensors": tensors,
    }


def case_exact_windows(spec: SpecAdapter):
    grids = [
        [[1, 8, 12]],
        [[1, 16, 16]],
        [[1, 2, 2]],
        [[1, 2, 40]],
        [[2, 10, 14]],
        [[1, 16, 16], [1, 6, 10]],
        [[3, 8, 8]],
        [[1, 36, 20]],
        [[1, 8, 8]],
        [[1, 100, 100]],
        [[1, 24, 18], [2, 16, 8], [1, 4, 4]],
    ]
    items = []
    for grid in grids:
        wi, cw, cu = spec.window_partition(torch.tensor(grid), window_size=112, patch_size=14, merge_size=2)
        items.append(
            {
                "label": f"grid {grid}",
                "inputs": {"grid_thw": grid, "window_size": 112, "patch_size": 14, "merge_size": 2},
                "expected": {"window_index": wi.tolist(), "cu_window_seqlens": cw.tolist(), "cu_seqlens": cu.tolist()},
            }
        )
    return {
        "description": "window partitions: grids that are and are not multiples of the window, strips, "
        "several items, t > 1, a large grid",
        "stages": {"fn.window_partition": items},
        "tensors": {},
    }


CONVERSATIONS = [
    ("text only", [{"role": "user", "content": "Hello!"}], True, False),
    ("system given", [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}], True, False),
    (
        "image then text",
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        True,
        False,
    ),
    (
        "image mid-prompt",
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image"},
                    {"type": "text", "text": " and say why."},
                ],
            }
        ],
        True,
        False,
    ),
    (
        "multi-turn",
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]},
        ],
        True,
        False,
    ),
    (
        "video",
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        True,
        False,
    ),
    (
        "vision ids",
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "video"},
                    {"type": "text", "text": "All three."},
                ],
            }
        ],
        True,
        True,
    ),
    ("no generation prompt", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], False, False),
    ("typed pad token", [{"role": "user", "content": "the text <|image_pad|> is not an image"}], True, False),
    (
        # the ids count over the whole conversation: Picture 2 and 3 in the third message, not Picture 1 and 2
        "vision ids over several messages",
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "First."}]},
            {"role": "assistant", "content": "Seen."},
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "video"}],
            },
        ],
        True,
        True,
    ),
]


def case_exact_prompt(spec: SpecAdapter, tokenizer_dir: str):
    chats = []
    for label, msgs, gen, vid in CONVERSATIONS:
        chats.append(
            {
                "label": label,
                "inputs": {"messages": msgs, "add_generation_prompt": gen, "add_vision_id": vid},
                "expected": spec.render_chat(msgs, add_generation_prompt=gen, add_vision_id=vid),
            }
        )
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    vpad = "<|vision_start|><|video_pad|><|vision_end|>"
    expand_rows = [
        ("one image", [f"a {pad} b"], [[1, 4, 6]], None),
        ("two images, two rows", [f"{pad}x", f"y{pad}"], [[1, 2, 2], [1, 8, 12]], None),
        ("image and video", [f"{vpad} then {pad}"], [[1, 6, 4]], [[3, 4, 4]]),
        ("no vision", ["plain"], None, None),
    ]
    expand = []
    for label, texts, ig, vg in expand_rows:
        out = spec.expand_vision_tokens(
            texts, None if ig is None else torch.tensor(ig), None if vg is None else torch.tensor(vg), merge_size=2
        )
        expand.append(
            {
                "label": label,
                "inputs": {"texts": texts, "image_grid_thw": ig, "video_grid_thw": vg, "merge_size": 2},
                "expected": list(out),
            }
        )
    texts = (
        [c["expected"] for c in chats]
        + [e["expected"][0] for e in expand]
        + [
            "Hello world",
            "12345 67",
            "héllo 你好 🙂",
            "\n\n   x  \t y",
            "don't I'll we've",
            "<|im_start|><|endoftext|>",
            # NFC changes these (the tokenizer's normalizer composes them): decomposed accents, Hangul jamo
            "Cafe\u0301 de\u0301ja\u0300 vu",
            "A\u030angstro\u0308m",
            "\u1112\u1161\u11ab\u1100\u1173\u11af",
            # the Qwen2 pre-tokenizer regex splits this in 2 pieces, GPT-2's in 4
            "(x):\n",
        ]
    )
    toks = [
        {"label": f"text {k}", "inputs": {"text": t}, "expected": spec.tokenize(t, tokenizer_dir=tokenizer_dir)}
        for k, t in enumerate(texts)
    ]
    return {
        "description": "chat template renderings (vision ids counted over several messages), vision pad expansion "
        "and token ids",
        "stages": {"fn.render_chat": chats, "fn.expand_vision_tokens": expand, "fn.tokenize": toks},
        "tensors": {},
        "tokenizer": f"../{CHECKPOINT}",
    }


def _span(kind_id: int, grid, merge: int = 2) -> list[int]:
    t, h, w = grid
    return [VS] + [kind_id] * (t * h * w // merge**2) + [VE]


def _text(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def case_exact_positions(spec: SpecAdapter):
    config = Qwen25VLConfig().to_dict()
    tensors = {}
    rows = []

    def add(label, seqs, igrids, vgrids, spg, left_pad=True):
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), 151643, dtype=torch.int64)
        mask = torch.zeros((len(seqs), L), dtype=torch.int64)
        for b, s in enumerate(seqs):
            if left_pad:
                ids[b, L - len(s) :], mask[b, L - len(s) :] = torch.tensor(s), 1
            else:
                ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
        rows.append((label, ids, mask, igrids, vgrids, spg))

    add("text only", [_text(10)], None, None, None)
    add("image mid-prompt", [_text(5) + _span(IMG, (1, 8, 12)) + _text(5)], [[1, 8, 12]], None, None)
    add(
        "two images",
        [_text(3) + _span(IMG, (1, 4, 4)) + _text(2) + _span(IMG, (1, 2, 10)) + _text(4)],
        [[1, 4, 4], [1, 2, 10]],
        None,
        None,
    )
    add("tall image (rows > cols)", [_text(2) + _span(IMG, (1, 12, 4)) + _text(3)], [[1, 12, 4]], None, None)
    add("video fps 1 (2 s per grid)", [_text(4) + _span(VID, (3, 4, 4)) + _text(3)], None, [[3, 4, 4]], [2.0])
    add("video fps 2 (1 s per grid)", [_text(4) + _span(VID, (4, 4, 6)) + _text(3)], None, [[4, 4, 6]], [1.0])
    add("video fps 4 (0.5 s per grid)", [_text(4) + _span(VID, (5, 2, 4)) + _text(3)], None, [[5, 2, 4]], [0.5])
    add("video fps 30 (1/15 s per grid)", [_text(4) + _span(VID, (8, 2, 2)) + _text(3)], None, [[8, 2, 2]], [2 / 30])
    add(
        "long video, time past the text rule", [_text(2) + _span(VID, (40, 2, 2)) + _text(3)], None, [[40, 2, 2]], [2.0]
    )
    add(
        "image and video",
        [_text(3) + _span(IMG, (1, 4, 6)) + _text(2) + _span(VID, (2, 4, 4)) + _text(2)],
        [[1, 4, 6]],
        [[2, 4, 4]],
        [1.0],
    )
    add(
        "multi-turn",
        [
            _text(8)
            + _text(6, 2000)
            + _span(IMG, (1, 6, 6))
            + _text(4)
            + _text(5, 3000)
            + _span(IMG, (1, 2, 2))
            + _text(3)
        ],
        [[1, 6, 6], [1, 2, 2]],
        None,
        None,
    )
    add("left-padded batch", [_text(3) + _span(IMG, (1, 4, 4)) + _text(2), _text(20)], [[1, 4, 4]], None, None)
    add(
        "left-padded batch, images in both rows",
        [_text(2) + _span(IMG, (1, 2, 4)) + _text(1), _text(6) + _span(IMG, (1, 6, 4)) + _text(7)],
        [[1, 2, 4], [1, 6, 4]],
        None,
        None,
    )
    add("beyond 16k positions", [_text(16500) + _span(IMG, (1, 8, 8)) + _text(20)], [[1, 8, 8]], None, None)
    # the padded row has no image: its rope_deltas are minus its padding (-6), not 0
    add(
        "left-padded batch, the padded row text only",
        [_text(3) + _span(IMG, (1, 4, 4)) + _text(2), _text(5)],
        [[1, 4, 4]],
        None,
        None,
    )
    items = []
    for k, (label, ids, mask, ig, vg, spg) in enumerate(rows):
        pos, deltas = spec.rope_index(
            ids,
            None if ig is None else torch.tensor(ig),
            None if vg is None else torch.tensor(vg),
            None if spg is None else torch.tensor(spg, dtype=torch.float64),
            mask,
            config=config,
        )
        big = ids.numel() > 2000
        if big:
            tensors[f"rope.{k}.input_ids"], tensors[f"rope.{k}.attention_mask"] = ids, mask
            tensors[f"rope.{k}.position_ids"] = pos
        inp = {
            "input_ids": ref(f"rope.{k}.input_ids") if big else ids.tolist(),
            "attention_mask": ref(f"rope.{k}.attention_mask") if big else mask.tolist(),
            "image_grid_thw": ig,
            "video_grid_thw": vg,
            "second_per_grid_ts": spg,
            "config": config,
        }
        items.append(
            {
                "label": label,
                "inputs": inp,
                "expected": {
                    "position_ids": ref(f"rope.{k}.position_ids") if big else pos.tolist(),
                    "rope_deltas": deltas.tolist(),
                },
            }
        )
    dec = []
    for deltas, start, steps in (([[0]], 0, 1), ([[-5], [3]], 20, 4), ([[-16000]], 17000, 3), ([[-40], [-38]], 57, 5)):
        out = spec.decode_positions(torch.tensor(deltas), start, steps)
        dec.append(
            {
                "label": f"deltas {deltas} start {start} steps {steps}",
                "inputs": {"rope_deltas": deltas, "start": start, "steps": steps},
                "expected": out.tolist(),
            }
        )
    cs = []
    for k, (label, pos) in enumerate(
        [
            (
                "positions of an image mid-prompt",
                spec.rope_index(rows[1][1], torch.tensor([[1, 8, 12]]), None, None, rows[1][2], config=config)[0],
            ),
            (
                "positions past 16k",
                torch.stack(
                    [
                        torch.tensor([0, 5, 900, 16383, 16384, 17000, 19999, 20000]),
                        torch.tensor([0, 7, 901, 16390, 16384, 17001, 19000, 20000]),
                        torch.tensor([0, 9, 902, 16400, 16385, 17002, 18000, 20000]),
                    ]
                )[:, None],
            ),
        ]
    ):
        cos, sin = spec.mrope_cos_sin(pos, head_dim=128, theta=1e6, mrope_section=(16, 24, 24))
        tensors[f"cos_sin.{k}.position_ids"] = pos
        tensors[f"cos_sin.{k}.cos"], tensors[f"cos_sin.{k}.sin"] = cos.to(torch.float64), sin.to(torch.float64)
        cs.append(
            {
                "label": label,
                "inputs": {
                    "position_ids": ref(f"cos_sin.{k}.position_ids"),
                    "head_dim": 128,
                    "theta": 1e6,
                    "mrope_section": [16, 24, 24],
                },
                "expected": {"cos": ref(f"cos_sin.{k}.cos"), "sin": ref(f"cos_sin.{k}.sin")},
            }
        )
    return {
        "description": "MRoPE position ids and rope_deltas (images, mid-prompt, videos at several rates, "
        "multi-turn, left-padded batches, the padded row with an image and text only, > 16k positions), decode "
        "positions, rotary tables",
        "stages": {"fn.rope_index": items, "fn.decode_positions": dec, "fn.mrope_cos_sin": cs},
        "tensors": tensors,
    }


EXACT_CASES = {
    "exact_resize": case_exact_resize,
    "exact_video_frames": case_exact_video_frames,
    "exact_patches": case_exact_patches,
    "exact_windows": case_exact_windows,
    "exact_prompt": case_exact_prompt,
    "exact_positions": case_exact_positions,
}


def write_exact(name: str, out: Path, spec: SpecAdapter, tokenizer_dir: str) -> None:
    fn = EXACT_CASES[name]
    built = fn(spec, tokenizer_dir) if name == "exact_prompt" else fn(spec)
    files, st = {}, {}
    for stage, items in built["stages"].items():
        files[f"{stage}.json"] = {"items": items}
        st[stage] = {
            "tolerance": stages.info(stage).tolerance.name,
            "items": f"{stage}.json",
            "files": [f"{stage}.json"],
        }
        if built["tensors"]:
            st[stage]["tensors"] = "tensors.safetensors"
            st[stage]["files"].append("tensors.safetensors")
    if built["tensors"]:
        files["tensors.safetensors"] = built["tensors"]
    manifest = {
        "case": name,
        "kind": "exact",
        "description": built["description"],
        "stages": st,
        "producer": versions(),
    }
    if built.get("tokenizer"):
        manifest["tokenizer"] = built["tokenizer"]
    write_case(out / name, manifest, files)


# ------------------------------------------------------------------------- model cases


def _clip(frames: int, fps: float) -> dict:
    """The "videos" and "options" of a one-clip case: `frames` frames of 112x140 (write_model draws the same
    moving square for every clip, so clips of equal length differ only in their rate), sampled at `fps`,
    within 16 to 32 patches of 28x28 per frame."""
    return {
        "videos": [{"frames": [(112, 140)] * frames, "fps": fps}],
        "options": {"video_options": {"fps": fps, "min_pixels": 12544, "max_pixels": 25088}},
    }


MODEL_CASES = {
    "model_image": {
        "description": "one image mid-prompt (grid 18x12: partial windows), greedy decode past the image",
        "conversations": [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Look at "},
                        {"type": "image"},
                        {"type": "text", "text": " and describe it."},
                    ],
                }
            ]
        ],
        "images": [(252, 168, 1)],
        "videos": [],
        "options": {},
    },
    "model_image_swap": {
        "description": "model_image's text with another image of the same size: the same token ids, other pixels "
        "(a cache keyed on token ids, or positions kept from an earlier request, shows here)",
        "conversations": [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Look at "},
                        {"type": "image"},
                        {"type": "text", "text": " and describe it."},
                    ],
                }
            ]
        ],
        "images": [(252, 168, 7)],
        "videos": [],
        "options": {},
    },
    "model_batch": {
        "description": "left-padded batch of 2, an image in each row: two images (one an exact multiple of the "
        "window) vs multi-turn text around a 100x300 image the resize must change (to 112x308: aspect 3.0 -> 2.75) "
        "and a decomposed 'Cafe\u0301' that NFC composes; row 1 stops at <|endoftext|> (151643) at step 4 "
        "(then padded with 151643), row 0 runs on",
        "conversations": [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": "and"},
                        {"type": "image"},
                        {"type": "text", "text": "Which is brighter?"},
                    ],
                }
            ],
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Cafe\u0301 menu:"},
                        {"type": "image"},
                        {"type": "text", "text": "Count to three."},
                    ],
                },
            ],
        ],
        "images": [(224, 224, 2), (84, 140, 3), (100, 300, 4)],
        "videos": [],
        "options": {},
    },
    "model_video": {
        "description": "a 5-frame clip at 1 fps (odd count, 2 s per temporal patch: time positions 0, 4, 8)",
        "conversations": [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]],
        "images": [],
        **_clip(frames=5, fps=1.0),
    },
    "model_video_file": {
        "description": "a video file (QuickTime RLE, lossless), 19 frames at 5 fps, sampled at 2 fps: 6 frames, "
        "indices 0, 4, 7, 11, 14, 18 (round(linspace); transformers' floor(k*T/n) gives 0, 3, 6, 9, 12, 15 and "
        "qwen-vl-utils 0.0.8's rounded count 8 frames), a sampled rate of 30/19 fps, so second_per_grid_t 19/15 "
        "(not 1.0, what the 2 fps asked for gives) and temporal positions 0, 2, 5",
        "conversations": [
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]
        ],
        "images": [],
        # seed 97 (of 60 x 4 questions searched): every greedy step is picked by >= 0.188 logit (bf16 noise 0.106)
        "videos": [{"file": {"frames": 19, "fps": 5, "size": (112, 140), "step": (4, 6), "seed": 97}}],
        "options": {"video_options": {"fps": 2.0, "min_pixels": 12544, "max_pixels": 25088}},
    },
    "model_video_budget": {
        "description": "a 2-frame video file of 112x140 frames at 2 fps and no pixel budget in the request: "
        "Qwen2.5-VL's per-frame video budget (at least 128 x 28 x 28 pixels a frame) scales the frames up to "
        "308x364 (grid 1x22x26, 143 tokens); a budget over the whole clip (Qwen3-VL's rule: 2 x 112 x 140 "
        "within the image budget 3136..12845056) keeps 112x140 (20 tokens)",
        "conversations": [
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
        ],
        "images": [],
        # seed 100: every greedy step is picked by >= 0.148 logit (bf16 noise 0.073)
        "videos": [{"file": {"frames": 2, "fps": 2, "size": (112, 140), "step": (4, 6), "seed": 100}}],
        "options": {},
    },
    "model_resize_tie": {
        "description": "one 126x294 image whose resize is a tie on both sides (4.5 and 10.5 patches of 28): "
        "Python's round, half to even, gives 112x280 (grid 8x20); C's std::round, ties away from zero, 140x308",
        "conversations": [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
        ],
        "images": [(126, 294, 17)],  # seed 17: every greedy step is picked by >= 0.136 logit (no near tie)
        "videos": [],
        "options": {},
    },
    "model_thin": {
        "description": "one 8x288 image, a thin strip: the min_pixels branch scales it up to 28x336 (grid 2x24); "
        "float32 arithmetic gives 28x364, qwen-vl-utils' rule (first rounding clamped to 28) 28x280, and "
        "transformers <= 4.51 refuses a side under 28 px",
        "conversations": [
            [{"role": "user", "content": [{"type": "text", "text": "Read the strip:"}, {"type": "image"}]}]
        ],
        "images": [(8, 288, 25)],  # seed 25: every greedy step is picked by >= 0.108 logit (bf16 noise 0.070)
        "videos": [],
        "options": {},
    },
    "model_video_fps": {
        "description": "a 6-frame clip at 1.5 fps: second_per_grid_t 4/3, so the temporal positions are 0, 2, 5 "
        "(an integer cast of second_per_grid_t gives 0, 2, 4; ignoring it, 0, 1, 2)",
        "conversations": [
            [
                {
                    "role": "user",
                    "content": [{"type": "video"}, {"type": "text", "text": "What changes between the frames?"}],
                }
            ]
        ],
        "images": [],
        **_clip(frames=6, fps=1.5),
    },
    "model_video_sparse": {
        "description": "model_video_fps's six frames as a 40-minute recording, one frame every 400 s (fps 0.0025): "
        "second_per_grid_t 800, so the temporal positions are 0, 1600, 3200 past the span start and the text "
        "after the video resumes at 3216: past 2048 (where float16 stops holding every integer) and far past "
        "the prompt's 88 tokens (a rotary table sized by the token count runs out)",
        "conversations": [
            [
                {
                    "role": "user",
                    "content": [{"type": "video"}, {"type": "text", "text": "Describe what happens over time."}],
                }
            ]
        ],
        "images": [],
        **_clip(frames=6, fps=0.0025),  # model_video_fps's frames: only the rate differs
    },
    "model_video_image": {
        "description": "a 4-frame clip at 2 fps, then an image, in one turn (40 video tokens, then 15 image tokens): "
        "features go to their own kind's pads, images into image pads and videos into video pads, each in order, so "
        "a port that stacks images before videos and fills every vision pad in prompt order swaps the two blocks, "
        "and one that encodes only one kind leaves the other's pads as token embeddings",
        "conversations": [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "video"},
                        {"type": "text", "text": "then"},
                        {"type": "image"},
                        {"type": "text", "text": "Is the square of the clip in the picture?"},
                    ],
                }
            ]
        ],
        "images": [(84, 140, 6)],  # seed 6: every greedy step is picked by >= 0.082 logit
        **_clip(frames=4, fps=2.0),
    },
    "model_media_forms": {
        "description": "a left-padded batch of 2: row 0 holds three image files in the forms users send, an RGBA "
        "PNG with partly transparent pixels and a palette PNG with a transparency key (both composited over white: "
        "a port that drops alpha sees the hidden colours) and a PNG stored 56x140 with EXIF orientation 6 (upright "
        "140x56, grid 10x4: a port that ignores EXIF gets grid 4x10); row 1 is text only and the shorter, so its "
        "padding sits before a row with no image (rope_deltas minus its padding, not 0); the case's eos list is "
        "[151645, 104399, 138093], the tokens rows 0 and 1 pick at step 2, neither the pad id 151643: each row keeps "
        "its eos and the run ends there, 3 tokens (a port that stops only on 151643/151645, drops the eos, returns "
        "the pad in its place or stops one step late fails)",
        "conversations": [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Three pictures:"},
                        {"type": "image"},
                        {"type": "image"},
                        {"type": "image"},
                        {"type": "text", "text": "Which one is turned?"},
                    ],
                }
            ],
            [{"role": "user", "content": "Say hi."}],
        ],
        # seed 31 (of 31 to 37 searched): each step up to the eos is picked by >= 0.093 logit. Both rows stop at
        # the same step: a row padded after a non-pad eos fails compare._bad_topk (its top-k lacks the pad)
        "images": [(84, 112, 31, "rgba"), (56, 84, 32, "palette"), (140, 56, 33, "exif6")],
        "videos": [],
        "options": {},
        "eos_token_id": [151645, 104399, 138093],
    },
    "model_large_image": {
        "description": "one 1008x1120 image (1.13 Mpx, grid 72x80, 1440 image tokens) and no pixel budget in the "
        "request: the preprocessor config's default (3136..12845056) keeps its size; a port whose default "
        "max_pixels is 1280 x 28 x 28 = 1003520 shrinks it to 924x1036 (grid 66x74)",
        # not bundled (python -m qwen25vl.tools.generate_fixtures --out DIR --only model_large_image): its
        # pixel_values alone are 27 MB, past the bundled fixtures' 63 MB cap
        "bundled": False,
        "conversations": [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
        ],
        "images": [(1008, 1120, 41)],
        "videos": [],
        "options": {},
    },
    "model_outliers": {
        "description": "one 112x168 image on the tied checkpoint, whose vision tower carries 20480 in one residual "
        "channel of every patch from block 0's MLP on (the real 3B carries 2.3e4 by block 31), undone by the later "
        "norms' weights, and whose decoder carries 1.2e4 to 3.1e4 in one channel of each <|im_start|>: a norm that "
        "sums squares in float16 overflows (65504) and erases the row",
        "checkpoint": TIED_CHECKPOINT,
        "conversations": [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]
        ],
        "images": [(112, 168, 3)],
        "videos": [],
        "options": {},
    },
    "model_text": {
        "description": "text only, on the tied checkpoint (the 3B layout: no lm_head.weight stored), a system "
        "prompt of its own and two user turns, 394 tokens: positions past 256 (where bfloat16 stops holding every "
        "integer), digit runs, contractions in capitals, '(x):\\n', tabs, CRLF, CJK, Arabic and emoji for the "
        "pre-tokenizer; from layer 0 on, each of its five <|im_start|> carries a massive activation (1.2e4 to 3.7e4 "
        "in one channel), as a trained decoder's first token does",
        "checkpoint": TIED_CHECKPOINT,
        "conversations": [
            [
                {"role": "system", "content": "You are a terse assistant. Answer in one line."},
                {
                    "role": "user",
                    "content": "Read this log and tell me what failed.\n\n"
                    "    [2026-12-06 03:51:27] step 12345 ->  loss=0.0731  lr=3e-4\n"
                    "\t[2026-12-06 03:52:02] step 12346 ->  loss=NaN (x):\n"
                    "IT'S the 2nd time; we'LL retry, they'RE sure it's fine, I'M not.\n"
                    "Costs: $1,299.99 vs \u20ac1.049,50 -- 50% off!!! ...  \u00abquoted\u00bb \u201csmart\u201d\r\n"
                    "\u4f60\u597d\uff0c\u4e16\u754c\uff01 \u3053\u3093\u306b\u3061\u306f "
                    "\u0645\u0631\u062d\u0628\u0627 \U0001f600\U0001f44d\n"
                    "def f(x):\n    return x**2  # 0x1F, 1e-6, 3.14159\n\n\n"
                    "https://example.com/a_b-c?d=1&e=2#frag   trailing   \n",
                },
                {"role": "assistant", "content": "Step 12346 diverged (NaN loss) after 12345 passed."},
                {
                    "role": "user",
                    "content": "Now the table:\n| id | value |\n|----|-------|\n| 007 | 1234567890 |\n"
                    "| 08 | -0.000001 |\nSum the values, then count down: 10 9 8 7 6 5 4 3 2 1 0.\n"
                    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt "
                    "ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation "
                    "ullamco laboris nisi ut aliquip...",
                },
            ]
        ],
        "images": [],
        "videos": [],
        "options": {},
    },
}


def _rel_control(golden: dict, run: dict, mask) -> dict:
    out = {}
    for name, g in golden.items():
        if name not in run or not g.is_floating_point():
            continue
        m = mask if name.startswith("text.") else None
        if name == "logits":
            s = compare.logit_stats(g, run[name].double(), mask)
            out[name] = {"mean_kl": s["mean_kl"], "top1": s["top1"]}
        else:
            out[name] = compare.float_errors(g, run[name].double(), m, channels=True)["rel"]
    return out


def _finite(value) -> bool:
    """A control (a float, or the logits' {"mean_kl", "top1"}) that is a number."""
    values = value.values() if isinstance(value, dict) else [value]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _held(table: dict, stage: str) -> dict:
    """{precision: control} of one stage, without the precisions whose spec run was not finite there: a
    real checkpoint's activations can pass float16's 65504, and an inf control would budget anything."""
    return {dt: table[dt][stage] for dt in table if stage in table[dt] and _finite(table[dt][stage])}


def _before_eos(tokens: torch.Tensor, eos) -> torch.Tensor:
    """[B, n] 1.0 on each row's steps up to and including its first eos, 0.0 after (padding)."""
    eos = [eos] if isinstance(eos, int) else list(eos)
    is_eos = torch.isin(tokens, torch.tensor(eos))
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after).double()


def write_model(
    name: str, out: Path, tokenizer_dir: str, checkpoint: Path | None = None, loaded: dict | None = None
) -> None:
    """Write model case `name` under `out`: golden from the float64 spec, controls at every precision.

    checkpoint: the model folder (default: the bundled tiny one, out/checkpoints/tiny), named in the manifest
    relative to the case folder. loaded: dtype name -> (config, params) to run instead of loading the folder
    whole (tools/fixtures_from_checkpoint.py streams them).
    """
    spec_case = MODEL_CASES[name]
    ck = out / spec_case.get("checkpoint", CHECKPOINT) if checkpoint is None else Path(checkpoint)
    ref = Reference(str(ck), loaded=loaded)
    files: dict = {}
    images, videos = [], []
    for k, (h, w, seed, *form) in enumerate(spec_case["images"]):
        files[f"media/image{k}.png"] = image_file_bytes(h, w, seed, *form)
        images.append(f"media/image{k}.png")
    for v, vid in enumerate(spec_case["videos"]):
        if "file" in vid:
            clip = vid["file"]
            drawn = [moving_square(*clip["size"], k, clip["step"], clip["seed"]) for k in range(clip["frames"])]
            files[f"media/video{v}.mov"] = video_file_bytes(drawn, clip["fps"])
            videos.append({"file": f"media/video{v}.mov"})
            continue
        frames = []
        for k, (h, w) in enumerate(vid["frames"]):
            files[f"media/video{v}_frame{k}.png"] = png_bytes(moving_square(h, w, k))
            frames.append(f"media/video{v}_frame{k}.png")
        videos.append({"frames": frames, "fps": vid["fps"]})
    request = {
        "conversations": spec_case["conversations"],
        "images": images,
        "videos": videos,
        "options": spec_case["options"],
        "add_generation_prompt": True,
    }
    files["request.json"] = request

    # build the inputs from the media as written (the PNG and QuickTime RLE round trips are lossless)
    import tempfile

    gold = ref.adapter("float64")
    with tempfile.TemporaryDirectory() as tmp:
        for f, b in files.items():
            if isinstance(b, bytes):
                (Path(tmp) / f).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / f).write_bytes(b)
        inputs = gold.build_inputs(
            request["conversations"],
            *request_media(tmp, request),
            tokenizer_dir=tokenizer_dir,
            options=request["options"],
        )
    inputs = {k: v for k, v in inputs.items() if v is not None}
    files["inputs.safetensors"] = inputs
    mask = inputs["attention_mask"]

    names = stages.model_stages(gold.config.vision.depth, gold.config.num_hidden_layers)
    has_vision = "pixel_values" in inputs or "pixel_values_videos" in inputs
    if not has_vision:
        names = [n for n in names if not n.startswith("vision.")]
    g64 = gold.run(inputs, capture=names)
    stored = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in g64.items() if k != "logits"}
    files["golden.safetensors"] = stored
    logits = g64["logits"]
    top = logits.topk(TOPK_STORED, dim=-1)
    files["logits_topk.safetensors"] = {"values": top.values.to(torch.float32), "indices": top.indices}

    # generation_config.json's list, [151645, 151643], unless the case names its own
    eos = spec_case.get("eos_token_id") or stop_token_ids(ck)
    new = generate_greedy(gold.params, gold.config, inputs, MAX_NEW_TOKENS, eos_token_id=eos)
    step = gold.step_logits(inputs, new).double()  # [B, n, V]
    step_top = step.topk(compare.TOPK, dim=-1)
    valid = _before_eos(new, eos)  # [B, n]: steps up to each row's eos
    files["generate.json"] = {
        "tokens": new.tolist(),
        "topk": step_top.indices.tolist(),
        "topk_logits": step_top.values.tolist(),
        "topk_logprobs": step.log_softmax(-1).gather(-1, step_top.indices).tolist(),
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": eos,
    }

    # controls: the spec itself at each precision a port may declare (conformance/precision.py), end
    # to end (compute dtypes) and teacher-forced (every precision; rounded inputs are a local property)
    control, control_tf, bf16_store, noise = {}, {}, {}, {}
    feeds = {**inputs, "position_ids": g64["text.position_ids"]}
    scaled = [s for s in names if stages.info(s).tolerance.scaled]
    depth, layers = gold.config.vision.depth, gold.config.num_hidden_layers
    for precision in ("bfloat16", "float16", "float32", "float16-inputs", "bfloat16-inputs"):
        if precision in COMPUTE:
            run = ref.adapter(precision).run(inputs, capture=names)
            control[precision] = _rel_control(g64, run, mask)
            if precision == "bfloat16":
                bf16_store = {k: v for k, v in run.items() if k != "logits"}
        tf = {}
        for s in scaled:
            prev = stages.previous(s, depth, layers, vision=has_vision)
            tf[s] = ref.stage(s, feeds if prev is None else {**feeds, "hidden": stored[prev]}, precision)
        control_tf[precision] = _rel_control(g64, tf, mask)
        if precision in COMPUTE:  # how far the spec's own decode logits move at this precision
            low = ref.adapter(precision).step_logits(inputs, new).double().gather(-1, step_top.indices)
            moved = 2 * float(((low - step_top.values).abs().amax(-1) * valid).max())
            if math.isfinite(moved):  # else a stand-in's noise judges that precision
                noise[precision] = moved
    files["control_bfloat16.safetensors"] = bf16_store

    st = {}
    for s in ["preprocess." + k for k in stages.INPUT_KEYS] + names + ["generate.tokens"]:
        tol = stages.info(s).tolerance.name
        entry = {"tolerance": tol}
        if s.startswith("preprocess."):
            entry["files"] = ["inputs.safetensors", "request.json"]
        elif s == "generate.tokens":
            entry["files"] = ["generate.json"]
            # measured like the controls (machine-dependent at low precision), so kept beside them
            entry["logit_noise"] = noise
        else:
            entry["files"] = ["golden.safetensors"]
            if tol in ("float", "logits"):
                entry["control"], entry["control_teacher"] = _held(control, s), _held(control_tf, s)
                overflow = sorted(
                    (set(control) - set(entry["control"])) | (set(control_tf) - set(entry["control_teacher"]))
                )
                if overflow:  # a stand-in judges that precision (compare.STAND_IN): float16 -> bfloat16
                    entry["not_held"] = overflow
            if s == "logits":
                entry["derived"] = (
                    "text.norm @ lm_head.weight^T in float64 (lm_head: the checkpoint's, or the embedding when tied)"
                )
        st[s] = entry
    manifest = {
        "case": name,
        "kind": "model",
        "description": spec_case["description"],
        "stages": st,
        "checkpoint": Path(os.path.relpath(ck, out / name)).as_posix(),
        "request": "request.json",
        "inputs": "inputs.safetensors",
        "depth": {"vision": gold.config.vision.depth, "text": gold.config.num_hidden_layers},
        "golden_dtype": "float64 computed, float32 stored",
        "producer": versions(),
    }
    write_case(out / name, manifest, files)


def write_checkpoint(out: Path, tied: bool = False) -> Path:
    """A tiny checkpoint the numeric cases run on, with a manifest of its files' sha256: CHECKPOINT (the 7B
    layout, untied, a stop planted in its head) or, tied, TIED_CHECKPOINT (the 3B layout: the same draw,
    the head is the embedding and is not stored, and a real vision tower's outlier channel is planted)."""
    from .make_tiny_checkpoint import make_tiny_checkpoint

    folder = make_tiny_checkpoint(out / (TIED_CHECKPOINT if tied else CHECKPOINT), seed=0, tied=tied, overwrite=True)
    write_checkpoint_manifest(folder, "tools/make_tiny_checkpoint.py --seed 0" + (" --tied" if tied else ""))
    return folder


def write_checkpoint_manifest(folder: Path, maker: str) -> None:
    """folder/manifest.json: the sha256 of every other file, which the harness checks before judging."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_bytes(
        dump_json(
            {
                "format": "qwen25vl-checkpoint/1",
                "kind": "checkpoint",
                "maker": maker,
                "files": files,
                "producer": versions(),
            }
        )
    )


def generate(out: str | Path, only: str | None = None) -> list[str]:
    """Write the cases selected by `only` ('exact', 'model', a case name, a regex, or None: all) under `out`."""
    with deterministic():
        return _generate(Path(out), only)


def _generate(out: Path, only: str | None) -> list[str]:
    bundled = [n for n in MODEL_CASES if MODEL_CASES[n].get("bundled", True)]  # the others only by name
    names = list(EXACT_CASES) + bundled
    if only == "exact":
        names = list(EXACT_CASES)
    elif only == "model":
        names = bundled
    elif only:
        names = list(EXACT_CASES) + list(MODEL_CASES)
        names = [n for n in names if re.fullmatch(only, n)]
        if not names:
            raise ValueError(f"--only {only!r} matches no case; cases are {list(EXACT_CASES) + list(MODEL_CASES)}")
    needed = {MODEL_CASES[n].get("checkpoint", CHECKPOINT) for n in names if n in MODEL_CASES}
    if "exact_prompt" in names:
        needed.add(CHECKPOINT)  # its tokenizer
    for folder in sorted(needed):
        if not (out / folder / "manifest.json").is_file():
            write_checkpoint(out, tied=folder == TIED_CHECKPOINT)
    tokenizer_dir = str(out / CHECKPOINT)
    spec = SpecAdapter("float64")
    for n in names:
        if n in EXACT_CASES:
            write_exact(n, out, spec, tokenizer_dir)
        else:
            write_model(n, out, tokenizer_dir)
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen25vl.tools.generate_fixtures", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="fixture folder to write (the bundled one is fixtures/)")
    p.add_argument("--only", default=None, help="'exact', 'model', or a case name / regex")
    p.add_argument("--checkpoint", action="store_true", help="also rewrite the tiny checkpoint when it exists")
    args = p.parse_args(argv)
    try:
        if args.checkpoint:
            write_checkpoint(Path(args.out))
        names = generate(args.out, args.only)
    except ValueError as e:
        print(f"generate_fixtures: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(names)} cases under {args.out}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
