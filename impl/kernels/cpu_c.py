"""Kernels in C for the CPU (cpu_c.c): int4 weights x int8 activations (impl.quant's "w4a8") and the
small operations of a decode step that torch runs slowly at batch 1.

Why C:
- No torch, fbgemm or oneDNN operator multiplies 4-bit weights by 8-bit activations on x86. torch's
  int4 CPU kernel converts to float and is compute-bound on AVX2, at 3-6 GB/s (docs/impl.md, CPU).
  `w4a8_matmul` does what llama.cpp's q4_0 x q8_0 dot does: integer block dot products (AVX2 maddubs)
  and one float multiply-add per block of 32.
- At batch 1 a decode step is a few hundred small operations. For one row, torch spends about 30 us on
  an RMSNorm of 512, 40-50 us on a rotary of 8 heads, 50-70 us on SDPA over 448 keys, and 150 us on the
  argmax of 151936 logits: several ATen calls each, every one a dispatch. One C call takes 8, 8, 32 and
  30-40 us, at the rounding points of the torch paths it replaces (tests/impl/test_kernels.py,
  test_attention.py, test_w4a8.py).
- SwiGLU stays in torch: its exp is vectorized there, and a scalar C loop measured no faster (15 us
  against 12-18 us for 1408).

Build: the C source beside this file is compiled once per machine with the system C compiler ($CC,
default cc; -O3 -march=native -fopenmp). The library goes to $QWEN25VL_CACHE/kernels (default
~/.cache/qwen25vl/kernels), keyed by the source, the command and the CPU's model and flags, and is loaded
with ctypes. Without a compiler, `available()` says why: w4a8 is refused with that reason, and the
other kernels fall back to torch after one warning.

The elementwise functions. `ok(x)` says whether they take x: a CPU tensor in float32 or bfloat16, with
the library built. The dispatchers in rmsnorm.py, rotary.py, impl.attention and impl.generate then call:
  rms_norm(x, w, eps)  x [..., C] -> [..., C]      rotary_(x, cos, sin, n_rot)  x [T, H, D] in place
  argmax(x)            x [R, V] -> int64 [R], the greedy pick (impl.generate's decode step)
  decode_attention(q, k_cache, v_cache, bias)  one query per row over the cache (impl.attention, "cpu_c")

The int4 functions (x [M, K] float32 or bfloat16, M <= MAX_ROWS; blocks [N, K/32, 16] uint8 from
`to_blocks`; scale, zero [N, K/G] float32 or bfloat16; K % G == 0, G % 32 == 0):
  available()                -> (True, "") or (False, why: no compiler, the build failed ...)
  build(march, cc)           -> (ctypes library, "") or (None, why); cached per process
  to_blocks(q)               q uint8 [N, K] in 0..15 -> the kernel's layout
  PackedInt4(blocks, scale, zero, G)  the weights checked once; .matmul(x), .dequantize(n0, n1),
                                      .matmul_dequantized(x) (prefill: float32, a slab of rows at a time)
  matmul(x, blocks, scale, zero, G)  -> y [M, N] in x's dtype = x_hat . w_hat^T (the C file's formula)
  dequantize(blocks, scale, zero, G) -> w_hat [N, K] float32
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_c.c")
BLOCK = 32
MAX_ROWS = 8  # the C file's MAX_ROWS: more rows go to dequantize-then-matmul (compute-bound there)
CACHE = Path(os.environ.get("QWEN25VL_CACHE", Path.home() / ".cache" / "qwen25vl")) / "kernels"


def compiler_command(cc: str, march: str, source: Path, out: Path) -> list[str]:
    # fp-contract off: the scalar parts (x's quantization, dequantize) round as written, no fused multiply-adds
    flags = [f"-march={march}", "-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
    return [cc, *flags, str(source), "-o", str(out), "-lm"]


def machine_key() -> bytes:
    """What -march=native compiles for: the CPU's model and feature flags (not its clock, which varies)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    wanted = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(wanted))).encode() or platform.processor().encode()


