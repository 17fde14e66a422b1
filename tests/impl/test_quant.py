"""int4 weight-only quantization: the formula, the packing, the kernels against the formula, the
fallback for widths the kernels cannot take, and the effect on a small model (KL, top-1)."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from qwen25vl.impl.quant import (
    GROUP_SIZE,
    Int4Linear,
    dequantize_int4,
    kernel_for,
    linear_weight_bytes,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

from .helpers import DEVICE, assert_close, vision_inputs, wide_config

KERNEL_DTYPES = [torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32, torch.bfloat16]


def test_formula_by_hand():
    """One group 0..127 / 127 * 15: lo 0, hi 15, scale 1, zero 8 -> q = round(w), w_hat = q."""
    w = (torch.arange(128, dtype=torch.float32) / 127 * 15)[None]
    q, scale, zero = quantize_int4(w, 128, torch.float32)
    assert scale.item() == 1.0 and zero.item() == 8.0
    assert torch.equal(q[0].long(), torch.round(w[0]).long())
    assert torch.equal(dequantize_int4(q, scale, zero), torch.round(w))


def test_packing_layout():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x12, 0xF0]]  # column 2j high nibble, 2j+1 low nibble
    assert torch.equal(unpack_int4(pack_int4(q)), q)


@given(N=st.integers(1, 20), groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_quantize_error_bound(N, groups, seed):
    """|w - w_hat| <= scale / 2 (+ rounding of scale/zero) everywhere; q in 0..15; pack round trip."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, groups * GROUP_SIZE, generator=g) * torch.rand(N, 1, generator=g) * 3
    q, scale, zero = quantize_int4(w, GROUP_SIZE, torch.float32)
    assert q.max() <= 15
    err = (dequantize_int4(q, scale, zero) - w).abs().view(N, groups, GROUP_SIZE).amax(-1)
    assert (err <= scale * 0.5 + 1e-5).all()
    assert torch.equal(unpack_int4(pack_int4(q)), q)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@given(
    M=st.integers(1, 9), n16=st.integers(1, 6), groups=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 2**16)
)
def test_kernel_matches_formula(dtype, M, n16, groups, bias, seed):
    """The packed kernel (CPU: _weight_int4pack_mm_for_cpu, CUDA: _weight_int4pack_mm) equals
    x @ dequantize_int4(...)^T + b in float64, within the activation dtype's kernel tolerance."""
    g = torch.Generator().manual_seed(seed)
    N, K = 16 * n16, groups * GROUP_SIZE
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    lin = Int4Linear(w.to(DEVICE), None if b is None else b.to(DEVICE), dtype=dtype)
    assert lin.kernel == DEVICE.type
    x = torch.randn(M, K, generator=g).to(dtype)
    q, scale, zero = quantize_int4(w, GROUP_SIZE, dtype)
    ref = x.double() @ dequantize_int4(q, scale, zero).double().T
    if b is not None:
        ref = ref + b.to(dtype).double()
    assert_close(lin(x.to(DEVICE)), ref, dtype, kind="kernel" if dtype == torch.float32 else "stage", what="int4 mm")


def test_cpu_kernel_zero_point_convention():
    """_weight_int4pack_mm_for_cpu reads scales_and_zeros as (q - 8) * scale + zero (float offset),
    not (q - zero) * scale: a hand example with q = 0 and q = 15 in one group."""
    K, N = 128, 16
    q = torch.zeros(N, K, dtype=torch.int32)
    q[:, 1] = 15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scale, zero = torch.full((1, N), 2.0), torch.full((1, N), 3.0)
    x = torch.zeros(1, K)
    x[0, 0], x[0, 1] = 1.0, 1.0
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, torch.stack([scale, zero], -1))
    # column 0: (0 - 8) * 2 + 3 = -13; column 1: (15 - 8) * 2 + 3 = 17; sum 4
    assert torch.allclose(y, torch.full((1, N), 4.0))


@pytest.mark.parametrize(
    "shape,reason",
    [((20, 256), "out_features 20 is not a multiple of 16"), ((32, 200), "in_features 200 is not a multiple of 128")],
)
def test_fallback_layer(shape, reason):
    if DEVICE.type == "cuda" and "out_features" in reason:
        shape, reason = (12, 256), "out_features 12 is not a multiple of 8"
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    w = torch.randn(*shape)
    lin = Int4Linear(w.to(DEVICE), None, dtype=dtype)
    assert lin.kernel is None and lin.reason == reason
    x = torch.randn(3, shape[1]).to(dtype)
    pad = (-shape[1]) % 128
    q, s, z = quantize_int4(torch.nn.functional.pad(w, (0, pad)), 128, dtype)
    ref = x.double() @ dequantize_int4(q, s, z)[:, : shape[1]].double().T
    assert_close(lin(x.to(DEVICE)), ref, dtype, kind="kernel" if dtype == torch.float32 else "stage")
    with pytest.raises(ValueError, match=reason):
        Int4Linear(w, None, dtype=torch.float32, allow_fallback=False)


def test_kernel_for_refuses_dtypes():
    assert kernel_for(torch.device("cpu"), torch.float16, 16, 128)[0] is None
    assert "bfloat16" in kernel_for(torch.device("cuda"), torch.float32, 16, 128)[1]


def _kl_top1(a, b):
    a, b = a.float().log_softmax(-1), b.float().log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1)
    return kl.mean().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def test_tiny_model_int4_falls_back_and_says_so(tiny_params):
    """Tiny hidden 32 < group 128: every text linear falls back, one warning lists them."""
    from qwen25vl.impl.model import Qwen25VL

    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    with pytest.warns(UserWarning, match=r"int4: 8 layer\(s\) use the dequantize-then-matmul fallback"):
        m = Qwen25VL.from_params(*tiny_params, dtype=dtype, device=DEVICE, quantize="int4")
    assert m.quant_report["quantized"] == []
    assert m.quant_report["fallback"]["text.layers.0.attn.qkv"] == "in_features 32 is not a multiple of 128"


def test_int4_model_kl_and_memory(capsys):
    """On a widened tiny model: all text linears packed, logits close to the unquantized model's
    (KL reported), linear-weight memory <= 0.3x of the same model in bfloat16."""
    from qwen25vl.impl.model import Qwen25VL
    from qwen25vl.tools.make_tiny_checkpoint import make_random_params

    cfg = wide_config()
    params = make_random_params(cfg, 0, torch.float32)
    dtype = torch.bfloat16
    inputs = vision_inputs(cfg, [list(range(100, 130)), list(range(200, 220))], [(0, (1, 8, 8))], [], seed=1)
    base = Qwen25VL.from_params(cfg, params, dtype=dtype, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer may fall back here
        q4 = Qwen25VL.from_params(cfg, params, dtype=dtype, device=DEVICE, quantize="int4")
    assert len(q4.quant_report["quantized"]) == 4 * cfg.num_hidden_layers
    mask = inputs["attention_mask"].bool()
    a, b = base.forward(inputs)[0].cpu()[mask], q4.forward(inputs)[0].cpu()[mask]
    kl, top1 = _kl_top1(a, b)
    with capsys.disabled():
        print(f"\n[int4 vs bf16, widened tiny model, {DEVICE.type}] KL {kl:.4f} nats, top-1 agreement {top1:.2%}")
    assert kl < 0.1
    ratio = linear_weight_bytes(q4) / linear_weight_bytes(base)
    assert ratio <= 0.3, ratio
