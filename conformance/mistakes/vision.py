"""Mistakes of the vision tower: patch embedding, windows and segments, rotary, norms, MLP, merger."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ...spec import vision, windows
from ..adapters.spec import SpecAdapter
from ._base import Mistake, Patched, grid_of

# ---------------------------------------------------------------------------------------------- weights


class Conv3dWeightReshaped(SpecAdapter):
    """The Conv3d weight [out, in, kT, kH, kW] read as channels-last [out, kT, kH, kW, in] (reshaped, not permuted)."""

    def prepare(self, checkpoint, *, dtype, device):
        super().prepare(checkpoint, dtype=dtype, device=device)
        w = self.params["visual.patch_embed.proj.weight"]  # [Cv, c, tp, p, p]
        O, C, T, H, W = w.shape
        self.params = {**self.params, "visual.patch_embed.proj.weight": w.reshape(O, T, H, W, C).permute(0, 4, 1, 2, 3)}


# ---------------------------------------------------------------------------------------------- segments


class _Segments(Patched):
    """window_partition's segments replaced in the model (the fn.* stage keeps the spec's)."""

    @staticmethod
    def segments(window_index, cu_window_seqlens, cu_seqlens, grid):
        return window_index, cu_window_seqlens, cu_seqlens

    def model_patches(self, inputs):
        real, change = windows.window_partition, self.segments

        def partition(grid_thw, **kwargs):
            return change(*real(grid_thw, **kwargs), torch.as_tensor(grid_thw))

        return [(windows, "window_partition", partition), (vision, "window_partition", partition)]


class WindowNoDedup(SpecAdapter):
    """The padding windows of a grid that is a multiple of the window kept as empty segments."""

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


class WindowEightMergedTokens(SpecAdapter):
    """Windows of 8x8 merged tokens (window_size // patch_size) instead of 4x4 (window_size // patch_size //
    merge_size): the blog's "8x8 window" read in merged tokens, when it counts patches."""

    def window_partition(self, grid_thw, *, window_size, patch_size, merge_size):
        return super().window_partition(
            grid_thw, window_size=window_size * merge_size, patch_size=patch_size, merge_size=merge_size
        )

    def model_config(self, config):  # the model's windows, from the same wider window_size
        v = config.vision
        return replace(config, vision=replace(v, window_size=v.window_size * v.spatial_merge_size))


class FullAttentionShifted(SpecAdapter):
    """Full attention in the wrong blocks (every index shifted down by one)."""

    def model_config(self, config):
        v = config.vision
        return replace(config, vision=replace(v, fullatt_block_indexes=tuple(i - 1 for i in v.fullatt_block_indexes)))


class FullWindowSwapped(_Segments):
    """The full-attention and window segments passed in each other's place."""

    @staticmethod
    def segments(window_index, cu_window_seqlens, cu_seqlens, grid):
        return window_index, cu_seqlens, cu_window_seqlens


class NoFullAttention(_Segments):
    """Every block uses window attention (the full-attention block indexes never match)."""

    @staticmethod
    def segments(window_index, cu_window_seqlens, cu_seqlens, grid):
        return window_index, cu_window_seqlens, cu_window_seqlens


class NoWindowAttention(_Segments):
    """Every block uses full (per-frame) attention: the window segments are ignored."""

    @staticmethod
    def segments(window_index, cu_window_seqlens, cu_seqlens, grid):
        return window_index, cu_seqlens, cu_seqlens


class FullAttentionPerItem(_Segments):
    """Full-attention segments span a whole item (every frame of a video) instead of one frame."""

    @staticmethod
    def segments(window_index, cu_window_seqlens, cu_seqlens, grid):
        per_item = grid.prod(-1)
        return window_index, cu_window_seqlens, torch.cat([cu_seqlens[:1], per_item.cumsum(0)])


class AttentionUnsegmented(_Segments):
    """Attention not split into segments at all: every block attends over all patches of all items."""

    @staticmethod
    def segments(window_index, cu_window_seqlens, cu_seqlens, grid):
        whole = cu_seqlens[[0, -1]]
        return window_index, whole, whole


