"""spec/vision.py: unit checks by hand or by another formula, and the cross-check against transformers.

The transformers vision tower keeps three float32 islands even in a float64 model (RMSNorm, the
rotary tables, and q/k during the rotation), so stock transformers agrees with the float64 spec to
about 1e-7 only. With those islands patched to float64 (test `test_matches_transformers_float64_exact`)
the two agree to about 1e-15, which shows every other step (orderings, windows, merger) is identical.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from qwen25vl.spec.checkpoint import expected_shapes, load_checkpoint
from qwen25vl.spec.config import Qwen25VLConfig
from qwen25vl.spec.norms import rms_norm
from qwen25vl.spec.vision import patch_embed, patch_merger, vision_attention, vision_block, vision_encoder, vision_mlp
from qwen25vl.spec.windows import vision_rotary_cos_sin, vision_rotary_positions, window_partition
from qwen25vl.tools.make_tiny_checkpoint import make_random_params

from ..conftest import MODEL_CONFIG_DIR

# Grids chosen for the window logic: (1,20,12) has 10x6 units -> 3x2 windows, the last row and column
# partial; (1,16,16) has 8x8 units, a multiple of the window (the reference pads a whole empty window);
# (1,4,6) is smaller than one window; (2,12,8) is a video of two temporal groups.
IMAGES = [[1, 20, 12], [1, 16, 16], [1, 4, 6]]
VIDEO = [[2, 12, 8]]


def _pixels(grid, seed=1):
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, 1176, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def tiny64(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint, dtype=torch.float64)


@pytest.fixture(scope="module")
def hf_visual(tiny_checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float64)
    return model.model


def _hf_run(hf_model, pixel_values, grid, kind):
    """Run the transformers tower; return (merged [P/4, C] item order, per-block outputs in ROW order)."""
    from transformers.vision_utils import get_vision_window_index

    visual = hf_model.visual
    outs = {}
    hooks = [
        blk.register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(i, out))
        for i, blk in enumerate(visual.blocks)
    ]
    hooks.append(visual.patch_embed.register_forward_hook(lambda mod, args, out: outs.__setitem__("embed", out)))
    grid_t = torch.tensor(grid)
    try:
        with torch.no_grad():
            if kind == "image":
                merged = torch.cat(hf_model.get_image_features(pixel_values, grid_t).pooler_output)
            elif kind == "video":
                merged = torch.cat(hf_model.get_video_features(pixel_values, grid_t).pooler_output)
            else:
                merged = visual(pixel_values, grid_thw=grid_t).pooler_output
    finally:
        for h in hooks:
            h.remove()
    # transformers' block outputs are in window order: rows order[j] of pixel_values sit at place j
    window_index, _ = get_vision_window_index(grid_t, 2, 112, 14)
    order = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1)
    blocks = {}
    for i in range(len(visual.blocks)):
        row = torch.empty_like(outs[i])
        row[order] = outs[i]
        blocks[i] = row
    return merged, blocks, outs["embed"]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [("image", IMAGES), ("video", VIDEO), ("packed", IMAGES + VIDEO)]


@pytest.mark.parametrize("kind,grid", CASES, ids=[c[0] for c in CASES])
def test_matches_transformers(tiny64, hf_visual, kind, grid):
    config, params = tiny64
    pv = _pixels(grid)
    capture = {}
    ours = vision_encoder(params, config, pv, grid, capture=capture)
    merged, blocks, embed = _hf_run(hf_visual, pv, grid, kind)
    P = pv.shape[0]
    assert ours.shape == merged.shape == (P // 4, 32)  # out_hidden_size
    assert ours.dtype == torch.float64
    # measured on this checkpoint: about 3e-7 absolute (values up to ~5); float32 islands in transformers
    assert (ours - merged).abs().max() < 2e-6
    assert torch.equal(capture["vision.merger"], ours)
    assert (capture["vision.patch_embed"] - embed).abs().max() < 1e-12  # patch embed has no float32 step
    for i in range(config.vision.depth):
        assert capture[f"vision.block.{i}"].shape == (P, 64)  # vision hidden_size
        assert (capture[f"vision.block.{i}"] - blocks[i]).abs().max() < 2e-6, i


_grids = st.lists(
    st.tuples(st.integers(1, 2), st.integers(1, 10).map(lambda n: 2 * n), st.integers(1, 10).map(lambda n: 2 * n)),
    min_size=1,
    max_size=3,
)


@given(grid=_grids)
def test_random_grids_match_transformers(tiny64, hf_visual, grid):
    """Any packing of items of any (even) size, up to 20x20 patches: windows full, partial or absent."""
    config, params = tiny64
    grid = [list(g) for g in grid]
    pv = _pixels(grid, seed=len(grid))
    capture = {}
    ours = vision_encoder(params, config, pv, grid, capture=capture)
    merged, blocks, _ = _hf_run(hf_visual, pv, grid, "packed")
    assert (ours - merged).abs().max() < 2e-6
    assert (capture["vision.block.3"] - blocks[3]).abs().max() < 2e-6


def test_matches_transformers_float64_exact(tiny64, hf_visual, monkeypatch):
    """Patch transformers' float32 islands to float64: then every stage agrees to rounding (~1e-15)."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as hf

    def rotary64(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return q * cos + hf.rotate_half(q) * sin, k * cos + hf.rotate_half(k) * sin

    def tables64(self, x, position_ids):
        dim = self.config.hidden_size // self.config.num_heads // 2
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = position_ids[..., None].double() * inv_freq
        return self.recomposition_frequencies(angles.cos()), self.recomposition_frequencies(angles.sin())

    def norm64(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(hf, "apply_rotary_pos_emb_vision", rotary64)
    monkeypatch.setattr(hf.Qwen2_5_VLVisionRotaryEmbedding, "forward", tables64)
    monkeypatch.setattr(hf.Qwen2_5_VLRMSNorm, "forward", norm64)
    config, params = tiny64
    grid = IMAGES + VIDEO
    pv = _pixels(grid, seed=2)
    capture = {}
    ours = vision_encoder(params, config, pv, grid, capture=capture)
    merged, blocks, _ = _hf_run(hf_visual, pv, grid, "packed")
    assert (ours - merged).abs().max() < 1e-13
    for i in range(config.vision.depth):
        assert (capture[f"vision.block.{i}"] - blocks[i]).abs().max() < 1e-13


def test_lower_precision_error_shrinks(tiny64):
    """float32 and bfloat16 runs of the same weights: error vs float64 shrinks with precision."""
    config, params = tiny64
    grid = IMAGES + VIDEO
    pv = _pixels(grid, seed=3)
    ref = vision_encoder(params, config, pv, grid)
    errs = {}
    for dtype in (torch.float32, torch.bfloat16):
        low = {k: t.to(dtype) for k, t in params.items() if k.startswith("visual.")}
        out = vision_encoder(low, config, pv.to(dtype), grid)
        assert out.dtype == dtype
        errs[dtype] = _rel(out.double(), ref)
    # measured: float32 ~3e-7, bfloat16 ~1e-2 (relative to the largest output)
    assert errs[torch.float32] < 1e-5
    assert errs[torch.bfloat16] < 0.1
    assert errs[torch.float32] * 100 < errs[torch.bfloat16]


def test_bfloat16_close_to_transformers_bfloat16(tiny_checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).model
    config, params = load_checkpoint(tiny_checkpoint)  # stored dtype: bfloat16
    grid = IMAGES
    pv = _pixels(grid, seed=4).float()
    ours = vision_encoder(params, config, pv, grid)
    with torch.no_grad():
        theirs = torch.cat(model.get_image_features(pv, torch.tensor(grid)).pooler_output)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    # same roundings, but matmul accumulation order differs: a few bf16 ulps at most
    assert _rel(ours.double(), theirs.double()) < 0.03


# ----------------------------------------------------------------------------------------------
# Stages by hand / by another formula


def test_rms_norm_by_hand():
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    rms = math.sqrt((9 + 16) / 2 + 1e-6)
    assert torch.allclose(rms_norm(x, w, 1e-6), torch.tensor([[3 / rms, 8 / rms]], dtype=torch.float64), rtol=1e-15)


def test_rms_norm_casts_before_weight_multiply():
    # bf16: normalised value rounded to bf16 first, then multiplied by the weight in bf16
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    w = torch.full((4,), 1.1, dtype=torch.bfloat16)
    xf = x.float()
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean() + 1e-6)).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, w, 1e-6), expected)
    with pytest.raises(ValueError, match="width 4 but weight has 3"):
        rms_norm(x, w[:3], 1e-6)


