"""int4 weight-only quantization of linear layers: group size 128, asymmetric, zero point in the float domain.

Formula (the one the packed kernels are judged against; tinygemm's convention). For each output row n and
each group g of 128 consecutive input columns, with lo, hi the group's min and max:
    scale = (hi - lo) / 15,     zero = lo + 8 * scale             (both rounded to the model dtype)
    q     = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15)   (uint4)
    w_hat = (q - 8) * scale + zero                                  -- `dequantize_int4`
Storage ("plain" packing, documented and device independent): q as uint8 [N, K/2], column 2j in the
high nibble and 2j+1 in the low nibble; scale and zero [N, K/128] in the model dtype.
Runtime kernels (they take their own opaque layout, converted once at load):
  CUDA  torch.ops.aten._weight_int4pack_mm        (tinygemm; bfloat16; K % 128 == 0, N % 8 == 0)
  CPU   torch.ops.aten._weight_int4pack_mm_for_cpu (float32 / bfloat16; K % 128 == 0, N % 16 == 0)
Both take scales_and_zeros [K/128, N, 2] and compute (q - 8) * scale + zero (verified in the tests).
A layer the kernel cannot take keeps the plain packing and runs dequantize-then-matmul; `quantize_model`
warns and lists those layers.

int8 per output channel (the lm_head option where int4's group error costs too much): symmetric,
    scale = max|w[n, :]| / 127 (float32),   q = clamp(round(w / scale), -127, 127) (int8),   w_hat = q * scale
Runtime kernel torch.ops.aten._weight_int8pack_mm (x [M, K] float32 / bfloat16, q [N, K], scale [N] in x's
dtype); where the device has no such kernel, dequantize-then-matmul.

int8 weights and activations ("w8a8", an lm_head option on x86 CPUs): the weights as int8 above; each
input row is scaled to max|x| = 1 and quantized at run time by fbgemm (uint8, 7 bits, one scale and zero
point for the call), the products summed in int32 and rescaled: torch.ops.quantized.linear_dynamic. The
activation rounding adds at most sum_k |w_hat[n, k]| * max|x| / 127 to output n (tested). llama.cpp's
q4_0 / q6_K files quantize their activations the same way (to q8 blocks) for the same reason: integer
dot products are what an AVX2 CPU does fastest.

float16-packed ("fp16 pack", a bfloat16 model's linears on a CPU below AVX512, applied by
`Qwen25VL.from_params`): the weight is held once, as fbgemm's packed float16 matrix
(torch.ops.quantized.linear_prepack_fp16), and y = (x.float() @ w16.float()^T + b.float()).to(bfloat16)
by its AVX2 float16 GEMM with float32 accumulation (linear_dynamic_fp16). Every bfloat16 weight of
magnitude >= 2^-14 is exactly a float16; smaller ones become float16 subnormals (within 2^-25); a
layer holding a weight beyond float16's range (65504) stays as it is. Same bytes as bfloat16, read at
1.4x the speed of torch's bfloat16 GEMV and computed in float32 (docs/impl.md, CPU).

int4 weights and int8 activations ("w4a8", the text layers and the lm_head on a CPU): the weights are
int4's w_hat above, held in blocks of 32 columns (impl.kernels.cpu_c); the rows of a decode step
(at most 8) are quantized in blocks of 32, x_hat = dx * round(x / dx), dx = max|x_block| / 127, and
summed as integers per block (AVX2 maddubs), once in float32 per block: llama.cpp's q4_0 x q8_0 scheme
on int4's groups. The activation rounding adds at most sum_k |w_hat[n, k]| * dx(k) / 2 to output n
(tested). More rows (prefill) run x @ w_hat^T in float32, unquantized. The kernel is C, compiled at
first use with the system compiler (a CPU-only option: needs `cc`; refused with the reason otherwise).

lm_head (`apply_lm_head_quant`, "int4", "int8", "w8a8" or "w4a8"): the vocabulary projection is the largest single
matrix read per decode step (151936 x 2048 for 3B: 0.62 GB in bfloat16). The tied embedding table stays
in the model dtype for the token lookup (one row per token, so the bytes read per token drop by the
lm_head's whole share; the memory held grows by the quantized copy). int4 needs hidden_size % 128 == 0
(true for every released width; the tiny test checkpoint's 32 is refused, int8 takes any width).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import cpu_c

GROUP_SIZE = 128


def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE, scale_dtype: torch.dtype = torch.bfloat16):
    """w [N, K] (K % group_size == 0) -> (q uint8 [N, K] in 0..15, scale [N, K/G], zero [N, K/G] in scale_dtype)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 quantization needs in_features % {group_size} == 0, got in_features {K}")
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(scale_dtype)
    zero = (lo + 8 * scale.float()).to(scale_dtype)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.clamp(torch.round((wg - (z - 8 * s)) / s), 0, 15).to(torch.uint8)
    return q.reshape(N, K), scale, zero


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = GROUP_SIZE
) -> torch.Tensor:
    """The formula: q uint8 [N, K], scale, zero [N, K/G] -> w_hat float32 [N, K] = (q - 8) * scale + zero."""
    N, K = q.shape
    qg = q.float().reshape(N, K // group_size, group_size)
    return ((qg - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(N, K)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] (0..15, K even) -> uint8 [N, K/2]: column 2j in the high nibble, 2j+1 in the low one."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> q uint8 [N, K]; inverse of `pack_int4`."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).reshape(packed.shape[0], -1)


def kernel_for(
    device: torch.device, dtype: torch.dtype, out_features: int, in_features: int, group_size: int = GROUP_SIZE
) -> tuple[str | None, str]:
    """Which packed kernel can run this layer: ('cuda' | 'cpu' | None, reason when None)."""
    if in_features % group_size:
        return None, f"in_features {in_features} is not a multiple of {group_size}"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return None, f"the CUDA int4 kernel takes bfloat16 activations, not {dtype}"
        if out_features % 8:
            return None, f"out_features {out_features} is not a multiple of 8"
        return "cuda", ""
    if device.type == "cpu":
        if dtype not in (torch.float32, torch.bfloat16):
            return None, f"the CPU int4 kernel takes float32 or bfloat16 activations, not {dtype}"
        if out_features % 16:
            return None, f"out_features {out_features} is not a multiple of 16"
        return "cpu", ""
    return None, f"no int4 kernel for device {device.type}"


class QuantizedLinear(nn.Module):
    """What the quantized linears share: y = matmul(x [rows, K]) + bias, reshaped back; bytes of the buffers."""

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # each subclass's kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def nbytes(self) -> int:
        """Bytes of the buffers: the quantized weight and its scales (the bias is a parameter, not counted)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Int4Linear(QuantizedLinear):
    """y = x @ w_hat^T + b with w_hat from `dequantize_int4`; x [..., K] -> [..., N]."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        dtype: torch.dtype,
        group_size: int = GROUP_SIZE,
        allow_fallback: bool = True,
    ):
        super().__init__()
        N, K = weight.shape
        self.in_features, self.out_features, self.group_size = K, N, group_size
        self.kernel, self.reason = kernel_for(weight.device, dtype, N, K, group_size)
        if self.kernel is None and not allow_fallback:
            raise ValueError(f"int4 layer [{N}, {K}] cannot use a packed kernel: {self.reason}")
        pad = (-K) % group_size  # fallback layers are quantized over a zero-padded width
        w = F.pad(weight, (0, pad)) if pad else weight
        q, scale, zero = quantize_int4(w, group_size, dtype)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        if self.kernel == "cuda":
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(pack_int4(q).contiguous(), 8))
        elif self.kernel == "cpu":
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        else:
            self.register_buffer("packed", pack_int4(q))
        if self.kernel is None:
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
        else:
            self.register_buffer("scales_and_zeros", torch.stack((scale.t(), zero.t()), dim=-1).contiguous())

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.kernel == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        if self.kernel == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        w = dequantize_int4(unpack_int4(self.packed), self.scale, self.zero, self.group_size)
        return x2 @ w[:, : self.in_features].to(x2.dtype).t()

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kernel={self.kernel or 'dequant-fallback'}"


