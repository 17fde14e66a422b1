"""Mistakes of the positions: rope_index, decode positions, the MRoPE tables, generation state."""

from __future__ import annotations

import torch

from ...spec import forward as spec_forward
from ...spec import generate as spec_generate
from ...spec import mrope
from ..adapters.spec import SpecAdapter
from ._base import Mistake, Patched

# ---------------------------------------------------------------------------------------------- rope_index


class TextAfterSpanTokenCount(SpecAdapter):
    """Text after a vision span resumes at span start + number of vision tokens, not largest position + 1."""

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        pos, deltas = super().rope_rule(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
        )
        new, deltas = pos.clone(), deltas.clone()
        vision_ids = (config.image_token_id, config.video_token_id)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        for b in range(input_ids.shape[0]):
            cols = mask[b].nonzero().flatten().tolist()
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


class VideoTimeUnscaled(SpecAdapter):
    """Video temporal id = temporal-patch index, not scaled by second_per_grid_t * tokens_per_second."""

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        if video_grid_thw is not None:
            n = torch.as_tensor(video_grid_thw).reshape(-1, 3).shape[0]
            second_per_grid_ts = torch.full((n,), 1.0 / config.vision.tokens_per_second, dtype=torch.float64)
        return super().rope_rule(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
        )


class VideoSecondsTruncated(SpecAdapter):
    """second_per_grid_t cast to an integer before use (0.5 s -> 0: every frame at one temporal id)."""

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        if second_per_grid_ts is not None:
            second_per_grid_ts = torch.as_tensor(second_per_grid_ts, dtype=torch.float64).trunc()
        return super().rope_rule(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
        )


class Positions1D(SpecAdapter):
    """Plain 1-D positions (0, 1, 2, ... on all three rows), vision spans included; no rope_deltas."""

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.int64)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, mrope.PAD_POSITION)  # [B, L]
        deltas = (pos.max(-1, keepdim=True).values + 1 - input_ids.shape[1]).to(torch.int64)
        return pos[None].expand(3, -1, -1).clone().to(input_ids.device), deltas


class HeightWidthSwapped(SpecAdapter):
    """The height and width rows of the positions exchanged: a vision token at (row r, column c) placed at
    height c and width r. Text tokens carry the same value on all three rows, so only vision spans change."""

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        pos, deltas = super().rope_rule(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
        )
        return pos[[0, 2, 1]], deltas


class TextAfterSpanMaxSide(SpecAdapter):
    """transformers >= 5.3: text after a span resumes at start + max(h, w)/2, ignoring a video's time extent."""

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        return mrope.rope_index_transformers_v53(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
        )


class FramesAsImages(SpecAdapter):
    """Each temporal patch of a video positioned as its own image (t = 0), one after the other."""

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        if video_grid_thw is None:
            return super().rope_rule(
                input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
            )
        # alternate image and video pad ids per temporal patch, so each patch is its own run of t = 1
        m = config.vision.spatial_merge_size
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        images = [] if image_grid_thw is None else [tuple(g) for g in torch.as_tensor(image_grid_thw).tolist()]
        videos = [tuple(g) for g in torch.as_tensor(video_grid_thw).tolist()]
        ids = input_ids.clone()
        img_out, vid_out, used = [], [], {"image": 0, "video": 0}
        for b in range(ids.shape[0]):
            row = ids[b][mask[b].bool()]
            for start, end, kind in mrope._pad_runs(row, config.image_token_id, config.video_token_id):
                t, h, w = (images if kind == "image" else videos)[used[kind]]
                used[kind] += 1
                if kind == "image":
                    img_out.append((t, h, w))
                    continue
                n = h * w // (m * m)
                for k in range(t):
                    seg = slice(start + k * n, start + (k + 1) * n)
                    row[seg] = config.image_token_id if k % 2 == 0 else config.video_token_id
                    (img_out if k % 2 == 0 else vid_out).append((1, h, w))
            ids[b][mask[b].bool()] = row
        grid = torch.tensor(img_out, dtype=torch.int64).reshape(-1, 3)
        vgrid = torch.tensor(vid_out, dtype=torch.int64).reshape(-1, 3)
        # image runs must be consumed in order: rebuild the image list in run order over the batch
        return mrope.rope_index(
            ids,
            grid if len(img_out) else None,
            vgrid if len(vid_out) else None,
            torch.zeros(len(vid_out), dtype=torch.float64) if len(vid_out) else None,
            attention_mask,
            config=config,
        )


class RopeDeltasFirstRow(SpecAdapter):
    """Only the first batch row's rope_delta is kept and used for every row."""

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        pos, deltas = super().rope_rule(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
        )
        return pos, deltas[:1].expand_as(deltas).clone()


# ---------------------------------------------------------------------------------------------- decode


