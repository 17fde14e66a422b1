"""How the spec's error to its own float64 run grows, stage by stage, in float32 and bfloat16.

The tables printed here (pytest -s) are the ones in docs/decisions.md ("The model"); they feed the
conformance tolerances. Both runs start from the same stored bfloat16 weights, so the difference is
arithmetic only. Expected orders of magnitude: float32 keeps about 7 significant digits (relative
errors near 1e-7 .. 1e-6), bfloat16 about 2 to 3 (relative errors near 1e-2).
"""

import dataclasses

import pytest
import torch
from qwen25vl.spec import text
from qwen25vl.spec.checkpoint import load_checkpoint
from qwen25vl.spec.forward import precision_profile, stage_names
from qwen25vl.spec.mrope import mrope_cos_sin

from tests.spec.test_generate import build
from tests.spec.test_text import random_params, tiny_config


def table(p32: dict, p16: dict) -> str:
    rows = ["| stage | float32 max abs | float32 rel | bfloat16 max abs | bfloat16 rel |", "|---|---|---|---|---|"]
    rows += [
        f"| `{n}` | {p32[n]['max_abs']:.1e} | {p32[n]['rel']:.1e} | {p16[n]['max_abs']:.1e} | {p16[n]['rel']:.1e} |"
        for n in p32
    ]
    return "\n".join(rows)


def test_precision_profile_tiny_padded_batch(tiny_checkpoint):
    config, params = load_checkpoint(tiny_checkpoint)  # stored bfloat16
    inputs = build("padded_batch", str(tiny_checkpoint))
    p32 = precision_profile(params, config, inputs, torch.float32)
    p16 = precision_profile(params, config, inputs, torch.bfloat16)
    print("\n" + table(p32, p16))
    assert list(p32) == list(p16) == stage_names(config)
    for name in ("text.position_ids", "text.rope_deltas"):
        assert p32[name]["max_abs"] == p16[name]["max_abs"] == 0  # integer stages do not depend on the dtype
    floats = [n for n in p32 if n not in ("text.position_ids", "text.rope_deltas")]
    assert all(1e-9 < p32[n]["rel"] < 5e-6 for n in floats), {n: p32[n]["rel"] for n in floats}
    assert all(1e-4 < p16[n]["rel"] < 5e-2 for n in floats), {n: p16[n]["rel"] for n in floats}
    assert all(p16[n]["rel"] > 100 * p32[n]["rel"] for n in floats)
    # error grows through the decoder: the logits are worse than the embeddings in both dtypes
    for p in (p32, p16):
        assert p["logits"]["rel"] > p["text.inputs_embeds"]["rel"]


@pytest.mark.parametrize("hidden,heads,kv_heads,intermediate", [(2048, 16, 2, 11008)], ids=["3B"])
def test_one_layer_at_real_width(hidden, heads, kv_heads, intermediate):
    """One decoder layer at the 3B width (random bfloat16 weights, 16 tokens): the per-layer error a
    real checkpoint adds, since the tiny width (32) accumulates less rounding per dot product."""
    cfg = dataclasses.replace(
        tiny_config(
            hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate, mrope=(16, 24, 24), layers=1
        ),
        vocab_size=8,
    )
    params = {k: v.to(torch.bfloat16) for k, v in random_params(cfg, seed=1, dtype=torch.float32).items()}
    x = torch.randn(1, 16, hidden, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    position_ids = torch.arange(16).expand(3, 1, 16)
    cos, sin = mrope_cos_sin(
        position_ids, head_dim=128, theta=cfg.rope_theta, mrope_section=cfg.mrope_section, dtype=torch.float64
    )
    mask = torch.ones(1, 16, dtype=torch.int64)
    outs = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        p = {k: v.to(dtype) for k, v in params.items()}
        outs[dtype], _ = text.decoder_layer(p, cfg, 0, x.to(dtype), cos.to(dtype), sin.to(dtype), mask)
    ref = outs[torch.float64]
    rel = {d: ((outs[d].double() - ref).abs().max() / ref.abs().max()).item() for d in (torch.float32, torch.bfloat16)}
    print(
        f"\none layer at width {hidden}: rel err float32 {rel[torch.float32]:.1e}, bfloat16 {rel[torch.bfloat16]:.1e}"
    )
    assert rel[torch.float32] < 5e-6
    assert 1e-4 < rel[torch.bfloat16] < 5e-2
