"""Fused Triton kernels with plain-PyTorch fallbacks.

Each kernel module exposes three functions: `<op>_torch` (the fallback, plain PyTorch),
`<op>_triton` (the Triton launcher; CUDA tensors, or CPU tensors when the module was imported with
TRITON_INTERPRET=1, which is how the tests run it on CPU) and `<op>` (the dispatcher: Triton on CUDA
when Triton is importable and `use_triton` is on; on the CPU, with `use_triton` on, the C kernels of
cpu_c.py where they built (RMSNorm, rotary); else the fallback). cpu_c.py also holds the
w4a8 int4 x int8 matmul (impl.quant).
"""

from __future__ import annotations

try:  # Triton is optional: CPU-only installs run the fallbacks.
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CI has triton
    HAVE_TRITON = False


def triton_ok(x) -> bool:
    """True when a Triton kernel can run on tensor `x` (CUDA tensor and Triton importable)."""
    return HAVE_TRITON and x.is_cuda