class RotaryNotReordered(Patched):
    """Patches permuted into window order but their 2D rotary tables not, so each is rotated by another's angles."""

    def model_patches(self, inputs):
        grid = grid_of(inputs)
        if grid is None:  # text only: no vision tower runs
            return []
        v = self.config.vision
        wi, _, _ = windows.window_partition(
            grid, window_size=v.window_size, patch_size=v.patch_size, merge_size=v.spatial_merge_size
        )
        restore = torch.argsort(windows.window_row_order(wi, v.spatial_merge_size))
        real = windows.vision_rotary_cos_sin

        def cos_sin(*args, **kwargs):  # tables pre-permuted so that the model's reorder cancels out
            cos, sin = real(*args, **kwargs)
            return cos[restore], sin[restore]

        return [(vision, "vision_rotary_cos_sin", cos_sin)]


class WindowInverseIsPermutation(Patched):
    """After the merger the window order is undone with window_index itself instead of argsort(window_index)."""

    def model_patches(self, inputs):
        if grid_of(inputs) is None:  # text only: no vision tower runs
            return []
        v = self.config.vision
        wi, _, _ = windows.window_partition(
            grid_of(inputs), window_size=v.window_size, patch_size=v.patch_size, merge_size=v.spatial_merge_size
        )
        real = vision.patch_merger

        def merger(params, config, x):
            # the spec un-permutes with argsort(wi) after this (or feeds item order in run_stage);
            # [wi][wi] makes the result the port's y[wi] in both paths
            return real(params, config, x)[wi][wi]

        return [(vision, "patch_merger", merger)]


# ---------------------------------------------------------------------------------------------- attention


class VisionQkvSplitPerHead(Patched):
    """The fused qkv output split per head ([N, 3, D]: q, k, v of head 0, then of head 1, ...) instead of
    [3, N, D] (all of q, then k, then v), as a port does that reads the checkpoint's qkv rows in the layout
    its own fused kernel wants without re-laying them."""

    def model_patches(self, inputs):
        real = vision.vision_attention

        def attention(params, config, i, x, cos, sin, cu_seqlens):
            b = f"visual.blocks.{i}.attn.qkv"
            N, D = config.vision.num_heads, config.vision.head_dim
            # row (s, n, d) of the spec's [3, N, D] split is row (n, s, d) of the port's [N, 3, D] split
            rows = torch.arange(3 * N * D).view(N, 3, D).transpose(0, 1).reshape(-1)
            relaid = {**params, f"{b}.weight": params[f"{b}.weight"][rows], f"{b}.bias": params[f"{b}.bias"][rows]}
            return real(relaid, config, i, x, cos, sin, cu_seqlens)

        return [(vision, "vision_attention", attention)]


class VisionAttentionCausal(Patched):
    """Vision attention run causal inside each segment (a decoder's attention kernel reused with its
    causal flag on) instead of bidirectional."""

    def model_patches(self, inputs):
        def attention(params, config, i, x, cos, sin, cu_seqlens):
            v = config.vision
            P, N, D = x.shape[0], v.num_heads, v.head_dim
            b = f"visual.blocks.{i}.attn"
            q, k, val = F.linear(x, params[f"{b}.qkv.weight"], params[f"{b}.qkv.bias"]).view(P, 3, N, D).unbind(1)
            q, k = vision.apply_vision_rotary(q, cos, sin), vision.apply_vision_rotary(k, cos, sin)
            bounds = cu_seqlens.tolist()
            out = [
                F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, val)), is_causal=True)
                .transpose(0, 1)
                .reshape(e - s, N * D)
                for s, e in zip(bounds[:-1], bounds[1:])
            ]
            attn = torch.cat(out) if out else x.new_zeros(0, N * D)
            return F.linear(attn, params[f"{b}.proj.weight"], params[f"{b}.proj.bias"])

        return [(vision, "vision_attention", attention)]


# ---------------------------------------------------------------------------------------------- rotary


def _rotate_pairs(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): GPT-J's rotate_every_two."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


def apply_rotary_adjacent_pairs(x, cos, sin):
    """Rotation of adjacent pairs (2j, 2j+1) by angle j; cos/sin [..., D] as the spec builds them (halves)."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
    dt = torch.promote_types(x.dtype, cos.dtype)
    xf = x.to(dt)
    return (xf * c.to(dt) + _rotate_pairs(xf) * s.to(dt)).to(x.dtype)


class VisionRotaryAdjacentPairs(Patched):
    """Vision rotary rotates adjacent pairs (2j, 2j+1) instead of halves (i, i + D/2)."""

    def model_patches(self, inputs):
        def rotary(x, cos, sin):
            return apply_rotary_adjacent_pairs(x, cos[:, None, :], sin[:, None, :])

        return [(vision, "apply_vision_rotary", rotary)]


class VisionRopeTheta1e6(Patched):
    """Vision rotary with the text rope_theta (1e6) instead of the ViT's fixed 10000."""

    def model_patches(self, inputs):
        return [(vision, "VISION_ROPE_THETA", 1_000_000.0)]