@cache
def build(march: str = "native", cc: str | None = None) -> tuple[ctypes.CDLL | None, str]:
    """Compile (once per source, compiler, flags and machine) and load the kernel: (library, "") or
    (None, why). cc: the compiler, default $CC or `cc`; march: -march's value ("native": this CPU's
    SIMD; a baseline such as "x86-64" compiles the C file's portable loop instead of its AVX2 one)."""
    cc = cc or os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler: {cc!r} is not on PATH (set CC, or install gcc)"
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(compiler_command(cc, march, SOURCE, Path())).encode())
    key.update(machine_key())
    target = CACHE / f"cpu_c-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            CACHE.mkdir(parents=True, exist_ok=True)
            # built beside the target and renamed into place: concurrent builders never see half a file
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                built = Path(tmp) / target.name
                cmd = compiler_command(cc, march, SOURCE, built)
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if run.returncode:
                    return None, f"compiling {SOURCE.name} failed ({' '.join(cmd)}): {run.stderr.strip()[-500:]}"
                os.replace(built, target)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"compiling {SOURCE.name} into {CACHE} failed: {e}"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"loading {target} failed: {e}"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.w4a8_matmul.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
    lib.w4a8_matmul.restype = ctypes.c_int
    lib.w4_dequantize.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ptr]
    lib.w4_dequantize.restype = None
    lib.rms_norm_rows.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
    lib.rotary_rows.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_int]
    lib.argmax_rows.argtypes = [ptr, i64, i64, ctypes.c_int, ptr]
    lib.decode_attention_rows.argtypes = [ptr, ptr, ptr, ptr, ptr, *[i64] * 8, ctypes.c_int]
    lib.decode_attention_rows.restype = ctypes.c_int
    for fn in (lib.rms_norm_rows, lib.rotary_rows, lib.argmax_rows):
        fn.restype = None
    return lib, ""


def available() -> tuple[bool, str]:
    """Whether the C kernels run here: (True, "") or (False, the reason)."""
    lib, reason = build()
    return lib is not None, reason


def _loaded(march: str) -> ctypes.CDLL:
    lib, reason = build(march)
    if lib is None:
        raise RuntimeError(f"the C kernels (impl.kernels.cpu_c) are unavailable: {reason}")
    return lib