class W4A8Linear(QuantizedLinear):
    """y = x_hat @ w_hat^T + b (module doc, "w4a8"): int4's w_hat, x quantized to int8 blocks for up to
    cpu_c.MAX_ROWS rows, float32 x @ w_hat^T for more; x [..., K] -> [..., N]. CPU only, K % 128 == 0."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, dtype: torch.dtype):
        super().__init__()
        N, K = weight.shape
        why = (
            cpu_c.available()[1]
            or (f"the weight is on {weight.device}" if weight.device.type != "cpu" else "")
            or (f"in_features {K} is not a multiple of {GROUP_SIZE}" if K % GROUP_SIZE else "")
        )
        if why:
            raise ValueError(f"w4a8 layer [{N}, {K}] cannot run here: {why}")
        self.in_features, self.out_features, self.group_size = K, N, GROUP_SIZE
        q, scale, zero = quantize_int4(weight, GROUP_SIZE, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        self.register_buffer("blocks", cpu_c.to_blocks(q))
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.packed = cpu_c.PackedInt4(self.blocks, self.scale, self.zero, GROUP_SIZE)  # checked once
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= cpu_c.MAX_ROWS:
            return self.packed.matmul(x2)
        # prefill: compute-bound, where integer blocks would cost more than dequantizing
        return self.packed.matmul_dequantized(x2)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kernel=cpu_c"


INT4_MODES = ("int4", "w4a8")


def quantize_model(model: nn.Module, *, include=lambda name: True, dtype: torch.dtype, mode: str = "int4") -> dict:
    """Swap every nn.Linear whose qualified name passes `include` for an Int4Linear (mode "int4") or a
    W4A8Linear ("w4a8"; a layer it cannot take, K % 128 != 0, becomes an Int4Linear), in place.

    Returns a report {"quantized": [names], "fallback": {name: reason}}; warns once if any layer fell back.
    """
    if mode not in INT4_MODES:
        raise ValueError(f"int4 mode must be one of {INT4_MODES}, got {mode!r}")
    if mode == "w4a8" and not cpu_c.available()[0]:
        raise ValueError(f"w4a8 needs its CPU kernel, which is unavailable: {cpu_c.available()[1]}")
    report = {"quantized": [], "fallback": {}}
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Fp16PackedLinear)) and include(n)]
    for name, lin in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if mode == "w4a8" and lin.weight.device.type == "cpu" and lin.in_features % GROUP_SIZE == 0:
            q = W4A8Linear(lin.weight, lin.bias, dtype=dtype)
        else:
            q = Int4Linear(lin.weight, lin.bias, dtype=dtype)
        setattr(parent, attr, q)
        if isinstance(q, Int4Linear) and q.kernel is None:
            report["fallback"][name] = q.reason
        else:
            report["quantized"].append(name)
    if report["fallback"]:
        names = ", ".join(f"{n} ({r})" for n, r in report["fallback"].items())
        warnings.warn(
            f"int4: {len(report['fallback'])} layer(s) use the dequantize-then-matmul fallback: {names}", stacklevel=2
        )
    return report


def apply_int4(model: nn.Module, mode: str = "int4", *, vision: bool = False) -> dict:
    """Quantize a built impl.model.Qwen25VL from outside: the text decoder's linear layers (q|k|v,
    o, gate|up, down of every layer; embeddings and lm_head stay in the model dtype), and with
    vision=True the vision tower's too. mode: "int4" (weight-only) or "w4a8" (the same weights, int8
    activations at decode; CPU). Stores and returns the report (model.quant_report)."""
    if mode not in INT4_MODES:
        raise ValueError(f"quantize must be one of {INT4_MODES}, got {mode!r}")
    prefixes = ("text.layers.",) + (("visual.",) if vision else ())
    report = quantize_model(model, include=lambda n: n.startswith(prefixes), dtype=model.dtype_, mode=mode)
    model.quant_report = report
    return report


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale float32 [N]); symmetric per output channel (module doc)."""
    wf = w.detach().float()
    scale = (wf.abs().amax(1) / 127).clamp(min=1e-12)
    q = torch.clamp(torch.round(wf / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The formula: q int8 [N, K], scale [N] -> w_hat float32 [N, K] = q * scale."""
    return q.float() * scale.float()[:, None]


def int8_kernel_for(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether torch.ops.aten._weight_int8pack_mm runs here: (True, "") or (False, reason)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False, f"the int8 kernel takes floating activations, not {dtype}"
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", key):
        return False, f"this torch has no _weight_int8pack_mm for device {device.type}"
    return True, ""


class Int8Linear(QuantizedLinear):
    """y = x @ w_hat^T + b with w_hat from `dequantize_int8`; x [..., K] -> [..., N]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, dtype: torch.dtype):
        super().__init__()
        N, K = weight.shape
        self.in_features, self.out_features = K, N
        self.use_kernel, self.reason = int8_kernel_for(weight.device, dtype)
        q, scale = quantize_int8(weight)
        self.register_buffer("q", q.contiguous())
        # the kernel wants the scales in the activation dtype; the fallback keeps them in float32
        self.register_buffer("scale", scale.to(dtype) if self.use_kernel else scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            return torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        return x2 @ dequantize_int8(self.q, self.scale).to(x2.dtype).t()

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} -> {self.out_features}, kernel={'int8pack' if self.use_kernel else 'dequant-fallback'}"
        )


