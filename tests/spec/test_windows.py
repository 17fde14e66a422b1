"""spec/windows.py: vision rotary positions, 2D rotary, window partition (hf_reference.md §5 steps 2-6).

Expected values come from the literal examples of hf_reference.md, from a brute-force walk of the
reference's padded-canvas rule written here, from the patchify row formula (§10 step 6), and from
transformers 5.24 (vision_utils helpers, the vision rotary module and its apply function).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from qwen25vl.spec.windows import apply_vision_rotary, vision_rotary_cos_sin, vision_rotary_positions, window_partition

# ---------------------------------------------------------------------------------------------
# Literal examples


def test_rotary_positions_grid_1_4_6():
    expected = [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (0, 2),
        (0, 3),
        (1, 2),
        (1, 3),
        (0, 4),
        (0, 5),
        (1, 4),
        (1, 5),
        (2, 0),
        (2, 1),
        (3, 0),
        (3, 1),
        (2, 2),
        (2, 3),
        (3, 2),
        (3, 3),
        (2, 4),
        (2, 5),
        (3, 4),
        (3, 5),
    ]
    pos = vision_rotary_positions(torch.tensor([[1, 4, 6]]))
    assert pos.dtype == torch.int64 and pos.shape == (24, 2)
    assert [tuple(p) for p in pos.tolist()] == expected


def test_rotary_positions_repeat_per_temporal_group_and_concatenate_items():
    pos = vision_rotary_positions([[2, 2, 2], [1, 2, 4]]).tolist()
    block = [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert pos == block + block + block + [[0, 2], [0, 3], [1, 2], [1, 3]]


@pytest.mark.parametrize(
    "grid, index, cu",
    [
        (
            [[1, 8, 12]],
            [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21, 4, 5, 10, 11, 16, 17, 22, 23],
            [0, 64, 96],
        ),
        ([[2, 8, 8]], list(range(32)), [0, 64, 128]),
        ([[1, 4, 4]], [0, 1, 2, 3], [0, 16]),
        ([[1, 10, 6], [1, 4, 4]], list(range(19)), [0, 48, 60, 76]),
    ],
)
def test_window_partition_literal(grid, index, cu):
    window_index, cu_window_seqlens, _ = window_partition(torch.tensor(grid))
    assert window_index.dtype == torch.int64 and cu_window_seqlens.dtype == torch.int64
    assert window_index.tolist() == index
    assert cu_window_seqlens.tolist() == cu


def test_window_partition_grid_1_12_20_window_sizes():
    # units 6x10: 2x3 windows holding 16, 16, 8 | 8, 8, 4 units
    _, cu, _ = window_partition([[1, 12, 20]])
    assert torch.diff(cu).tolist() == [4 * n for n in (16, 16, 8, 8, 8, 4)]


def test_full_attention_cu_seqlens_per_frame():
    _, _, cu_seqlens = window_partition([[2, 8, 8], [1, 4, 6]])
    assert cu_seqlens.dtype == torch.int64
    assert cu_seqlens.tolist() == [0, 64, 128, 152]


def test_vision_rotary_cos_sin_by_hand():
    # head_dim 8: D/4 = 2 frequencies, 10000^0 = 1 and 10000^(-1/2) = 0.01
    cos, sin = vision_rotary_cos_sin(torch.tensor([[3, 5]]), head_dim=8)
    angles = [3, 0.03, 5, 0.05, 3, 0.03, 5, 0.05]
    assert cos.dtype == torch.float64 and cos.shape == (1, 8)
    assert torch.allclose(cos[0], torch.tensor([math.cos(a) for a in angles], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(sin[0], torch.tensor([math.sin(a) for a in angles], dtype=torch.float64), rtol=0, atol=1e-15)


def test_apply_vision_rotary_by_hand():
    # quarter turn on every pair (i, i + D/2): (x_i, x_{i+D/2}) -> (-x_{i+D/2}, x_i)
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)  # [P=1, N=1, D=4]
    cos, sin = torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64)
    assert apply_vision_rotary(x, cos, sin).tolist() == [[[-3.0, -4.0, 1.0, 2.0]]]
    # identity at angle 0
    assert torch.equal(
        apply_vision_rotary(x, torch.ones(1, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)), x
    )


def test_apply_vision_rotary_keeps_input_dtype():
    x = torch.randn(6, 2, 8, dtype=torch.bfloat16)
    cos, sin = vision_rotary_cos_sin(vision_rotary_positions([[1, 2, 6]])[:6], 8, dtype=torch.float32)
    assert apply_vision_rotary(x, cos, sin).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Another formula: the reference's padded canvas walked by brute force, and the patchify row order


def canvas_windows(grid, ws=4, m=2):
    """hf_reference.md §5 step 4 literally: pad each frame by ws - (L mod ws) units with empties,
    cut into ws x ws windows in (t, window row, window col) order, read row-major, drop empties;
    returns (index, raw cu with repeats, cu without consecutive repeats)."""
    index, raw, offset = [], [0], 0
    for t, h, w in grid:
        lh, lw = h // m, w // m
        hp, wp = lh + ws - lh % ws, lw + ws - lw % ws
        for tt in range(t):
            for wr in range(hp // ws):
                for wc in range(wp // ws):
                    n = 0
                    for r in range(wr * ws, wr * ws + ws):
                        for c in range(wc * ws, wc * ws + ws):
                            if r < lh and c < lw:
                                index.append(offset + (tt * lh + r) * lw + c)
                                n += 1
                    raw.append(raw[-1] + n * m * m)
        offset += t * lh * lw
    dedup = raw[:1] + [b for a, b in zip(raw, raw[1:]) if b != a]
    return index, raw, dedup


def test_canvas_walk_matches_documented_raw_lists():
    # the raw lists of hf_reference.md §5 step 4, repeats from the empty padding windows included
    assert canvas_windows([[1, 8, 12]])[1] == [0, 64, 96, 96, 96]
    assert canvas_windows([[2, 8, 8]])[1] == [0, 64, 64, 64, 64, 128, 128, 128, 128]


grids = st.lists(
    st.tuples(st.integers(1, 3), st.integers(1, 14).map(lambda v: 2 * v), st.integers(1, 14).map(lambda v: 2 * v)),
    min_size=1,
    max_size=3,
)


@given(grids)
def test_window_partition_matches_canvas_walk(grid):
    index, _, cu = canvas_windows(grid)
    window_index, cu_window_seqlens, _ = window_partition(torch.tensor(grid))
    assert window_index.tolist() == index
    assert cu_window_seqlens.tolist() == cu


@given(grids)
def test_window_partition_properties(grid):
    window_index, cu_window, cu_full = window_partition(grid)
    P = sum(t * h * w for t, h, w in grid)
    assert sorted(window_index.tolist()) == list(range(P // 4))  # a permutation of the units
    assert cu_window[0] == 0 and cu_window[-1] == P
    assert bool((torch.diff(cu_window) > 0).all())  # strictly increasing: no empty windows
    assert bool((cu_window % 4 == 0).all())  # windows never split a merge block
    # where every unit lives: (item, frame, unit row, unit col)
    where = [
        (i, tt, r, c)
        for i, (t, h, w) in enumerate(grid)
        for tt in range(t)
        for r in range(h // 2)
        for c in range(w // 2)
    ]
    for a, b in zip(cu_window.tolist(), cu_window[1:].tolist()):
        units = [where[u] for u in window_index[a // 4 : b // 4].tolist()]
        assert len({(i, tt) for i, tt, _, _ in units}) == 1  # one frame of one item
        assert len({(r // 4, c // 4) for _, _, r, c in units}) == 1  # one aligned 4x4 square
        assert [(r, c) for _, _, r, c in units] == sorted((r, c) for _, _, r, c in units)  # row-major inside
    # full-attention segments: one per frame, h*w patches each, and frames stay contiguous in window order
    frames = [h * w for t, h, w in grid for _ in range(t)]
    assert torch.diff(cu_full).tolist() == frames
    frame_of_unit = [(i, tt) for i, tt, _, _ in where]
    permuted = [frame_of_unit[u] for u in window_index.tolist()]
    for a, b in zip(cu_full.tolist(), cu_full[1:].tolist()):
        assert len(set(permuted[a // 4 : b // 4])) == 1


@given(grids)
def test_rotary_positions_follow_patchify_row_formula(grid):
    pos = vision_rotary_positions(torch.tensor(grid))
    assert pos.shape == (sum(t * h * w for t, h, w in grid), 2)
    offset = 0
    for t, h, w in grid:
        expected = torch.empty(t * h * w, 2, dtype=torch.int64)
        for tt in range(t):
            for r in range(h):
                for c in range(w):
                    # hf_reference.md §10 step 6: row of patch (t, r, c)
                    row = tt * h * w + ((r // 2) * (w // 2) + c // 2) * 4 + (r % 2) * 2 + (c % 2)
                    expected[row] = torch.tensor([r, c])
        assert torch.equal(pos[offset : offset + t * h * w], expected)
        assert (
            int(pos[offset : offset + t * h * w, 0].max()) == h - 1
            and int(pos[offset : offset + t * h * w, 1].max()) == w - 1
        )
        offset += t * h * w


# ---------------------------------------------------------------------------------------------
# transformers 5.24


@given(grids)
def test_agrees_with_transformers_vision_utils(grid):
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    g = torch.tensor(grid)
    window_index, cu_window, cu_full = window_partition(g)
    hf_index, hf_cu = get_vision_window_index(g, spatial_merge_size=2, window_size=112, patch_size=14)
    assert torch.equal(window_index, hf_index.to(torch.int64))
    assert torch.equal(cu_window, hf_cu.to(torch.int64))
    assert torch.equal(cu_full, get_vision_cu_seqlens(g).to(torch.int64))
    assert torch.equal(vision_rotary_positions(g), get_vision_position_ids(g, 2).to(torch.int64))


@pytest.fixture(scope="module")
def hf_vision_rotary():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding

    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=160, num_heads=2, intermediate_size=16, out_hidden_size=32)
    )
    return Qwen2_5_VLVisionRotaryEmbedding(cfg.vision_config)  # head_dim 80, theta 10000, as the checkpoints


def test_rotary_tables_and_application_match_transformers(hf_vision_rotary):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    grid = torch.tensor([[2, 8, 12], [1, 36, 20]])
    pos = vision_rotary_positions(grid)
    cos32, sin32 = vision_rotary_cos_sin(pos, 80, dtype=torch.float32)
    hf_cos, hf_sin = hf_vision_rotary(torch.zeros(1), pos)
    assert torch.equal(cos32, hf_cos) and torch.equal(sin32, hf_sin)  # float32 tables bit for bit
    cos64, sin64 = vision_rotary_cos_sin(pos, 80)
    assert (cos64 - hf_cos.double()).abs().max() < 1e-5  # float64 within float32 rounding of the angles

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(len(pos), 2, 80, generator=gen).to(torch.bfloat16)
    k = torch.randn(len(pos), 2, 80, generator=gen).to(torch.bfloat16)
    hf_q, hf_k = apply_rotary_pos_emb_vision(q, k, hf_cos, hf_sin)
    assert torch.equal(apply_vision_rotary(q, cos32, sin32), hf_q)
    assert torch.equal(apply_vision_rotary(k, cos32, sin32), hf_k)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "grid, match",
    [
        ([[1, 5, 4]], r"grid_thw\[0\] = \[1, 5, 4\]: h and w must be multiples of merge_size 2"),
        ([[1, 4, 4], [1, 4, 6], [2, 4, 7]], r"grid_thw\[2\] = \[2, 4, 7\]"),
        ([[0, 4, 4]], r"grid_thw\[0\] = \[0, 4, 4\] must be positive"),
        ([1, 4, 4], r"grid_thw must have shape \[k, 3\].*\[3\]"),
        ([[1.0, 4.0, 4.0]], r"grid_thw must hold integers"),
    ],
)
def test_bad_grid(grid, match):
    with pytest.raises(ValueError, match=match):
        window_partition(grid)
    with pytest.raises(ValueError, match=match):
        vision_rotary_positions(grid)


def test_bad_window_and_rotary_arguments():
    with pytest.raises(ValueError, match="window_size 100 is not a multiple of patch_size\\*merge_size = 28"):
        window_partition([[1, 4, 4]], window_size=100)
    with pytest.raises(ValueError, match="head_dim must be a positive multiple of 4.*10"):
        vision_rotary_cos_sin(torch.zeros(3, 2, dtype=torch.int64), 10)
    with pytest.raises(ValueError, match=r"positions must have shape \[P, 2\].*\[3, 3\]"):
        vision_rotary_cos_sin(torch.zeros(3, 3, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match=r"x must have shape \[P, N, D\]"):
        apply_vision_rotary(torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"cos and sin must have shape \[P, D\] = \[3, 8\]"):
        apply_vision_rotary(torch.zeros(3, 1, 8), torch.zeros(4, 8), torch.zeros(4, 8))
