"""int4 weights x int8 activations on the CPU (impl.kernels.cpu_c, impl.quant.W4A8Linear): the block
layout, the kernel against an integer reference of its own formula (AVX2 and the portable loop), the
activation rounding bound against the unquantized input, the prefill path, the refusals, and a model
decoding with it (layers and lm_head; the CLI)."""

import pytest
import torch
import torch.nn as nn
from qwen25vl.impl import quant
from qwen25vl.impl.kernels import cpu_c
from qwen25vl.impl.quant import (
    GROUP_SIZE,
    Int4Linear,
    W4A8Linear,
    apply_lm_head_quant,
    decode_weight_bytes,
    dequantize_int4,
    quantize_int4,
)

from .helpers import NEEDS_C, wide_config

pytestmark = NEEDS_C  # every test here builds or runs the C kernels

SCALE_DTYPES = [torch.float32, torch.bfloat16]
# the portable C loop, compiled for the x86-64 baseline (no AVX2): what a CPU without AVX2 runs
MARCHES = ["native"] + (["x86-64"] if cpu_c.machine_key() and b"avx2" in cpu_c.machine_key() else [])


def _quantized(N: int, K: int, scale_dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.linspace(0.01, 1.0, N)[:, None]
    q, scale, zero = quantize_int4(w, GROUP_SIZE, scale_dtype)
    return w, q, scale, zero


def _x_hat(x: torch.Tensor) -> torch.Tensor:
    """The C file's activation rounding, in float64: per block of 32, dx = max|x| / 127 and
    round-half-even(x * (127 / max|x|)) in float32."""
    M, K = x.shape
    xb = x.reshape(M, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    # a true float32 division, as C's 127.0f / amax (torch's 127 / t is t.reciprocal() * 127: one more
    # rounding, and x = amax / 2 then misses the tie at 63.5 that C rounds to even)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv).double() * (amax / 127).double()).reshape(M, K)


def test_block_layout():
    """Byte j of block b holds column 32b + j in its low nibble and 32b + 16 + j in its high one."""
    q = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    blocks = cpu_c.to_blocks(q)
    assert blocks.shape == (3, 2, 16) and blocks.dtype == torch.uint8
    for b in range(2):
        for j in range(16):
            assert torch.equal(blocks[:, b, j] & 15, q[:, 32 * b + j])
            assert torch.equal(blocks[:, b, j] >> 4, q[:, 32 * b + 16 + j])


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_dequantize_is_int4_formula(scale_dtype, march):
    """Both evaluate (q - 8) * scale + zero in float32 with two roundings: equal on this machine."""
    _, q, scale, zero = _quantized(40, 384, scale_dtype)
    w = cpu_c.dequantize(cpu_c.to_blocks(q), scale, zero, GROUP_SIZE, march=march)
    assert torch.equal(w, dequantize_int4(q, scale, zero))


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_matmul_is_its_formula(x_dtype, rows, scale_dtype, march):
    """y against x_hat @ w_hat^T in float64 (x_hat: the C file's rounding of x): equal up to float32
    accumulation (and, for bfloat16, the output's one rounding), every output row and every input row
    (each row count is its own compiled instance; 300 rows = 75 tiles of 4, and 2 x 150)."""
    N, K = 302, 640  # N % 4 == 2: the tail rows after the last tile of 4
    _, q, scale, zero = _quantized(N, K, scale_dtype, seed=rows)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(10 + rows))
    x[0, :32] *= 1e-3  # blocks at different resolutions within one row
    x = x.to(x_dtype)
    y = cpu_c.matmul(x, cpu_c.to_blocks(q), scale, zero, GROUP_SIZE, march=march)
    assert y.shape == (rows, N) and y.dtype == x_dtype
    w_hat = dequantize_int4(q, scale, zero).double()
    x_hat = _x_hat(x.float())
    ref = x_hat @ w_hat.t()
    # float32 sums of terms as large as |x_hat| (|w_hat| + 16 |scale|) (the kernel's q * s + (z - 8 s))
    s = scale.double().repeat_interleave(GROUP_SIZE, 1)
    tol = 2e-6 * (x_hat.abs() @ (w_hat.abs() + 16 * s.abs()).t())
    if x_dtype == torch.bfloat16:
        tol = tol + ref.abs() * 2**-8
    assert ((y.double() - ref).abs() <= tol).all(), ((y.double() - ref).abs() / tol).amax()


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_activation_rounding_bound(scale_dtype):
    """Against the unquantized x: within sum_k |w_hat[n, k]| * dx(k) / 2 (plus float32 noise) for every
    output, rows 1000x apart in scale each at their own resolution, not exact (the rounding ran), and a
    zero row gives exactly zero."""
    N, K = 500, 256
    _, q, scale, zero = _quantized(N, K, scale_dtype, seed=3)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(4)) * torch.tensor([[1.0], [1e-3], [30.0], [0.0]])
    y = cpu_c.matmul(x, cpu_c.to_blocks(q), scale, zero, GROUP_SIZE).double()
    w_hat = dequantize_int4(q, scale, zero).double()
    ref = x.double() @ w_hat.t()
    dx = x.reshape(4, K // 32, 32).abs().amax(-1).double() / 127
    bound = (dx.repeat_interleave(32, 1) / 2) @ w_hat.abs().t()
    noise = 2e-6 * (x.double().abs() @ (w_hat.abs() + 16 * scale.double().abs().repeat_interleave(GROUP_SIZE, 1)).t())
    err = (y - ref).abs()
    assert (err <= bound * (1 + 1e-3) + noise).all(), (err / (bound + noise)).amax()
    assert err[:3].amax() > 0
    assert torch.equal(y[3], torch.zeros(N, dtype=torch.float64))
    x[1, 40] = float("nan")  # block 1 of row 1: its outputs are NaN, as a float matmul's would be
    y = cpu_c.matmul(x, cpu_c.to_blocks(q), scale, zero, GROUP_SIZE)
    assert y[1].isnan().all() and not y[[0, 2, 3]].isnan().any()


def test_kernel_refuses_out_of_contract_inputs():
    _, q, scale, zero = _quantized(16, 256, torch.float32)
    blocks = cpu_c.to_blocks(q)
    with pytest.raises(
        ValueError, match=r"x must be float32 or bfloat16 \[M <= 8, 256\], got torch.float32 \(9, 256\)"
    ):
        cpu_c.matmul(torch.randn(9, 256), blocks, scale, zero, GROUP_SIZE)
    with pytest.raises(ValueError, match=r"x must be float32 or bfloat16 .*got torch.float64"):
        cpu_c.matmul(torch.randn(1, 256).double(), blocks, scale, zero, GROUP_SIZE)
    with pytest.raises(ValueError, match=r"blocks must be contiguous uint8 \[N, K/32, 16\]"):
        cpu_c.matmul(torch.randn(1, 256), blocks.int(), scale, zero, GROUP_SIZE)
    with pytest.raises(ValueError, match="group size 64 and scale"):
        cpu_c.matmul(torch.randn(1, 256), blocks, scale, zero, 64)
    with pytest.raises(ValueError, match="scale and zero must both be float32 or bfloat16"):
        cpu_c.matmul(torch.randn(1, 256), blocks, scale.half(), zero.half(), GROUP_SIZE)


def test_build_failures_name_the_cause(tmp_path):
    lib, why = cpu_c.build("native", str(tmp_path / "no-such-cc"))
    assert lib is None and "no C compiler" in why and "no-such-cc" in why
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: fatal error: no input files' >&2\nexit 1\n")
    failing.chmod(0o755)
    lib, why = cpu_c.build("native", str(failing))
    assert lib is None and "compiling cpu_c.c failed" in why and "fatal error" in why


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_decode_and_prefill_rows(dtype):
    """Up to 8 rows through the kernel (its formula), more through float32 x @ w_hat^T; the bias added;
    the weights' bytes: int4 plus a scale and zero per group of 128."""
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(96, 256, generator=g), torch.randn(96, generator=g)
    lin = W4A8Linear(w, b, dtype=dtype)
    qq, scale, zero = quantize_int4(w, GROUP_SIZE, dtype)
    w_hat = dequantize_int4(qq, scale, zero).double()
    out_round = 2**-8 if dtype == torch.bfloat16 else 1e-6
    for rows in (1, 8, 20):
        x = torch.randn(2, rows // 2 or 1, 256, generator=g).to(dtype) if rows > 1 else torch.randn(1, 256).to(dtype)
        y = lin(x)
        assert y.shape == (*x.shape[:-1], 96) and y.dtype == dtype
        x2 = x.reshape(-1, 256)
        xin = _x_hat(x2.float()) if x2.shape[0] <= cpu_c.MAX_ROWS else x2.double()
        prod = (xin @ w_hat.t()).reshape(y.shape)
        ref = prod + b.to(dtype).double()
        # the product's rounding to the dtype, then the bias add's; float32 sums
        tol = out_round * (prod.abs() + ref.abs()) + 1e-5 * (xin.abs() @ w_hat.abs().t()).reshape(y.shape)
        assert ((y.double() - ref).abs() <= tol).all(), rows
    assert lin.nbytes() == 96 * 256 // 2 + 2 * 96 * 2 * (2 if dtype == torch.bfloat16 else 4)
    # the prefill path in slabs of 7 rows (the last one short): the float32 product, within its rounding
    x = torch.randn(20, 256, generator=g).to(dtype)
    ref = x.double() @ w_hat.t()
    slabs = lin.packed.matmul_dequantized(x, slab_bytes=7 * 256 * 4).double()
    assert ((slabs - ref).abs() <= out_round * ref.abs() + 1e-5 * (x.double().abs() @ w_hat.abs().t())).all()
    assert torch.equal(lin.packed.dequantize(90, 96), lin.packed.dequantize()[90:])
    with pytest.raises(ValueError, match=r"rows \[90, 97\) are outside the weight's 96"):
        lin.packed.dequantize(90, 97)


def test_linear_survives_deepcopy_and_pickle():
    """The ctypes library and raw pointers are not copied: a copy rebuilds them over its own tensors."""
    import copy
    import pickle

    lin = W4A8Linear(torch.randn(64, 128), torch.randn(64), dtype=torch.bfloat16)
    x = torch.randn(3, 128).bfloat16()
    for twin in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert twin.packed.tensors[0].data_ptr() != lin.packed.tensors[0].data_ptr()
        assert twin.packed.tensors[0].data_ptr() == twin.blocks.data_ptr()  # the copy's own buffer
        assert torch.equal(twin(x), lin(x))


def test_linear_refusals(monkeypatch):
    with pytest.raises(ValueError, match=r"w4a8 layer \[16, 96\] cannot run here: in_features 96 is not a multiple"):
        W4A8Linear(torch.randn(16, 96), None, dtype=torch.float32)
    monkeypatch.setattr(cpu_c, "available", lambda: (False, "no C compiler: 'cc' is not on PATH"))
    with pytest.raises(ValueError, match="cannot run here: no C compiler"):
        W4A8Linear(torch.randn(16, 128), None, dtype=torch.float32)
    with pytest.raises(ValueError, match="w4a8 needs its CPU kernel, which is unavailable: no C compiler"):
        quant.quantize_model(nn.Sequential(nn.Linear(128, 16)), dtype=torch.float32, mode="w4a8")
    with pytest.raises(ValueError, match="int4 mode must be one of"):
        quant.quantize_model(nn.Sequential(nn.Linear(128, 16)), dtype=torch.float32, mode="int3")


def test_model_decodes_with_w4a8(capsys):
    """Layers and lm_head in w4a8 against the same weights in int4 (weight-only): every text linear
    takes the kernel, the logits stay close (KL reported), greedy decoding runs, the bytes per decode
    step are int4's, and the fused decode variant gives the same tokens."""
    from qwen25vl.impl.model import Qwen25VL
    from qwen25vl.impl.variants import apply_fused
    from qwen25vl.tools.make_tiny_checkpoint import make_random_params

    cfg = wide_config(tied=True)
    params = make_random_params(cfg, 0, torch.float32)
    dtype = torch.bfloat16
    kw = dict(dtype=dtype, device="cpu", cpu_fp16_pack=False)
    int4 = Qwen25VL.from_params(cfg, params, quantize="int4", **kw)
    w4a8 = Qwen25VL.from_params(cfg, params, quantize="w4a8", **kw)
    apply_lm_head_quant(int4, "int4")
    apply_lm_head_quant(w4a8, "w4a8")
    assert len(w4a8.quant_report["quantized"]) == 4 * cfg.num_hidden_layers and not w4a8.quant_report["fallback"]
    linears = [m for n, m in w4a8.named_modules() if n.rpartition(".")[2] in ("qkv", "o_proj", "gate_up", "down")]
    text_linears = linears[-4 * cfg.num_hidden_layers :]  # after the vision tower's, which stay as they are
    assert all(type(m) is W4A8Linear for m in text_linears), [type(m).__name__ for m in text_linears]
    assert type(w4a8.text.lm_head) is W4A8Linear and w4a8.quant_report["lm_head"] == "w4a8"
    # 6 positions: every linear and the lm_head see at most 8 rows, so the forward runs the kernel
    short = torch.tensor([list(range(100, 106))])
    a = int4.forward({"input_ids": short, "attention_mask": torch.ones_like(short)})[0]
    b = w4a8.forward({"input_ids": short, "attention_mask": torch.ones_like(short)})[0]
    la, lb = a.float().log_softmax(-1), b.float().log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1).mean().item()
    with capsys.disabled():
        print(f"\n[w4a8 vs int4, hidden 128, 6 positions] KL {kl:.5f} nats")
    assert 0 < kl < 0.01
    ids = torch.tensor([list(range(100, 130))])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = w4a8.generate_from_inputs(inputs, 6, [0], ignore_eos=True)
    assert tokens.shape == (1, 6)
    assert decode_weight_bytes(w4a8) == decode_weight_bytes(int4)
    apply_fused(w4a8)
    assert torch.equal(w4a8.generate_from_inputs(inputs, 6, [0], ignore_eos=True), tokens)


def test_cli_w4a8(tiny_checkpoint, capsys):
    """--quantize w4a8 on the tiny checkpoint (hidden 32): every layer is an int4 fallback, said once,
    and it runs; --quantize-lm-head w4a8 is refused naming the width."""
    from qwen25vl.impl.cli import main

    args = ["--checkpoint", str(tiny_checkpoint), "--prompt", "Hi.", "--max-new-tokens", "3", "--device", "cpu"]
    with pytest.warns(UserWarning, match="int4: 8 layer"):
        assert main([*args, "--quantize", "w4a8"]) == 0
    assert ", w4a8)" in capsys.readouterr().err
    assert main([*args, "--quantize-lm-head", "w4a8"]) == 2
    assert "error: w4a8 layer [152064, 32] cannot run here: in_features 32 is not a multiple of 128" in (
        capsys.readouterr().err
    )


def test_int4_layers_unchanged_by_w4a8_mode():
    """A layer w4a8 cannot take (in_features % 128) becomes the int4 layer it was before."""
    model = nn.Sequential(nn.Linear(96, 16), nn.Linear(128, 16))
    with pytest.warns(UserWarning, match="1 layer"):
        report = quant.quantize_model(model, dtype=torch.float32, mode="w4a8")
    assert type(model[0]) is Int4Linear and type(model[1]) is W4A8Linear
    assert report["quantized"] == ["1"] and "0" in report["fallback"]
