"""Greedy generation for impl: caches set up explicitly, prefill once, then a fixed-shape decode step.

The decode step reads and writes only persistent tensors (`DecodeState`): the token to feed, a
device-side step counter, the precomputed MRoPE tables of every decode position, the key mask, the
output buffer and the finished flags. Nothing in it depends on Python values that change per step,
so on CUDA it is captured once as a CUDA graph and replayed (one launch per token); on the CPU it
runs eagerly. The host looks at the finished flags only every `sync_every` steps (or every step
when a streaming callback is given).

There is one decode step: `decode_step` calls the model's `decode`, which runs each layer's
`decode`. How the layers compute it is a property of the built model, set from outside like int4:
impl.variants (fused batch-1 matrix-vector kernels, torch.compile'd pieces), impl.quant (int4),
impl.tp (tensor parallel). Only the attention backend is an argument here:
  decode_attention  "sdpa" (default) | "split" (flash-decoding over the filled keys) | "math"
What ran lands in model.last_stats (decode_attention, decode_variant, cuda_graph).

Semantics equal spec.generate.generate_greedy: argmax (first index on ties), a row keeps its eos
and is padded with config.pad_token_id after it, stop when every row has stopped or after
max_new_tokens. Positions of new tokens: spec.mrope.decode_positions from rope_deltas.

Shapes: B batch, L prompt length, n new tokens, T = L + max_new_tokens cache length, V vocab.
"""

from __future__ import annotations

import time

import torch

from ..spec.forward import check_prefill_chunk
from ..spec.generate import check_generate_args
from ..spec.mrope import decode_positions
from .attention import check_decode_backend, resolve_decode_backend
from .cache import check_cache_fits
from .kernels import cpu_c


