"""spec.text: embedding, vision scatter, attention mask, GQA attention, cache, decoder layer.

Expected values come from literal tables, from a per-head loop written here (another formula), or
from transformers' own Qwen2_5_VLDecoderLayer.
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from qwen25vl.spec import text
from qwen25vl.spec.config import Qwen25VLConfig, VisionConfig


def tiny_config(hidden=32, heads=4, kv_heads=2, intermediate=48, vocab=64, layers=1, mrope=(2, 1, 1)):
    return Qwen25VLConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        mrope_section=mrope,
        vision=VisionConfig(out_hidden_size=hidden),
    )


def random_params(config, seed=0, dtype=torch.float64, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    C, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    N, K = config.num_attention_heads, config.num_key_value_heads

    def r(*shape, s=scale):
        return torch.randn(*shape, generator=g, dtype=dtype) * s

    p = {
        "model.embed_tokens.weight": r(config.vocab_size, C, s=1.0),
        "model.norm.weight": 1 + r(C),
        "lm_head.weight": r(config.vocab_size, C),
    }
    for i in range(config.num_hidden_layers):
        a = f"model.layers.{i}."
        p.update(
            {
                a + "self_attn.q_proj.weight": r(N * D, C, s=C**-0.5),
                a + "self_attn.q_proj.bias": r(N * D),
                a + "self_attn.k_proj.weight": r(K * D, C, s=C**-0.5),
                a + "self_attn.k_proj.bias": r(K * D),
                a + "self_attn.v_proj.weight": r(K * D, C, s=C**-0.5),
                a + "self_attn.v_proj.bias": r(K * D),
                a + "self_attn.o_proj.weight": r(C, N * D, s=(N * D) ** -0.5),
                a + "mlp.gate_proj.weight": r(I, C, s=C**-0.5),
                a + "mlp.up_proj.weight": r(I, C, s=C**-0.5),
                a + "mlp.down_proj.weight": r(C, I, s=I**-0.5),
                a + "input_layernorm.weight": 1 + r(C),
                a + "post_attention_layernorm.weight": 1 + r(C),
            }
        )
    return p


def random_rotation(B, L, D, seed=1, dtype=torch.float64):
    """cos/sin tables [B, L, D] of arbitrary angles, duplicated over the two halves as RoPE requires."""
    angles = torch.rand(B, L, D // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 * math.pi
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# ---------------------------------------------------------------- embedding and scatter


def test_embed_picks_rows():
    table = torch.arange(10 * 3, dtype=torch.float64).view(10, 3)
    out = text.embed({"model.embed_tokens.weight": table}, torch.tensor([[2, 0], [9, 2]]))
    assert out.tolist() == [[[6, 7, 8], [0, 1, 2]], [[27, 28, 29], [6, 7, 8]]]


@pytest.mark.parametrize("bad", [10, -1, 151655])
def test_embed_rejects_out_of_vocab(bad):
    table = torch.zeros(10, 3)
    with pytest.raises(ValueError, match=rf"token id {bad}, outside the vocabulary 0\.\.9"):
        text.embed({"model.embed_tokens.weight": table}, torch.tensor([[1, bad]]))


def test_embed_rejects_float_ids():
    with pytest.raises(TypeError, match="int64"):
        text.embed({"model.embed_tokens.weight": torch.zeros(10, 3)}, torch.tensor([[1.0]]))


def test_scatter_fills_in_flattened_batch_order():
    cfg = tiny_config(hidden=32)
    I, Vd = cfg.image_token_id, cfg.video_token_id
    ids = torch.tensor([[5, I, Vd, I], [I, 7, Vd, 8]])
    embeds = torch.zeros(2, 4, 32, dtype=torch.float64)
    image = torch.arange(1, 4, dtype=torch.float32)[:, None].expand(3, 32)  # rows 1, 2, 3
    video = torch.tensor([10.0, 20.0])[:, None].expand(2, 32)
    out = text.scatter_vision_features(embeds, ids, image, video, cfg)
    assert out[..., 0].tolist() == [[0, 1, 10, 2], [3, 0, 20, 0]]
    assert out.dtype == torch.float64  # features take the embedding dtype
    assert embeds.abs().sum() == 0  # input untouched


@pytest.mark.parametrize("n_feats", [2, 4])
def test_scatter_count_mismatch_names_both_counts(n_feats):
    cfg = tiny_config()
    ids = torch.tensor([[cfg.image_token_id] * 3])
    with pytest.raises(ValueError, match=rf"holds 3 image pad tokens .* gave {n_feats} image features"):
        text.scatter_vision_features(torch.zeros(1, 3, 32), ids, torch.zeros(n_feats, 32), None, cfg)


def test_scatter_video_tokens_without_features():
    cfg = tiny_config()
    ids = torch.tensor([[1, cfg.video_token_id]])
    with pytest.raises(ValueError, match="holds 1 video pad tokens .* gave 0 video features"):
        text.scatter_vision_features(torch.zeros(1, 2, 32), ids, None, None, cfg)


# ---------------------------------------------------------------- mask


def test_attention_allowed_literal():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    got = text.attention_allowed(mask, 4)[:, 0].int().tolist()
    assert got[0] == [
        [1, 0, 0, 0],  # a padding query sees only itself
        [0, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 1, 1, 1],
    ]
    assert got[1] == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    # two new tokens after three cached ones: queries sit at cache index 3 and 4
    assert text.attention_allowed(torch.tensor([[0, 1, 1, 1, 1]]), 2)[0, 0].int().tolist() == [
        [0, 1, 1, 1, 0],
        [0, 1, 1, 1, 1],
    ]


# ---------------------------------------------------------------- attention


def loop_attention(params, cfg, i, x, cos, sin, mask):
    """Per-head, per-query loop: rotate, dot with every allowed key, softmax, weighted sum."""
    B, L, C = x.shape
    N, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    p = f"model.layers.{i}.self_attn."
    q = (x @ params[p + "q_proj.weight"].T + params[p + "q_proj.bias"]).view(B, L, N, D)
    k = (x @ params[p + "k_proj.weight"].T + params[p + "k_proj.bias"]).view(B, L, K, D)
    v = (x @ params[p + "v_proj.weight"].T + params[p + "v_proj.bias"]).view(B, L, K, D)

    def rot(t, b, s):  # t [D]: t*cos + rotate_half(t)*sin
        half = torch.cat([-t[D // 2 :], t[: D // 2]])
        return t * cos[b, s] + half * sin[b, s]

    out = torch.zeros(B, L, N, D, dtype=x.dtype)
    for b in range(B):
        for h in range(N):
            g = h // (N // K)  # kv head g serves query heads g*N/K .. (g+1)*N/K - 1
            for s in range(L):
                if not mask[b, s]:
                    continue
                keys = [j for j in range(s + 1) if mask[b, j]]
                logits = torch.stack([rot(q[b, s, h], b, s) @ rot(k[b, j, g], b, j) / math.sqrt(D) for j in keys])
                w = torch.softmax(logits, 0)
                out[b, s, h] = sum(w[n] * v[b, j, g] for n, j in enumerate(keys))
    return out.reshape(B, L, N * D) @ params[p + "o_proj.weight"].T


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (4, 4)])
def test_attention_matches_per_head_loop(heads, kv_heads):
    cfg = tiny_config(heads=heads, kv_heads=kv_heads)
    params = random_params(cfg)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cos, sin = random_rotation(2, 5, cfg.head_dim)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    got, (k, v) = text.attention(params, cfg, 0, x, cos, sin, mask)
    want = loop_attention(params, cfg, 0, x, cos, sin, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-12)
    assert k.shape == v.shape == (2, kv_heads, 5, cfg.head_dim)
    assert torch.isfinite(got).all()  # padding queries do not produce NaN


def test_cache_continuation_equals_one_pass():
    """Prefix, then the rest with the cache, gives the same outputs and cache as one pass."""
    cfg = tiny_config()
    params = random_params(cfg)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cos, sin = random_rotation(2, 7, cfg.head_dim)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    full, full_cache = text.decoder_layer(params, cfg, 0, x, cos, sin, mask)
    first, cache = text.decoder_layer(params, cfg, 0, x[:, :4], cos[:, :4], sin[:, :4], mask[:, :4])
    assert cache[0].shape == (2, 2, 4, cfg.head_dim)
    outs = [first]
    for s in range(4, 7):  # one token at a time, as decoding does
        step = slice(s, s + 1)
        o, cache = text.decoder_layer(params, cfg, 0, x[:, step], cos[:, step], sin[:, step], mask[:, : s + 1], cache)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1)[mask.bool()], full[mask.bool()], rtol=0, atol=1e-12)
    torch.testing.assert_close(cache[0], full_cache[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(cache[1], full_cache[1], rtol=0, atol=1e-12)


@given(
    pads=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    length=st.integers(1, 6),
    split=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_attention_property_loop_and_cache(pads, length, split, seed):
    """Any left padding, any prefix/rest split: one pass = the per-head loop = prefix + cached rest."""
    cfg = tiny_config(heads=4, kv_heads=2)
    params = random_params(cfg, seed=seed % 7)
    B, L = len(pads), length + max(pads)
    mask = torch.tensor([[0] * p + [1] * (L - p) for p in pads])  # row b: pads[b] leading padding slots
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 32, generator=g, dtype=torch.float64)
    cos, sin = random_rotation(B, L, cfg.head_dim, seed=seed)
    full, _ = text.attention(params, cfg, 0, x, cos, sin, mask)
    want = loop_attention(params, cfg, 0, x, cos, sin, mask)
    real = mask.bool()
    torch.testing.assert_close(full[real], want[real], rtol=0, atol=1e-12)
    split = min(split, L)
    if 0 < split < L:
        first, cache = text.attention(params, cfg, 0, x[:, :split], cos[:, :split], sin[:, :split], mask[:, :split])
        rest, _ = text.attention(params, cfg, 0, x[:, split:], cos[:, split:], sin[:, split:], mask, cache)
        torch.testing.assert_close(torch.cat([first, rest], 1)[real], full[real], rtol=0, atol=1e-12)


def test_left_padding_does_not_change_real_tokens():
    cfg = tiny_config()
    params = random_params(cfg)
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cos, sin = random_rotation(1, 5, cfg.head_dim)
    alone, _ = text.decoder_layer(params, cfg, 0, x, cos, sin, torch.ones(1, 5, dtype=torch.int64))
    junk = torch.randn(1, 3, 32, dtype=torch.float64) * 100
    xp = torch.cat([junk, x], 1)
    pad_cos = torch.ones(1, 3, cfg.head_dim, dtype=torch.float64)  # any rotation: padding is never seen
    cp, sp = torch.cat([pad_cos, cos], 1), torch.cat([0 * pad_cos, sin], 1)
    padded, _ = text.decoder_layer(params, cfg, 0, xp, cp, sp, torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    torch.testing.assert_close(padded[:, 3:], alone, rtol=0, atol=1e-12)


def test_attention_mask_shape_mismatch():
    cfg = tiny_config()
    params = random_params(cfg)
    x = torch.zeros(1, 3, 32, dtype=torch.float64)
    cos, sin = random_rotation(1, 3, cfg.head_dim)
    with pytest.raises(
        ValueError, match=r"attention_mask has shape \(1, 4\), expected \(batch 1, cached \+ new tokens 3\)"
    ):
        text.decoder_layer(params, cfg, 0, x, cos, sin, torch.ones(1, 4, dtype=torch.int64))


def test_mlp_and_head_formulas():
    cfg = tiny_config()
    params = random_params(cfg)
    x = torch.randn(1, 2, 32, dtype=torch.float64)
    gate = x @ params["model.layers.0.mlp.gate_proj.weight"].T
    up = x @ params["model.layers.0.mlp.up_proj.weight"].T
    want = (gate / (1 + torch.exp(-gate)) * up) @ params["model.layers.0.mlp.down_proj.weight"].T
    torch.testing.assert_close(text.mlp(params, 0, x), want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(text.lm_head(params, x), torch.einsum("blc,vc->blv", x, params["lm_head.weight"]))
    w = params["model.norm.weight"]
    torch.testing.assert_close(
        text.final_norm(params, cfg, x), w * x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    )


# ---------------------------------------------------------------- against transformers, real widths


def hf_decoder_layer(cfg, params, dtype):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

    hf_cfg = Qwen2_5_VLTextConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        num_hidden_layers=1,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps,
    )
    hf_cfg._attn_implementation = "eager"
    with torch.device("meta"):  # skip transformers' own weight init: the weights are ours
        layer = Qwen2_5_VLDecoderLayer(hf_cfg, 0).eval()
    layer.load_state_dict(
        {k[len("model.layers.0.") :]: v.to(dtype) for k, v in params.items() if k.startswith("model.layers.0.")},
        assign=True,
    )
    return layer


@pytest.mark.parametrize(
    "hidden,heads,kv_heads,intermediate", [(2048, 16, 2, 11008), (3584, 28, 4, 18944)], ids=["3B", "7B"]
)
def test_decoder_layer_real_width_matches_transformers(hidden, heads, kv_heads, intermediate):
    """One layer at the 3B / 7B widths (head_dim 128), random weights, 6 tokens, one padded, float32."""
    cfg = tiny_config(hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate, mrope=(16, 24, 24))
    cfg = dataclasses.replace(cfg, vocab_size=8)  # no embedding needed
    params = random_params(cfg, dtype=torch.float32, scale=0.02)
    x = torch.randn(2, 6, hidden, generator=torch.Generator().manual_seed(6))
    cos, sin = random_rotation(2, 6, 128, dtype=torch.float32)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got, (k, v) = text.decoder_layer(params, cfg, 0, x, cos, sin, mask)
    assert k.shape == (2, kv_heads, 6, 128)
    additive = torch.where(text.attention_allowed(mask, 6), 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        want = hf_decoder_layer(cfg, params, torch.float32)(x, attention_mask=additive, position_embeddings=(cos, sin))
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
