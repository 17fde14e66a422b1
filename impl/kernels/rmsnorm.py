"""RMSNorm as one Triton program per row.

y = weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype): the cast to the input dtype comes before
the multiply by the weight, as in the reference (Qwen2 RMSNorm).
"""

from __future__ import annotations

import torch

from ...spec.norms import rms_norm as rms_norm_torch  # the fallback: spec's formula is already the fast one
from . import HAVE_TRITON, cpu_c, triton_ok

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, C, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        # tl.reduce with our own combine rather than tl.sum: tl.sum is a jit function of triton's library, and
        # under the interpreter it only works if triton itself was imported with TRITON_INTERPRET=1
        inv = 1.0 / tl.sqrt(tl.reduce(x * x, 0, _add) / C + eps)
        normed = (x * inv).to(y_ptr.dtype.element_ty)
        # the bf16*bf16 product is exact in float32, so one rounding here equals the reference's
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, (normed.to(tl.float32) * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, weight, y, x2.stride(0), y.stride(0), C, eps, BLOCK=triton.next_power_of_2(C)
        )
    return y.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, use_triton: bool = True) -> torch.Tensor:
    """RMSNorm over the last dim. x [..., C], weight [C] (same dtype as x) -> [..., C]."""
    if use_triton and triton_ok(x):
        return rms_norm_triton(x, weight, eps)
    if use_triton and weight.dtype == x.dtype and weight.is_contiguous() and cpu_c.ok(x):
        return cpu_c.rms_norm(x, weight, eps)
    return rms_norm_torch(x, weight, eps)
