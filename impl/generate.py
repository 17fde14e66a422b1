"""Greedy generation for impl: prefill once into a preallocated cache, then a fixed-shape decode step.

The decode step reads and writes only persistent tensors (`DecodeState`): the token to feed, a
device-side step counter, the precomputed MRoPE tables of every decode position, the key mask, the
output buffer and the finished flags. Nothing in it depends on Python values that change per step,
so on CUDA it is captured once as a CUDA graph and replayed (one launch per token); on the CPU it
runs eagerly. The host looks at the finished flags only every `sync_every` steps (or every step
when a streaming callback is given).

How a step runs is chosen by argument (generate_tokens), written out, and recorded in last_stats:
  decode_attention  "sdpa" (default) | "split" (flash-decoding over the filled keys) | "math"
  fused_decode      False (default): DecoderLayer.decode; True: decode_layer_fused (batch 1;
                    the matrix-vector products with their neighbours fused)
  compile_decode    False (default) | True / "default" | "max-autotune-no-cudagraphs": the layers
                    as torch.compile'd pure functions (ignored when fused_decode is on)
Every variant is captured in the same CUDA graph.

Semantics equal spec.generate.generate_greedy: argmax (first index on ties), a row keeps its eos
and is padded with config.pad_token_id after it, stop when every row has stopped or after
max_new_tokens. Positions of new tokens: spec.mrope.decode_positions from rope_deltas.

Shapes: B batch, L prompt length, n new tokens, T = L + max_new_tokens cache length, V vocab.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spec.generate import check_generate_args
from ..spec.mrope import decode_positions
from .attention import check_decode_backend, decode_attention
from .cache import KVCache, check_cache_fits
from .kernels.gemv import gemv
from .kernels.rmsnorm import rms_norm, rms_norm_torch
from .kernels.rotary import apply_rotary_cache_, rotary_torch
from .kernels.swiglu import swiglu as swiglu_fn
from .kernels.swiglu import swiglu_torch
from .model import mrope_half_tables

COMPILE_MODES = (False, True, "default", "max-autotune-no-cudagraphs")


class DecodeState:
    """Persistent tensors of one generation (all on the model device)."""

    def __init__(
        self,
        model,
        first: torch.Tensor,
        mask: torch.Tensor,
        rope_deltas: torch.Tensor,
        L: int,
        max_new: int,
        eos: torch.Tensor,
        cache: KVCache,
    ):
        dev, cfg = model.device_, model.config
        B, T = first.shape[0], cache.max_len
        self.L, self.cache = L, cache
        self.tok = first.clone()  # [B] token fed at the next step
        self.step = torch.zeros(1, dtype=torch.int64, device=dev)
        self.out = torch.full((B, max_new), cfg.pad_token_id, dtype=torch.int64, device=dev)
        self.out[:, 0] = first
        self.eos = eos.to(dev)
        self.finished = (first[:, None] == self.eos[None]).any(-1)
        steps = max(max_new - 1, 1)
        pos = decode_positions(rope_deltas, L, steps)  # [3, B, steps]
        cos, sin = mrope_half_tables(pos, cfg, dev)  # [B*steps, D/2]
        self.cos, self.sin = cos.view(B, steps, -1), sin.view(B, steps, -1)
        key_valid = torch.ones(B, T, dtype=torch.bool, device=dev)
        key_valid[:, :L] = mask.bool().to(dev)
        self.key_valid = key_valid
        self.key_index = torch.arange(T, device=dev)
        self.pad = torch.tensor(cfg.pad_token_id, device=dev)
        self.zero = torch.tensor(0.0, dtype=model.dtype_, device=dev)
        self.neg_inf = torch.tensor(float("-inf"), dtype=model.dtype_, device=dev)
        self.attn = "sdpa"  # decode_attention backend
        self.compiled = None  # (pre, post, head) from compiled_decode_fns, or None = the layers' eager decode
        self.fused = False  # batch-1 fused matrix-vector kernels (decode_layer_fused)


def _layer_pre(x, cos, sin, kc, vc, slot, norm, w, b, eps: float, N: int, K: int, D: int):
    """Norm, q|k|v, rotary, cache write of one layer in plain PyTorch (for torch.compile to fuse):
    x [B, C], caches [B, K, T, D] (written at `slot`) -> q [B, N, D]."""
    qkv = F.linear(rms_norm_torch(x, norm, eps), w, b).view(x.shape[0], -1, D)
    rotary_torch(qkv, cos, sin, N + K)
    kc.index_copy_(2, slot, qkv[:, N : N + K, None])
    vc.index_copy_(2, slot, qkv[:, N + K :, None])
    return qkv[:, :N]


def _layer_post(x, o, wo, norm, wgu, wd, eps: float):
    """o_proj + residual, norm, SwiGLU MLP + residual: x [B, C], o [B, N*D] -> [B, C]."""
    x = x + F.linear(o, wo)
    return x + F.linear(swiglu_torch(F.linear(rms_norm_torch(x, norm, eps), wgu)), wd)


def _head(x, norm, w, eps: float, finished, pad):
    """Final norm, lm_head, argmax (pad where finished): x [B, C] -> int64 [B]."""
    nxt = F.linear(rms_norm_torch(x, norm, eps), w).argmax(-1)
    return torch.where(finished, pad, nxt)


def compiled_decode_fns(model, mode):
    """torch.compile of the three per-step pieces, shared by every layer (weights are arguments, so
    one compilation serves all layers); cached on the model. Attention stays outside (any backend).
    mode: True / "default" or "max-autotune-no-cudagraphs" (our own CUDA graph wraps the step)."""
    for layer in model.text.layers:
        for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
            if type(lin) is not nn.Linear:
                raise ValueError(
                    f"compile_decode needs plain nn.Linear layers, layer {layer.i} has "
                    f"{type(lin).__name__} (int4 runs eagerly)"
                )
    mode = "default" if mode is True else mode
    cache = model.__dict__.setdefault("_compiled_decode", {})
    if mode not in cache:
        kw = dict(mode=mode, dynamic=False, fullgraph=True)
        cache[mode] = (torch.compile(_layer_pre, **kw), torch.compile(_layer_post, **kw), torch.compile(_head, **kw))
    return cache[mode]


def _mv(lin, x, *, residual=None, norm_weight=None, eps: float = 1e-6, swiglu: bool = False, use_triton: bool = True):
    """One row through linear layer `lin` with its neighbours: impl.kernels.gemv (fused) for a plain
    nn.Linear; otherwise (Int4Linear) RMSNorm, the layer, SwiGLU and the residual add one by one."""
    if type(lin) is nn.Linear:
        return gemv(
            x,
            lin.weight,
            lin.bias,
            residual=residual,
            norm_weight=norm_weight,
            eps=eps,
            swiglu=swiglu,
            use_triton=use_triton,
        )
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps, use_triton=use_triton)
    y = lin(x)
    if swiglu:
        y = swiglu_fn(y, use_triton=use_triton)
    return y if residual is None else residual + y


def decode_layer_fused(layer, x, cos, sin, bias, cache, slot, attn: str, n_valid) -> torch.Tensor:
    """The same as DecoderLayer.decode for one row, with fewer kernels: RMSNorm fused into the q|k|v
    and gate|up products, SwiGLU into gate|up, the residual adds into o_proj and down (impl.kernels.gemv,
    plain nn.Linear layers; int4 layers run their own kernel with the neighbours unfused), and the
    cache write fused into the rotary. bf16: 5 kernels + attention per layer instead of 12.
    x [1, C] -> [1, C]."""
    B, t, eps = x.shape[0], layer.use_triton, layer.eps
    N, D = layer.N, layer.D
    qkv = _mv(layer.qkv, x, norm_weight=layer.norm1, eps=eps, use_triton=t)
    qkv = apply_rotary_cache_(qkv.view(B, -1, D), cos, sin, N, cache.k[layer.i], cache.v[layer.i], slot, use_triton=t)
    o = decode_attention(qkv[:, :N], cache.k[layer.i], cache.v[layer.i], bias, attn, n_valid, use_triton=t)
    x = _mv(layer.o_proj, o.reshape(B, N * D), residual=x, use_triton=t)
    h = _mv(layer.gate_up, x, norm_weight=layer.norm2, eps=eps, swiglu=True, use_triton=t)
    return _mv(layer.down, h, residual=x, use_triton=t)


def check_fusable(model, B: int) -> None:
    """ValueError unless fused decode can run: batch 1."""
    if B != 1:
        raise ValueError(f"fused_decode needs batch 1, got batch {B}")


def decode_step(model, st: DecodeState) -> None:
    """Feed st.tok at cache slot L + step, write the argmax into st.out[:, step + 1]; all in place."""
    slot = st.step + st.L  # [1]
    n_valid = slot + 1  # keys 0..slot are filled
    cos = st.cos.index_select(1, st.step)[:, 0]  # [B, D/2]
    sin = st.sin.index_select(1, st.step)[:, 0]
    valid = st.key_valid & (st.key_index <= slot)[None]  # [B, T]
    bias = torch.where(valid, st.zero, st.neg_inf)  # additive mask, built once for all layers
    x = F.embedding(st.tok, model.text.embed)  # [B, C]
    text = model.text
    if st.fused:
        for layer in text.layers:
            x = decode_layer_fused(layer, x, cos, sin, bias, st.cache, slot, st.attn, n_valid)
        logits = _mv(text.lm_head, x, norm_weight=text.norm, eps=text.cfg.rms_norm_eps, use_triton=text.use_triton)
        nxt = torch.where(st.finished, st.pad, logits.argmax(-1))
    elif st.compiled is None:
        for layer in text.layers:
            x = layer.decode(x, cos, sin, bias, st.cache, slot, st.attn, n_valid)
        nxt = torch.where(st.finished, st.pad, text.lm_head(text.final(x)).argmax(-1))  # [B]
    else:
        pre, post, head = st.compiled
        B = x.shape[0]
        for layer in text.layers:
            kc, vc = st.cache.k[layer.i], st.cache.v[layer.i]
            q = pre(
                x,
                cos,
                sin,
                kc,
                vc,
                slot,
                layer.norm1,
                layer.qkv.weight,
                layer.qkv.bias,
                layer.eps,
                layer.N,
                layer.K,
                layer.D,
            )
            o = decode_attention(q, kc, vc, bias, st.attn, n_valid, use_triton=layer.use_triton)
            x = post(
                x,
                o.reshape(B, -1),
                layer.o_proj.weight,
                layer.norm2,
                layer.gate_up.weight,
                layer.down.weight,
                layer.eps,
            )
        nxt = head(x, text.norm, text.lm_head.weight, text.cfg.rms_norm_eps, st.finished, st.pad)
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
    decode_attention: str = "sdpa",
    compile_decode=False,
    fused_decode: bool = False,
) -> torch.Tensor:
    """Greedy continuation: model inputs -> int64 [B, n] on the CPU (see module doc).

    cuda_graph: None = on for CUDA models (if capture fails, decoding runs eagerly and
    last_stats["cuda_graph_error"] says why). on_token(ids: list[int] of length B) is called once per
    generated position, in order (forces a sync per step). ignore_eos: always produce max_new_tokens
    (benchmarks). decode_attention: "sdpa" | "split" | "math" (impl.attention.decode_attention).
    compile_decode: False, True (= "default") or "max-autotune-no-cudagraphs": torch.compile the
    per-layer pieces of the decode step (plain nn.Linear only; when compiling fails the step runs
    eagerly and last_stats["compile_error"] says why). fused_decode: batch 1 only (else ValueError):
    the layers' matrix-vector products with their norms, SwiGLU and residual adds fused
    (decode_layer_fused; int4 layers keep their kernel); it takes precedence over compile_decode. Timings and what ran
    land in model.last_stats.
    """
    check_decode_backend(decode_attention)
    if compile_decode not in COMPILE_MODES:
        raise ValueError(f"compile_decode must be one of {COMPILE_MODES}, got {compile_decode!r}")
    eos = check_generate_args(model.config, inputs, max_new_tokens, eos_token_id)  # spec's own checks
    if fused_decode:
        check_fusable(model, inputs["input_ids"].shape[0])
    if ignore_eos:
        eos = torch.tensor([-1])  # matches no token
    ids = inputs["input_ids"]
    B, L = ids.shape
    T = -(-(L + max_new_tokens) // 16) * 16  # rounded up: SDPA's fused kernels want an aligned mask
    V, C = model.config.vocab_size, model.config.hidden_size
    item = torch.empty((), dtype=model.dtype_).element_size()
    work = B * L * (4 * C + 2 * model.config.intermediate_size) * item + B * V * 4  # rough prefill activations
    check_cache_fits(model.config, B, L + max_new_tokens, model.dtype_, model.device_, extra_bytes=work, alloc_len=T)
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(torch.int64)

    stats = model.last_stats
    stats.clear()
    sync = (lambda: torch.cuda.synchronize(model.device_)) if model.device_.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    cache = KVCache(model.config, B, T, model.dtype_, model.device_)
    logits, rope_deltas = model._prefill(inputs, cache, captured={}, wanted=set(), all_logits=False)
    first = logits.argmax(-1)  # [B]
    st = DecodeState(model, first, mask, rope_deltas, L, max_new_tokens, eos, cache)
    sync()
    t1 = time.perf_counter()
    stats.update(prefill_s=t1 - t0, batch=B, prompt_tokens=L)
    st.attn, st.fused = decode_attention, bool(fused_decode)
    stats.update(decode_attention=decode_attention, compile_decode=False, fused_decode=st.fused)
    if compile_decode and not fused_decode and max_new_tokens > 1:  # compile time is counted in graph_capture_s
        try:
            st.compiled = compiled_decode_fns(model, compile_decode)
            saved = (st.tok.clone(), st.out.clone(), st.finished.clone())
            try:
                decode_step(model, st)  # compiles now; the cache slot it wrote is rewritten by step 0
            finally:
                st.step.zero_()
                st.tok.copy_(saved[0])
                st.out.copy_(saved[1])
                st.finished.copy_(saved[2])
            stats["compile_decode"] = "default" if compile_decode is True else compile_decode
        except Exception as e:  # eager rather than fail; say so
            st.compiled = None
            stats["compile_error"] = f"{type(e).__name__}: {str(e)[:500]}"
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
