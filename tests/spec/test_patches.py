"""patchify / unpatchify: the hf_reference.md §2 layout written as loops, round trips, padding, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from qwen25vl.spec.patches import patchify, unpatchify


def patchify_by_loops(frames, p=14, tp=2, m=2):
    """§2 read literally: rows t, block row, block col, row in block, col in block; value[c, tau, y, x]."""
    T, C, H, W = frames.shape
    if T % tp:
        frames = np.concatenate([frames] + [frames[-1:]] * (tp - T % tp))
    gt, gh, gw = frames.shape[0] // tp, H // p, W // p
    rows = []
    for t in range(gt):
        for bh in range(gh // m):
            for bw in range(gw // m):
                for mh in range(m):
                    for mw in range(m):
                        row, col = bh * m + mh, bw * m + mw
                        value = np.empty(C * tp * p * p, frames.dtype)
                        for c in range(C):
                            for tau in range(tp):
                                patch = frames[t * tp + tau, c, row * p : (row + 1) * p, col * p : (col + 1) * p]
                                start = c * tp * p * p + tau * p * p
                                value[start : start + p * p] = patch.reshape(-1)
                        rows.append(value)
    return np.stack(rows), [gt, gh, gw]


@pytest.mark.parametrize("shape", [(1, 3, 28, 28), (2, 3, 56, 84), (3, 3, 84, 56), (4, 3, 28, 56)])
def test_layout_matches_reference_loops(shape):
    frames = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected, grid = patchify_by_loops(frames)
    pixel_values, grid_thw = patchify(frames)
    assert grid_thw.dtype == torch.int64 and grid_thw.tolist() == [grid]
    np.testing.assert_array_equal(pixel_values.numpy(), expected)


def test_small_sizes_by_hand():
    # p=1, tp=2, m=2 on a 1-channel 2x2 image: one block, rows TL, TR, BL, BR, each (tau0, tau1)
    frames = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    pixel_values, grid = patchify(frames, patch_size=1)
    assert grid.tolist() == [[1, 2, 2]]
    assert pixel_values.tolist() == [[1, 1], [2, 2], [3, 3], [4, 4]]
    # a 2x4 image: blocks in raster order, each a contiguous quadruple
    frames = torch.arange(8.0).reshape(1, 1, 2, 4)
    assert patchify(frames, patch_size=1)[0][:, 0].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


frame_shapes = st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


@given(frame_shapes, st.integers(0, 2**32 - 1))
def test_round_trip_and_padding(shape, seed):
    T, C, bh, bw = shape
    frames = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (T, C, bh * 28, bw * 28)))
    pixel_values, grid = patchify(frames)
    assert pixel_values.shape == (grid.prod().item(), C * 2 * 14 * 14)
    assert grid.tolist() == [[(T + 1) // 2, bh * 2, bw * 2]]
    back = unpatchify(pixel_values, grid, channels=C)
    assert torch.equal(back[:T], frames)
    if T % 2:  # odd T: the last frame is repeated
        assert torch.equal(back[T], frames[-1])


@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_single_image_halves_identical(bh, bw, seed):
    image = torch.from_numpy(np.random.default_rng(seed).random((1, 3, bh * 28, bw * 28), dtype=np.float32))
    pixel_values, grid = patchify(image)
    assert grid.tolist() == [[1, bh * 2, bw * 2]]
    per_channel = pixel_values.reshape(-1, 3, 2, 196)
    assert torch.equal(per_channel[:, :, 0], per_channel[:, :, 1])


def test_dtype_kept_and_numpy_accepted():
    frames = np.zeros((1, 3, 28, 28), np.uint8)
    assert patchify(frames)[0].dtype == torch.uint8
    assert patchify(torch.zeros(1, 3, 28, 28, dtype=torch.bfloat16))[0].dtype == torch.bfloat16


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[T, C, H, W\].*\(3, 28, 28\)"):
        patchify(torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="height 30.*28"):
        patchify(torch.zeros(1, 3, 30, 28))
    with pytest.raises(ValueError, match=r"\(0, 3, 28, 28\)"):
        patchify(torch.zeros(0, 3, 28, 28))
    with pytest.raises(TypeError, match="list"):
        patchify([[0]])
    with pytest.raises(ValueError, match="patch_size"):
        patchify(torch.zeros(1, 3, 28, 28), patch_size=0)
    with pytest.raises(ValueError, match=r"\(4, 1176\).*\[1, 2, 4\]"):
        unpatchify(torch.zeros(4, 1176), torch.tensor([[1, 2, 4]]))
    with pytest.raises(ValueError, match="merge_size"):
        unpatchify(torch.zeros(3, 1176), torch.tensor([[1, 1, 3]]))