def fbgemm_available() -> tuple[bool, str]:
    """Whether torch's fbgemm quantized CPU kernels run here (x86 builds with AVX2): (True, "") or (False, reason)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False, f"this torch has no fbgemm engine (engines: {torch.backends.quantized.supported_engines})"
    return True, ""


class Int8DynamicLinear(QuantizedLinear):
    """y = dequant(quant(x / s) @ q^T) * s + b, s = max|x| per row (module doc, "w8a8"); x [..., K] -> [..., N].
    CPU only (fbgemm)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, dtype: torch.dtype):
        super().__init__()
        ok, reason = fbgemm_available()
        if not ok or weight.device.type != "cpu":
            raise ValueError(f"w8a8 needs fbgemm on the CPU: {reason or f'the weight is on {weight.device}'}")
        N, K = weight.shape
        self.in_features, self.out_features = K, N
        q, scale = quantize_int8(weight)
        self.register_buffer("scale", scale)
        with warnings.catch_warnings():  # torch deprecates quantized tensors, fbgemm's prepack still takes one
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(N, dtype=torch.int64), 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)  # fbgemm's own layout of q, held once
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @property
    def q(self) -> torch.Tensor:
        """The int8 weight [N, K], unpacked from fbgemm's layout (a copy)."""
        qw, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qw.int_repr()

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        x = x2.float()
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-30)  # one range for every row: per-row resolution
        # reduce_range (7-bit activations): u8 x s8 pairs then cannot saturate fbgemm's int16 sums
        y = torch.ops.quantized.linear_dynamic(x / s, self.packed, True)
        return (y * s).to(x2.dtype)

    def nbytes(self) -> int:
        return self.in_features * self.out_features + self.scale.numel() * self.scale.element_size()

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kernel=fbgemm linear_dynamic"


