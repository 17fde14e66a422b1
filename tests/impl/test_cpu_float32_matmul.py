"""The CPU bfloat16 float32-matmul path (impl.variants.Float32MatmulLinear, apply_float32_matmul): the
values against float64, single rows left to torch's bf16 GEMV, applied by from_params exactly where the
CPU lacks native bf16 matmul, undone in place, and accepted by the decode variants and tensor parallelism."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from qwen25vl.impl.variants import (
    Float32MatmulLinear,
    apply_compiled,
    apply_eager,
    apply_float32_matmul,
    cpu_has_native_bf16_matmul,
)

from .helpers import assert_close


@pytest.mark.parametrize("bias", [False, True])
def test_many_rows_in_float32_one_row_as_before(bias):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(96, 200, bias=bias).to(torch.bfloat16)
    lin.__class__ = Float32MatmulLinear
    x = torch.randn(3, 16, 96, generator=g).to(torch.bfloat16)
    b = None if lin.bias is None else lin.bias.double()
    assert_close(lin(x), F.linear(x.double(), lin.weight.double(), b), torch.bfloat16, what="float32 matmul")
    # products in float32, one rounding to bf16 at the end: equal to the float32 product rounded
    assert torch.equal(lin(x), F.linear(x.float(), lin.weight.float(), None if b is None else b.float()).bfloat16())
    one = x[0, :1]
    assert torch.equal(lin(one), F.linear(one, lin.weight, lin.bias))  # decode rows: torch's bf16 GEMV
    x32 = x.float()
    assert torch.equal(lin.float()(x32), F.linear(x32, lin.weight, lin.bias))  # other dtypes: untouched


def test_from_params_applies_it_where_bf16_matmul_is_not_native(tiny_params):
    from qwen25vl.impl.model import Qwen25VL

    m = Qwen25VL.from_params(*tiny_params, dtype=torch.bfloat16, device="cpu")
    kinds = {type(mod) for name, mod in m.named_modules() if isinstance(mod, nn.Linear) and name != "text.lm_head"}
    expected = nn.Linear if cpu_has_native_bf16_matmul() else Float32MatmulLinear
    assert kinds == {expected}, (kinds, torch.backends.cpu.get_cpu_capability())
    assert type(m.text.lm_head) is nn.Linear
    f32 = Qwen25VL.from_params(*tiny_params, dtype=torch.float32, device="cpu")
    assert not any(isinstance(mod, Float32MatmulLinear) for mod in f32.modules())
    # off and on again in place, weights shared; the lm_head never
    w = m.text.layers[0].attn.qkv.weight
    apply_float32_matmul(m, on=False)
    assert not any(isinstance(mod, Float32MatmulLinear) for mod in m.modules())
    linears = sum(isinstance(mod, nn.Linear) for mod in m.modules()) - 1
    assert apply_float32_matmul(m) == linears
    assert apply_float32_matmul(m) == 0  # already on
    assert m.text.layers[0].attn.qkv.weight is w and type(m.text.lm_head) is nn.Linear


def test_logits_close_with_and_without_it_and_compiled_accepts_it(tiny_params):
    """The model's logits with the float32 matmuls on and off agree within the bf16 stage tolerance
    (tiny model); the compiled decode variant takes the subclass."""
    from qwen25vl.impl.model import Qwen25VL

    from .helpers import vision_inputs

    config, params = tiny_params
    m = Qwen25VL.from_params(config, params, dtype=torch.bfloat16, device="cpu")
    inputs = vision_inputs(config, [list(range(100, 120))], [(0, (1, 8, 8))], [], seed=3)
    apply_float32_matmul(m)
    logits_on = m.forward(inputs)[0]
    apply_float32_matmul(m, on=False)
    logits_off = m.forward(inputs)[0]
    assert not torch.equal(logits_on, logits_off)  # the path ran: other rounding points
    assert_close(logits_on, logits_off.double(), torch.bfloat16, kind="stage", what="logits, float32 matmul on/off")
    apply_float32_matmul(m)
    apply_compiled(m)  # refused for non-nn.Linear layers only; compiles lazily, nothing runs here
    assert m.text.layers[0].attn.variant == "compiled"
    apply_eager(m)
