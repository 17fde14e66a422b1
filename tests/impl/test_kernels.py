"""Each Triton kernel (interpreted on the CPU, compiled on CUDA), its C kernel for the CPU where it has
one (impl.kernels.cpu_c: RMSNorm, rotary) and its PyTorch fallback against a float64 formula from spec,
over random shapes, in float32 and bfloat16 (tolerance: helpers.TOL); the C kernels against the
fallbacks they stand in for."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from qwen25vl.impl.kernels import cpu_c  # no Triton in it: the installed module (the dispatchers' own)
from qwen25vl.spec.mrope import apply_mrope, mrope_cos_sin
from qwen25vl.spec.norms import rms_norm as spec_rms_norm
from qwen25vl.spec.windows import apply_vision_rotary, vision_rotary_cos_sin

from .helpers import DEVICE, NEEDS_C, assert_close, kernel_module

rmsnorm, rotary, swiglu = (kernel_module(n) for n in ("rmsnorm", "rotary", "swiglu"))
DTYPES = [torch.float32, torch.bfloat16]
RMS_NORM = {"triton": rmsnorm.rms_norm_triton, "torch": rmsnorm.rms_norm_torch, "c": cpu_c.rms_norm}
ROTARY = {"triton": rotary.rotary_triton, "torch": rotary.rotary_torch, "c": cpu_c.rotary_}


def _device(impl: str) -> torch.device:
    return torch.device("cpu") if impl == "c" else DEVICE


def _rand(shape, seed, dtype, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["triton", "torch", pytest.param("c", marks=NEEDS_C)])
@given(rows=st.integers(0, 9), width=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_rms_norm(dtype, impl, rows, width, seed):
    x, w = _rand((rows, width), seed, dtype, 3.0), _rand((width,), seed + 1, dtype)
    y = RMS_NORM[impl](x.to(_device(impl)), w.to(_device(impl)), 1e-6)
    assert y.dtype == dtype
    assert_close(y, spec_rms_norm(x.double(), w.double(), 1e-6), dtype, what="rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["triton", "torch", pytest.param("c", marks=NEEDS_C)])
@given(
    B=st.integers(1, 3),
    L=st.integers(1, 7),
    kv=st.integers(1, 3),
    groups=st.integers(1, 4),
    sections=st.sampled_from([(2, 3, 3), (16, 24, 24), (1, 1, 2)]),
    seed=st.integers(0, 2**16),
)
def test_mrope_rotary(dtype, impl, B, L, kv, groups, sections, seed):
    """MRoPE on the q and k heads of a fused q|k|v buffer; v must come back untouched."""
    D, N = 2 * sum(sections), kv * groups
    pos = torch.randint(0, 5000, (3, B, L), generator=torch.Generator().manual_seed(seed))
    cos, sin = mrope_cos_sin(pos, head_dim=D, theta=1e6, mrope_section=sections)  # float64 [B, L, D]
    qkv = _rand((B * L, N + 2 * kv, D), seed, dtype)
    dev = _device(impl)
    half = lambda t: t[..., : D // 2].reshape(B * L, D // 2).float().to(dev)  # noqa: E731
    out = ROTARY[impl](qkv.clone().to(dev), half(cos), half(sin), N + kv).cpu()
    q = qkv[:, :N].double().view(B, L, N, D).transpose(1, 2)
    k = qkv[:, N : N + kv].double().view(B, L, kv, D).transpose(1, 2)
    q_ref, k_ref = apply_mrope(q, k, cos, sin)
    assert_close(out[:, :N].view(B, L, N, D).transpose(1, 2), q_ref, dtype, what="q")
    assert_close(out[:, N : N + kv].view(B, L, kv, D).transpose(1, 2), k_ref, dtype, what="k")
    assert torch.equal(out[:, N + kv :], qkv[:, N + kv :])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["triton", "torch", pytest.param("c", marks=NEEDS_C)])
@given(P=st.integers(0, 40), N=st.integers(1, 3), D=st.sampled_from([8, 16, 80]), seed=st.integers(0, 2**16))
def test_vision_rotary(dtype, impl, P, N, D, seed):
    pos = torch.randint(0, 200, (P, 2), generator=torch.Generator().manual_seed(seed))
    cos, sin = vision_rotary_cos_sin(pos, D)  # float64 [P, D]
    qkv = _rand((P, 3 * N, D), seed, dtype)
    dev = _device(impl)
    out = ROTARY[impl](
        qkv.clone().to(dev), cos[:, : D // 2].float().to(dev), sin[:, : D // 2].float().to(dev), 2 * N
    ).cpu()
    assert_close(out[:, :N], apply_vision_rotary(qkv[:, :N].double(), cos, sin), dtype, what="q")
    assert_close(out[:, N : 2 * N], apply_vision_rotary(qkv[:, N : 2 * N].double(), cos, sin), dtype, what="k")
    assert torch.equal(out[:, 2 * N :], qkv[:, 2 * N :])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@given(rows=st.integers(0, 6), I=st.integers(1, 2100), seed=st.integers(0, 2**16))
def test_swiglu(dtype, impl, rows, I, seed):
    gu = _rand((rows, 2 * I), seed, dtype, 2.0)
    fn = swiglu.swiglu_triton if impl == "triton" else swiglu.swiglu_torch
    y = fn(gu.to(DEVICE))
    g, u = gu.double().chunk(2, -1)
    assert_close(y, F.silu(g) * u, dtype, what="swiglu")


@pytest.mark.parametrize("impl", ["triton", pytest.param("c", marks=NEEDS_C)])
def test_rotary_strided_rows(impl):
    """The kernel honours row strides: a [T, H, D] view cut out of a wider buffer."""
    buf = _rand((5, 7, 16), 0, torch.float32)
    view = buf[:, 1:5]  # rows of stride 7*16, heads 1..4
    cos, sin = _rand((5, 8), 1, torch.float32), _rand((5, 8), 2, torch.float32)
    expected = rotary.rotary_torch(view.clone(), cos, sin, 3)
    dev = _device(impl)
    b = buf.clone().to(dev)
    ROTARY[impl](b[:, 1:5], cos.to(dev), sin.to(dev), 3)
    assert_close(b[:, 1:5].cpu(), expected, torch.float32)
    assert torch.equal(b[:, 0].cpu(), buf[:, 0]) and torch.equal(b[:, 5:].cpu(), buf[:, 5:])


@NEEDS_C
@pytest.mark.parametrize("dtype", DTYPES)
def test_c_kernels_round_where_the_fallbacks_do(dtype):
    """Rotary: the same float32 products and sums, so equal to the fallback bit for bit. RMSNorm: its sum
    of squares is added in another order (double), so within a few float32 roundings of the fallback,
    and in bfloat16 within one unit and equal for nearly every element."""
    qkv = _rand((9, 12, 128), 3, dtype)
    cos, sin = _rand((9, 64), 4, torch.float32), _rand((9, 64), 5, torch.float32)
    assert torch.equal(cpu_c.rotary_(qkv.clone(), cos, sin, 10), rotary.rotary_torch(qkv.clone(), cos, sin, 10))
    x, w = _rand((37, 2048), 6, dtype, 3.0), _rand((2048,), 7, dtype)
    c, t = cpu_c.rms_norm(x, w, 1e-6), rmsnorm.rms_norm_torch(x, w, 1e-6)
    # bfloat16: one unit in the last place; float32: a few roundings of the statistics (sum order, rsqrt)
    rel = 2**-7 if dtype == torch.bfloat16 else 2**-21
    assert ((c.double() - t.double()).abs() <= t.double().abs() * rel).all()
    if dtype == torch.bfloat16:
        assert (c == t).float().mean() > 0.99


@NEEDS_C
def test_dispatchers_pick_the_c_kernels_on_the_cpu(monkeypatch):
    """rms_norm / apply_rotary_ run the C kernels for CPU tensors, and the fallback with use_triton=False."""
    calls = []
    monkeypatch.setattr(cpu_c, "rms_norm", lambda *a: calls.append("rms_norm") or a[0])
    monkeypatch.setattr(cpu_c, "rotary_", lambda *a: calls.append("rotary") or a[0])
    x, w = torch.ones(2, 8), torch.ones(8)
    rmsnorm.rms_norm(x, w, 1e-6)
    rotary.apply_rotary_(torch.ones(2, 3, 8), torch.ones(2, 4), torch.zeros(2, 4), 2)
    assert calls == ["rms_norm", "rotary"]
    rmsnorm.rms_norm(x, w, 1e-6, use_triton=False)
    rotary.apply_rotary_(torch.ones(2, 3, 8), torch.ones(2, 4), torch.zeros(2, 4), 2, use_triton=False)
    assert calls == ["rms_norm", "rotary"]
    # a cos table that torch would broadcast (one row for two) goes to the fallback, not to C
    rotary.apply_rotary_(torch.ones(2, 3, 8), torch.ones(1, 4), torch.zeros(1, 4), 2)
    assert calls == ["rms_norm", "rotary"]


def test_c_kernels_refuse_what_they_cannot_take():
    with pytest.raises(ValueError, match=r"cos and sin \[T, D/2\].*cos \(1, 4\)"):
        cpu_c.rotary_(torch.ones(2, 3, 8), torch.ones(1, 4), torch.zeros(1, 4), 2)
    with pytest.raises(ValueError, match=r"n_rot <= H.*n_rot 4"):
        cpu_c.rotary_(torch.ones(2, 3, 8), torch.ones(2, 4), torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match=r"rms_norm wants a contiguous weight \[8\] in torch.float32"):
        cpu_c.rms_norm(torch.ones(2, 8), torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="cpu_c takes CPU tensors, got one on meta"):
        cpu_c.argmax(torch.ones(2, 8, device="meta"))
    with pytest.raises(ValueError, match=r"argmax wants float32 or bfloat16 \[R, V\], got torch.float64"):
        cpu_c.argmax(torch.ones(2, 8).double())


def test_dispatch_uses_fallback_on_cpu():
    from qwen25vl.impl.kernels import triton_ok

    assert not triton_ok(torch.zeros(1))


@NEEDS_C
@pytest.mark.parametrize("dtype", DTYPES)
@given(rows=st.integers(1, 4), V=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_c_argmax_is_torch_max_indices(dtype, rows, V, seed):
    """The greedy pick (impl.generate.greedy_pick on the CPU): the first largest, ties included (bfloat16
    rounds many logits together), a NaN counting as the largest as in torch."""
    x = _rand((rows, V), seed, dtype).round()  # integers: ties are common
    assert torch.equal(cpu_c.argmax(x), x.max(-1).indices)
    g = torch.Generator().manual_seed(seed)
    x[0, int(torch.randint(0, V, (1,), generator=g))] = float("nan")
    x[-1, int(torch.randint(0, V, (1,), generator=g))] = float("nan")
    assert torch.equal(cpu_c.argmax(x), x.max(-1).indices)
