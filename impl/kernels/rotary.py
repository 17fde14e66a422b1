"""Rotary application (rotate-half form) for the text MRoPE and the vision 2-D rotary, in place.

Both rotaries duplicate their angles over the two halves of a head ([a, a], D = 2*H2), so the kernel
takes half-width tables cos, sin [T, D/2] and rotates pairs (i, i + D/2):
  out[:H2] = x[:H2] * cos - x[H2:] * sin,   out[H2:] = x[H2:] * cos + x[:H2] * sin,
computed in float32 and cast back to x's dtype. The MRoPE sectioning (which position axis feeds which
frequency slot) lives in the table, not here. Applied to the first `n_rot` heads of a fused
q|k|v row, so q and k are rotated by one launch and v is left alone.
"""

from __future__ import annotations

import torch

from . import HAVE_TRITON, cpu_c, triton_ok

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotary_kernel(
        x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, n_rot, H2, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        t = tl.program_id(0)
        hs = tl.arange(0, BLOCK_H)[:, None]
        ds = tl.arange(0, BLOCK_D)[None, :]
        mask = (hs < n_rot) & (ds < H2)
        c = tl.load(cos_ptr + t * stride_c + ds, mask=ds < H2, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_c + ds, mask=ds < H2, other=0.0).to(tl.float32)
        p1 = x_ptr + t * stride_t + hs * stride_h + ds
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + H2, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(p1 + H2, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)


def rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int) -> torch.Tensor:
    """Rotate heads [0, n_rot) of x [T, H, D] in place with cos, sin [T, D/2] (float32); returns x."""
    h2 = x.shape[-1] // 2
    xr = x[:, :n_rot].float()
    x1, x2 = xr[..., :h2], xr[..., h2:]
    c, s = cos[:, None, :].float(), sin[:, None, :].float()
    x[:, :n_rot] = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    return x


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int) -> torch.Tensor:
    T, H, D = x.shape
    assert x.stride(2) == 1 and cos.stride(1) == 1 and cos.stride() == sin.stride(), "rotary wants unit stride on D"
    if T:
        _rotary_kernel[(T,)](
            x,
            cos,
            sin,
            x.stride(0),
            x.stride(1),
            cos.stride(0),
            n_rot,
            D // 2,
            BLOCK_H=triton.next_power_of_2(n_rot),
            BLOCK_D=triton.next_power_of_2(D // 2),
        )
    return x


def apply_rotary_(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int, *, use_triton: bool = True
) -> torch.Tensor:
    """In place: x [T, H, D] (heads [0, n_rot) rotated), cos, sin float32 [T, D/2]. Returns x."""
    if use_triton and triton_ok(x):
        return rotary_triton(x, cos, sin, n_rot)
    if use_triton and x.stride(2) == 1 and cos.shape == sin.shape == (x.shape[0], x.shape[2] // 2) and cpu_c.ok(x):
        return cpu_c.rotary_(x, cos, sin, n_rot)
    return rotary_torch(x, cos, sin, n_rot)


if HAVE_TRITON:

    @triton.jit
    def _rotary_cache_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        kc_ptr,
        vc_ptr,
        slot_ptr,
        stride_t,
        stride_h,
        stride_c,
        sc_b,
        sc_h,
        sc_t,
        N,
        K,
        H2,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        b = tl.program_id(0)
        hs = tl.arange(0, BLOCK_H)[:, None]
        ds = tl.arange(0, BLOCK_D)[None, :]
        n_rot = N + K
        mask = (hs < n_rot) & (ds < H2)
        c = tl.load(cos_ptr + b * stride_c + ds, mask=ds < H2, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b * stride_c + ds, mask=ds < H2, other=0.0).to(tl.float32)
        p1 = x_ptr + b * stride_t + hs * stride_h + ds
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + H2, mask=mask, other=0.0).to(tl.float32)
        y1 = (x1 * c - x2 * s).to(x_ptr.dtype.element_ty)
        y2 = (x2 * c + x1 * s).to(x_ptr.dtype.element_ty)
        tl.store(p1, y1, mask=mask)
        tl.store(p1 + H2, y2, mask=mask)
        slot = tl.load(slot_ptr)
        kmask = mask & (hs >= N)  # the rotated k heads -> k cache at slot
        pk = kc_ptr + b * sc_b + (hs - N) * sc_h + slot * sc_t + ds
        tl.store(pk, y1, mask=kmask)
        tl.store(pk + H2, y2, mask=kmask)
        ks = tl.arange(0, BLOCK_K)[:, None]  # v heads are copied unrotated
        vmask = (ks < K) & (ds < H2)
        pv = x_ptr + b * stride_t + (n_rot + ks) * stride_h + ds
        po = vc_ptr + b * sc_b + ks * sc_h + slot * sc_t + ds
        tl.store(po, tl.load(pv, mask=vmask, other=0.0), mask=vmask)
        tl.store(po + H2, tl.load(pv + H2, mask=vmask, other=0.0), mask=vmask)


def rotary_cache_torch(x, cos, sin, n_q: int, k_cache, v_cache, slot):
    """Rotate the q and k heads of x [B, N+2K, D] in place and write k (rotated) and v into
    caches [B, K, T, D] at `slot` (int64 tensor [1]); returns x."""
    K = k_cache.shape[1]
    rotary_torch(x, cos, sin, n_q + K)
    k_cache.index_copy_(2, slot, x[:, n_q : n_q + K, None])
    v_cache.index_copy_(2, slot, x[:, n_q + K :, None])
    return x


def rotary_cache_triton(x, cos, sin, n_q: int, k_cache, v_cache, slot):
    B, H, D = x.shape
    K = k_cache.shape[1]
    assert x.stride(2) == 1 and cos.stride(1) == 1 and cos.stride() == sin.stride(), "rotary wants unit stride on D"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, "caches want the same strides"
    if B:
        _rotary_cache_kernel[(B,)](
            x,
            cos,
            sin,
            k_cache,
            v_cache,
            slot,
            x.stride(0),
            x.stride(1),
            cos.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            n_q,
            K,
            D // 2,
            BLOCK_H=triton.next_power_of_2(n_q + K),
            BLOCK_D=triton.next_power_of_2(D // 2),
            BLOCK_K=triton.next_power_of_2(K),
        )
    return x


def apply_rotary_cache_(x, cos, sin, n_q: int, k_cache, v_cache, slot, *, use_triton: bool = True):
    """Decode step: rotary of q|k plus the cache write of k|v in one kernel on CUDA (else the fallback)."""
    if use_triton and triton_ok(x):
        return rotary_cache_triton(x, cos, sin, n_q, k_cache, v_cache, slot)
    return rotary_cache_torch(x, cos, sin, n_q, k_cache, v_cache, slot)
