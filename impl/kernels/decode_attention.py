"""Decode attention split over the key axis (flash-decoding), reading only the filled part of the cache.

One query token per row, grouped-query: the G = N/K query heads of kv head h read that head's keys.
SDPA hands this to one program per (row, kv head) -> B*K programs on a GPU of 132 SMs; here the keys
are cut into `splits` chunks, each program handles one (row, kv head, chunk) and keeps a running
max / sum / weighted value (online softmax), and a second kernel merges the chunks:
    out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s,    M = max_s m_s.
Keys at index > n_valid - 1 are never read (n_valid is read from a device tensor, so the call is
CUDA-graph safe while the cache fills); keys below it are masked by the additive bias [B, T]
(0 / -inf), which carries left padding.

Shapes: B batch, N heads, K kv heads, G = N/K, D head dim, T cache length, S splits.
"""

from __future__ import annotations

import math

import torch

from . import HAVE_TRITON, triton_ok

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _max(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bias_ptr,
        nvalid_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        K,
        G,
        T,
        D,
        chunk,
        scale,
        sq_b,
        sq_h,
        sk_b,
        sk_h,
        sk_t,
        sb_b,
        BLOCK_G: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)  # row * K + kv head
        s = tl.program_id(1)
        n_split = tl.num_programs(1)
        b = bh // K
        h = bh % K
        gs = tl.arange(0, BLOCK_G)
        ds = tl.arange(0, BLOCK_D)
        ts = tl.arange(0, BLOCK_T)
        qmask = (gs[:, None] < G) & (ds[None, :] < D)
        q = tl.load(q_ptr + b * sq_b + (h * G + gs[:, None]) * sq_h + ds[None, :], mask=qmask, other=0.0)
        n_valid = tl.load(nvalid_ptr)
        lo = s * chunk
        hi = tl.minimum(lo + chunk, tl.minimum(n_valid, T))
        m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)  # finite: a chunk with no visible key adds nothing
        l_i = tl.full((BLOCK_G,), 0.0, tl.float32)
        acc = tl.full((BLOCK_G, BLOCK_D), 0.0, tl.float32)
        kbase = k_ptr + b * sk_b + h * sk_h
        vbase = v_ptr + b * sk_b + h * sk_h
        for start in range(lo, hi, BLOCK_T):
            t = start + ts
            tmask = t < hi
            kv_mask = tmask[:, None] & (ds[None, :] < D)
            k = tl.load(kbase + t[:, None] * sk_t + ds[None, :], mask=kv_mask, other=0.0)
            sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale  # [BG, BT]
            bias = tl.load(bias_ptr + b * sb_b + t, mask=tmask, other=float("-inf")).to(tl.float32)
            sc = sc + bias[None, :]
            m_new = tl.maximum(m_i, tl.reduce(sc, 1, _max))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.reduce(p, 1, _add)
            v = tl.load(vbase + t[:, None] * sk_t + ds[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            m_i = m_new
        row = (bh * n_split + s) * BLOCK_G + gs
        tl.store(m_ptr + row, m_i)
        tl.store(l_ptr + row, l_i)
        tl.store(acc_ptr + row[:, None] * BLOCK_D + ds[None, :], acc)

    @triton.jit
    def _merge_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        o_ptr,
        G,
        D,
        n_split,
        so_b,
        so_h,
        K,
        BLOCK_G: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        g = tl.program_id(1)
        b = bh // K
        h = bh % K
        ss = tl.arange(0, BLOCK_S)
        ds = tl.arange(0, BLOCK_D)
        smask = ss < n_split
        row = (bh * n_split + ss) * BLOCK_G + g
        m = tl.load(m_ptr + row, mask=smask, other=-1.0e30)
        l = tl.load(l_ptr + row, mask=smask, other=0.0)
        acc = tl.load(acc_ptr + row[:, None] * BLOCK_D + ds[None, :], mask=smask[:, None], other=0.0)
        w = tl.exp(m - tl.reduce(m, 0, _max))
        num = tl.reduce(acc * w[:, None], 0, _add)
        den = tl.reduce(l * w, 0, _add)
        tl.store(o_ptr + b * so_b + (h * G + g) * so_h + ds, (num / den).to(o_ptr.dtype.element_ty), mask=ds < D)


def choose_splits(rows: int, T: int, block_t: int = 64, target_programs: int = 264) -> int:
    """Chunks per (row, kv head): enough programs to fill a GPU (~2 per SM of an H100), at least one
    key block per chunk."""
    return max(1, min(-(-T // block_t), -(-target_programs // max(rows, 1))))


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bias: torch.Tensor,
    n_valid: torch.Tensor,
    splits: int | None = None,
) -> torch.Tensor:
    """q [B, N, D]; caches [B, K, T, D] (unit stride on D); bias float [B, T] (0 / -inf); n_valid int
    tensor [1] (keys 0..n_valid-1 are read) -> [B, N, D] in q's dtype."""
    B, N, D = q.shape
    K, T = k_cache.shape[1], k_cache.shape[2]
    G = N // K
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride(), "unit stride on D"
    BLOCK_T = 64
    S = splits or choose_splits(B * K, T, BLOCK_T)
    chunk = -(-(-(-T // S)) // BLOCK_T) * BLOCK_T  # ceil(T / S) rounded up to whole key blocks  # noqa: B002 (nested ceil divisions)
    S = -(-T // chunk)
    BG, BD = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(D))
    m = torch.empty(B * K * S * BG, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B * K * S * BG, BD, dtype=torch.float32, device=q.device)
    bias = bias.to(torch.float32) if bias.dtype not in (torch.float32, q.dtype) else bias
    _split_kernel[(B * K, S)](
        q,
        k_cache,
        v_cache,
        bias,
        n_valid,
        m,
        l,
        acc,
        K,
        G,
        T,
        D,
        chunk,
        1.0 / math.sqrt(D),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        bias.stride(0),
        BLOCK_G=BG,
        BLOCK_T=BLOCK_T,
        BLOCK_D=BD,
    )
    o = torch.empty(B, N, D, dtype=q.dtype, device=q.device)
    _merge_kernel[(B * K, G)](
        m, l, acc, o, G, D, S, o.stride(0), o.stride(1), K, BLOCK_G=BG, BLOCK_S=triton.next_power_of_2(S), BLOCK_D=BD
    )
    return o


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bias: torch.Tensor,
    n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same in plain PyTorch (float32 softmax over the whole cache; n_valid is implied by the
    bias, which must hide keys >= n_valid): q [B, N, D], caches [B, K, T, D], bias [B, T] -> [B, N, D]."""
    B, N, D = q.shape
    K = k_cache.shape[1]
    qg = q.reshape(B, K, N // K, D)
    sc = torch.matmul(qg, k_cache.transpose(-1, -2)).float() / math.sqrt(D) + bias.float()[:, None, None, :]
    p = torch.softmax(sc, dim=-1)
    return torch.matmul(p.to(v_cache.dtype), v_cache).reshape(B, N, D)


def decode_attention_split(q, k_cache, v_cache, bias, n_valid, *, use_triton: bool = True) -> torch.Tensor:
    """Dispatcher: the split kernel on CUDA when Triton imports and `use_triton`, else the fallback."""
    if use_triton and triton_ok(q):
        return decode_attention_triton(q, k_cache, v_cache, bias, n_valid)
    return decode_attention_torch(q, k_cache, v_cache, bias, n_valid)
