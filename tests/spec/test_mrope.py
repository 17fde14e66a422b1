"""spec/mrope.py: rope_index (training rule and the transformers >= 5.3 variant), decode positions,
sectioned MRoPE tables and their application (hf_reference.md §6).

Expected values come from the worked examples A, B, C of hf_reference.md §6.2, from hand-computed
batches, from plain 1D RoPE and complex-number rotation written here, and from transformers 5.24
(Qwen2_5_VLModel.get_rope_index, Qwen2_5_VLRotaryEmbedding, apply_rotary_pos_emb).

Padding convention: spec writes 1 at padded slots and rope_deltas = max + 1 - L with L the PADDED
row length (transformers v4 / training); transformers v5 writes 0 there and uses the unpadded
length, so its delta is ours + (number of pads). Comparisons below are on unpadded slots.
"""

import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from qwen25vl.spec.config import Qwen25VLConfig
from qwen25vl.spec.mrope import (
    apply_mrope,
    decode_positions,
    mrope_cos_sin,
    rope_index,
    rope_index_transformers_v53,
    rotate_half,
)

CFG = Qwen25VLConfig()
IMG, VID, VS, VE, PAD = (
    CFG.image_token_id,
    CFG.video_token_id,
    CFG.vision_start_token_id,
    CFG.vision_end_token_id,
    151643,
)


def rows3(position_ids, b=0):
    return [position_ids[a, b].tolist() for a in range(3)]


# ---------------------------------------------------------------------------------------------
# Worked examples (hf_reference.md §6.2)

EXAMPLE_A = [10, 11, 12, VS] + [IMG] * 6 + [VE, 13, 14]
EXAMPLE_B = [10, 11, 12, VS] + [VID] * 16 + [VE, 13, 14]


def test_example_a_image():
    pos, delta = rope_index(torch.tensor([EXAMPLE_A]), torch.tensor([[1, 4, 6]]), None, None, None, config=CFG)
    assert pos.dtype == torch.int64 and pos.shape == (3, 1, 13) and delta.dtype == torch.int64
    assert rows3(pos) == [
        [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9],
        [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9],
        [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9],
    ]
    assert delta.tolist() == [[-3]]
    pos53, delta53 = rope_index_transformers_v53(torch.tensor([EXAMPLE_A]), [[1, 4, 6]], None, None, None, config=CFG)
    assert torch.equal(pos53, pos) and torch.equal(delta53, delta)  # the rules agree on images


def test_example_a_left_padded_and_decode():
    ids = torch.tensor([[PAD, PAD] + EXAMPLE_A])
    mask = torch.tensor([[0, 0] + [1] * 13])
    pos, delta = rope_index(ids, torch.tensor([[1, 4, 6]]), None, None, mask, config=CFG)
    assert rows3(pos)[1] == [1, 1, 0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9]  # padded slots get 1
    assert delta.tolist() == [[10 - 15]]  # against the padded length
    # 15 tokens so far: the first generated token sits at 10 = max + 1, then 11, 12
    assert decode_positions(delta, 15, 3).tolist() == [[[10, 11, 12]]] * 3


def test_example_b_video_both_rules():
    ids = torch.tensor([EXAMPLE_B])
    pos, delta = rope_index(ids, None, torch.tensor([[4, 4, 4]]), torch.tensor([1.0]), None, config=CFG)
    assert rows3(pos) == [
        [0, 1, 2, 3] + [4] * 4 + [6] * 4 + [8] * 4 + [10] * 4 + [11, 12, 13],
        [0, 1, 2, 3] + [4, 4, 5, 5] * 4 + [11, 12, 13],
        [0, 1, 2, 3] + [4, 5, 4, 5] * 4 + [11, 12, 13],
    ]
    assert delta.tolist() == [[14 - 23]]
    pos53, delta53 = rope_index_transformers_v53(ids, None, [[4, 4, 4]], None, None, config=CFG)
    assert torch.equal(pos53[:, :, :20], pos[:, :, :20])  # same vision positions
    assert rows3(pos53)[0][20:] == [6, 7, 8]  # text restarts at s + max(h, w)/2, below the temporal ids
    assert delta53.tolist() == [[11 - 23]]


