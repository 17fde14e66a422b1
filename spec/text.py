"""The text decoder: embeddings, vision scatter, Qwen2 decoder layers, final norm and LM head.

A pre-norm transformer (Qwen2): for each layer
    h = h + o_proj(attention(rms_norm(h)))
    h = h + down_proj(silu(gate_proj(rms_norm(h))) * up_proj(rms_norm(h)))
then one final RMSNorm and the LM head. Attention is grouped-query (K key/value heads, each serving
N/K consecutive query heads), q/k/v projections carry a bias, positions enter through MRoPE
(spec.mrope.apply_mrope), and the mask is causal plus padding.

Every function is pure over `params`, the checkpoint dict in hub key names (`model.layers.{i}.*`).
All arithmetic, softmax included, runs in the dtype of the activations: float64 makes the oracle.

The key/value cache is a plain value: a layer takes its cache `(k, v)` (each [B, K, S, D]) or None
and returns the new one with the fresh tokens appended. Nothing is preallocated or mutated.

Shapes: B batch, L new tokens, S tokens in the cache after this step (past + L), C hidden,
N query heads, K key/value heads, D head dim, I intermediate, V vocab.
"""

from __future__ import annotations

import torch

from .mrope import apply_mrope
from .norms import rms_norm


def embed(params: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings: input_ids int64 [B, L] -> [B, L, C] in the dtype of the embedding table."""
    table = params["model.embed_tokens.weight"]  # [V, C]
    vocab = table.shape[0]
    if input_ids.dtype != torch.int64:
        raise TypeError(f"input_ids must be int64, got {input_ids.dtype}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab)]
        raise ValueError(f"input_ids holds token id {int(bad[0])}, outside the vocabulary 0..{vocab - 1}")
    return table[input_ids]


def scatter_vision_features(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    image_feats: torch.Tensor | None,
    video_feats: torch.Tensor | None,
    config,
) -> torch.Tensor:
    """Write vision features over the placeholder tokens: [B, L, C] -> [B, L, C] (a new tensor).

    image_feats [n_image_tokens, C] fill the positions where input_ids == config.image_token_id, and
    video_feats [n_video_tokens, C] those of config.video_token_id, in flattened batch order (row 0
    left to right, then row 1, ...): that is how the features of several items and rows are packed.
    The embedding rows of the placeholder ids themselves are never used.
    """
    out = inputs_embeds.clone()
    for kind, token_id, feats in (
        ("image", config.image_token_id, image_feats),
        ("video", config.video_token_id, video_feats),
    ):
        mask = input_ids == token_id  # [B, L]
        n_tokens = int(mask.sum())
        n_feats = 0 if feats is None else feats.shape[0]
        if n_tokens != n_feats:
            raise ValueError(
                f"input_ids holds {n_tokens} {kind} pad tokens (id {token_id}) but the vision tower "
                f"gave {n_feats} {kind} features: they must be equal"
            )
        if n_tokens:
            if feats.shape[-1] != out.shape[-1]:
                raise ValueError(
                    f"{kind} features have width {feats.shape[-1]}, the text hidden size is {out.shape[-1]}"
                )
            out[mask] = feats.to(out.dtype)  # boolean indexing walks [B, L] row-major: flattened batch order
    return out


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T (+ bias [out]) -> [..., out]."""
    y = x @ weight.T
    return y if bias is None else y + bias


def attention_allowed(attention_mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """Which keys each new query may attend to: attention_mask int [B, S] -> bool [B, 1, L, S].

    The L new tokens are the last L of the S; query i sits at cache index S - L + i and may see key j
    when j <= S - L + i (causal) and attention_mask[b, j] == 1 (not padding). A padding query would
    see no key at all, so it is let see itself: its output is never used, and this keeps softmax
    free of NaN.
    """
    S, device = attention_mask.shape[1], attention_mask.device
    query_index = torch.arange(S - n_new, S, device=device)[:, None]  # [L, 1]
    key_index = torch.arange(S, device=device)[None, :]  # [1, S]
    causal = key_index <= query_index  # [L, S]
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # [B, L, S]
    allowed = allowed | (key_index == query_index)[None]
    return allowed[:, None]  # [B, 1, L, S], broadcast over heads


def attention(
    params: dict,
    config,
    i: int,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: tuple | None = None,
) -> tuple[torch.Tensor, tuple]:
    """Grouped-query self-attention of layer i: x [B, L, C] -> ([B, L, C], cache (k, v) each [B, K, S, D]).

    cos, sin [B, L, D] are the MRoPE tables of the new tokens; attention_mask int [B, S] covers the
    cached and the new tokens (1 = real token, 0 = padding).
    """
    B, L, C = x.shape
    N, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    p = f"model.layers.{i}.self_attn."
    q = (
        _linear(x, params[p + "q_proj.weight"], params[p + "q_proj.bias"]).view(B, L, N, D).transpose(1, 2)
    )  # [B, N, L, D]
    k = (
        _linear(x, params[p + "k_proj.weight"], params[p + "k_proj.bias"]).view(B, L, K, D).transpose(1, 2)
    )  # [B, K, L, D]
    v = (
        _linear(x, params[p + "v_proj.weight"], params[p + "v_proj.bias"]).view(B, L, K, D).transpose(1, 2)
    )  # [B, K, L, D]
    q, k = apply_mrope(q, k, cos, sin)
    if cache is not None:
        k = torch.cat([cache[0], k], dim=2)  # [B, K, S, D]
        v = torch.cat([cache[1], v], dim=2)
    S = k.shape[2]
    if tuple(attention_mask.shape) != (B, S):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch {B}, cached + new tokens {S})"
        )
    # kv head g serves query heads g*N/K .. (g+1)*N/K - 1: repeat each kv head in place (repeat_interleave)
    k_rep = k.repeat_interleave(N // K, dim=1)  # [B, N, S, D]
    v_rep = v.repeat_interleave(N // K, dim=1)
    scores = (q @ k_rep.transpose(-1, -2)) * D**-0.5  # [B, N, L, S]
    scores = scores.masked_fill(~attention_allowed(attention_mask, L), float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # in the working dtype
    out = (weights @ v_rep).transpose(1, 2).reshape(B, L, N * D)  # [B, L, C]
    return _linear(out, params[p + "o_proj.weight"]), (k, v)


def mlp(params: dict, i: int, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU feed-forward of layer i: [B, L, C] -> [B, L, I] -> [B, L, C]."""
    p = f"model.layers.{i}.mlp."
    gate = torch.nn.functional.silu(_linear(x, params[p + "gate_proj.weight"]))
    return _linear(gate * _linear(x, params[p + "up_proj.weight"]), params[p + "down_proj.weight"])


def decoder_layer(
    params: dict,
    config,
    i: int,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: tuple | None = None,
) -> tuple[torch.Tensor, tuple]:
    """Decoder layer i: x [B, L, C] -> ([B, L, C], cache (k, v) each [B, K, S, D]); see attention()."""
    p = f"model.layers.{i}."
    h, cache = attention(
        params,
        config,
        i,
        rms_norm(x, params[p + "input_layernorm.weight"], config.rms_norm_eps),
        cos,
        sin,
        attention_mask,
        cache,
    )
    x = x + h
    x = x + mlp(params, i, rms_norm(x, params[p + "post_attention_layernorm.weight"], config.rms_norm_eps))
    return x, cache


def final_norm(params: dict, config, x: torch.Tensor) -> torch.Tensor:
    """The RMSNorm after the last layer: [B, L, C] -> [B, L, C]."""
    return rms_norm(x, params["model.norm.weight"], config.rms_norm_eps)


def lm_head(params: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits: [B, L, C] -> [B, L, V]. `lm_head.weight` is always in params (a copy of the embedding when tied)."""
    return _linear(x, params["lm_head.weight"])
