"""The quantized lm_head (impl.quant.apply_lm_head_quant): int8 per channel and int4, each against its
dequantized reference; the refusal where int4 cannot run; bytes per decode step; the CLI option."""

import pytest
import torch
import torch.nn as nn
from qwen25vl.impl import quant
from qwen25vl.impl.quant import (
    Int4Linear,
    Int8DynamicLinear,
    Int8Linear,
    apply_lm_head_quant,
    decode_weight_bytes,
    dequantize_int4,
    dequantize_int8,
    fbgemm_available,
    quantize_int4,
    quantize_int8,
)

from .helpers import DEVICE, assert_close, wide_config

# The tolerance stated for a quantized lm_head: its output against x @ w_hat^T in float64 (w_hat the
# dequantized weight, so only the kernel's arithmetic is judged), relative to the largest logit: the
# kernel tolerance of impl's other matmuls (helpers.TOL["kernel"]: 1.6e-2 bfloat16, 4e-6 float32).
DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cpu" else [torch.bfloat16]


def test_int8_formula_error_bound():
    """|w - w_hat| <= scale / 2 in every row; the largest |w| of a row is exact up to float32 rounding."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 64)[:, None]
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (w - dequantize_int8(q, scale)).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert int(q.abs().amax(1).min()) == 127


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_int8_linear_matches_dequantized_reference(dtype, rows):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 96, generator=g).to(DEVICE)
    x = torch.randn(rows, 96, generator=g).to(DEVICE, dtype)
    lin = Int8Linear(w, None, dtype=dtype)
    assert lin.use_kernel, lin.reason  # CPU torch has _weight_int8pack_mm for float32 and bfloat16
    ref = x.double() @ dequantize_int8(lin.q, lin.scale).double().t()
    assert_close(lin(x), ref, dtype, what=f"int8 lm_head {dtype}")


def _w8a8_bound(x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """The activation rounding's worst case per output (impl.quant, "w8a8"): sum_k |w_hat[n, k]| * max|x| / 127,
    plus float32 noise; x [rows, K], w_hat [N, K] -> [rows, N]."""
    s = x.double().abs().amax(-1, keepdim=True)
    return s * w_hat.double().abs().sum(-1) / 127 * (1 + 1e-4) + 1e-5 * s


NEEDS_FBGEMM = pytest.mark.skipif(not fbgemm_available()[0], reason=f"w8a8 needs fbgemm: {fbgemm_available()[1]}")


@NEEDS_FBGEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_within_its_activation_rounding_bound(dtype):
    """Against x @ w_hat^T: inside the stated bound for every output, including a row 1000x smaller
    than its neighbour (each row is quantized at its own resolution), and not exact (activations are
    rounded: the path ran)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3000, 96, generator=g)
    x = torch.randn(3, 96, generator=g) * torch.tensor([[1.0], [1e-3], [30.0]])
    x = x.to(dtype)
    lin = Int8DynamicLinear(w, None, dtype=dtype)
    y = lin(x)
    assert y.dtype == dtype and y.shape == (3, 3000)
    w_hat = dequantize_int8(lin.q, lin.scale)
    ref = x.double() @ w_hat.double().t()
    err = (y.double() - ref).abs()
    slack = 0 if dtype == torch.float32 else ref.abs() * 2**-8  # the output's own rounding to bfloat16
    assert (err <= _w8a8_bound(x, w_hat) + slack).all(), (err / _w8a8_bound(x, w_hat)).amax()
    assert err.amax() > 0
    assert lin.nbytes() == 3000 * 96 + 3000 * 4 and torch.equal(lin.q, quant.quantize_int8(w)[0])


def test_w8a8_refused_without_fbgemm(monkeypatch):
    monkeypatch.setattr(quant, "fbgemm_available", lambda: (False, "this torch has no fbgemm engine"))
    with pytest.raises(ValueError, match="w8a8 needs fbgemm on the CPU: this torch has no fbgemm engine"):
        Int8DynamicLinear(torch.randn(16, 8), None, dtype=torch.float32)