class _Decode(SpecAdapter):
    """decode_positions replaced, in the fn.* stage and in generation alike."""

    @staticmethod
    def positions(rope_deltas, start, steps):
        raise NotImplementedError

    def decode_positions(self, rope_deltas, start, steps):
        return self.positions(torch.as_tensor(rope_deltas), start, steps)

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):  # generate too
        with Patched._patched(self, [(spec_generate, "decode_positions", self.positions)]):
            return super().generate_chunked(
                inputs, prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id
            )


class DecodeWithoutDeltas(_Decode):
    """Decode positions count from the cache length, dropping rope_deltas."""

    @staticmethod
    def positions(rope_deltas, start, steps):
        return mrope.decode_positions(torch.zeros_like(rope_deltas), start, steps)


class DecodeOffByOne(_Decode):
    """The first decode token takes the last prompt token's position (start - 1 + delta)."""

    @staticmethod
    def positions(rope_deltas, start, steps):
        return mrope.decode_positions(rope_deltas - 1, start, steps)


class DecodeDeltasShared(_Decode):
    """One rope_delta (the first row's) used for every row of the batch."""

    @staticmethod
    def positions(rope_deltas, start, steps):
        return mrope.decode_positions(rope_deltas[:1].expand_as(rope_deltas), start, steps)


class StaleRopeDeltas(SpecAdapter):
    """rope_deltas of the first generation kept and reused by every later one (same batch size)."""

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):  # generate too
        real = spec_generate.prefill

        def prefill(*args, **kwargs):
            hidden, captured, cache, deltas = real(*args, **kwargs)
            stale = getattr(self, "_stale_deltas", None)
            if stale is None or stale.shape != deltas.shape:
                self._stale_deltas = stale = deltas
            return hidden, captured, cache, stale

        with Patched._patched(self, [(spec_generate, "prefill", prefill)]):
            return super().generate_chunked(
                inputs, prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id
            )


# ---------------------------------------------------------------------------------------------- tables


_SPEC_TABLE = mrope.mrope_cos_sin  # the spec's own, kept before any variant replaces the module's name