@pytest.mark.parametrize(
    "spgt, relative",
    [
        (0.5, [0, 1, 2, 3, 4, 5, 6, 7]),
        (1.004, [0, 2, 4, 6, 8, 10, 12, 14]),
        (2 / 24, [0, 0, 0, 0, 0, 0, 1, 1]),
    ],
)
def test_example_c_temporal_ids(spgt, relative):
    ids = torch.tensor([[10] + [VID] * 8])  # 8 temporal groups of one merged token each
    pos, _ = rope_index(ids, None, [[8, 2, 2]], [spgt], None, config=CFG)
    assert [p - 1 for p in pos[0, 0, 1:].tolist()] == relative
    assert pos[1, 0, 1:].tolist() == [1] * 8 and pos[2, 0, 1:].tolist() == [1] * 8


def test_batch_text_row_image_row_video_row_by_hand():
    ids = torch.tensor(
        [
            [PAD, PAD, PAD, 20, 21, 22, 23, 24],
            [20, VS, IMG, IMG, IMG, IMG, VE, 21],
            [PAD, PAD, PAD, PAD, VS, VID, VID, VE],
        ]
    )
    mask = (ids != PAD).long()
    pos, delta = rope_index(ids, [[1, 4, 4]], [[2, 2, 2]], [2.0], mask, config=CFG)
    assert rows3(pos, 0) == [[1, 1, 1, 0, 1, 2, 3, 4]] * 3
    assert rows3(pos, 1) == [[0, 1, 2, 2, 2, 2, 4, 5], [0, 1, 2, 2, 3, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]]
    # video at s = 1, 2 s per temporal patch at 2 tokens/s: temporal ids 1 + (0, 4)
    assert rows3(pos, 2) == [[1, 1, 1, 1, 0, 1, 5, 6], [1, 1, 1, 1, 0, 1, 1, 6], [1, 1, 1, 1, 0, 1, 1, 6]]
    assert delta.tolist() == [[5 - 8], [6 - 8], [7 - 8]]
    pos53, delta53 = rope_index_transformers_v53(ids, [[1, 4, 4]], [[2, 2, 2]], [2.0], mask, config=CFG)
    assert rows3(pos53, 2)[0] == [1, 1, 1, 1, 0, 1, 5, 2]  # text after the video at s + 1
    assert delta53.tolist() == [[-3], [-2], [6 - 8]]


def test_no_vision_at_all_is_arange_and_defaults():
    ids = torch.tensor([[PAD, 5, 6, 7], [5, 6, 7, 8]])
    pos, delta = rope_index(ids, None, None, None, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), config=CFG)
    assert pos[:, 0].tolist() == [[1, 0, 1, 2]] * 3 and pos[:, 1].tolist() == [[0, 1, 2, 3]] * 3
    assert delta.tolist() == [[-1], [0]]
    pos_nomask, _ = rope_index(ids[1:], None, None, None, None, config=CFG)
    assert torch.equal(pos_nomask, pos[:, 1:])


# ---------------------------------------------------------------------------------------------
# Tables and application