class VisionRotaryColumnsFirst(Patched):
    """Vision rotary angles [col * inv_freq | row * inv_freq] instead of [row | col]: each patch rotated
    as if the image were transposed."""

    def model_patches(self, inputs):
        real = vision.vision_rotary_cos_sin

        def cos_sin(positions, *args, **kwargs):
            return real(torch.as_tensor(positions).flip(-1), *args, **kwargs)

        return [(vision, "vision_rotary_cos_sin", cos_sin)]


class VisionAttentionScaleInverted(Patched):
    """Vision attention scores multiplied by sqrt(D) instead of by D^-0.5 (a refactor that lost the inverse).

    The spec's vision_attention scales q @ k^T by D^-0.5 inline; q and k both scaled by sqrt(D) after the
    rotary make that q @ k^T * D^-0.5 * D = q @ k^T * sqrt(D), and change nothing else (v is not rotated)."""

    def model_patches(self, inputs):
        real = vision.apply_vision_rotary

        def rotary(x, cos, sin):
            return real(x, cos, sin) * x.shape[-1] ** 0.5

        return [(vision, "apply_vision_rotary", rotary)]


# ---------------------------------------------------------------------------------------------- norms, MLP


def layer_norm(x, weight, eps):
    """LayerNorm with the RMSNorm weight and no bias, in the same working dtype as the spec's rms_norm."""
    h = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    h = F.layer_norm(h, h.shape[-1:], eps=eps)
    return weight * h.to(x.dtype)


def _rms(x, weight, eps, *, outside=False, squares_in_float16=False):
    h = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if squares_in_float16:  # a square past 65504 (any |x| over 256, or a sum over the row) is inf: rsqrt(inf) = 0
        ms = h.half().pow(2).sum(-1, keepdim=True).to(h.dtype) / h.shape[-1]
    else:
        ms = h.pow(2).mean(-1, keepdim=True)
    h = h / (ms.sqrt() + eps) if outside else h * torch.rsqrt(ms + eps)
    return weight * h.to(x.dtype)


class VisionLayerNorm(Patched):
    """LayerNorm (mean subtracted, zero bias) instead of RMSNorm in the vision blocks."""

    def model_patches(self, inputs):
        real = vision.vision_block

        def block(*args, **kwargs):
            with Patched._patched(self, [(vision, "rms_norm", layer_norm)]):
                return real(*args, **kwargs)

        return [(vision, "vision_block", block)]


class RmsNormEpsZero(Patched):
    """RMSNorm without eps (eps = 0) everywhere."""

    def model_patches(self, inputs):
        def norm(x, weight, eps):
            return _rms(x, weight, 0.0)

        from ...spec import text

        return [(vision, "rms_norm", norm), (text, "rms_norm", norm)]


class TextRmsNormEpsUnread(RmsNormEpsZero):
    """The decoder's RMSNorms without eps (eps = 0): the text model's rms_norm_eps never read from the
    config (the vision tower's is), as llama.cpp's qwen2vl loader does."""

    def model_patches(self, inputs):
        return [p for p in super().model_patches(inputs) if p[0] is not vision]


class RmsNormEpsOutsideSqrt(Patched):
    """RMSNorm as x / (sqrt(mean(x^2)) + eps) instead of x / sqrt(mean(x^2) + eps), everywhere."""

    def model_patches(self, inputs):
        def norm(x, weight, eps):
            return _rms(x, weight, eps, outside=True)

        from ...spec import text

        return [(vision, "rms_norm", norm), (text, "rms_norm", norm)]


class RmsNormWeightOffsetOne(Patched):
    """RMSNorm scaled by (1 + weight), the zero-centred convention of Gemma and Qwen3.5, on a checkpoint that
    stores the gain itself (vision and text)."""

    def model_patches(self, inputs):
        def norm(x, weight, eps):
            return _rms(x, 1 + weight, eps)

        from ...spec import text

        return [(vision, "rms_norm", norm), (text, "rms_norm", norm)]


