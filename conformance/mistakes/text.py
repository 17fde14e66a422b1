"""Mistakes of the text decoder: the vision scatter, rotary, attention, mask, LM head."""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ...spec import forward as spec_forward
from ...spec import mrope, text
from ..adapters.spec import SpecAdapter
from ._base import Mistake, Patched
from .vision import apply_rotary_adjacent_pairs


class ScatterTransposed(Patched):
    """Vision features written over the pads walking the (S, B)-transposed sequence instead of (B, S)."""

    def model_patches(self, inputs):
        real = text.scatter_vision_features

        def scatter(inputs_embeds, input_ids, image_feats, video_feats, config):
            real(inputs_embeds, input_ids, image_feats, video_feats, config)  # the spec's checks: counts, widths
            out = inputs_embeds.clone().transpose(0, 1)  # [L, B, C]
            for token_id, feats in ((config.image_token_id, image_feats), (config.video_token_id, video_feats)):
                mask = (input_ids == token_id).T  # [L, B]: walked L-major
                if feats is not None and int(mask.sum()):
                    out[mask] = feats.to(out.dtype)
            return out.transpose(0, 1)

        return [(text, "scatter_vision_features", scatter)]


class VisionFeaturesImagesFirst(Patched):
    """Image and video features stacked images first and written over every vision pad in prompt order,
    one pooled mask for both kinds: right only when the images come before the videos in the prompt."""

    def model_patches(self, inputs):
        real = text.scatter_vision_features

        def scatter(inputs_embeds, input_ids, image_feats, video_feats, config):
            real(inputs_embeds, input_ids, image_feats, video_feats, config)  # the spec's checks: counts, widths
            feats = [f for f in (image_feats, video_feats) if f is not None]
            out = inputs_embeds.clone()
            if feats:
                pads = (input_ids == config.image_token_id) | (input_ids == config.video_token_id)
                out[pads] = torch.cat(feats).to(out.dtype)
            return out

        return [(text, "scatter_vision_features", scatter)]


class VideosUnencodedWithImages(Patched):
    """With images and videos in one request, only the images are encoded: the video pads keep the embedding
    of their placeholder token."""

    def model_patches(self, inputs):
        real = text.scatter_vision_features

        def scatter(inputs_embeds, input_ids, image_feats, video_feats, config):
            if image_feats is None or video_feats is None:
                return real(inputs_embeds, input_ids, image_feats, video_feats, config)
            no_video_pads = input_ids.masked_fill(input_ids == config.video_token_id, -1)
            return real(inputs_embeds, no_video_pads, image_feats, None, config)

        return [(text, "scatter_vision_features", scatter)]


class TextRopeTheta1e4(SpecAdapter):
    """Text rotary with theta 10000 (the Llama default) instead of the config's rope_theta 1e6."""

    def model_config(self, config):
        return replace(config, rope_theta=10000.0)


class TextRotaryAdjacentPairs(Patched):
    """Text rotary rotates adjacent pairs (2j, 2j+1) instead of halves (i, i + D/2)."""

    def model_patches(self, inputs):
        def apply(q, k, cos, sin):
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, L, D]
            return apply_rotary_adjacent_pairs(q, cos, sin), apply_rotary_adjacent_pairs(k, cos, sin)

        return [(text, "apply_mrope", apply)]


