"""SwiGLU on a fused gate|up projection: silu(g) * u with [g | u] = x @ [W_gate; W_up]^T.

Computed in float32 and cast back to the input dtype (the reference computes silu and the product in
the activation dtype; the difference is one rounding, inside the bf16 tolerance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import HAVE_TRITON, triton_ok

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_kernel(gu_ptr, y_ptr, stride_gu, stride_y, I, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def swiglu_torch(gu: torch.Tensor) -> torch.Tensor:
    """gu [..., 2I] (gate then up) -> [..., I] in gu.dtype."""
    g, u = gu.float().chunk(2, dim=-1)
    return (F.silu(g) * u).to(gu.dtype)


def swiglu_triton(gu: torch.Tensor) -> torch.Tensor:
    two_i = gu.shape[-1]
    I = two_i // 2
    gu2 = gu.reshape(-1, two_i)
    if gu2.stride(-1) != 1:
        gu2 = gu2.contiguous()
    y = torch.empty(gu2.shape[0], I, dtype=gu.dtype, device=gu.device)
    BLOCK = min(1024, triton.next_power_of_2(I))
    if gu2.shape[0]:
        _swiglu_kernel[(gu2.shape[0], triton.cdiv(I, BLOCK))](gu2, y, gu2.stride(0), y.stride(0), I, BLOCK=BLOCK)
    return y.view(*gu.shape[:-1], I)


def swiglu(gu: torch.Tensor, *, use_triton: bool = True) -> torch.Tensor:
    """silu(gate) * up for gu [..., 2I] = [gate | up] -> [..., I]."""
    if use_triton and triton_ok(gu):
        return swiglu_triton(gu)
    return swiglu_torch(gu)
