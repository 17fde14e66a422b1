"""qwen25vl.impl: the fast path (fused kernels, one-call window attention, KV cache, CUDA graphs, int4)."""

from .model import Qwen25VL

__all__ = ["Qwen25VL"]
