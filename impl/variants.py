"""Decode variants, applied to a built impl.model.Qwen25VL from outside (as quant.apply_int4 is).

The decode step exists once (Qwen25VL.decode -> DecoderLayer.decode -> Attention.decode, MLP).
A variant swaps each layer's `attn` and `mlp` for a subclass that computes the same values with
other kernels; the weights are shared, not copied, and `apply_eager` swaps the plain classes back.

  fused     one row through impl.kernels.gemv: RMSNorm fused into the q|k|v and gate|up products,
            SwiGLU into gate|up, the residual adds into o_proj and down, and the cache write into
            the rotary (bf16 on CUDA: 5 kernels + attention per layer instead of 12). Layers gemv
            cannot take (int4, tensor-parallel) run their own forward with the neighbours unfused;
            more than one row (batch > 1, prefill) runs the plain path.
  compiled  torch.compile of the pieces around attention (norm, q|k|v, rotary, cache write; o_proj +
            residual; the MLP), pure functions with the weights as arguments, so one compilation
            serves every layer. Plain nn.Linear layers only. Attention stays outside (any backend).

Shapes: B batch, C hidden, N heads, K kv heads, D head dim, T cache length.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels.gemv import gemv
from .kernels.rmsnorm import rms_norm, rms_norm_torch
from .kernels.rotary import apply_rotary_cache_, rotary_torch
from .kernels.swiglu import swiglu, swiglu_torch
from .model import MLP, Attention

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def _mv(lin, x, *, residual=None, norm_weight=None, eps: float = 1e-6, act: bool = False, use_triton: bool = True):
    """One row through `lin` with its neighbours: fused by gemv for a plain nn.Linear; otherwise
    (Int4Linear, a tensor-parallel layer) RMSNorm, the layer, SwiGLU and the residual add one by one."""
    if isinstance(lin, nn.Linear):
        return gemv(
            x,
            lin.weight,
            lin.bias,
            residual=residual,
            norm_weight=norm_weight,
            eps=eps,
            swiglu=act,
            use_triton=use_triton,
        )
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps, use_triton=use_triton)
    y = lin(x)
    if act:
        y = swiglu(y, use_triton=use_triton)
    return y if residual is None else residual + y


class FusedAttention(Attention):
    variant = "fused"

    def step_in(self, x, cos, sin, kv, slot):
        if x.shape[0] != 1:
            return super().step_in(x, cos, sin, kv, slot)
        t = self.use_triton
        qkv = _mv(self.qkv, x, norm_weight=self.norm, eps=self.eps, use_triton=t).view(1, -1, self.D)
        return apply_rotary_cache_(qkv, cos, sin, self.N, kv[0], kv[1], slot, use_triton=t)[:, : self.N]

    def step_out(self, x, o):
        if x.dim() != 2 or x.shape[0] != 1:
            return super().step_out(x, o)
        return _mv(self.o_proj, o, residual=x, use_triton=self.use_triton)


class FusedMLP(MLP):
    variant = "fused"

    def forward(self, x):
        if x.dim() != 2 or x.shape[0] != 1:
            return super().forward(x)
        t = self.use_triton
        h = _mv(self.gate_up, x, norm_weight=self.norm, eps=self.eps, act=True, use_triton=t)
        return _mv(self.down, h, residual=x, use_triton=t)


def _step_in(x, cos, sin, kc, vc, slot, norm, w, b, eps: float, N: int, K: int, D: int):
    """Norm, q|k|v, rotary, cache write in plain PyTorch: x [B, C], caches [B, K, T, D] -> q [B, N, D]."""
    qkv = F.linear(rms_norm_torch(x, norm, eps), w, b).view(x.shape[0], -1, D)
    rotary_torch(qkv, cos, sin, N + K)
    kc.index_copy_(2, slot, qkv[:, N : N + K, None])
    vc.index_copy_(2, slot, qkv[:, N + K :, None])
    return qkv[:, :N]


def _step_out(x, o, wo):
    """x [B, C] + o [B, N*D] @ wo^T."""
    return x + F.linear(o, wo)


def _mlp(x, norm, wgu, wd, eps: float):
    """x [B, C] -> x + SwiGLU MLP of norm(x)."""
    return x + F.linear(swiglu_torch(F.linear(rms_norm_torch(x, norm, eps), wgu)), wd)


class CompiledAttention(Attention):
    variant = "compiled"
    fns: dict = {}  # set per model by apply_compiled: {"step_in", "step_out", "mlp"} -> compiled function

    def step_in(self, x, cos, sin, kv, slot):
        b = self.qkv.bias
        return self.fns["step_in"](
            x, cos, sin, *kv, slot, self.norm, self.qkv.weight, b, self.eps, self.N, self.K, self.D
        )

    def step_out(self, x, o):
        if x.dim() != 2:
            return super().step_out(x, o)
        return self.fns["step_out"](x, o, self.o_proj.weight)


class CompiledMLP(MLP):
    variant = "compiled"
    fns: dict = {}

    def forward(self, x):
        if x.dim() != 2:
            return super().forward(x)
        return self.fns["mlp"](x, self.norm, self.gate_up.weight, self.down.weight, self.eps)


def _swap(model, attn_cls, mlp_cls, **attrs) -> None:
    """Replace every layer's attn / mlp by an instance of attn_cls / mlp_cls holding the same weights."""
    for layer in model.text.layers:
        a, m = layer.attn, layer.mlp
        layer.attn = attn_cls(a.norm, a.qkv, a.o_proj, a.N, a.K, a.D, a.eps, a.use_triton)
        layer.mlp = mlp_cls(m.norm, m.gate_up, m.down, m.eps, m.use_triton)
        for k, v in attrs.items():
            setattr(layer.attn, k, v)
            setattr(layer.mlp, k, v)


