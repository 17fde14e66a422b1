"""RMSNorm, the one normalisation both towers use (vision blocks, merger, decoder layers, final norm).

The reference normalises in at least float32, casts back to the input dtype, and only then multiplies
by the weight: in bfloat16 that order decides the rounding, so it is kept here exactly.
"""

from __future__ import annotations

import torch


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the reference upcasts (norms, softmax, rotary): float64 stays float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / sqrt(mean(x^2) + eps)), over the last axis.

    x: [..., C] (any float dtype); weight: [C]. Returns [..., C] in the promoted dtype of x and weight
    (the dtype of x when both share it). Normalised in float32, or float64 when x is float64.
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x has width {x.shape[-1]} but weight has {weight.shape[-1]}")
    h = x.to(work_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)  # cast before the multiply, as the reference does
