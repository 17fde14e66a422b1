"""Greedy generation: prefill the prompt once, then decode one token at a time with the cache.

Pure argmax. The published generation_config.json sets repetition_penalty 1.05 (and do_sample with
temperature 1e-6); transformers applies that penalty even to greedy search. The reference does
not: compare against transformers with do_sample=False, repetition_penalty=1.0, num_beams=1.
Ties in argmax go to the lowest token id (torch.argmax returns the first maximal index).

The batch must be left padded (what build_inputs produces): every row then ends at the same index
and its next token is appended after it. A new token's MRoPE position is the same on all three
axes: one more than the previous one, counted from rope_deltas (spec.mrope.decode_positions).

Shapes: B batch, L prompt tokens, n generated tokens, V vocab.
"""

from __future__ import annotations

import torch

from . import text
from .forward import check_inputs, decoder_stack, prefill
from .mrope import decode_positions, rope_index


def decode_step(
    params: dict, config, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache: list
) -> tuple[torch.Tensor, list]:
    """One step: tokens int64 [B, 1] at position_ids [3, B, 1] -> (logits [B, 1, V], new cache).

    attention_mask [B, S] covers the cache and the new token; cache holds one (k, v) per layer.
    """
    x = text.embed(params, tokens.to(params["model.embed_tokens.weight"].device))
    x, new_cache = decoder_stack(params, config, x, position_ids, attention_mask, cache)
    return text.lm_head(params, text.final_norm(params, config, x)), new_cache


def check_generate_args(config, inputs: dict, max_new_tokens, eos_token_id) -> torch.Tensor:
    """Reject a generation request that cannot work, before any compute: max_new_tokens a positive
    int, eos ids inside the vocabulary, valid model inputs, left (not right) padding. -> eos int64 [E]."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.int64)
    if eos.numel() == 0 or ((eos < 0) | (eos >= config.vocab_size)).any():
        raise ValueError(
            f"eos_token_id must be one id or a list of ids in 0..{config.vocab_size - 1}, got {eos_token_id!r}"
        )
    check_inputs(config, inputs)
    mask = inputs.get("attention_mask")
    if mask is not None and (mask[:, -1] == 0).any():
        raise ValueError("inputs['attention_mask'] has padding at the end of a row: generation needs left padding")
    return eos


def generate_greedy(
    params: dict,
    config,
    inputs: dict,
    max_new_tokens: int,
    *,
    eos_token_id,
    rope_rule=rope_index,
    return_logits: bool = False,
    prefill_chunk: int | None = None,
):
    """Greedy continuation of a left-padded batch: model inputs -> new tokens int64 [B, n], n <= max_new_tokens.

    eos_token_id: an id or a list of ids; a row stops at the first of them (which it keeps), and is
    filled with config.pad_token_id after it. Generation stops when every row has stopped or after
    max_new_tokens. rope_rule: the position rule of the prompt (see spec.forward.prefill).
    return_logits: also return the logits [B, n, V] each token was picked from, as this loop computed
    them (prefill, then one cached decode step per token). prefill_chunk: None, or the prompt
    prefilled that many tokens at a time (spec.forward.decoder_stack_in_chunks): the same answer up
    to rounding, whatever the chunk.
    """
    eos = check_generate_args(config, inputs, max_new_tokens, eos_token_id)
    hidden, _, cache, rope_deltas = prefill(params, config, inputs, rope_rule=rope_rule, prefill_chunk=prefill_chunk)
    logits = text.lm_head(params, hidden[:, -1:])  # [B, 1, V]: only the last position is needed
    B, L = inputs["input_ids"].shape
    device = hidden.device
    mask = inputs.get("attention_mask")
    mask = torch.ones(B, L, dtype=torch.int64, device=device) if mask is None else mask.to(device, torch.int64)
    eos = eos.to(device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, picked_from = [], []
    for step in range(max_new_tokens):
        picked_from.append(logits[:, -1])
        token = logits[:, -1].argmax(-1)  # [B]; first maximal index on ties
        token = torch.where(done, config.pad_token_id, token)
        tokens.append(token)
        done = done | torch.isin(token, eos)
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.int64, device=device)], dim=1)  # [B, L + step + 1]
        positions = decode_positions(rope_deltas, L + step, 1).to(device)  # [3, B, 1]
        logits, cache = decode_step(params, config, token[:, None], positions, mask, cache)
    new_tokens = torch.stack(tokens, dim=1)
    return (new_tokens, torch.stack(picked_from, dim=1)) if return_logits else new_tokens