def inv_freq_by_hand(head_dim, theta):
    return [theta ** (-2 * j / head_dim) for j in range(head_dim // 2)]


def test_mrope_at_5_7_11_is_sectioned():
    inv = inv_freq_by_hand(128, 1e6)
    sel = [5 * f for f in inv[:16]] + [7 * f for f in inv[16:40]] + [11 * f for f in inv[40:64]]
    angles = torch.tensor(sel + sel, dtype=torch.float64)
    cos, sin = mrope_cos_sin(
        torch.tensor([5, 7, 11]).view(3, 1, 1), head_dim=128, theta=1e6, mrope_section=(16, 24, 24)
    )
    assert cos.shape == (1, 1, 128) and cos.dtype == torch.float64
    assert torch.allclose(cos[0, 0], angles.cos(), rtol=0, atol=1e-13)
    assert torch.allclose(sin[0, 0], angles.sin(), rtol=0, atol=1e-13)


@given(st.lists(st.integers(0, 40000), min_size=1, max_size=8))
def test_text_positions_give_plain_rope(positions):
    inv = torch.tensor(inv_freq_by_hand(128, 1e6), dtype=torch.float64)
    p = torch.tensor(positions)
    angles = p.double()[:, None] * inv  # [L, 64], standard 1D RoPE
    cos, sin = mrope_cos_sin(p.view(1, 1, -1).expand(3, 1, -1), head_dim=128, theta=1e6, mrope_section=[16, 24, 24])
    assert torch.allclose(cos[0], torch.cat([angles.cos()] * 2, -1), rtol=0, atol=1e-9)
    assert torch.allclose(sin[0], torch.cat([angles.sin()] * 2, -1), rtol=0, atol=1e-9)


def test_apply_mrope_equals_complex_rotation():
    gen = torch.Generator().manual_seed(1)
    B, N, K, L, D = 2, 4, 2, 5, 16
    q, k = (
        torch.randn(B, N, L, D, generator=gen, dtype=torch.float64),
        torch.randn(B, K, L, D, generator=gen, dtype=torch.float64),
    )
    pos = torch.randint(0, 100, (3, B, L), generator=gen)
    cos, sin = mrope_cos_sin(pos, head_dim=D, theta=10000.0, mrope_section=[2, 3, 3])
    q2, k2 = apply_mrope(q, k, cos, sin)
    angle = torch.atan2(sin[..., : D // 2], cos[..., : D // 2])[:, None]  # [B, 1, L, D/2]
    for x, y in ((q, q2), (k, k2)):
        z = torch.complex(x[..., : D // 2], x[..., D // 2 :]) * torch.exp(1j * angle)  # pair (i, i + D/2)
        assert torch.allclose(y, torch.cat([z.real, z.imag], -1), atol=1e-12)
    assert rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [-3.0, -4.0, 1.0, 2.0]


def test_tables_and_application_match_transformers():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, apply_rotary_pos_emb

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=256,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=16,
            num_hidden_layers=1,
            vocab_size=64,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        )
    )
    rotary = Qwen2_5_VLRotaryEmbedding(cfg.text_config)  # head_dim 128, as every checkpoint
    gen = torch.Generator().manual_seed(2)
    pos = torch.randint(0, 30000, (3, 2, 7), generator=gen)
    hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = mrope_cos_sin(pos, head_dim=128, theta=1e6, mrope_section=[16, 24, 24], dtype=torch.float32)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)  # float32 bit for bit
    cos64, _ = mrope_cos_sin(pos, head_dim=128, theta=1e6, mrope_section=[16, 24, 24])
    assert (cos64 - hf_cos.double()).abs().max() < 1e-2  # float32 angles near 3e4 are off by ~1e-3 rad

    q = torch.randn(2, 4, 7, 128, generator=gen).to(torch.bfloat16)
    k = torch.randn(2, 2, 7, 128, generator=gen).to(torch.bfloat16)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos.to(torch.bfloat16), hf_sin.to(torch.bfloat16))
    q2, k2 = apply_mrope(q, k, cos.to(torch.bfloat16), sin.to(torch.bfloat16))
    assert torch.equal(q2, hf_q) and torch.equal(k2, hf_k)


# ---------------------------------------------------------------------------------------------
# Generated prompts: properties, and agreement with transformers 5.24

text_ids = st.integers(0, 151000)  # below every special id
SPGTS = [0.5, 1.0, 2 / 24, 1.004, 0.25, 3.0, 0.7]


@st.composite
def prompts(draw, videos=True, max_rows=3):
    rows, images, vids, spgts = [], [], [], []
    for _ in range(draw(st.integers(1, max_rows))):
        row = draw(st.lists(text_ids, min_size=1, max_size=4))
        for _ in range(draw(st.integers(0, 3))):
            if videos and draw(st.booleans()):
                t, h, w = draw(st.integers(1, 5)), 2 * draw(st.integers(1, 4)), 2 * draw(st.integers(1, 4))
                vids.append([t, h, w])
                spgts.append(draw(st.sampled_from(SPGTS)))
                pad = VID
            else:
                t, h, w = 1, 2 * draw(st.integers(1, 6)), 2 * draw(st.integers(1, 6))
                images.append([t, h, w])
                pad = IMG
            row += [VS] + [pad] * (t * h * w // 4) + [VE] + draw(st.lists(text_ids, max_size=4))
        rows.append(row)
    L = max(len(r) for r in rows)
    return dict(
        input_ids=torch.tensor([[PAD] * (L - len(r)) + r for r in rows]),
        attention_mask=torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows]),
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor(vids) if vids else None,
        # float32, as the processor returns it; transformers multiplies in this dtype
        second_per_grid_ts=torch.tensor(spgts, dtype=torch.float32) if spgts else None,
    )


def call(fn, p):
    return fn(
        p["input_ids"],
        p["image_grid_thw"],
        p["video_grid_thw"],
        p["second_per_grid_ts"],
        p["attention_mask"],
        config=CFG,
    )


@given(prompts())
def test_rope_index_properties(p):
    pos, delta = call(rope_index, p)
    ids, mask = p["input_ids"], p["attention_mask"].bool()
    B, L = ids.shape
    assert bool((pos[:, ~mask] == 1).all())  # padded slots
    steps = decode_positions(delta, L, 2)
    for b in range(B):
        row, tok = pos[:, b, mask[b]], ids[b, mask[b]]
        text = (tok != IMG) & (tok != VID)
        assert bool((row[0, text] == row[1, text]).all() and (row[1, text] == row[2, text]).all())  # equal on text
        tp = row[0, text]
        assert bool((torch.diff(tp) > 0).all())  # text strictly increasing
        assert tp[0] == 0
        # training rule: every vision position lies between the text before and the text after its span
        idx = torch.arange(len(tok))
        for i in torch.nonzero(~text).flatten().tolist():
            before, after = tp[idx[text] < i], tp[idx[text] > i]
            if len(before):
                assert bool((row[:, i] > before.max()).all())
            if len(after):
                assert bool((row[:, i] < after.min()).all())
        # the next token continues right after the largest position
        assert steps[:, b].tolist() == [[int(row.max()) + 1, int(row.max()) + 2]] * 3
        if not (~text).any():
            assert row.tolist() == [list(range(len(tok)))] * 3  # text-only rows: plain arange


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=32,
            spatial_merge_size=2,
            tokens_per_second=2,
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
    )
    return Qwen2_5_VLModel(cfg).eval()  # ~0.1 M parameters; only get_rope_index is used


