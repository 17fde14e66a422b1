"""Attention for impl: every vision segment in one call, and the text decoder's prefill and decode.

Vision (non-causal, inside each cu_seqlens segment; segments are windows of <= 64 patches or whole
frames). Backends, by name:
  "flash_attn"  flash_attn_varlen_func (CUDA, fp16/bf16; when the package is installed)
  "varlen"      torch.nn.attention.varlen.varlen_attn (torch >= 2.10, CUDA, fp16/bf16)
  "dense"       segments gathered into a padded [S, Lmax, N, D] batch and one SDPA call with a key
                padding mask; when every segment has the same length (all windows of an image whose
                sides are multiples of 8 patches, or a single frame) the batch is a free view and
                no mask is needed. Exact: padded keys are masked, padded queries are dropped.
  "blockmask"   one SDPA call over all P patches with a [P, P] block-diagonal mask (for comparison).
"auto" picks, per segment list: flash_attn if installed; else dense when the segments are uniform;
else varlen on CUDA with half precision; else dense. `SegmentPlan.backend` records what ran.

Text: prefill uses SDPA with a causal + padding mask (a padding query sees only itself, so no row is
all -inf); decode attends one new query per row over the preallocated cache with a key mask, so its shapes
never change (CUDA-graph friendly); backends "sdpa", "split" (flash-decoding, reads only the filled
part of the cache), "math" (see decode_attention).

Shapes: P patches, S segments, N heads, K kv heads, G = N/K, D head dim, B batch, L tokens, T cache length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import cpu_c
from .kernels.decode_attention import decode_attention_split, decode_attention_torch

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

VISION_BACKENDS = ("auto", "flash_attn", "varlen", "dense", "blockmask")


def check_backend(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError when vision attention backend `name` cannot run on device/dtype."""
    if name not in VISION_BACKENDS:
        raise ValueError(f"attention must be one of {VISION_BACKENDS}, got {name!r}")
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "flash_attn" and (flash_attn_varlen_func is None or device.type != "cuda" or not half):
        raise ValueError(
            f"attention='flash_attn' needs the flash-attn package, a CUDA device and fp16/bf16 "
            f"(installed: {flash_attn_varlen_func is not None}, device {device.type}, dtype {dtype})"
        )
    if name == "varlen" and (varlen_attn is None or device.type != "cuda" or not half):
        raise ValueError(
            f"attention='varlen' needs torch >= 2.10 with torch.nn.attention.varlen, a CUDA device and "
            f"fp16/bf16 (available: {varlen_attn is not None}, device {device.type}, dtype {dtype})"
        )


class SegmentPlan:
    """How to run attention over the segments of one cu_seqlens list; built once per forward.

    cu_seqlens int [S+1] (CPU or device; zero-length segments are allowed and ignored).
    """

    def __init__(
        self, cu_seqlens: torch.Tensor, P: int, device: torch.device, dtype: torch.dtype, backend: str = "auto"
    ):
        cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).cpu()
        assert int(cu[0]) == 0 and int(cu[-1]) == P, f"cu_seqlens must run 0..{P}, got {cu[0]}..{cu[-1]}"
        lengths = cu.diff()
        cu = torch.cat([cu[:1], cu[1:][lengths > 0]])
        lengths = lengths[lengths > 0]
        self.P, self.n, self.max_len = P, len(lengths), int(lengths.max()) if len(lengths) else 0
        self.uniform = bool((lengths == self.max_len).all()) if len(lengths) else True
        half = dtype in (torch.float16, torch.bfloat16) and device.type == "cuda"
        if backend == "auto":
            if flash_attn_varlen_func is not None and half:
                backend = "flash_attn"
            elif self.uniform or not (half and varlen_attn is not None):
                backend = "dense"
            else:
                backend = "varlen"
        self.backend = backend
        if backend in ("flash_attn", "varlen"):
            self.cu = cu.to(device=device, dtype=torch.int32)
        elif backend == "dense" and not self.uniform:
            # row r of segment s sits at packed row cu[s] + r; pads point at row 0 and are masked/dropped
            r = torch.arange(self.max_len)
            valid = r[None, :] < lengths[:, None]  # [S, Lmax]
            self.gather = torch.where(valid, cu[:-1, None] + r[None, :], 0).reshape(-1).to(device)  # [S*Lmax]
            self.key_mask = valid[:, None, None, :].to(device)  # [S, 1, 1, Lmax]
            self.scatter = torch.nonzero(valid.reshape(-1)).flatten().to(device)  # [P] padded slot of each packed row
        elif backend == "blockmask":
            seg = torch.repeat_interleave(torch.arange(self.n), lengths)
            self.mask = (seg[:, None] == seg[None, :]).to(device)[None, None]  # [1, 1, P, P]

    @property
    def label(self) -> str:
        return f"{self.backend}-uniform" if self.backend == "dense" and self.uniform else self.backend


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """Softmax(q k^T / sqrt(D)) v inside each segment: q, k, v [P, N, D] (unit stride on D) -> [P, N, D]."""
    P, N, D = q.shape
    if plan.backend in ("flash_attn", "varlen"):
        fn = flash_attn_varlen_func if plan.backend == "flash_attn" else varlen_attn
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the packed kernels want dense [P, N, D]
        return fn(q, k, v, plan.cu, plan.cu, plan.max_len, plan.max_len)
    if plan.backend == "blockmask":
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=plan.mask
        )  # [1, N, P, D]
        return o[0].transpose(0, 1)
    if plan.uniform:
        S, Lw = plan.n, plan.max_len
        qs, ks, vs = (t.reshape(S, Lw, N, D).transpose(1, 2) for t in (q, k, v))  # [S, N, Lw, D]
        return F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(P, N, D)
    S, Lm = plan.n, plan.max_len
    qs, ks, vs = (t.index_select(0, plan.gather).view(S, Lm, N, D).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=plan.key_mask)  # [S, N, Lm, D]
    return o.transpose(1, 2).reshape(S * Lm, N, D).index_select(0, plan.scatter)


