"""spec.windows.window_row_order: the unit order of window_partition expanded to patch rows (literal cases)."""

import torch
from qwen25vl.spec.windows import window_partition, window_row_order


def test_literal_orders():
    assert window_row_order(torch.tensor([1, 0])).tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert window_row_order(torch.tensor([2, 0, 1]), merge_size=1).tolist() == [2, 0, 1]
    assert window_row_order(torch.tensor([0, 1]), merge_size=3).tolist() == list(range(18))
    assert window_row_order(torch.zeros(0, dtype=torch.int64)).tolist() == []


def test_grid_8x12_window_order():
    """grid (1, 8, 12): units 4x6, windows of 4x4 units then 4x2 (window_partition's docstring example)."""
    wi, _, _ = window_partition(torch.tensor([[1, 8, 12]]))
    order = window_row_order(wi)
    assert order.shape == (96,) and sorted(order.tolist()) == list(range(96))
    assert order[:8].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # units 0, 1
    assert order[16:20].tolist() == [24, 25, 26, 27]  # place 4 holds unit 6 (second unit row)
    assert order[64:68].tolist() == [16, 17, 18, 19]  # the second window starts at unit 4