class RmsNormSquaresInFloat16(Patched):
    """RMSNorm whose sum of squares is taken in float16 (vision and text): a row with a channel past 256
    overflows to inf and comes out zero."""

    def model_patches(self, inputs):
        def norm(x, weight, eps):
            return _rms(x, weight, eps, squares_in_float16=True)

        from ...spec import text

        return [(vision, "rms_norm", norm), (text, "rms_norm", norm)]


class TextRmsNormSquaresInFloat16(RmsNormSquaresInFloat16):
    """The decoder's RMSNorms with their sum of squares in float16 (the vision tower's right): a token that
    carries a massive activation (the first token, in a trained model) comes out zero."""

    def model_patches(self, inputs):
        return [p for p in super().model_patches(inputs) if p[0] is not vision]


class VisionMlpQuickGelu(Patched):
    """quick-GELU (x * sigmoid(1.702 x), Qwen2-VL's vision activation) instead of SiLU in the vision SwiGLU."""

    def model_patches(self, inputs):
        def mlp(params, i, x):
            b = f"visual.blocks.{i}.mlp"
            gate = F.linear(x, params[f"{b}.gate_proj.weight"], params[f"{b}.gate_proj.bias"])
            up = F.linear(x, params[f"{b}.up_proj.weight"], params[f"{b}.up_proj.bias"])
            act = gate * torch.sigmoid(1.702 * gate)
            return F.linear(act * up, params[f"{b}.down_proj.weight"], params[f"{b}.down_proj.bias"])

        return [(vision, "vision_mlp", mlp)]


def _gate_up_swapped(params, prefix):
    """params with the SwiGLU's gate_proj and up_proj tensors under `prefix` exchanged."""
    out = dict(params)
    for suffix in ("weight", "bias"):
        gate, up = f"{prefix}.gate_proj.{suffix}", f"{prefix}.up_proj.{suffix}"
        if gate in params:
            out[gate], out[up] = params[up], params[gate]
    return out


class MlpGateUpSwapped(Patched):
    """The SwiGLU's gate and up projections exchanged, silu(up(x)) * gate(x) (a fused gate_up weight
    concatenated in the other order), in the vision blocks and the decoder layers."""

    def model_patches(self, inputs):
        from ...spec import text

        vision_mlp, text_mlp = vision.vision_mlp, text.mlp

        def vision_swapped(params, i, x):
            return vision_mlp(_gate_up_swapped(params, f"visual.blocks.{i}.mlp"), i, x)

        def text_swapped(params, i, x):
            return text_mlp(_gate_up_swapped(params, f"model.layers.{i}.mlp"), i, x)

        return [(vision, "vision_mlp", vision_swapped), (text, "mlp", text_swapped)]


# ---------------------------------------------------------------------------------------------- merger


def _merger(params, config, x, *, norm, act):
    """spec.vision.patch_merger with its norm and activation given."""
    v = config.vision
    x = norm(x, params["visual.merger.ln_q.weight"], v.rms_norm_eps)
    x = x.reshape(-1, v.spatial_merge_size**2 * v.hidden_size)  # [P/m², m²*Cv]
    x = act(F.linear(x, params["visual.merger.mlp.0.weight"], params["visual.merger.mlp.0.bias"]))
    return F.linear(x, params["visual.merger.mlp.2.weight"], params["visual.merger.mlp.2.bias"])


class MergerTanhGelu(Patched):
    """tanh-approximated GELU in the merger MLP instead of exact (erf) GELU."""

    def model_patches(self, inputs):
        def merger(params, config, x):
            return _merger(params, config, x, norm=vision.rms_norm, act=lambda h: F.gelu(h, approximate="tanh"))

        return [(vision, "patch_merger", merger)]


class MergerLayerNorm(Patched):
    """The merger's ln_q as LayerNorm (Qwen2-VL, zero bias) instead of RMSNorm."""

    def model_patches(self, inputs):
        def merger(params, config, x):
            return _merger(params, config, x, norm=layer_norm, act=F.gelu)

        return [(vision, "patch_merger", merger)]