def test_tiny_model_int4_lm_head_refused_int8_taken(tiny_params):
    """Hidden 32 cannot take the int4 kernel: refused, naming the width and the alternative; int8 runs,
    and the model's logits match final-hidden @ w_hat^T."""
    from qwen25vl.impl.model import Qwen25VL

    config, params = tiny_params
    m = Qwen25VL.from_params(config, params, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match=r"int4 lm_head \[152064, 32\].*in_features 32 is not a multiple of 128.*int8"):
        apply_lm_head_quant(m, "int4")
    assert type(m.text.lm_head) is nn.Linear  # nothing changed by the refusal
    with pytest.raises(ValueError, match="must be one of"):
        apply_lm_head_quant(m, "int2")
    before = decode_weight_bytes(m)
    apply_lm_head_quant(m, "int8")
    assert m.quant_report["lm_head"] == "int8"
    with pytest.raises(ValueError, match="already Int8Linear"):
        apply_lm_head_quant(m, "int8")
    # lm_head 152064 x 32 float32 -> int8 + a float32 scale per row: 4x fewer bytes for that matrix
    head = 152064 * 32
    assert before - decode_weight_bytes(m) == head * 4 - (head + 152064 * 4)


@pytest.mark.parametrize(
    "mode",
    [
        "int4",
        "int8",
        pytest.param(
            "w8a8", marks=[NEEDS_FBGEMM, pytest.mark.skipif(DEVICE.type != "cpu", reason="w8a8 is a CPU kernel")]
        ),
    ],
)
def test_lm_head_quant_on_a_model_matches_reference(mode, capsys):
    """Hidden 128, tied embedding, bfloat16: the quantized lm_head's logits within the kernel tolerance
    of final-hidden @ w_hat^T; greedy tokens and KL against the unquantized model reported; the embedding
    table is untouched (the lookup still reads the model-dtype rows)."""
    from qwen25vl.impl.model import Qwen25VL
    from qwen25vl.tools.make_tiny_checkpoint import make_random_params

    cfg = wide_config(tied=True)
    dtype = torch.bfloat16
    params = make_random_params(cfg, 0, torch.float32)
    base = Qwen25VL.from_params(cfg, params, dtype=dtype, device=DEVICE)
    q = Qwen25VL.from_params(cfg, params, dtype=dtype, device=DEVICE)
    apply_lm_head_quant(q, mode)
    head = q.text.lm_head
    assert isinstance(head, {"int4": Int4Linear, "int8": Int8Linear, "w8a8": Int8DynamicLinear}[mode])
    assert torch.equal(q.text.embed, base.text.embed)
    h = torch.randn(4, 128, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    if mode == "int4":
        # the packed layout is opaque: the reference w_hat comes from quantizing the same weight again
        qq, scale, zero = quantize_int4(base.text.lm_head.weight, scale_dtype=dtype)
        w_hat = dequantize_int4(qq, scale, zero)
        assert head.kernel is not None
    else:
        w_hat = dequantize_int8(head.q, head.scale)
    if mode == "w8a8":  # the activations are rounded too: judged by that rounding's bound
        ref = h.double() @ w_hat.double().t()
        assert ((head(h).double() - ref).abs() <= _w8a8_bound(h, w_hat) + ref.abs() * 2**-8).all()
    else:
        assert_close(head(h), h.double() @ w_hat.double().t(), dtype, what=f"{mode} lm_head")
    ids = torch.tensor([list(range(100, 140))])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    a = base.forward(inputs)[0].float()
    b = q.forward(inputs)[0].float()
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(f"\n[{mode} lm_head vs bf16, hidden 128, {DEVICE.type}] KL {kl:.5f} nats, top-1 agreement {top1:.0%}")
    assert kl < (0.05 if mode == "int4" else 0.005)
    ratio = decode_weight_bytes(q) / decode_weight_bytes(base)
    assert ratio < (0.5 if mode == "int4" else 0.65), ratio  # the lm_head is most of this small model


def test_cli_quantize_lm_head(tiny_checkpoint, capsys):
    from qwen25vl.impl.cli import main

    args = ["--checkpoint", str(tiny_checkpoint), "--prompt", "Hi.", "--max-new-tokens", "3", "--device", "cpu"]
    assert main([*args, "--quantize-lm-head", "int8"]) == 0
    err = capsys.readouterr().err
    assert "lm_head int8" in err
    assert main([*args, "--quantize-lm-head", "int4"]) == 2
    err = capsys.readouterr().err
    assert "error: int4 lm_head [152064, 32] has no packed kernel" in err
