"""The CPU bfloat16 float16-pack path (impl.quant.Fp16PackedLinear, apply_fp16_pack): products computed
in float32 from the exact float16 image of the bfloat16 weights, tiny weights within 2^-25, layers beyond
float16's range left alone, applied by from_params exactly where fp16_pack_wanted says, undone in place,
composed with int4, the lm_head options, the fused decode and tensor parallelism's order of operations."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from qwen25vl.impl.quant import (
    Fp16PackedLinear,
    Int4Linear,
    apply_fp16_pack,
    apply_int4,
    apply_lm_head_quant,
    decode_weight_bytes,
    fbgemm_available,
    fp16_pack_wanted,
)
from qwen25vl.impl.variants import apply_compiled, apply_eager, apply_fused

from .helpers import assert_close

pytestmark = pytest.mark.skipif(not fbgemm_available()[0], reason=f"needs fbgemm: {fbgemm_available()[1]}")


def _packed(w, b=None):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(torch.bfloat16)
    lin.weight.data = w.to(torch.bfloat16)
    if b is not None:
        lin.bias.data = b.to(torch.bfloat16)
    return lin, Fp16PackedLinear(lin)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_values_are_the_float32_product_rounded_once(bias, rows):
    """y = bf16(x @ w^T + b computed in float32): within float32 summation noise of the float64 product
    before the one rounding, i.e. at most one bfloat16 half-ulp (+ noise) from float64 everywhere."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 96, generator=g) * 0.05
    b = torch.randn(200, generator=g) if bias else None
    lin, packed = _packed(w, b)
    x = torch.randn(3, rows, 96, generator=g).to(torch.bfloat16)
    y = packed(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, rows, 200)
    ref = F.linear(x.double(), lin.weight.double(), None if b is None else lin.bias.double())
    assert_close(y, ref, torch.bfloat16, what="fp16-packed linear")
    half_ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp(min=1e-30))) - 8)  # of bfloat16 at ref
    bound = half_ulp + 1e-6 * ref.abs().amax()  # + float32 summation noise
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().amax()
    normal = lin.weight.abs() >= 2**-14  # float16's normal range: bfloat16 values there are float16 values
    assert normal.float().mean() > 0.99 and torch.equal(packed.weight[normal], lin.weight[normal])


def test_tiny_weights_and_out_of_range_layers():
    """Weights below float16's normal range keep 2^-25 absolute accuracy; a layer holding a weight beyond
    65504 is not packed (it would become inf)."""
    w = torch.full((32, 64), 3e-7)
    w[0, 0] = 1.0
    _, packed = _packed(w)
    assert (packed.weight.float() - w.bfloat16().float()).abs().amax() <= 2**-25
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16)).to(torch.bfloat16)
    with torch.no_grad():
        model[1].weight[3, 3] = 1e5
    assert apply_fp16_pack(model, prefixes=("0", "1")) == 1
    assert type(model[0]) is Fp16PackedLinear and type(model[1]) is nn.Linear


def test_from_params_applies_it_where_wanted(tiny_params):
    from qwen25vl.impl.model import Qwen25VL

    m = Qwen25VL.from_params(*tiny_params, dtype=torch.bfloat16, device="cpu")
    wanted = fp16_pack_wanted(torch.device("cpu"), torch.bfloat16)
    assert wanted == (not torch.backends.cpu.get_cpu_capability().startswith("AVX512"))
    kinds = {type(mod) for mod in m.modules() if isinstance(mod, (nn.Linear, Fp16PackedLinear))}
    assert kinds == {Fp16PackedLinear if wanted else nn.Linear}, (kinds, torch.backends.cpu.get_cpu_capability())
    assert torch.equal(m.text.embed, tiny_params[1]["model.embed_tokens.weight"].bfloat16())  # lookup table kept
    off = Qwen25VL.from_params(*tiny_params, dtype=torch.bfloat16, device="cpu", cpu_fp16_pack=False)
    assert not any(isinstance(mod, Fp16PackedLinear) for mod in off.modules())
    f32 = Qwen25VL.from_params(*tiny_params, dtype=torch.float32, device="cpu")
    assert not any(isinstance(mod, Fp16PackedLinear) for mod in f32.modules())
    # the same bytes per decode step as the bfloat16 weights
    assert decode_weight_bytes(m if wanted else off) == decode_weight_bytes(off)
    # on and off in place
    n = apply_fp16_pack(off)
    assert n == sum(isinstance(mod, Fp16PackedLinear) for mod in off.modules()) and n > 10
    assert apply_fp16_pack(off) == 0  # already on
    assert apply_fp16_pack(off, on=False) == n
    assert not any(isinstance(mod, Fp16PackedLinear) for mod in off.modules())


