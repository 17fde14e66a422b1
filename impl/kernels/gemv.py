"""Matrix-vector products for one decode row (batch 1) with the neighbouring elementwise ops fused in.

y = epilogue(W @ prologue(x)) for x [K], W [N, K] (nn.Linear layout), one Triton program per block of
output rows, streaming W once (decode at batch 1 is bound by reading the weights). Fused, each
optional, with the rounding points of the unfused path (so results match it to one rounding):
  norm     prologue: x -> rms_norm(x) * norm_weight (float32 statistics, cast to the dtype before the
           weight multiply, as impl.kernels.rmsnorm)
  bias     + b[n] in float32 before the one rounding of the product (as cuBLAS' epilogue)
  swiglu   W is [gate; up] [2I, K]: the program computes rows n and I+n, rounds both to the dtype and
           writes silu(g) * u (float32, one rounding) -> y [I]  (as impl.kernels.swiglu)
  residual y = r + round(W x) (the add in float32, one rounding)
Shapes: K in features, N out features, I = N/2 for swiglu.
"""

from __future__ import annotations

import torch

from . import HAVE_TRITON, triton_ok
from .rmsnorm import rms_norm_torch
from .swiglu import swiglu_torch

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        r_ptr,
        nw_ptr,
        y_ptr,
        N_out,
        K,
        half,
        eps,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        NORM: tl.constexpr,
        SWIGLU: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        nmask = ns < N_out
        inv = 1.0
        if NORM:
            ss = tl.full((BLOCK_K,), 0.0, tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_ptr + k0 + ks, mask=k0 + ks < K, other=0.0).to(tl.float32)
                ss += xk * xk
            inv = 1.0 / tl.sqrt(tl.reduce(ss, 0, _add) / K + eps)
        acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
        acc2 = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = k0 + ks < K
            x = tl.load(x_ptr + k0 + ks, mask=kmask, other=0.0)
            if NORM:
                nw = tl.load(nw_ptr + k0 + ks, mask=kmask, other=0.0).to(tl.float32)
                normed = (x.to(tl.float32) * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
                x = (normed * nw).to(x_ptr.dtype.element_ty)
            xf = x.to(tl.float32)[None, :]
            wmask = nmask[:, None] & kmask[None, :]
            w = tl.load(w_ptr + ns[:, None] * K + k0 + ks[None, :], mask=wmask, other=0.0).to(tl.float32)
            acc += w * xf
            if SWIGLU:
                w2 = tl.load(w_ptr + (ns[:, None] + half) * K + k0 + ks[None, :], mask=wmask, other=0.0).to(tl.float32)
                acc2 += w2 * xf
        y = tl.reduce(acc, 1, _add)
        if HAS_BIAS:
            y += tl.load(b_ptr + ns, mask=nmask, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
        if SWIGLU:
            u = tl.reduce(acc2, 1, _add)
            if HAS_BIAS:
                u += tl.load(b_ptr + half + ns, mask=nmask, other=0.0).to(tl.float32)
            u = u.to(y_ptr.dtype.element_ty).to(tl.float32)
            y = y / (1.0 + tl.exp(-y)) * u
        if HAS_RES:
            y += tl.load(r_ptr + ns, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + ns, y.to(y_ptr.dtype.element_ty), mask=nmask)


def _blocks(n_out: int, K: int, swiglu: bool) -> tuple[int, int]:
    """BLOCK_N so that there are >= ~264 programs (2 per SM of an H100) when N allows; BLOCK_K 512
    (256 with swiglu's two accumulators, to stay in registers)."""
    bn = 16
    while bn > 2 and -(-n_out // bn) < 264:
        bn //= 2
    bk = 256 if swiglu else 512
    return bn, bk if K >= bk else triton.next_power_of_2(K)


def gemv_triton(x, w, bias=None, *, residual=None, norm_weight=None, eps: float = 1e-6, swiglu: bool = False):
    """x [1, K] (or [K]), w [N, K] -> [1, N] (or [1, N/2] with swiglu); see the module doc."""
    K = x.shape[-1]
    N = w.shape[0]
    n_out = N // 2 if swiglu else N
    x1 = x.reshape(K)
    assert x1.stride(0) == 1 and w.stride(1) == 1 and w.stride(0) == K, "gemv wants contiguous x and w"
    y = torch.empty(n_out, dtype=x.dtype, device=x.device)
    bn, bk = _blocks(n_out, K, swiglu)
    dummy = x1
    _gemv_kernel[(triton.cdiv(n_out, bn),)](
        x1,
        w,
        bias if bias is not None else dummy,
        residual.reshape(n_out) if residual is not None else dummy,
        norm_weight if norm_weight is not None else dummy,
        y,
        n_out,
        K,
        n_out,
        eps,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        NORM=norm_weight is not None,
        SWIGLU=swiglu,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=8,
    )
    return y.view(1, n_out)


def gemv_torch(x, w, bias=None, *, residual=None, norm_weight=None, eps: float = 1e-6, swiglu: bool = False):
    """The unfused path with the same rounding points: the fallback, and the tests' second formula."""
    if norm_weight is not None:
        x = rms_norm_torch(x, norm_weight, eps)
    y = torch.nn.functional.linear(x, w, bias)
    if swiglu:
        y = swiglu_torch(y)
    return y if residual is None else residual + y


def gemv(
    x,
    w,
    bias=None,
    *,
    residual=None,
    norm_weight=None,
    eps: float = 1e-6,
    swiglu: bool = False,
    use_triton: bool = True,
):
    """Dispatcher: the fused kernel for one CUDA row when Triton imports, else the unfused path."""
    if use_triton and triton_ok(x) and x.numel() == x.shape[-1]:
        return gemv_triton(x, w, bias, residual=residual, norm_weight=norm_weight, eps=eps, swiglu=swiglu)
    return gemv_torch(x, w, bias, residual=residual, norm_weight=norm_weight, eps=eps, swiglu=swiglu)