def test_patch_embed_is_conv3d(tiny64):
    config, params = tiny64
    pv = _pixels([[1, 2, 4]])
    w = params["visual.patch_embed.proj.weight"]
    conv = F.conv3d(pv.view(-1, 3, 2, 14, 14), w, stride=(2, 14, 14)).view(-1, 64)
    assert torch.allclose(patch_embed(params, config, pv), conv, atol=1e-12)


def test_patch_merger_groups_four_consecutive_rows(tiny64):
    config, params = tiny64
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = patch_merger(params, config, x)
    assert out.shape == (2, 32)
    # token 1 from rows 4..7 only, by the formula: RMSNorm rows, concatenate, Linear, erf-GELU, Linear
    normed = rms_norm(x[4:], params["visual.merger.ln_q.weight"], 1e-6).reshape(-1)
    h = params["visual.merger.mlp.0.weight"] @ normed + params["visual.merger.mlp.0.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    expected = params["visual.merger.mlp.2.weight"] @ h + params["visual.merger.mlp.2.bias"]
    assert torch.allclose(out[1], expected, atol=1e-12)


def test_vision_attention_one_segment_is_sdpa(tiny64):
    config, params = tiny64
    P = 12
    x = torch.randn(P, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    cos, sin = torch.ones(P, 16, dtype=torch.float64), torch.zeros(P, 16, dtype=torch.float64)  # no rotation
    out = vision_attention(params, config, 0, x, cos, sin, torch.tensor([0, P]))
    qkv = x @ params["visual.blocks.0.attn.qkv.weight"].T + params["visual.blocks.0.attn.qkv.bias"]
    q, k, v = qkv.view(P, 3, 4, 16).permute(1, 2, 0, 3)  # each [N, P, D]: 4 heads of 16
    attn = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(P, 64)
    expected = attn @ params["visual.blocks.0.attn.proj.weight"].T + params["visual.blocks.0.attn.proj.bias"]
    assert torch.allclose(out, expected, atol=1e-12)


def test_vision_attention_segments_do_not_mix(tiny64):
    config, params = tiny64
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 64, generator=g, dtype=torch.float64)
    cos, sin = vision_rotary_cos_sin(torch.randint(0, 5, (10, 2), generator=g), 16)
    cu = torch.tensor([0, 4, 10])
    a = vision_attention(params, config, 0, x, cos, sin, cu)
    y = x.clone()
    y[4:] += 1.0  # change only the second segment
    b = vision_attention(params, config, 0, y, cos, sin, cu)
    assert torch.equal(a[:4], b[:4])
    assert not torch.allclose(a[4:], b[4:])
    # and the first segment alone gives the same rows
    assert torch.allclose(
        vision_attention(params, config, 0, x[:4], cos[:4], sin[:4], torch.tensor([0, 4])), a[:4], atol=1e-14
    )


def test_vision_block_is_two_residual_steps(tiny64):
    config, params = tiny64
    P = 8
    x = torch.randn(P, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    cos, sin = vision_rotary_cos_sin(vision_rotary_positions([[1, 2, 4]]), 16)
    cu = torch.tensor([0, P])
    h = x + vision_attention(params, config, 2, rms_norm(x, params["visual.blocks.2.norm1.weight"], 1e-6), cos, sin, cu)
    m = rms_norm(h, params["visual.blocks.2.norm2.weight"], 1e-6)
    gate = m @ params["visual.blocks.2.mlp.gate_proj.weight"].T + params["visual.blocks.2.mlp.gate_proj.bias"]
    up = m @ params["visual.blocks.2.mlp.up_proj.weight"].T + params["visual.blocks.2.mlp.up_proj.bias"]
    mlp = (gate * torch.sigmoid(gate) * up) @ params["visual.blocks.2.mlp.down_proj.weight"].T + params[
        "visual.blocks.2.mlp.down_proj.bias"
    ]
    assert torch.allclose(vision_mlp(params, 2, m), mlp, atol=1e-12)
    assert torch.allclose(vision_block(params, config, 2, x, cos, sin, cu), h + mlp, atol=1e-12)


def test_items_are_independent(tiny64):
    """Packing is exact: encoding two items together equals encoding each alone."""
    config, params = tiny64
    grid = [[1, 4, 6], [2, 4, 4]]
    pv = _pixels(grid, seed=9)
    both = vision_encoder(params, config, pv, grid)
    first = vision_encoder(params, config, pv[:24], grid[:1])
    second = vision_encoder(params, config, pv[24:], grid[1:])
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-13)


@pytest.mark.parametrize(
    "pv_shape,grid,match",
    [
        ((24, 1000), [[1, 4, 6]], r"pixel_values must have shape \[P, 1176\]"),
        ((23, 1176), [[1, 4, 6]], r"pixel_values has 23 rows but grid_thw \[\[1, 4, 6\]\] needs sum\(t\*h\*w\) = 24"),
        ((15, 1176), [[1, 3, 5]], r"multiples of merge_size 2"),
        ((24, 1176), [[1, 4, 6, 1]], r"grid_thw must have shape \[k, 3\]"),
        ((0, 1176), [[0, 4, 6]], r"must be positive"),
    ],
)
def test_bad_inputs(tiny64, pv_shape, grid, match):
    config, params = tiny64
    with pytest.raises(ValueError, match=match):
        vision_encoder(params, config, torch.zeros(pv_shape, dtype=torch.float64), grid)


def test_bad_pixel_type(tiny64):
    config, params = tiny64
    with pytest.raises(TypeError, match="pixel_values must be a floating-point torch tensor"):
        vision_encoder(params, config, torch.zeros(24, 1176, dtype=torch.int64), [[1, 4, 6]])
    with pytest.raises(TypeError, match="got ndarray"):
        vision_encoder(params, config, torch.zeros(24, 1176).numpy(), [[1, 4, 6]])


# ----------------------------------------------------------------------------------------------
# Real sizes

CONFIG_3B = {  # hf_reference.md §8.1, 3B-Instruct
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}


def _real_configs():
    return {"3B": Qwen25VLConfig.from_dict(CONFIG_3B), "7B": Qwen25VLConfig.from_file(MODEL_CONFIG_DIR)}


@pytest.mark.parametrize("name,published", [("3B", 3.75e9), ("7B", 8.29e9)])
def test_real_configs_parameter_count(name, published):
    config = _real_configs()[name]
    shapes = expected_shapes(config)
    n = sum(math.prod(s) for k, s in shapes.items() if not (k == "lm_head.weight" and config.tie_word_embeddings))
    assert abs(n - published) / published < 0.005  # the hub's model cards: 3.75B and 8.29B parameters
    assert shapes["visual.blocks.0.attn.qkv.weight"] == (3840, 1280)
    assert shapes["visual.merger.mlp.2.weight"] == (config.hidden_size, 5120)


def test_real_width_block_matches_transformers():
    """One vision block at real width (1280, 16 heads, head_dim 80) with random weights, vs transformers."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock

    config = _real_configs()["7B"]
    params = make_random_params(config, seed=0, dtype=torch.float32, prefixes=("visual.blocks.0.",))
    grid = [[1, 12, 20]]  # 240 patches, 6x10 units: full and partial windows
    x = torch.randn(240, 1280, generator=torch.Generator().manual_seed(0))
    cos, sin = vision_rotary_cos_sin(vision_rotary_positions(grid), 80, dtype=torch.float32)
    _, cu_window, _ = window_partition(grid)
    ours = vision_block(params, config, 0, x, cos, sin, cu_window)

    block = Qwen2_5_VLVisionBlock(Qwen2_5_VLVisionConfig(hidden_size=1280, num_heads=16, intermediate_size=3420))
    block.load_state_dict({k.removeprefix("visual.blocks.0."): t for k, t in params.items()})
    with torch.no_grad():
        theirs = block(x, cu_seqlens=cu_window.to(torch.int32), position_embeddings=(cos, sin))
    assert ours.shape == (240, 1280)
    assert _rel(ours, theirs) < 1e-5