def test_logits_tokens_and_variants_with_and_without_it(tiny_params):
    """Logits with the pack on and off agree within the bfloat16 stage tolerance; the fused decode runs
    on packed layers and gives the eager tokens; the compiled decode refuses them, naming the way out."""
    from qwen25vl.impl.model import Qwen25VL

    from .helpers import vision_inputs

    config, params = tiny_params
    on = Qwen25VL.from_params(config, params, dtype=torch.bfloat16, device="cpu", cpu_fp16_pack=True)
    off = Qwen25VL.from_params(config, params, dtype=torch.bfloat16, device="cpu", cpu_fp16_pack=False)
    inputs = vision_inputs(config, [list(range(100, 120))], [(0, (1, 8, 8))], [], seed=3)
    a, b = on.forward(inputs)[0], off.forward(inputs)[0]
    assert not torch.equal(a, b)  # the path ran: other rounding points
    assert_close(a, b.double(), torch.bfloat16, kind="stage", what="logits, fp16 pack on/off")
    eager = on.generate_from_inputs(inputs, 4, [0], ignore_eos=True)
    apply_fused(on)
    fused = on.generate_from_inputs(inputs, 4, [0], ignore_eos=True)
    apply_eager(on)
    assert torch.equal(torch.as_tensor(fused), torch.as_tensor(eager))
    with pytest.raises(ValueError, match="cpu_fp16_pack=False"):
        apply_compiled(on)


@pytest.mark.filterwarnings("ignore:int4. 8 layer")  # the tiny widths take int4's fallback
def test_int4_and_lm_head_options_compose_with_it(tiny_params):
    """int4 at build time takes the text layers first, the pack the rest; int4 applied afterwards takes
    packed layers from their values; the lm_head options start from the packed head's values."""
    from qwen25vl.impl.model import Qwen25VL

    config, params = tiny_params
    q = Qwen25VL.from_params(config, params, dtype=torch.bfloat16, device="cpu", quantize="int4", cpu_fp16_pack=True)
    assert isinstance(q.text.layers[0].mlp.down, Int4Linear)
    assert type(q.text.lm_head) is Fp16PackedLinear and type(q.visual.blocks[0].down) is Fp16PackedLinear
    late = Qwen25VL.from_params(config, params, dtype=torch.bfloat16, device="cpu", cpu_fp16_pack=True)
    report = apply_int4(late)
    assert isinstance(late.text.layers[0].mlp.down, Int4Linear) and len(report["fallback"]) == 8  # hidden 32
    ids = torch.tensor([list(range(100, 130))])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(q.forward(inputs)[0], late.forward(inputs)[0])  # the same int4 values either way
    apply_lm_head_quant(late, "int8")
    assert type(late.text.lm_head).__name__ == "Int8Linear"


def test_tensor_parallel_refuses_packed_layers_naming_the_way_out(tiny_params, tmp_path):
    import torch.distributed as dist
    from qwen25vl.impl.model import Qwen25VL
    from qwen25vl.impl.tp import apply_tp

    m = Qwen25VL.from_params(*tiny_params, dtype=torch.bfloat16, device="cpu", cpu_fp16_pack=True)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="layer 0 holds Fp16PackedLinear.*cpu_fp16_pack=False"):
            apply_tp(m)
    finally:
        dist.destroy_process_group()
