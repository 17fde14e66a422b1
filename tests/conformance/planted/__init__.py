"""Planted bugs: faulty adapters, each the spec with ONE thing broken the way a real port broke it
(/work/shared/research/ports.md §3). tests/conformance/test_planted.py asserts that the harness
flags each at the stage where it first shows (`PLANTED`: adapter -> expected first divergent stage).

They double as examples of the adapter protocol: subclass an adapter, override a method.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from unittest import mock

import torch
from qwen25vl.conformance.adapters.spec import SpecAdapter
from qwen25vl.spec import forward as spec_forward
from qwen25vl.spec import generate as spec_generate
from qwen25vl.spec import mrope, patches, vision, windows


class RoundHalfUp(SpecAdapter):
    """Preprocessing (ports.md §3.2, kekzl/imp#1166): smart_resize rounds ties up (floor(x + 0.5))
    instead of Python's round-half-to-even, so a 70 px side becomes 84, not 56."""

    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        def up(x):  # a side of factor*(k + 1/2) is a tie; nudge it so round() goes up
            return x + 1 if (2 * x) % factor == 0 and (2 * x // factor) % 2 == 1 else x

        return super().smart_resize(up(height), up(width), factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


class ImageTokenCount(SpecAdapter):
    """Placeholders (ports.md §3.6, kekzl/imp#1173): each pad expanded to t*h*w tokens, forgetting the 2x2 merge."""

    def expand_vision_tokens(self, texts, image_grid_thw, video_grid_thw, *, merge_size):
        return super().expand_vision_tokens(texts, image_grid_thw, video_grid_thw, merge_size=1)


class PatchOrderRaster(SpecAdapter):
    """Patchify (ports.md §1.3): patches in plain raster order instead of 2x2 merge blocks."""

    def patchify(self, frames, *, patch_size, temporal_patch_size, merge_size):
        pv, grid = patches.patchify(
            frames, patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size
        )
        gt, gh, gw = grid[0].tolist()
        m = merge_size
        # undo the block order: rows are (t, block row, block col, row in block, col in block)
        raster = pv.view(gt, gh // m, gw // m, m, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(pv.shape)
        return raster, grid


class WindowNoDedup(SpecAdapter):
    """Window partition (ports.md §3.4, vllm#15200): the padding windows of a grid that is an exact
    multiple of the window are kept as empty segments (cu_window_seqlens not de-duplicated)."""

    def window_partition(self, grid_thw, *, window_size, patch_size, merge_size):
        wi, cw, cu = super().window_partition(
            grid_thw, window_size=window_size, patch_size=patch_size, merge_size=merge_size
        )
        ws = window_size // (patch_size * merge_size)
        if any(
            (h // merge_size) % ws == 0 or (w // merge_size) % ws == 0 for _, h, w in torch.as_tensor(grid_thw).tolist()
        ):
            cw = torch.cat([cw, cw[-1:]])
        return wi, cw, cu


class WrongFullAttention(SpecAdapter):
    """Vision blocks (ports.md §3.4): full attention in the wrong blocks (every index shifted by one)."""

    def model_config(self, config):
        v = config.vision
        return replace(config, vision=replace(v, fullatt_block_indexes=tuple(i - 1 for i in v.fullatt_block_indexes)))


class RotaryNotReordered(SpecAdapter):
    """Vision rotary (ports.md §3.4): the patches are permuted into window order but their 2D rotary
    tables are not, so each patch is rotated by another patch's angles."""

    def _patched(self, grid):
        m2 = self.config.vision.spatial_merge_size**2
        wi, _, _ = windows.window_partition(
            grid,
            window_size=self.config.vision.window_size,
            patch_size=self.config.vision.patch_size,
            merge_size=self.config.vision.spatial_merge_size,
        )
        restore = torch.argsort((wi[:, None] * m2 + torch.arange(m2)).reshape(-1))
        real = windows.vision_rotary_cos_sin

        def cos_sin(*args, **kwargs):  # tables pre-permuted so that the model's reorder cancels out
            cos, sin = real(*args, **kwargs)
            return cos[restore], sin[restore]

        return mock.patch.object(vision, "vision_rotary_cos_sin", cos_sin)

    @staticmethod
    def _grid(inputs):
        return torch.cat([inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None])

    def run(self, inputs, *, capture):
        with self._patched(self._grid(inputs)):
            return super().run(inputs, capture=capture)

    def run_stage(self, stage, feeds):
        if not stage.startswith("vision.block."):
            return super().run_stage(stage, feeds)
        with self._patched(self._grid(feeds)):
            return super().run_stage(stage, feeds)


def _interleaved_cos_sin(position_ids, *, head_dim, theta, mrope_section, dtype=torch.float64):
    """Qwen3-VL's interleaved layout: frequency slot j takes axis j mod 3."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    angles = position_ids.to(dtype)[..., None] * inv_freq  # [3, B, L, D/2]
    axis = torch.arange(head_dim // 2) % 3
    picked = angles.gather(0, axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:])).squeeze(0)
    picked = torch.cat([picked, picked], -1)
    return picked.cos(), picked.sin()


class InterleavedMRoPE(SpecAdapter):
    """Text rotary (ports.md §1.5): frequency pairs interleaved t,h,w,t,h,w... instead of sectioned [16|24|24]."""

    def mrope_cos_sin(self, position_ids, *, head_dim, theta, mrope_section):
        return _interleaved_cos_sin(position_ids, head_dim=head_dim, theta=theta, mrope_section=mrope_section)

    def _patched(self):
        stack = ExitStack()
        stack.enter_context(mock.patch.object(spec_forward, "mrope_cos_sin", _interleaved_cos_sin))
        stack.enter_context(mock.patch.object(spec_generate, "mrope_cos_sin", _interleaved_cos_sin))
        return stack

    def run(self, inputs, *, capture):
        with self._patched():
            return super().run(inputs, capture=capture)

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        with self._patched():
            return super().generate(inputs, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)


class RopeTablesBf16(SpecAdapter):
    """Precision (ports.md §3.5): rotary angles computed from positions held in bfloat16, which cannot
    represent positions past 256 exactly (16384 becomes a multiple of 128)."""

    def mrope_cos_sin(self, position_ids, *, head_dim, theta, mrope_section):
        coarse = position_ids.to(torch.bfloat16).to(torch.int64)
        return mrope.mrope_cos_sin(coarse, head_dim=head_dim, theta=theta, mrope_section=mrope_section)


class TextPositionAfterImage(SpecAdapter):
    """Positions (ports.md §3.1, kekzl/imp#1173): text after a vision span resumes at span start +
    number of vision tokens instead of (largest position so far) + 1."""

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        pos, deltas = super().rope_rule(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
        )
        new, deltas = pos.clone(), deltas.clone()
        vision_ids = (config.image_token_id, config.video_token_id)
        for b in range(input_ids.shape[0]):
            cols = attention_mask[b].nonzero().flatten().tolist()
            vis = [int(input_ids[b, j]) in vision_ids for j in cols]
            offset = 0
            for k, j in enumerate(cols):
                new[:, b, j] = pos[:, b, j] + offset
                if vis[k] and k + 1 < len(cols) and not vis[k + 1]:  # the last token of a span
                    s = k
                    while s > 0 and vis[s - 1]:
                        s -= 1
                    start = int(pos[0, b, cols[s - 1]]) + 1 if s > 0 else 0
                    offset += start + (k - s + 1) - int(pos[0, b, cols[k + 1]])
            deltas[b] += offset
        return new, deltas


class NoVideoTimeScaling(SpecAdapter):
    """Video positions (ports.md §3.3): the temporal index is the frame-pair index, not scaled by
    second_per_grid_t * tokens_per_second."""

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        if second_per_grid_ts is not None:
            second_per_grid_ts = torch.full_like(second_per_grid_ts, 1.0 / config.vision.tokens_per_second)
        return super().rope_rule(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
        )


def _positions_without_deltas(rope_deltas, start, steps):
    B = rope_deltas.shape[0]
    return (start + torch.arange(steps)).view(1, 1, steps).expand(3, B, steps).clone()


class LostRopeDeltas(SpecAdapter):
    """Decode (ports.md §3.1): decode positions count from the cache length, dropping rope_deltas."""

    def decode_positions(self, rope_deltas, start, steps):
        return _positions_without_deltas(rope_deltas, start, steps)

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        with mock.patch.object(spec_generate, "decode_positions", _positions_without_deltas):
            return super().generate(inputs, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)


class RightPadding(SpecAdapter):
    """Batching (ports.md §3.9, transformers#36100): the batch is padded on the right."""

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        out = super().build_inputs(conversations, images, videos, tokenizer_dir=tokenizer_dir, options=options)
        ids, mask = out["input_ids"].clone(), out["attention_mask"].clone()
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            row = out["input_ids"][b][out["attention_mask"][b].bool()]
            ids[b] = 151643
            ids[b, :n], mask[b] = row, 0
            mask[b, :n] = 1
        return {**out, "input_ids": ids, "attention_mask": mask}


class NoDefaultSystemPrompt(SpecAdapter):
    """Prompt (ports.md §3.6): a hand-written template without the default system block."""

    def render_chat(self, messages, *, add_generation_prompt, add_vision_id):
        text = super().render_chat(messages, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
        return text.replace("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "", 1)


# adapter -> (the first stage where it must be flagged, the cases that show it)
PLANTED = {
    RoundHalfUp: ("fn.smart_resize", "exact_"),
    ImageTokenCount: ("fn.expand_vision_tokens", "exact_"),
    PatchOrderRaster: ("fn.patchify", "exact_"),
    WindowNoDedup: ("fn.window_partition", "exact_"),
    WrongFullAttention: ("vision.block.0", "exact_|model_image"),
    RotaryNotReordered: ("vision.block.0", "exact_|model_image"),
    InterleavedMRoPE: ("fn.mrope_cos_sin", "exact_"),
    RopeTablesBf16: ("fn.mrope_cos_sin", "exact_"),
    TextPositionAfterImage: ("fn.rope_index", "exact_"),
    NoVideoTimeScaling: ("fn.rope_index", "exact_"),
    LostRopeDeltas: ("fn.decode_positions", "exact_"),
    RightPadding: ("preprocess.input_ids", "exact_|model_batch"),
    NoDefaultSystemPrompt: ("fn.render_chat", "exact_"),
}