def apply_eager(model) -> None:
    """Back to the plain layers (Attention, MLP)."""
    _swap(model, Attention, MLP)


def apply_fused(model) -> None:
    """The fused batch-1 decode (see module doc)."""
    _swap(model, FusedAttention, FusedMLP)


def apply_compiled(model, mode: str = "default") -> None:
    """The torch.compile'd decode pieces (see module doc); mode: one of COMPILE_MODES. Compiles lazily,
    at the first decode step (inside generate_tokens' warm-up or CUDA graph capture)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    for layer in model.text.layers:
        for name in ("attn.qkv", "attn.o_proj", "mlp.gate_up", "mlp.down"):
            if not isinstance(layer.get_submodule(name), nn.Linear):
                raise ValueError(
                    f"the compiled decode needs plain nn.Linear layers; layer {layer.i} {name} is "
                    f"{type(layer.get_submodule(name)).__name__} (int4, tensor-parallel and float16-packed layers run "
                    f"eager or fused; build with cpu_fp16_pack=False to compile on the CPU)"
                )
    kw = dict(mode=mode, dynamic=False, fullgraph=True)
    if os.environ.get("ATEN_CPU_CAPABILITY") in ("default", "avx2"):
        # An emulated older CPU (CI's passes). Under "default" ATen dispatches no SIMD kernels, and
        # inductor's C++ must not use at::vec either (its generated code fails to compile). Under "avx2" on
        # an AVX-512 host, inductor's AVX2 code at one thread decoded wrong tokens (torch 2.13, a Xeon with
        # AMX; an AVX2 host is fine). Scalar code gives the same results. torch takes mode or options.
        kw = dict(options={"cpp.simdlen": 1, "max_autotune": "max-autotune" in mode}, dynamic=False, fullgraph=True)
    fns = {k: torch.compile(f, **kw) for k, f in (("step_in", _step_in), ("step_out", _step_out), ("mlp", _mlp))}
    _swap(model, CompiledAttention, CompiledMLP, fns=fns)
