"""Vision segment attention (every backend that can run here) and the text prefill/decode attention,
against float64 loops written in the test (tolerance: helpers.TOL)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from qwen25vl.impl.attention import (
    SegmentPlan,
    check_backend,
    decode_attention,
    prefill_attention,
    prefill_mask,
    segment_attention,
    varlen_attn,
)

from .helpers import DEVICE, NEEDS_C, assert_close

DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = ["dense", "blockmask"] + (["varlen"] if DEVICE.type == "cuda" and varlen_attn is not None else [])


def _segments_oracle(q, k, v, lengths):
    """softmax(q k^T / sqrt(D)) v inside each segment, in float64, one loop iteration per segment."""
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].double().transpose(0, 1) for t in (q, k, v))  # [N, n, D]
        w = torch.softmax(qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        out.append((w @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@given(
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=8),
    N=st.integers(1, 3),
    D=st.sampled_from([16, 80]),
    seed=st.integers(0, 2**16),
)
def test_segment_attention(dtype, backend, lengths, N, D, seed):
    if backend == "varlen" and dtype == torch.float32:
        return  # flash kernels take half precision only; check_backend refuses it (tested below)
    P = sum(lengths)
    if P == 0:
        lengths = [1]
        P = 1
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(P, 3 * N, D, generator=g).to(dtype)
    q, k, v = qkv.split(N, dim=1)  # strided views, as the model passes them
    cu = torch.tensor([0] + lengths).cumsum(0)
    plan = SegmentPlan(cu, P, DEVICE, dtype, backend)
    out = segment_attention(*(t.to(DEVICE) for t in (q, k, v)), plan)
    assert out.shape == (P, N, D)
    assert_close(out, _segments_oracle(q, k, v, [n for n in lengths if n]), dtype, what=plan.label)


def test_uniform_segments_are_a_view():
    plan = SegmentPlan(torch.tensor([0, 64, 128, 192]), 192, torch.device("cpu"), torch.float32, "dense")
    assert plan.uniform and plan.label == "dense-uniform"
    plan = SegmentPlan(torch.tensor([0, 64, 64, 96]), 96, torch.device("cpu"), torch.float32, "dense")
    assert not plan.uniform and plan.n == 2  # the zero-length segment is dropped


def test_auto_on_cpu_is_dense():
    assert SegmentPlan(torch.tensor([0, 10, 30]), 30, torch.device("cpu"), torch.float32, "auto").backend == "dense"


@pytest.mark.parametrize(
    "name,device,dtype",
    [("varlen", "cpu", torch.bfloat16), ("flash_attn", "cpu", torch.bfloat16), ("nope", "cpu", torch.float32)],
)
def test_backend_refused(name, device, dtype):
    with pytest.raises(ValueError, match="attention"):
        check_backend(name, torch.device(device), dtype)


def _causal_oracle(q, k, v, mask):
    """q [B, N, L, D], k, v [B, K, L, D] -> float64 [B, N, L, D]; padding queries are not checked."""
    B, N, L, D = q.shape
    G = N // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = q.double() @ k.transpose(2, 3) / D**0.5
    allowed = torch.ones(L, L).tril().bool()[None, None] & mask.bool()[:, None, None, :]
    allowed = allowed | torch.eye(L, dtype=torch.bool)
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    B=st.integers(1, 3),
    L=st.integers(1, 12),
    K=st.integers(1, 2),
    G=st.sampled_from([1, 2, 4, 7]),
    pads=st.lists(st.integers(0, 11), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_prefill_attention(dtype, B, L, K, G, pads, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, K * G, L, 16, generator=g).to(dtype)
    k, v = (torch.randn(B, K, L, 16, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(B, L, dtype=torch.int64)
    for b in range(B):
        mask[b, : min(pads[b], L - 1)] = 0  # left padding, at least one real token
    out = prefill_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), prefill_mask(mask.to(DEVICE)))
    real = mask.bool()[:, None, :, None].expand_as(q)
    assert_close(out.cpu()[real], _causal_oracle(q, k, v, mask)[real], dtype, what="prefill")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["auto", "sdpa", "math", pytest.param("cpu_c", marks=NEEDS_C)])
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 20),
    K=st.integers(1, 3),
    G=st.sampled_from([1, 2, 7]),
    D=st.sampled_from([16, 20]),  # 20: the C kernel's loop for widths that are not a multiple of 8
    seed=st.integers(0, 2**16),
)
def test_decode_attention(dtype, backend, B, T, K, G, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, K * G, D, generator=g).to(dtype)
    kc, vc = (torch.randn(B, K, T, D, generator=g).to(dtype) for _ in range(2))
    valid = torch.rand(B, T, generator=g) < 0.7
    valid[:, -1] = True
    dev = torch.device("cpu") if backend == "cpu_c" else DEVICE
    out = decode_attention(q.to(dev), kc.to(dev), vc.to(dev), valid.to(dev), backend)
    kk, vv = kc.double().repeat_interleave(G, 1), vc.double().repeat_interleave(G, 1)  # [B, N, T, D]
    s = (q.double()[:, :, None] @ kk.transpose(2, 3))[:, :, 0] / D**0.5  # [B, N, T]
    w = torch.softmax(s.masked_fill(~valid[:, None], float("-inf")), -1)
    assert_close(out, (w[:, :, None] @ vv)[:, :, 0], dtype, what="decode")


def test_cpu_c_decode_backend_refuses_what_it_cannot_run():
    q, kc = torch.ones(1, 2, 8, dtype=torch.float64), torch.ones(1, 1, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="decode_attention 'cpu_c' runs on the CPU in float32 or bfloat16"):
        decode_attention(q, kc, kc, torch.ones(1, 3, dtype=torch.bool), "cpu_c")
    assert decode_attention(q, kc, kc, torch.ones(1, 3, dtype=torch.bool), "auto").dtype == torch.float64  # sdpa