def hf_rope_index(model, p):
    ids = p["input_ids"]
    mm = (ids == IMG).long() + 2 * (ids == VID).long()  # v5: 0 text, 1 image pad, 2 video pad
    return model.get_rope_index(
        ids, mm, p["image_grid_thw"], p["video_grid_thw"], p["second_per_grid_ts"], p["attention_mask"]
    )


def assert_same_on_unpadded(ours, theirs, mask):
    pos, delta = ours
    hf_pos, hf_delta = theirs
    m = mask.bool()
    assert torch.equal(pos[:, m], hf_pos[:, m])
    n_pad = (~m).sum(1, keepdim=True)
    assert torch.equal(delta, hf_delta.to(torch.int64) - n_pad)  # delta convention: padded vs unpadded L


@given(prompts(videos=False))
def test_images_agree_with_transformers(hf_model, p):
    assert_same_on_unpadded(call(rope_index, p), hf_rope_index(hf_model, p), p["attention_mask"])


@given(prompts())
def test_videos_agree_with_transformers_variant(hf_model, p):
    assert_same_on_unpadded(call(rope_index_transformers_v53, p), hf_rope_index(hf_model, p), p["attention_mask"])


def test_training_rule_differs_from_transformers_after_video(hf_model):
    p = dict(
        input_ids=torch.tensor([EXAMPLE_B]),
        attention_mask=torch.ones(1, 23, dtype=torch.int64),
        image_grid_thw=None,
        video_grid_thw=torch.tensor([[4, 4, 4]]),
        second_per_grid_ts=None,
    )
    hf_pos, _ = hf_rope_index(hf_model, p)
    ours, _ = call(rope_index, p)
    assert hf_pos[0, 0, 20:].tolist() == [6, 7, 8] and ours[0, 0, 20:].tolist() == [11, 12, 13]
    assert torch.equal(hf_pos[:, :, :20], ours[:, :, :20])


def test_long_row_beyond_16k_positions_is_fast_and_right(hf_model):
    # 10 images of grid (1, 56, 56) (784 tokens, 28 x 28 merged) between 1500-token texts: 24360 tokens
    text = list(range(1, 1501))
    row = list(text)
    for _ in range(10):
        row += [VS] + [IMG] * 784 + [VE] + text
    L = len(row)
    ids = torch.tensor([row, [PAD] * 784 + row[:-784]])  # second row left padded, ends earlier
    mask = (ids != PAD).long()
    grids = torch.tensor([[1, 56, 56]] * 20)
    start = time.perf_counter()
    pos, delta = rope_index(ids, grids, None, None, mask, config=CFG)
    elapsed = time.perf_counter() - start
    # each round advances 1 (VS) + 28 (image) + 1 (VE) + 1500 text positions
    assert L == 24360 and int(pos[:, 0].max()) == 1500 + 10 * 1530 - 1 == 16799
    assert pos[0, 0, -1] == 16799 and delta[0, 0] == 16800 - L
    assert elapsed < 1.0, f"rope_index on 2 x {L} tokens took {elapsed:.2f} s"
    p = dict(input_ids=ids, attention_mask=mask, image_grid_thw=grids, video_grid_thw=None, second_per_grid_ts=None)
    assert_same_on_unpadded((pos, delta), hf_rope_index(hf_model, p), mask)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_more_pad_runs_than_grid_rows():
    ids = torch.tensor([[VS, IMG, VE, 5, VS, IMG, VE]])
    with pytest.raises(ValueError, match=r"input_ids has 2 image pad runs but image_grid_thw has 1 rows"):
        rope_index(ids, [[1, 2, 2]], None, None, None, config=CFG)