class DecodeState:
    """Persistent tensors of one generation (all on the model device); the cache is the model's."""

    def __init__(
        self, model, first: torch.Tensor, mask: torch.Tensor, rope_deltas: torch.Tensor, L: int, max_new: int, eos
    ):
        dev, cfg = model.device_, model.config
        B, T = first.shape[0], model.cache.max_len
        self.L = L
        self.tok = first.clone()  # [B] token fed at the next step
        self.step = torch.zeros(1, dtype=torch.int64, device=dev)
        self.out = torch.full((B, max_new), cfg.pad_token_id, dtype=torch.int64, device=dev)
        self.out[:, 0] = first
        self.eos = eos.to(dev)
        self.finished = (first[:, None] == self.eos[None]).any(-1)
        steps = max(max_new - 1, 1)
        cos, sin = model.rope_tables(decode_positions(rope_deltas, L, steps))  # [B*steps, D/2]
        self.cos, self.sin = cos.view(B, steps, -1), sin.view(B, steps, -1)
        key_valid = torch.ones(B, T, dtype=torch.bool, device=dev)
        key_valid[:, :L] = mask.bool().to(dev)
        self.key_valid = key_valid
        self.key_index = torch.arange(T, device=dev)
        self.pad = torch.tensor(cfg.pad_token_id, device=dev)
        self.zero = torch.tensor(0.0, dtype=model.dtype_, device=dev)
        self.neg_inf = torch.tensor(float("-inf"), dtype=model.dtype_, device=dev)
        self.attn = "sdpa"  # decode_attention backend


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> int64 [B], the first maximal index (argmax's and max(-1).indices' documented
    choice). On the CPU, impl.kernels.cpu_c.argmax: 0.03-0.04 ms at the real vocabulary where torch's
    max(-1).indices takes 0.15 (argmax 0.67 on bfloat16); 3-4% of a quantized decode step there."""
    if cpu_c.ok(logits) and logits.dim() == 2:
        return cpu_c.argmax(logits)
    return logits.max(-1).indices


def decode_step(model, st: DecodeState) -> None:
    """Feed st.tok at cache slot L + step, write the argmax into st.out[:, step + 1]; all in place."""
    slot = st.step + st.L  # [1]
    cos = st.cos.index_select(1, st.step)[:, 0]  # [B, D/2]
    sin = st.sin.index_select(1, st.step)[:, 0]
    valid = st.key_valid & (st.key_index <= slot)[None]  # [B, T]
    bias = torch.where(valid, st.zero, st.neg_inf)  # additive mask, built once for all layers
    logits = model.decode(st.tok, cos, sin, bias, slot, st.attn, slot + 1)  # keys 0..slot are filled
    nxt = torch.where(st.finished, st.pad, greedy_pick(logits))  # [B]
    st.out.index_copy_(1, st.step + 1, nxt[:, None])
    st.finished |= (nxt[:, None] == st.eos[None]).any(-1)
    st.tok.copy_(nxt)
    st.step += 1


def _capture_graph(model, st: DecodeState):
    """Warm up (compiles Triton kernels), capture one decode step as a CUDA graph, reset the state."""
    saved = (st.tok.clone(), st.out.clone(), st.finished.clone())
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                decode_step(model, st)
        torch.cuda.current_stream().wait_stream(stream)
        st.step.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode_step(model, st)
    finally:
        # warm-up steps wrote cache slots L, L+1: the real steps overwrite them before reading them
        torch.cuda.synchronize()
        st.step.zero_()
        st.tok.copy_(saved[0])
        st.out.copy_(saved[1])
        st.finished.copy_(saved[2])
    return graph


@torch.inference_mode()
def generate_tokens(
    model,
    inputs: dict,
    max_new_tokens: int,
    eos_token_id,
    *,
    cuda_graph: bool | None = None,
    sync_every: int = 16,
    on_token=None,
    ignore_eos: bool = False,
    decode_attention: str = "auto",
    prefill_chunk: int | None = None,
) -> torch.Tensor:
    """Greedy continuation: model inputs -> int64 [B, n] on the CPU (see module doc).

    cuda_graph: None = on for CUDA models (if capture fails, decoding runs eagerly and
    last_stats["cuda_graph_error"] says why). on_token(ids: list[int] of length B) is called once per
    generated position, in order (forces a sync per step). ignore_eos: always produce max_new_tokens
    (benchmarks). decode_attention: "auto" | "sdpa" | "split" | "math" | "cpu_c"
    (impl.attention.decode_attention; "auto" is resolved here, and last_stats names what ran).
    prefill_chunk: None (the prompt at once) or the prompt prefilled that many tokens at a time
    (Qwen25VL.prefill): the same answer up to rounding, with activations bounded by the chunk.
    The model's caches are set up here for B x (L + max_new_tokens) tokens. Timings and what ran land
    in model.last_stats.
    """
    check_decode_backend(decode_attention)
    check_prefill_chunk(prefill_chunk)  # before the cache is allocated
    eos = check_generate_args(model.config, inputs, max_new_tokens, eos_token_id)  # spec's own checks
    if ignore_eos:
        eos = torch.tensor([-1])  # matches no token
    ids = inputs["input_ids"]
    B, L = ids.shape
    T = -(-(L + max_new_tokens) // 16) * 16  # rounded up: SDPA's fused kernels want an aligned mask
    cfg, layer = model.config, model.text.layers[0]
    item = torch.empty((), dtype=model.dtype_).element_size()
    rows = L if prefill_chunk is None else min(L, prefill_chunk)  # the activations a prefill step holds
    work = B * rows * (4 * cfg.hidden_size + 2 * cfg.intermediate_size) * item + B * cfg.vocab_size * 4  # rough
    model.cache = None  # the previous generation's cache is not counted as used memory
    check_cache_fits(
        cfg, B, L + max_new_tokens, model.dtype_, model.device_, extra_bytes=work, alloc_len=T, kv_heads=layer.attn.K
    )
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(torch.int64)

    stats = model.last_stats
    stats.clear()
    sync = (lambda: torch.cuda.synchronize(model.device_)) if model.device_.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    model.setup_caches(B, T)
    logits, rope_deltas = model.prefill(inputs, prefill_chunk)
    first = logits.argmax(-1)  # [B]
    st = DecodeState(model, first, mask, rope_deltas, L, max_new_tokens, eos)
    like_q = torch.empty(0, dtype=model.dtype_, device=model.device_)  # what the decode's queries will be
    decode_attention = resolve_decode_backend(decode_attention, like_q)
    st.attn = decode_attention
    sync()
    t1 = time.perf_counter()
    stats.update(prefill_s=t1 - t0, batch=B, prompt_tokens=L, prefill_chunk=prefill_chunk)
    stats.update(decode_attention=decode_attention)
    stats.update(decode_variant=f"{layer.attn.variant}/{layer.mlp.variant}")
    if on_token is not None:
        on_token(first.tolist())
    use_graph = model.device_.type == "cuda" if cuda_graph is None else cuda_graph
    graph = None
    if use_graph and max_new_tokens > 1:
        try:
            graph = _capture_graph(model, st)
        except RuntimeError as e:  # run eagerly rather than fail; say so
            stats["cuda_graph_error"] = f"{type(e).__name__}: {e}"
            graph = None
    t2 = time.perf_counter()
    stats["graph_capture_s"] = t2 - t1
    stats["cuda_graph"] = graph is not None
    n = 1
    if not bool(st.finished.all()):
        for s in range(1, max_new_tokens):
            graph.replay() if graph is not None else decode_step(model, st)
            n = s + 1
            if on_token is not None:
                on_token(st.out[:, s].tolist())
            if (on_token is not None or s % sync_every == 0 or s == max_new_tokens - 1) and bool(st.finished.all()):
                break
    sync()
    t3 = time.perf_counter()
    out = st.out[:, :n].cpu()
    # rows all stopped before the last check: trim columns after the last row's eos
    is_eos = (out[:, :, None] == eos[None, None]).any(-1)
    if bool(is_eos.any(1).all()):
        n = int(is_eos.int().argmax(1).max()) + 1
        out = out[:, :n]
    stats.update(
        decode_s=t3 - t2,
        new_tokens=out.shape[1],
        decode_tok_per_s=(out.shape[1] - 1) / (t3 - t2) if out.shape[1] > 1 and t3 > t2 else None,
    )
    return out