def _interleaved_table(position_ids, *, head_dim, theta, mrope_section, dtype):
    """Qwen3-VL's layout: frequency slot j takes axis j mod 3."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    angles = position_ids.to(dtype)[..., None] * inv_freq  # [3, B, L, D/2]
    axis = torch.arange(head_dim // 2) % 3
    picked = angles.gather(0, axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:])).squeeze(0)
    picked = torch.cat([picked, picked], -1)
    return picked.cos(), picked.sin()


def _bf16_positions_table(position_ids, *, head_dim, theta, mrope_section, dtype):
    coarse = position_ids.to(torch.bfloat16).to(torch.int64)
    return _SPEC_TABLE(coarse, head_dim=head_dim, theta=theta, mrope_section=mrope_section, dtype=dtype)


def _fp16_positions_table(position_ids, *, head_dim, theta, mrope_section, dtype):
    coarse = position_ids.to(torch.float16).to(torch.float64)
    return _SPEC_TABLE(coarse, head_dim=head_dim, theta=theta, mrope_section=mrope_section, dtype=dtype)


def _fixed_section_table(position_ids, *, head_dim, theta, mrope_section, dtype):
    section = [24, 20, 20] if head_dim == 128 else mrope_section
    return _SPEC_TABLE(position_ids, head_dim=head_dim, theta=theta, mrope_section=section, dtype=dtype)


class RotaryTableMistake(Patched):
    """The spec with its MRoPE table replaced by `table`, the same in fn.mrope_cos_sin and inside the model
    (the decoder's forward and run_stage), so the harness can name it where a port shows it: the fn stage,
    or a model case's text.layer.{i} (FEEDS in mistakes/__init__.py)."""

    table = None  # (position_ids, *, head_dim, theta, mrope_section, dtype) -> (cos, sin)

    def mrope_cos_sin(self, position_ids, *, head_dim, theta, mrope_section):
        return type(self).table(
            position_ids, head_dim=head_dim, theta=theta, mrope_section=mrope_section, dtype=torch.float64
        )

    def model_patches(self, inputs):
        def table(position_ids, *, head_dim, theta, mrope_section, dtype=torch.float64):
            return type(self).table(
                position_ids, head_dim=head_dim, theta=theta, mrope_section=mrope_section, dtype=dtype
            )

        return [(spec_forward, "mrope_cos_sin", table), (mrope, "mrope_cos_sin", table)]


class MropeInterleaved(RotaryTableMistake):
    """Frequency pairs interleaved t,h,w,t,h,w... (Qwen3-VL) instead of sectioned [16|24|24]."""

    table = staticmethod(_interleaved_table)


class RopePositionsBf16(RotaryTableMistake):
    """Rotary angles from positions held in bfloat16 (positions past 256 rounded)."""

    table = staticmethod(_bf16_positions_table)


class RopePositionsFp16(RotaryTableMistake):
    """Rotary angles from positions held in float16 (past 2048 rounded; past 65504 infinite)."""

    table = staticmethod(_fp16_positions_table)


class MropeSectionFallback(RotaryTableMistake):
    """mrope_section not read: a fixed [24, 20, 20] used instead of the config's [16, 24, 24]."""

    table = staticmethod(_fixed_section_table)


ENTRIES = [
    Mistake(
        "text_after_span_token_count",
        "fn.rope_index",
        "text after a vision span resumes at span start + its token count, not largest position + 1",
        "kekzl/imp#1173; ggml-org/llama.cpp#13394",
        TextAfterSpanTokenCount,
        model_case="model_image",
    ),
    Mistake(
        "text_after_span_max_side",
        "fn.rope_index",
        "text after a span at start + max(h, w)/2 (transformers >= 5.3), ignoring a video's temporal extent",
        "port_bugs_2026-12.md §4; hf_reference.md §6.4",
        TextAfterSpanMaxSide,
        model_case="model_video",
    ),
    Mistake(
        "positions_height_width_swapped",
        "fn.rope_index",
        "MRoPE height and width rows exchanged for vision tokens (column index as height, row index as width)",
        "hf_reference.md §6.2 (rows t, h, w); EricLBuehler/mistral.rs#1881 (width and height swapped in Qwen VL)",
        HeightWidthSwapped,
        model_case="model_image",
    ),
    Mistake(
        "video_time_unscaled",
        "fn.rope_index",
        "video temporal ids ignore second_per_grid_t (temporal-patch index used as is)",
        "sgl-project/sglang#3674; vllm-project/vllm#14548",
        VideoTimeUnscaled,
        model_case="model_video",
    ),
    Mistake(
        "video_seconds_truncated",
        "fn.rope_index",
        "second_per_grid_t cast to an integer before the multiply (fps > 2 collapses the temporal ids)",
        "EvolvingLMMs-Lab/lmms-eval#1269; huggingface/transformers#45381",
        VideoSecondsTruncated,
        model_case="model_video_fps",
    ),
    Mistake(
        "frames_as_images",
        "fn.rope_index",
        "each temporal patch of a video positioned as its own image span",
        "ggml-org/llama.cpp#13754; LostRuins/koboldcpp#2359",
        FramesAsImages,
        model_case="model_video",
    ),
    Mistake(
        "positions_1d",
        "fn.rope_index",
        "1-D positions (0, 1, 2, ...) for every token, vision included",
        "Blaizzy/mlx-vlm#319; huggingface/candle#2814; areal-project/AReaL#217",
        Positions1D,
        model_case="model_image",
    ),
    Mistake(
        "rope_deltas_first_row",
        "fn.rope_index",
        "only the first batch row's rope_delta kept",
        "mlx-vlm get_rope_index (ports.md §2.4)",
        RopeDeltasFirstRow,
        model_case="model_batch",
    ),
    Mistake(
        "decode_without_deltas",
        "fn.decode_positions",
        "decode positions count from the cache length, dropping rope_deltas",
        "Blaizzy/mlx-vlm#1527",
        DecodeWithoutDeltas,
        model_case="model_image",
    ),
    Mistake(
        "decode_off_by_one",
        "fn.decode_positions",
        "the first generated token takes the last prompt token's position (off by one)",
        "ports.md §3.1; ggml-org/llama.cpp#13141",
        DecodeOffByOne,
        model_case="model_image",
    ),
    Mistake(
        "decode_deltas_shared",
        "fn.decode_positions",
        "one rope_delta used for every row of the batch",
        "sgl-project/sglang#8219; Blaizzy/mlx-vlm#1143",
        DecodeDeltasShared,
        model_case="model_batch",
    ),
    Mistake(
        "stale_rope_deltas",
        "generate.tokens",
        "rope_deltas of an earlier generation reused by the next one",
        "huggingface/transformers#43952; Blaizzy/mlx-vlm#1143",
        StaleRopeDeltas,
        cases="model_image|model_video",
    ),
    Mistake(
        "mrope_interleaved",
        "fn.mrope_cos_sin",
        "MRoPE frequency slots interleaved t,h,w,... (Qwen3-VL) instead of sectioned [16|24|24]",
        "Blaizzy/mlx-vlm#576",
        MropeInterleaved,
        model_case="model_image",
    ),
    Mistake(
        "mrope_section_fallback",
        "fn.mrope_cos_sin",
        "mrope_section not read: a fixed [24, 20, 20] instead of [16, 24, 24]",
        "mlx-vlm language.py (ports.md §2.4)",
        MropeSectionFallback,
        model_blind_spot="the fixed [24, 20, 20] fits head_dim 128 only; the tiny checkpoints' head_dim is 8, where the variant keeps the config's section",
    ),
    Mistake(
        "rope_positions_bf16",
        "fn.mrope_cos_sin",
        "rotary angles from positions held in bfloat16",
        "huggingface/candle#3520",
        RopePositionsBf16,
        model_case="model_text",
    ),
    Mistake(
        "rope_positions_fp16",
        "fn.mrope_cos_sin",
        "rotary angles from positions held in float16",
        "openvinotoolkit/openvino#34716",
        RopePositionsFp16,
        model_case="model_video_sparse",
    ),
]
