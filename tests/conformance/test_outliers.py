"""A real checkpoint's activation range: one residual channel far above the rest (model_outliers).

Measured whole, such a channel's error hides every other channel's, so a hidden-state comparison weighs
no channel above CHANNEL_CAP x the median channel's RMS (compare.channel_weights). Without that, a wrong
vision attention in a bfloat16 port passed every vision block of model_outliers and was blamed on the
merger; a float16 norm that overflows on the channel is the mistake the case was built to show."""

from pathlib import Path

import pytest
import torch
from qwen25vl.conformance import compare, runner
from qwen25vl.conformance.mistakes.vision import RmsNormSquaresInFloat16, VisionRotaryAdjacentPairs

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _hidden(rows=40, width=16, seed=0):
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_balanced_channels_are_weighed_as_before():
    g = _hidden()
    x = g + 0.01 * _hidden(seed=1)
    e = compare.float_errors(g, x, channels=True)
    assert e["capped"] == [] and e["rel"] == compare.float_errors(g, x)["rel"]  # bit-identical


def test_a_massive_channel_no_longer_hides_the_others():
    g = _hidden()
    g[:, 3] += 2e4  # one channel at 2e4, as a real vision tower's
    x = g.clone()
    x[:, 7] += 1.0  # an ordinary channel entirely wrong
    whole = compare.float_errors(g, x)["rel"]
    capped = compare.float_errors(g, x, channels=True)
    assert whole < 1e-3  # what the massive channel made of it: within any bfloat16 budget
    assert capped["capped"] == [3] and capped["rel"] > 0.1
    assert capped["worst"][1] == 7  # the report points at the wrong channel, not at the massive one
    # the massive channel itself still counts, at CHANNEL_CAP x the median
    y = g.clone()
    y[:, 3] *= 1.01
    assert compare.float_errors(g, y, channels=True)["rel"] > 0.005  # 1% of its weight in 16 channels


def test_padded_rows_and_zero_tensors():
    g = torch.zeros(1, 3, 4, dtype=torch.float64)
    assert compare.float_errors(g, g.clone(), channels=True)["rel"] == 0.0
    g[0, 1:] = _hidden(2, 4)
    x = g.clone()
    x[0, 0] = 1e6  # a padded position
    e = compare.float_errors(g, x, torch.tensor([[0, 1, 1]]), channels=True)
    assert e["rel"] == 0.0 and e["capped"] == []


def test_the_verdict_names_the_capped_channels():
    g = _hidden()
    g[:, 3] += 2e4
    v = compare.floats(g, g + 0.5, control={"bfloat16": 1e-3}, dtype="bfloat16")
    assert v.status == "fail" and "channels [3] capped at 8x the median RMS" in v.metric


def _first(adapter, stages=r"^vision\."):
    paths = runner.select_cases(FIXTURES, "^model_outliers$")
    _, results = runner.run_suite(paths, runner.SuiteOptions(only_stages=stages), adapter=adapter)
    return runner.first_divergence(results)


def test_a_bfloat16_port_with_a_wrong_vision_attention_is_caught_at_the_first_block():
    first = _first(VisionRotaryAdjacentPairs("bfloat16"))
    assert first is not None and first.stage == "vision.block.0" and first.status == "fail", first


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_norm_that_sums_squares_in_float16_is_named_where_the_channel_first_meets_a_norm(dtype):
    """The channel is written by block 0's MLP, so block 1's first norm is where a float16 sum overflows."""
    first = _first(RmsNormSquaresInFloat16(dtype))
    assert first is not None and first.stage == "vision.block.1" and first.status == "fail", first
    assert "sum of squares in float16" in first.note, first.note


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decoder_norms_in_float16_are_named_at_layer_1_and_the_erased_rows_located(dtype):
    """Each <|im_start|> of model_text carries the decoder's massive activation from layer 0's MLP on: layer 1's
    first norm is where a float16 sum overflows, and at the final norm those rows come out zero."""
    from qwen25vl.conformance.mistakes.vision import TextRmsNormSquaresInFloat16

    paths = runner.select_cases(FIXTURES, "^model_text$")
    _, results = runner.run_suite(
        paths, runner.SuiteOptions(only_stages=r"^text\."), adapter=TextRmsNormSquaresInFloat16(dtype)
    )
    first = runner.first_divergence(results)
    assert first is not None and first.stage == "text.layer.1" and first.status == "fail", first
    assert "the decoder's RMSNorm sums squares in float16" in first.note, first.note
    norm = next(r for r in results if r.stage == "text.norm")
    assert "5 of 394 tokens come out all zero where the golden's are not" in norm.where, norm.where
    assert "(all id 151644, a text token)" in norm.where, norm.where