def prefill_mask(attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor | None:
    """attention_mask int [B, S] -> bool [B, 1, S - start, S]: the queries of tokens start..S-1 (a
    prefill chunk; start 0: the whole prompt) over the keys 0..S-1, causal, padding keys hidden, each
    query sees itself. None for a whole prompt without padding (then SDPA's own causal path is used;
    its causal mask is aligned top-left, right only when queries and keys start together)."""
    if start == 0 and bool(attention_mask.bool().all()):
        return None
    S = attention_mask.shape[1]
    keys = torch.arange(S, device=attention_mask.device)
    queries = keys[start:, None]  # [S - start, 1]
    allowed = (keys[None, :] <= queries)[None] & attention_mask.bool()[:, None, :]
    return (allowed | (keys[None, :] == queries)[None])[:, None]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Causal GQA: q [B, N, L, D], k, v [B, K, S, D] (S = L, or the cache up to a chunk's end), mask
    from `prefill_mask` -> [B, N, L, D]."""
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


DECODE_BACKENDS = ("auto", "sdpa", "split", "math", "cpu_c")


def check_decode_backend(name: str) -> None:
    """Raise ValueError when `name` is not a decode attention backend."""
    if name not in DECODE_BACKENDS:
        raise ValueError(f"decode_attention must be one of {DECODE_BACKENDS}, got {name!r}")


def resolve_decode_backend(name: str, q: torch.Tensor) -> str:
    """ "auto" -> "cpu_c" for a CPU tensor the C kernels take, else "sdpa"; any other name as it is."""
    check_decode_backend(name)
    if name == "cpu_c" and not cpu_c.ok(q):
        raise ValueError(
            f"decode_attention 'cpu_c' runs on the CPU in float32 or bfloat16 with the C kernels built "
            f"(impl.kernels.cpu_c.available(): {cpu_c.available()}); got {q.dtype} on {q.device}"
        )
    if name != "auto":
        return name
    return "cpu_c" if cpu_c.ok(q) else "sdpa"


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_mask: torch.Tensor,
    backend: str = "sdpa",
    n_valid: torch.Tensor | None = None,
    use_triton: bool = True,
) -> torch.Tensor:
    """One query per row over the cache: q [B, N, D], caches [B, K, T, D], key_mask [B, T]
    (bool: True = attend; or additive float: 0 / -inf, in q's dtype) -> [B, N, D].

    backend (fallback order written out; the caller records which it asked for):
      "sdpa"   one SDPA call over the whole cache. The G = N/K query heads of one kv head are handed
               to SDPA as G query positions of that head (same keys, same mask, no causality among
               them), so GQA costs one fused call without repeating the cache. SDPA runs one
               program per (row, kv head): few programs for a whole GPU at batch 1.
      "split"  impl.kernels.decode_attention: keys cut into chunks (flash-decoding), and only keys
               0..n_valid-1 read (n_valid int tensor [1] on the device; None = T). Needs an additive
               float key_mask. Triton on CUDA; elsewhere its PyTorch fallback (= "math").
      "math"   matmul, float32 softmax, matmul (plain PyTorch; what torch.compile can fuse).
      "cpu_c"  impl.kernels.cpu_c: one C task per (row, kv head), float32 scores, softmax and sum,
               masked keys skipped (CPU; 2-3x faster than SDPA for one query there).
      "auto"   "cpu_c" on the CPU where the C kernels built, else "sdpa" (what generate uses).
    """
    B, N, D = q.shape
    K = k_cache.shape[1]
    backend = resolve_decode_backend(backend, q)
    if backend in ("split", "math", "cpu_c"):
        bias = (
            key_mask
            if key_mask.is_floating_point()
            else torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_mask, float("-inf"))
        )
        if backend == "math":
            return decode_attention_torch(q, k_cache, v_cache, bias)
        if backend == "cpu_c":
            return cpu_c.decode_attention(q, k_cache, v_cache, bias.to(q.dtype))
        if n_valid is None:
            n_valid = torch.full((1,), k_cache.shape[2], dtype=torch.int64, device=q.device)
        return decode_attention_split(q, k_cache, v_cache, bias, n_valid, use_triton=use_triton)
    qg = q.reshape(B, K, N // K, D)  # query heads of one kv head are consecutive
    o = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=key_mask[:, None, None, :])  # [B, K, G, D]
    return o.reshape(B, N, D)