def test_fewer_pad_runs_than_grid_rows():
    ids = torch.tensor([[VS, VID, VE, 5]])
    with pytest.raises(ValueError, match=r"video_grid_thw has 2 rows but input_ids has 1 video pad runs"):
        rope_index(ids, None, [[1, 2, 2], [1, 2, 2]], None, None, config=CFG)


def test_run_length_does_not_match_grid():
    ids = torch.tensor([[5, VS] + [IMG] * 4 + [VE]])
    with pytest.raises(
        ValueError,
        match=r"input_ids row 0: image pad run at tokens 2..5 has 4 tokens, "
        r"but image_grid_thw\[0\] = \[1, 4, 6\] needs t\*h\*w/4 = 6",
    ):
        rope_index(ids, [[1, 4, 6]], None, None, None, config=CFG)


def test_bad_attention_mask_and_inputs():
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=r"attention_mask shape \[1, 4\] does not match input_ids shape \[1, 3\]"):
        rope_index(ids, None, None, None, torch.ones(1, 4), config=CFG)
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        rope_index(ids, None, None, None, torch.tensor([[1, 2, 2]]), config=CFG)
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor of shape \[B, L\]"):
        rope_index(ids[0], None, None, None, None, config=CFG)
    with pytest.raises(ValueError, match="second_per_grid_ts has 2 values but video_grid_thw has 1 rows"):
        rope_index(torch.tensor([[VID] * 2]), None, [[2, 2, 2]], [1.0, 2.0], None, config=CFG)
    with pytest.raises(ValueError, match="second_per_grid_ts must be finite and >= 0"):
        rope_index(torch.tensor([[VID] * 2]), None, [[2, 2, 2]], [-1.0], None, config=CFG)


def test_odd_grid_not_divisible_by_merge():
    ids = torch.tensor([[VS] + [IMG] * 5 + [VE]])
    with pytest.raises(
        ValueError, match=r"image_grid_thw\[0\] = \[1, 5, 4\]: h and w must be multiples of merge_size 2"
    ):
        rope_index(ids, [[1, 5, 4]], None, None, None, config=CFG)


def test_bad_table_and_decode_arguments():
    pos = torch.zeros(3, 1, 2, dtype=torch.int64)
    with pytest.raises(
        ValueError, match=r"mrope_section \[16, 24, 16\] must be three sizes summing to head_dim/2 = 64"
    ):
        mrope_cos_sin(pos, head_dim=128, theta=1e6, mrope_section=[16, 24, 16])
    with pytest.raises(ValueError, match=r"position_ids must have shape \[3, B, L\]"):
        mrope_cos_sin(pos[0], head_dim=128, theta=1e6, mrope_section=[16, 24, 24])
    q = torch.zeros(1, 2, 2, 8)
    with pytest.raises(ValueError, match=r"cos and sin must have shape \[B, L, D\] = \[1, 2, 8\]"):
        apply_mrope(q, q, torch.zeros(1, 3, 8), torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match=r"k shape \[1, 2, 3, 8\] does not match q shape"):
        apply_mrope(q, torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match=r"rope_deltas must have shape \[B, 1\]"):
        decode_positions(torch.tensor([3]), 5, 1)
    with pytest.raises(ValueError, match="steps must be a non-negative integer, got -1"):
        decode_positions(torch.tensor([[3]]), 5, -1)


def test_video_time_ids_use_qwens_float32_arithmetic():
    # 12 frames sampled from 396 at 60 fps: second_per_grid_t = 2 / (12 / 396 * 60) = 1.1 exactly in
    # rationals, 1.0999999999999999 in float64. By hand the ids are floor(2.2 k) = 0, 2, 4, 6, 8, 11, ...
    # float64 arithmetic gives 10 at k = 5 and 21 at k = 10; Qwen's float32 tensors give 11 and 22.
    cfg = Qwen25VLConfig()
    V, S = cfg.video_token_id, cfg.vision_start_token_id
    grid = torch.tensor([[12, 2, 2]])  # 12 temporal groups of one merged token each
    ids = torch.tensor([[S] + [V] * 12 + [S]])
    spgt = 2 / (12 / 396 * 60)
    pos, _ = rope_index(ids, None, grid, torch.tensor([spgt], dtype=torch.float64), None, config=cfg)
    assert pos[0, 0, 1:13].tolist() == [1 + (22 * k) // 10 for k in range(12)]