ENTRIES = [
    Mistake(
        "conv3d_weight_reshaped",
        "vision.patch_embed",
        "Conv3d weight [out, in, kT, kH, kW] reinterpreted as channels-last by a reshape instead of permuted",
        "lablup/mlxcel#1423",
        Conv3dWeightReshaped,
        cases="model_image",
    ),
    Mistake(
        "window_no_dedup",
        "fn.window_partition",
        "padding windows of a grid that is a multiple of 4 kept as empty segments (cu_window_seqlens not de-duplicated)",
        "vllm-project/vllm#15200; huggingface/transformers#37535",
        WindowNoDedup,
        model_blind_spot="an empty window segment attends to nothing: the spec's attention, and so the variant's model, are unchanged; only a kernel that mishandles empty segments shows it",
    ),
    Mistake(
        "window_eight_merged_tokens",
        "fn.window_partition",
        "windows of 8x8 merged tokens (112 // 14) instead of 4x4 (112 // 14 // 2): 16x16 patches, not 8x8",
        "QwenLM/Qwen3-VL#783; hf_reference.md §9 (pitfall 4)",
        WindowEightMergedTokens,
        model_case="model_image",
    ),
    Mistake(
        "full_attention_shifted",
        "vision.block.{i}",
        "full attention in the wrong blocks (fullatt_block_indexes shifted by one)",
        "ports.md §3.4",
        FullAttentionShifted,
        cases="model_image",
    ),
    Mistake(
        "full_window_swapped",
        "vision.block.{i}",
        "full-attention and window segments passed in each other's place",
        "alibaba/Pai-Megatron-Patch#552",
        FullWindowSwapped,
        cases="model_image",
    ),
    Mistake(
        "no_full_attention",
        "vision.block.{i}",
        "every block uses window attention (the full-attention block check never matches)",
        "nvidia-cosmos/cosmos-rl#171; huggingface/trl#5805",
        NoFullAttention,
        cases="model_image",
    ),
    Mistake(
        "no_window_attention",
        "vision.block.{i}",
        "window segments ignored: every block attends over the whole frame",
        "vllm-project/vllm-gaudi#831",
        NoWindowAttention,
        cases="model_image",
    ),
    Mistake(
        "full_attention_per_item",
        "vision.block.{i}",
        "full-attention segments span a whole video (all frames) instead of one frame",
        "sgl-project/sglang#12261",
        FullAttentionPerItem,
        cases="model_video",
    ),
    Mistake(
        "attention_unsegmented",
        "vision.block.{i}",
        "attention mask not block-diagonal: every block attends across windows, frames and images",
        "sgl-project/sglang#9426",
        AttentionUnsegmented,
        cases="model_image",
    ),
    Mistake(
        "vision_qkv_split_per_head",
        "vision.block.{i}",
        "the vision qkv output split per head [heads, 3, head_dim] instead of [3, heads, head_dim]",
        "hf_reference.md §5 (qkv rows [q | k | v], each head-major); vllm-project/vllm#11719 (qkv re-laid per head)",
        VisionQkvSplitPerHead,
        cases="model_image",
    ),
    Mistake(
        "vision_attention_causal",
        "vision.block.{i}",
        "vision attention causal inside each window (a decoder kernel's causal flag left on), not bidirectional",
        "huggingface/transformers#39554 (flash attention ran causal whatever is_causal said); #39095",
        VisionAttentionCausal,
        cases="model_image",
    ),
    Mistake(
        "rotary_not_reordered",
        "vision.block.{i}",
        "patches permuted into window order but their 2D rotary tables not",
        "ports.md §3.4",
        RotaryNotReordered,
        cases="model_image",
    ),
    Mistake(
        "vision_rotary_adjacent_pairs",
        "vision.block.{i}",
        "vision rotary rotates adjacent pairs (2j, 2j+1) instead of halves (i, i + D/2)",
        "hf_reference.md §5 (rotate_half)",
        VisionRotaryAdjacentPairs,
        cases="model_image",
    ),
    Mistake(
        "vision_rope_theta_1e6",
        "vision.block.{i}",
        "vision rotary with the text rope_theta 1e6 instead of the ViT's fixed 10000",
        "hf_reference.md §5",
        VisionRopeTheta1e6,
        cases="model_image",
    ),
    Mistake(
        "vision_rotary_columns_first",
        "vision.block.{i}",
        "vision rotary angles [col | row] instead of [row | col] (each patch rotated as in the transposed image)",
        "hf_reference.md §5 (angles [r * inv_freq | c * inv_freq])",
        VisionRotaryColumnsFirst,
        cases="model_image",
    ),
    Mistake(
        "vision_attention_scale_inverted",
        "vision.block.{i}",
        "vision attention scores scaled by sqrt(head_dim) instead of 1/sqrt(head_dim)",
        "huggingface/transformers#39043 (Qwen2-VL and Qwen2.5-VL vision, after a refactor)",
        VisionAttentionScaleInverted,
        cases="model_image",
    ),
    Mistake(
        "vision_layernorm",
        "vision.block.{i}",
        "LayerNorm (Qwen2-VL) instead of RMSNorm in the vision blocks",
        "llama.cpp qwen2vl.cpp (ports.md §2.3); baidu-baige/LoongForge#109",
        VisionLayerNorm,
        cases="model_image",
    ),
    Mistake(
        "rmsnorm_eps_zero",
        "text.layer.{i}",
        "RMSNorm without eps (vision and text)",
        "hf_reference.md §5",
        RmsNormEpsZero,
        cases="model_image",
        also=("text.norm",),
    ),
    Mistake(
        "rmsnorm_squares_float16",
        "vision.block.{i}",
        "RMSNorm's sum of squares in float16: past 65504 it is inf, and rsqrt(inf) = 0 erases the row",
        "lablup/mlxcel#1601 (port_bugs_2026-12.md V2); Blaizzy/mlx-vlm#745 (fp16 overflow in the vision tower)",
        RmsNormSquaresInFloat16,
        cases="model_outliers",
        also=("vision.merger",),
    ),
    Mistake(
        "text_rmsnorm_squares_float16",
        "text.layer.{i}",
        "the decoder's RMSNorm sums squares in float16: at a massive activation it is inf, and rsqrt(inf) = 0 erases the row",
        "QwenLM/Qwen3#826 (Qwen2 in float16: NaN from layer 1); microsoft/onnxruntime#31626 (a decomposed norm's "
        "Pow overflows float16, the row normalises to zero)",
        TextRmsNormSquaresInFloat16,
        cases="model_text",
        also=("text.norm",),
    ),
    Mistake(
        "text_rmsnorm_eps_unread",
        "text.layer.{i}",
        "the decoder's RMSNorm eps never read from the config: eps 0 in the text model, the vision tower's right",
        "llama.cpp src/models/qwen2vl.cpp load_arch_hparams (docs/ports.md §llama.cpp)",
        TextRmsNormEpsUnread,
        cases="model_text",
        also=("text.norm",),
    ),
    Mistake(
        "rmsnorm_eps_outside_sqrt",
        "text.layer.{i}",
        "RMSNorm eps added outside the square root (vision and text)",
        "hf_reference.md §5",
        RmsNormEpsOutsideSqrt,
        cases="model_image",
        also=("text.norm",),
    ),
    Mistake(
        "rmsnorm_weight_offset_one",
        "vision.block.{i}",
        "RMSNorm scaled by (1 + weight), Gemma's and Qwen3.5's zero-centred gain, instead of weight (vision and text)",
        "Blaizzy/mlx-vlm#2041 (the (1 + w) norm on checkpoints storing the gain); llmmanorg/llmman#151",
        RmsNormWeightOffsetOne,
        cases="model_image",
        also=("vision.merger", "text.layer.{i}", "text.norm"),
    ),
    Mistake(
        "vision_mlp_quick_gelu",
        "vision.block.{i}",
        "quick-GELU (Qwen2-VL's vision activation) instead of SiLU in the vision SwiGLU",
        "vllm-project/vllm#8408",
        VisionMlpQuickGelu,
        cases="model_image",
    ),
    Mistake(
        "mlp_gate_up_swapped",
        "vision.block.{i}",
        "SwiGLU gate and up projections exchanged, silu(up(x)) * gate(x) (vision and text)",
        "hf_reference.md §5 (down(silu(gate(x)) * up(x))); sgl-project/sglang#9661 (a wrong gate_up mapping)",
        MlpGateUpSwapped,
        cases="model_image",
        also=("text.layer.{i}",),
    ),
    Mistake(
        "merger_tanh_gelu",
        "vision.merger",
        "tanh-approximated GELU in the merger MLP instead of exact GELU",
        "sgl-project/sglang#37609; lablup/mlxcel#921",
        MergerTanhGelu,
        cases="model_image",
    ),
    Mistake(
        "merger_layernorm",
        "vision.merger",
        "merger ln_q as LayerNorm with zero bias (Qwen2-VL's key map) instead of RMSNorm",
        "baidu-baige/LoongForge#109; NVIDIA/TensorRT-Model-Connect#191",
        MergerLayerNorm,
        cases="model_image",
    ),
    Mistake(
        "window_inverse_is_permutation",
        "vision.merger",
        "window order undone with window_index itself instead of argsort(window_index)",
        "lablup/mlxcel#1596",
        WindowInverseIsPermutation,
        cases="model_image",
    ),
]
