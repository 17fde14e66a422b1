"""Where a failing hidden state's error sits (compare.error_rows), said in the model's terms (locate)."""

import torch
from qwen25vl.conformance import compare
from qwen25vl.conformance.locate import locate_rows
from qwen25vl.tools.make_tiny_checkpoint import tiny_config

CONFIG = tiny_config()
IMG = CONFIG.image_token_id


def _hidden(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ids(B, L):
    ids = torch.arange(1000, 1000 + B * L).reshape(B, L)
    ids[:, 2:6] = IMG
    return ids


def test_erased_rows_are_counted_and_named_by_token():
    g = _hidden(1, 40, 16)
    x = g + 1e-3 * _hidden(1, 40, 16, seed=1)
    x[0, [3, 9]] = 0  # two rows erased (rsqrt(inf) = 0)
    rows = compare.error_rows(g, x)
    assert rows["zero_count"] == 2 and rows["zero_rows"] == [[0, 3], [0, 9]]
    said = locate_rows("text.layer.1", rows, {"input_ids": _ids(1, 40)}, CONFIG)
    assert (
        "2 of 40 tokens come out all zero where the golden's are not: tokens 3, 9 (1 image pad, 1 text token)" in said
    )


def test_concentrated_error_is_said_and_spread_error_is_not():
    g = _hidden(1, 100, 16)
    x = g + 1e-6 * _hidden(1, 100, 16, seed=1)
    x[0, [2, 3, 4]] += 1.0  # three image pads wrong
    rows = compare.error_rows(g, x)
    assert rows["of"] == 3 and rows["share"] > 0.99 and sorted(r[1] for r in rows["rows"]) == [2, 3, 4]
    said = locate_rows("text.inputs_embeds", rows, {"input_ids": _ids(1, 100)}, CONFIG)
    assert "of the error is in 3 of 100 tokens" in said and "all id 151655, an image pad" in said
    spread = compare.error_rows(g, g + 1e-3 * _hidden(1, 100, 16, seed=2))
    assert spread["rows"] == [] and spread["zero_count"] == 0
    assert locate_rows("text.layer.0", spread, {"input_ids": _ids(1, 100)}, CONFIG) == ""


def test_a_bug_of_one_batch_row_is_said():
    g = _hidden(2, 30, 16)
    x = g.clone()
    x[1] += 0.1 * _hidden(30, 16, seed=3)  # the second row of a padded batch wrong throughout
    rows = compare.error_rows(g, x)
    assert rows["batch"][0] == 1 and rows["batch"][1] > 0.999
    assert "100% of the error is in batch row 1" in locate_rows(
        "text.layer.0", rows, {"input_ids": _ids(2, 30)}, CONFIG
    )


def test_masked_padding_is_not_an_erased_row():
    g = _hidden(1, 20, 8)
    x = g.clone()
    x[0, :4] = 0  # left padding: the port writes zeros there, the mask hides the golden
    mask = torch.ones(1, 20, dtype=torch.int64)
    mask[0, :4] = 0
    rows = compare.error_rows(g, x, mask)
    assert rows["zero_count"] == 0 and rows["rows"] == []


def test_vision_rows_are_patches():
    g = _hidden(64, 16)
    x = g.clone()
    x[5] = 0
    rows = compare.error_rows(g, x)
    grid = {"image_grid_thw": torch.tensor([[1, 8, 8]])}
    said = locate_rows("vision.block.2", rows, grid, CONFIG)
    # patch 5 in 2x2 merge-block order is (row 0, col 3): on the top edge of the first 8x8 window (112 px)
    assert (
        "1 of 64 patches come out all zero where the golden's are not: patch 5 (row 0, col 3) (1 of 1 on a window edge)"
        in said
    )