FP16_MAX = 65504.0


class Fp16PackedLinear(nn.Module):
    """A bfloat16 nn.Linear on the CPU, held as fbgemm's packed float16 matrix and computed in float32
    (module doc, "fp16 pack"); x [..., K] -> [..., N] in x's dtype. `weight` unpacks a copy (slow: for
    code that needs the matrix once, as int4 quantization after the fact does)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.dtype = lin.weight.dtype
        self.bias = lin.bias
        b = None if lin.bias is None else lin.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(lin.weight.detach().float(), b)

    @property
    def weight(self) -> torch.Tensor:
        w, _ = torch.ops.quantized.linear_unpack_fp16(self.packed)
        return w.to(self.dtype)

    def unpacked(self) -> nn.Linear:
        """A plain nn.Linear holding the float16 values in the model dtype, sharing the bias."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight, lin.bias = nn.Parameter(self.weight, requires_grad=False), self.bias
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, shape[-1]).float(), self.packed)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return self.in_features * self.out_features * 2

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kernel=fbgemm float16"


def fp16_pack_wanted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `Qwen25VL.from_params` packs by default: bfloat16 on a CPU below AVX512 (AVX2, default: no
    AVX512-BF16/AMX, oneDNN refuses its bf16 path there and torch's bf16 GEMM was measured 3-6x slower
    than float32) where fbgemm runs."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and not torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        and fbgemm_available()[0]
    )