def to_blocks(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] (0..15, K % 32 == 0) -> [N, K/32, 16]: byte j of block b holds column 32b + j in its
    low nibble and 32b + 16 + j in its high one."""
    N, K = q.shape
    halves = q.reshape(N, K // BLOCK, 2, BLOCK // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).contiguous()


FLOATS = (torch.float32, torch.bfloat16)


def _on_cpu(*tensors: torch.Tensor) -> None:
    """C reads raw pointers: a tensor anywhere else would be read as host memory. Refuse it."""
    for t in tensors:
        if not t.is_cpu:
            raise ValueError(f"impl.kernels.cpu_c takes CPU tensors, got one on {t.device}")


class PackedInt4:
    """int4 weights in the kernel's layout, checked once: blocks [N, K/32, 16] uint8 (`to_blocks`), scale
    and zero [N, K/G] float32 or bfloat16, G the group size. Holds the tensors, so the pointers it passes
    stay valid whatever happens to the caller's references."""

    def __init__(self, blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, march="native"):
        self.lib = _loaded(march)
        _on_cpu(blocks, scale, zero)
        N, nb, sixteen = blocks.shape
        K = nb * BLOCK
        if blocks.dtype != torch.uint8 or sixteen != 16 or not blocks.is_contiguous():
            raise ValueError(f"blocks must be contiguous uint8 [N, K/32, 16], got {blocks.dtype} {tuple(blocks.shape)}")
        if group_size % BLOCK or K % group_size or scale.shape != (N, K // group_size) or zero.shape != scale.shape:
            raise ValueError(f"group size {group_size} and scale {tuple(scale.shape)} do not fit K={K}, N={N}")
        if scale.dtype != zero.dtype or scale.dtype not in FLOATS:
            raise ValueError(f"scale and zero must both be float32 or bfloat16, got {scale.dtype} and {zero.dtype}")
        if not (scale.is_contiguous() and zero.is_contiguous()):
            raise ValueError("scale and zero must be contiguous")
        self.N, self.K, self.group_size, self.march = N, K, group_size, march
        self.tensors = (blocks, scale, zero)
        self.args = (
            blocks.data_ptr(),
            scale.data_ptr(),
            zero.data_ptr(),
            N,
            group_size,
            int(scale.dtype == torch.bfloat16),
        )

    def __getstate__(self) -> dict:  # copy and pickle the tensors; the library and pointers are per process
        return {"tensors": self.tensors, "group_size": self.group_size, "march": self.march}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["tensors"], state["group_size"], state["march"])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 or bfloat16 (M <= MAX_ROWS) -> y [M, N] in x's dtype (module doc); no copy of
        x or y is made (the decode path of every w4a8 layer)."""
        _on_cpu(x)
        if x.dtype not in FLOATS or x.dim() != 2 or x.shape[1] != self.K or not 1 <= x.shape[0] <= MAX_ROWS:
            raise ValueError(
                f"x must be float32 or bfloat16 [M <= {MAX_ROWS}, {self.K}], got {x.dtype} {tuple(x.shape)}"
            )
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.N, dtype=x.dtype)
        blocks, s, z, N, G, bf16 = self.args
        x_bf16 = int(x.dtype == torch.bfloat16)
        if self.lib.w4a8_matmul(
            x.data_ptr(), x_bf16, x.shape[0], self.K, blocks, s, z, N, G, bf16, y.data_ptr(), x_bf16
        ):
            raise RuntimeError(f"w4a8_matmul refused x {tuple(x.shape)}, K={self.K}, group size {G}")
        return y

    def dequantize(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        """Rows [n0, n1) of w_hat (default all): float32 [n1 - n0, K] = (q - 8) * scale + zero."""
        n1 = self.N if n1 is None else n1
        if not 0 <= n0 <= n1 <= self.N:
            raise ValueError(f"rows [{n0}, {n1}) are outside the weight's {self.N}")
        w = torch.empty(n1 - n0, self.K, dtype=torch.float32)
        blocks, s, z, N, G, bf16 = self.args
        self.lib.w4_dequantize(blocks, s, z, n0, n1, self.K, G, bf16, w.data_ptr())
        return w

    def matmul_dequantized(self, x: torch.Tensor, slab_bytes: int = 64 * 2**20) -> torch.Tensor:
        """x [M, K] (any M) -> x @ w_hat^T [M, N] in x's dtype, in float32 on the dequantized weight: the
        prefill path, where M rows make the product compute-bound. The weight is dequantized a slab of
        output rows at a time (slab_bytes of float32), so the temporary stays bounded (a 3B lm_head in
        float32 would be 1.2 GB)."""
        _on_cpu(x)
        xf = x.float()
        y = torch.empty(x.shape[0], self.N, dtype=x.dtype)
        rows = max(1, slab_bytes // (4 * self.K))
        for n0 in range(0, self.N, rows):
            n1 = min(self.N, n0 + rows)
            y[:, n0:n1] = xf @ self.dequantize(n0, n1).t()
        return y


def matmul(x, blocks, scale, zero, group_size: int, *, march: str = "native") -> torch.Tensor:
    """One call of `PackedInt4(blocks, scale, zero, group_size).matmul(x)`."""
    return PackedInt4(blocks, scale, zero, group_size, march).matmul(x)


def dequantize(blocks, scale, zero, group_size: int, *, march: str = "native") -> torch.Tensor:
    """One call of `PackedInt4(blocks, scale, zero, group_size).dequantize()`."""
    return PackedInt4(blocks, scale, zero, group_size, march).dequantize()


# ---------------------------------------------------------------- the elementwise neighbours


@cache
def _warn_unavailable() -> None:
    ok, reason = available()
    if not ok:
        warnings.warn(f"impl.kernels.cpu_c is unavailable ({reason}): the CPU runs the torch fallbacks", stacklevel=3)


def ok(x: torch.Tensor) -> bool:
    """Whether the elementwise C kernels take x: a CPU tensor in float32 or bfloat16, the library built
    (a build failure is warned about once, and the torch fallbacks run)."""
    if x.device.type != "cpu" or x.dtype not in FLOATS:
        return False
    if build()[0] is None:
        _warn_unavailable()
        return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """spec.norms.rms_norm for x [..., C] and a contiguous weight [C] of x's dtype (statistics in float32)."""
    _on_cpu(x, weight)
    if weight.dtype != x.dtype or not weight.is_contiguous() or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"rms_norm wants a contiguous weight [{x.shape[-1]}] in {x.dtype}, got {weight.dtype} {tuple(weight.shape)}"
        )
    x = x.contiguous()
    y = torch.empty_like(x)
    bf16 = x.dtype == torch.bfloat16
    C = x.shape[-1]
    _loaded("native").rms_norm_rows(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // C, C, eps, bf16)
    return y


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int) -> torch.Tensor:
    """impl.kernels.rotary.rotary_torch in place: x [T, H, D] (unit stride on D), heads [0, n_rot) rotated
    with cos, sin float32 [T, D/2]. Returns x."""
    _on_cpu(x, cos, sin)
    T, H, D = x.shape
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    if x.stride(2) != 1 or cos.shape != (T, D // 2) or sin.shape != cos.shape or not 0 <= n_rot <= H:
        raise ValueError(
            f"rotary_ wants x [T, H, D] with unit stride on D, cos and sin [T, D/2], n_rot <= H; got x "
            f"{tuple(x.shape)} strides {x.stride()}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, n_rot {n_rot}"
        )
    bf16 = int(x.dtype == torch.bfloat16)
    _loaded("native").rotary_rows(
        x.data_ptr(), cos.data_ptr(), sin.data_ptr(), T, n_rot, D, x.stride(0), x.stride(1), cos.stride(0), bf16
    )
    return x


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [R, V] -> int64 [R]: torch's x.max(-1).indices (the first largest; a NaN counts as the largest)."""
    _on_cpu(x)
    if x.dtype not in FLOATS or x.dim() != 2:
        raise ValueError(f"argmax wants float32 or bfloat16 [R, V], got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _loaded("native").argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.dtype == torch.bfloat16, out.data_ptr())
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [B, N, D], caches [B, K, T, D] (unit stride on D, k and v with the same strides), additive bias
    [B, T] (0 / -inf) -> [B, N, D] in q's dtype: softmax(q k^T / sqrt(D) + bias) v in float32, masked
    keys never read (impl.attention.decode_attention, backend "cpu_c")."""
    _on_cpu(q, k_cache, v_cache, bias)
    B, N, D = q.shape
    K, T = k_cache.shape[1], k_cache.shape[2]
    same = k_cache.dtype == v_cache.dtype == bias.dtype == q.dtype and k_cache.stride() == v_cache.stride()
    if not same or k_cache.stride(3) != 1 or bias.shape != (B, T) or k_cache.shape != (B, K, T, D) or N % K:
        raise ValueError(
            f"cpu_c.decode_attention wants q [B, N, D], caches [B, K, T, D] with unit stride on D and equal "
            f"strides, bias [B, T], one dtype; got q {tuple(q.shape)} {q.dtype}, k {tuple(k_cache.shape)} "
            f"{k_cache.dtype} {k_cache.stride()}, v {v_cache.dtype} {v_cache.stride()}, bias {tuple(bias.shape)} {bias.dtype}"
        )
    q, bias = q.contiguous(), bias.contiguous()
    out = torch.empty_like(q)
    sb, sk, st = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
    ptrs = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), bias.data_ptr(), out.data_ptr())
    if _loaded("native").decode_attention_rows(*ptrs, B, N, K, T, D, sb, sk, st, q.dtype == torch.bfloat16):
        raise RuntimeError(f"decode_attention_rows refused N={N} query heads over K={K} kv heads")
    return out