class TextRotaryDim64(Patched):
    """Text rotary over the first 64 channels of each head only, the rest passed through unrotated: a
    partial-rotary layout (rotary_dim 64) where Qwen2.5-VL rotates the whole head. At head_dim <= 64 (the
    tiny checkpoint's 8) it rotates everything and is the spec; at the real 128 half of each head keeps no
    position."""

    ROTARY_DIM = 64

    def model_patches(self, inputs):
        def apply(q, k, cos, sin):
            r = min(self.ROTARY_DIM, q.shape[-1])
            half_table = cos.shape[-1] // 2
            # the partial layout's table: its r/2 lowest-index frequencies, in halves over r channels
            c = torch.cat([cos[..., : r // 2], cos[..., half_table : half_table + r // 2]], -1)
            s = torch.cat([sin[..., : r // 2], sin[..., half_table : half_table + r // 2]], -1)
            qr, kr = mrope.apply_mrope(q[..., :r], k[..., :r], c, s)
            return torch.cat([qr, q[..., r:]], -1), torch.cat([kr, k[..., r:]], -1)

        return [(text, "apply_mrope", apply)]


class RotaryFirstRowOnly(Patched):
    """The MRoPE tables of the first batch row used for every row (left padding shifts the others)."""

    def model_patches(self, inputs):
        def first_row(real):
            def cos_sin(*args, **kwargs):
                cos, sin = real(*args, **kwargs)
                return cos[:1].expand_as(cos).clone(), sin[:1].expand_as(sin).clone()

            return cos_sin

        return [
            (spec_forward, "mrope_cos_sin", first_row(spec_forward.mrope_cos_sin)),
            (mrope, "mrope_cos_sin", first_row(mrope.mrope_cos_sin)),
        ]


class GqaHeadsTiled(Patched):
    """KV heads repeated as a tile (g = h mod K) instead of in place (g = h // (N/K))."""

    def model_patches(self, inputs):
        real = torch.Tensor.repeat_interleave

        def attention(params, config, i, x, cos, sin, attention_mask, cache=None):
            def tiled(t, repeats, dim=None, **kw):
                if dim == 1 and isinstance(repeats, int) and t.dim() == 4:
                    return t.repeat(1, repeats, 1, 1)
                return real(t, repeats, dim=dim, **kw)

            with Patched._patched(self, [(torch.Tensor, "repeat_interleave", tiled)]):
                return real_attention(params, config, i, x, cos, sin, attention_mask, cache)

        real_attention = text.attention
        return [(text, "attention", attention)]


class CausalMaskByPosition(Patched):
    """Causal mask from the positions (key t-position <= query t-position) instead of the token order."""

    def model_patches(self, inputs):
        state = {}
        real_stack = spec_forward.decoder_stack

        def stack(params, config, x, position_ids, attention_mask, cache=None, **kwargs):
            state["t"] = position_ids[0]  # [B, L]: the temporal row
            return real_stack(params, config, x, position_ids, attention_mask, cache, **kwargs)

        def allowed(attention_mask, n_new):
            S, t = attention_mask.shape[1], state.get("t")
            if t is None or t.shape[1] != S:  # decode steps: every key is earlier anyway
                return real_allowed(attention_mask, n_new)
            q, k = t[:, S - n_new :, None], t[:, None, :]  # [B, L, 1], [B, 1, S]
            ok = (k <= q) & attention_mask.bool()[:, None, :]
            eye = torch.arange(S - n_new, S)[:, None] == torch.arange(S)[None, :]
            return (ok | eye[None])[:, None]

        real_allowed = text.attention_allowed
        if inputs.get("position_ids") is not None:  # run_stage: the golden positions are fed
            state["t"] = inputs["position_ids"][0]
        return [(spec_forward, "decoder_stack", stack), (text, "attention_allowed", allowed)]


class MlpReadsLayerInput(Patched):
    """The MLP branch fed the layer's input instead of the attention's residual: x + attn(norm1(x)) +
    mlp(norm2(x)), a parallel block (GPT-J style) where Qwen2 runs the two branches in sequence."""

    def model_patches(self, inputs):
        def layer(params, config, i, x, cos, sin, attention_mask, cache=None):
            p, eps = f"model.layers.{i}.", config.rms_norm_eps
            normed = text.rms_norm(x, params[p + "input_layernorm.weight"], eps)
            h, cache = text.attention(params, config, i, normed, cos, sin, attention_mask, cache)
            return x + h + text.mlp(
                params, i, text.rms_norm(x, params[p + "post_attention_layernorm.weight"], eps)
            ), cache

        return [(text, "decoder_layer", layer)]


class TextQkvBiasDropped(SpecAdapter):
    """The decoder's q/k/v projection biases left out (a Llama-style loader or attention_bias read as false)."""

    def prepare(self, checkpoint, *, dtype, device):
        super().prepare(checkpoint, dtype=dtype, device=device)
        biases = re.compile(r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias")
        self.params = {k: torch.zeros_like(v) if biases.fullmatch(k) else v for k, v in self.params.items()}


class LmHeadTied(SpecAdapter):
    """lm_head taken from embed_tokens although the checkpoint has tie_word_embeddings = false."""

    def prepare(self, checkpoint, *, dtype, device):
        super().prepare(checkpoint, dtype=dtype, device=device)
        self.params = {**self.params, "lm_head.weight": self.params["model.embed_tokens.weight"]}


class LmHeadUnloadedWhenTied(SpecAdapter):
    """A tied checkpoint (no lm_head.weight stored) whose lm_head is left at its random initialisation: the
    loader fills the head only from a stored lm_head.weight, and nothing ties it to the embedding."""

    INIT_STD = 0.02  # transformers' initializer_range, which the published configs keep

    def prepare(self, checkpoint, *, dtype, device):
        super().prepare(checkpoint, dtype=dtype, device=device)
        if self.config.tie_word_embeddings:
            embed = self.params["model.embed_tokens.weight"]
            draw = torch.randn(embed.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
            head = (draw * self.INIT_STD).to(device=embed.device, dtype=embed.dtype)
            self.params = {**self.params, "lm_head.weight": head}


class StopsOnImEndOnly(SpecAdapter):
    """Generation stops at config.json's eos_token_id (151645, <|im_end|>) only, not at every id of
    generation_config.json's list (also 151643, <|endoftext|>)."""

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):  # generate too
        first = eos_token_id if isinstance(eos_token_id, int) else eos_token_id[0]
        return super().generate_chunked(
            inputs, prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens, eos_token_id=first
        )


class NeverStops(SpecAdapter):
    """Generation ignores eos and always runs max_new_tokens (a benchmark setting left on)."""

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):  # generate too
        never = self.config.vocab_size - 1  # an unused row of the padded vocabulary: no greedy pick
        return super().generate_chunked(
            inputs, prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens, eos_token_id=never
        )


ENTRIES = [
    Mistake(
        "scatter_transposed",
        "text.inputs_embeds",
        "vision features scattered in (S, B)-transposed order instead of (B, S)",
        "alibaba/Pai-Megatron-Patch#649",
        ScatterTransposed,
        cases="model_batch",
    ),
    Mistake(
        "vision_features_images_first",
        "text.inputs_embeds",
        "image and video features stacked images first over every vision pad in prompt order: a video before an image swaps them",
        "osaurus-ai/vmlx-swift#404 (#298); NVIDIA/TensorRT-LLM#15852 (mixed requests in prompt order)",
        VisionFeaturesImagesFirst,
        cases="model_video_image",
    ),
    Mistake(
        "videos_unencoded_with_images",
        "text.inputs_embeds",
        "with images and videos in one request only the images are encoded: video pads keep their token embedding",
        "mlx-vlm 0.7.10 get_input_embeddings, found here (docs/ports.md §2 mlx-vlm); NVIDIA/TensorRT-LLM#15852",
        VideosUnencodedWithImages,
        cases="model_video_image",
    ),
    Mistake(
        "text_rope_theta_1e4",
        "text.layer.{i}",
        "text rotary with theta 10000 instead of rope_theta 1e6",
        "hf_reference.md §6.1",
        TextRopeTheta1e4,
        cases="model_image",
    ),
    Mistake(
        "text_rotary_adjacent_pairs",
        "text.layer.{i}",
        "text rotary rotates adjacent pairs (2j, 2j+1) instead of halves (i, i + D/2)",
        "hf_reference.md §6.1 (rotate_half)",
        TextRotaryAdjacentPairs,
        cases="model_image",
    ),
    Mistake(
        "text_rotary_dim_64",
        "text.layer.{i}",
        "text rotary over the first 64 channels of each head only (a partial rotary_dim 64), the rest unrotated",
        "port_bugs_2026-12.md §2 (NVIDIA-NeMo/Automodel#3643: a rotary_dim lost)",
        TextRotaryDim64,
        cases="model_image",
        blind_spot="the tiny checkpoints' head_dim is 8, all of it inside 64 channels; "
        "`qwen25vl fixtures --real-dims` (head_dim 128) shows it at text.layer.0",
    ),
    Mistake(
        "text_qkv_bias_dropped",
        "text.layer.{i}",
        "the decoder's q/k/v projection biases left out (a Llama-style loader, or attention_bias read as false)",
        "sbryngelson/ANEForge#253; EricLBuehler/candle-vllm#167",
        TextQkvBiasDropped,
        cases="model_image",
    ),
    Mistake(
        "rotary_first_row_only",
        "text.layer.{i}",
        "the MRoPE tables of the first batch row applied to every row",
        "linkedin/Liger-Kernel#464",
        RotaryFirstRowOnly,
        cases="model_batch",
    ),
    Mistake(
        "gqa_heads_tiled",
        "text.layer.{i}",
        "KV heads repeated as a tile instead of in place (query head h reads kv head h mod K)",
        "hf_reference.md §7",
        GqaHeadsTiled,
        cases="model_image",
    ),
    Mistake(
        "causal_mask_by_position",
        "text.layer.{i}",
        "causal mask from MRoPE positions instead of token order (image tokens see later image tokens)",
        "ggml-org/llama.cpp#13694",
        CausalMaskByPosition,
        cases="model_image",
    ),
    Mistake(
        "mlp_reads_layer_input",
        "text.layer.{i}",
        "the decoder MLP fed the layer's input, not the attention residual (a parallel block, GPT-J style)",
        "Ginjing-Yuan/QWen2-from_ground_up#2 (post_attention_layernorm applied to the layer's input)",
        MlpReadsLayerInput,
        cases="model_text",
    ),
    Mistake(
        "lm_head_tied",
        "logits",
        "lm_head copied from embed_tokens although tie_word_embeddings is false",
        "sgl-project/sglang#18024; QwenLM/Qwen3-VL#1016",
        LmHeadTied,
        cases="model_image",
    ),
    Mistake(
        "lm_head_unloaded_when_tied",
        "logits",
        "lm_head left at its random init on a tied checkpoint (the 3B: no lm_head.weight stored)",
        "port_bugs_2026-12.md P3; sgl-project/sglang#18024",
        LmHeadUnloadedWhenTied,
        cases="model_text",
    ),
    Mistake(
        "stops_on_im_end_only",
        "generate.tokens",
        "generation stops at <|im_end|> (config.json's eos 151645) only, not at generation_config.json's 151643 too",
        "hf_reference.md §15 (generation_config eos [151645, 151643])",
        StopsOnImEndOnly,
        cases="model_batch",
    ),
    Mistake(
        "never_stops",
        "generate.tokens",
        "generation ignores eos and always runs max_new_tokens",
        "hf_reference.md §15 (stop on either eos id)",
        NeverStops,
        cases="model_batch",
    ),
]