def apply_fp16_pack(model: nn.Module, on: bool = True, prefixes=("visual", "text.layers", "text.lm_head")) -> int:
    """Every plain nn.Linear under `prefixes` becomes an Fp16PackedLinear (on=True), or every
    Fp16PackedLinear a plain nn.Linear again holding the unpacked float16 values (on=False), in place.
    Layers whose weights exceed float16's range stay. Returns how many changed. A tied lm_head keeps
    the embedding table for the token lookup and holds the packed copy besides (module doc, lm_head)."""
    if on and not fbgemm_available()[0]:
        raise ValueError(f"the float16 pack needs fbgemm: {fbgemm_available()[1]}")
    src = nn.Linear if on else Fp16PackedLinear
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if type(m) is src and any(n == p or n.startswith(p + ".") for p in prefixes)
    ]
    if on:
        targets = [(n, m) for n, m in targets if m.weight.device.type == "cpu" and m.weight.abs().amax() <= FP16_MAX]
    # fbgemm packs at 0.1-0.2 GB/s on one core (about a minute for 3B): one matrix per thread
    # (the op releases the GIL), 1.85x on 2 cores
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        new = list(pool.map(lambda m: Fp16PackedLinear(m) if on else m.unpacked(), [m for _, m in targets]))
    for (name, _), module in zip(targets, new):
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
    return len(targets)


LM_HEAD_MODES = ("int4", "int8", "w8a8", "w4a8")


def apply_lm_head_quant(model: nn.Module, mode: str) -> dict:
    """Quantize a built impl.model.Qwen25VL's lm_head from outside: "int4" (packed kernel only; refused
    when hidden_size % 128 != 0 or N does not suit the kernel), "int8" (per output channel) or "w8a8"
    (int8 weights and activations, fbgemm) or "w4a8" (int4 weights, int8 activations; CPU, hidden_size
    % 128 == 0). The embedding table is left as it is (module doc). Returns
    and stores model.quant_report, with "lm_head"."""
    if mode not in LM_HEAD_MODES:
        raise ValueError(f"lm_head quantization must be one of {LM_HEAD_MODES}, got {mode!r}")
    head = model.text.lm_head
    if type(head) is Fp16PackedLinear:  # the CPU's bfloat16 storage, not a quantization: start from its values
        head = head.unpacked()
    if type(head) is not nn.Linear:
        raise ValueError(f"lm_head is already {type(head).__name__}; quantize it once, from the plain nn.Linear")
    dtype = model.dtype_
    if mode == "int4":
        kernel, reason = kernel_for(head.weight.device, dtype, head.out_features, head.in_features)
        if kernel is None:
            raise ValueError(
                f"int4 lm_head [{head.out_features}, {head.in_features}] has no packed kernel: {reason} "
                f"(the dequantize fallback would read more bytes than bfloat16); use int8 for this model"
            )
        new = Int4Linear(head.weight, head.bias, dtype=dtype, allow_fallback=False)
    elif mode == "w8a8":
        new = Int8DynamicLinear(head.weight, head.bias, dtype=dtype)
    elif mode == "w4a8":
        new = W4A8Linear(head.weight, head.bias, dtype=dtype)
    else:
        new = Int8Linear(head.weight, head.bias, dtype=dtype)
    model.text.lm_head = new
    report = model.quant_report if model.quant_report is not None else {"quantized": [], "fallback": {}}
    report["lm_head"] = mode
    model.quant_report = report
    return report


def decode_weight_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads at batch 1: the text layers' linears and norms, the final norm,
    the lm_head (quantized or not) and one embedding row."""
    text = model.text
    total = linear_weight_bytes(model, "text.layers.") + linear_weight_bytes(model, "text.lm_head")
    norms = [p for n, p in text.named_parameters() if n.endswith("norm") or n == "norm"]
    total += sum(p.numel() * p.element_size() for p in norms)
    return total + text.embed.shape[1] * text.embed.element_size()


def linear_weight_bytes(model: nn.Module, prefix: str = "text.layers.") -> int:
    """Bytes held by the linear layers under `prefix` (weights, packed weights, scales; biases excluded)."""
    total = 0
    for name, m in model.named_modules():
        if not name.startswith(prefix):
            continue
        if isinstance(m, (QuantizedLinear, Fp16PackedLinear)):
            total += m.nbytes()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total
