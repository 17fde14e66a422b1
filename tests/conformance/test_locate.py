"""Where a failing hidden state's error sits (compare.error_rows), said in the model's terms (locate)."""

from pathlib import Path

import torch
from qwen25vl.conformance import compare, runner
from qwen25vl.conformance.fixtures import load_case
from qwen25vl.conformance.locate import locate_frames, locate_kinds, locate_rows
from qwen25vl.conformance.mistakes import by_name
from qwen25vl.tools.make_tiny_checkpoint import tiny_config

CONFIG = tiny_config()
IMG = CONFIG.image_token_id
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


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
    # the patch embedding runs before any window attention: no window is named there
    embed = locate_rows("vision.patch_embed", rows, grid, CONFIG)
    assert "patch 5 (row 0, col 3)" in embed and "window" not in embed


def test_an_error_that_enters_at_one_token_says_where_it_starts():
    """Causal: a bug entering at token 30 leaves tokens 0-29 at the run's own noise."""
    g = _hidden(1, 100, 16)
    x = g + 1e-3 * _hidden(1, 100, 16, seed=1)
    x[0, 30:] += 0.05 * _hidden(70, 16, seed=2)
    rows = compare.error_rows(g, x)
    assert rows["spans"] == [[0, 30, 99, 30, 0]]
    ids = _ids(1, 100)
    ids[0, 30] = IMG
    said = locate_rows("text.layer.0", rows, {"input_ids": ids}, CONFIG)
    assert "the error starts at token 30 (id 151655, an image pad): the 30 tokens before it are quiet" in said


def test_precision_noise_says_no_span_even_when_rows_differ_in_scale():
    g = _hidden(2, 200, 16)
    scale = torch.logspace(-1, 1, 200, dtype=torch.float64)[:, None]  # rows 100x apart in error
    x = g + 1e-2 * scale * _hidden(2, 200, 16, seed=3)
    assert compare.error_rows(g, x)["spans"] == []
    kl = compare.logit_stats(g, x, spans=True)  # [B, L, V] as logits: KL per position
    assert kl["rows"]["spans"] == []


def test_a_per_token_error_says_both_ends_and_the_masked_padding_is_no_quiet_run():
    g = _hidden(2, 60, 16)
    x = g + 1e-4 * _hidden(2, 60, 16, seed=4)
    x[1, 20:28] += 1.0  # the image pads of row 1 embedded wrong; the tokens after them untouched
    x[:, :5] = 0  # row 0's left padding, written as zeros by the port: masked, so no quiet run
    mask = torch.ones(2, 60, dtype=torch.int64)
    mask[:, :5] = 0
    rows = compare.error_rows(g, x, mask)
    assert rows["spans"] == [[1, 20, 27, 15, 32]]
    ids = _ids(2, 60)
    ids[1, 20:28] = IMG
    said = locate_rows("text.inputs_embeds", rows, {"input_ids": ids}, CONFIG)
    assert (
        "the error in row 1 sits in token 20 (id 151655, an image pad) to 27 (id 151655, an image pad): "
        "the 15 tokens before and the 32 after are quiet (mean squared error <= 1% of the rest's)"
    ) in said


def test_failing_logits_say_where_the_kl_starts():
    g = _hidden(1, 50, 300)
    x = g + 1e-3 * _hidden(1, 50, 300, seed=5)
    x[0, 1:] += 0.5 * _hidden(49, 300, seed=6)  # position 0 untouched: a rotation-free token
    v = compare.logits(g, x, control={"float32": {"mean_kl": 1e-6, "top1": 1.0}}, dtype="float32")
    assert v.status == "fail" and v.values["rows"]["spans"] == [[0, 1, 49, 1, 0]]
    said = locate_rows("logits", v.values["rows"], {"input_ids": _ids(1, 50)}, CONFIG)
    assert (
        said
        == "; the error starts at token 1 (id 1001, a text token): the token before it is quiet (mean KL <= 1% of the rest's)"
    )
    passing = compare.logits(g, g, control={"float32": {"mean_kl": 1e-6, "top1": 1.0}}, dtype="float32")
    assert passing.status == "pass" and "rows" not in passing.values


def test_a_mask_built_from_positions_is_located_at_the_image_pads():
    """The catalogue's causal_mask_by_position lets the image pads, which share a time position, see each
    other: on model_image, text.layer.0's error sits exactly in the image pads but the last (which sees every
    other pad under a causal mask anyway), the text before and after them quiet."""
    case = FIXTURES / "model_image"
    adapter = by_name("causal_mask_by_position").adapter("float32")
    _, results = runner.run_suite([case], runner.SuiteOptions(only_stages=r"^text\.layer\.0$"), adapter=adapter)
    (layer0,) = results
    ids = load_case(case).tensors("inputs.safetensors")["input_ids"][0]
    pads = (ids == IMG).nonzero().flatten().tolist()
    assert layer0.status == "fail"
    assert f"sits in token {pads[0]} (id 151655, an image pad) to {pads[-2]} (id 151655, an image pad)" in layer0.where
    assert f"the {pads[0]} tokens before and the {len(ids) - 1 - pads[-2]} after are quiet" in layer0.where


VID = CONFIG.video_token_id


def _two_kinds(L=60):
    """A prompt with a video's pads (10 to 29), then an image's (40 to 47), text around them."""
    ids = torch.arange(1000, 1000 + L).reshape(1, L)
    ids[0, 10:30], ids[0, 40:48] = VID, IMG
    return ids


def test_the_kinds_of_token_that_hold_the_error_are_said_when_the_others_are_quiet():
    ids = _two_kinds()
    g = _hidden(1, 60, 16)
    noise = 1e-5 * _hidden(1, 60, 16, seed=7)
    x = g + noise
    x[0, 10:30] += 1.0  # the video's pads only (one kind never encoded)
    said = locate_kinds("text.inputs_embeds", g, x, None, {"input_ids": ids}, CONFIG)
    assert said == (
        "; the error is on the video pads (20 of 60 tokens): the 8 image pads and 32 text tokens are quiet "
        "(mean squared error <= 1% of the loud ones')"
    )
    assert locate_kinds("text.inputs_embeds", g, x.float().numpy(), None, {"input_ids": ids}, CONFIG) == said
    x = g + noise
    x[0, 10:30] += 1.0
    x[0, 40:48] -= 1.0  # both blocks of features swapped: two spans apart, text between them quiet
    said = locate_kinds("text.inputs_embeds", g, x, None, {"input_ids": ids}, CONFIG)
    assert "on the image pads and the video pads (28 of 60 tokens): the 32 text tokens are quiet" in said


def test_no_kind_is_named_when_every_kind_is_loud_or_the_prompt_has_one_kind():
    ids = _two_kinds()
    g = _hidden(1, 60, 16)
    x = g + 1e-2 * _hidden(1, 60, 16, seed=8)  # precision noise everywhere
    assert locate_kinds("text.layer.1", g, x, None, {"input_ids": ids}, CONFIG) == ""
    x[0, 20:] += 1.0  # from a video pad on, text after it too: the text kind is loud as well
    assert locate_kinds("text.layer.1", g, x, None, {"input_ids": ids}, CONFIG) == ""
    text_only = torch.arange(1000, 1060).reshape(1, 60)
    x = g.clone()
    x[0, 30:] += 1.0
    assert locate_kinds("text.layer.1", g, x, None, {"input_ids": text_only}, CONFIG) == ""
    # not a hidden state of the golden prompt: nothing is claimed
    assert locate_kinds("text.layer.1", g, x[:, :50], None, {"input_ids": ids}, CONFIG) == ""
    assert locate_kinds("vision.merger", g[0], x[0], None, {"input_ids": ids}, CONFIG) == ""


def test_a_masked_token_is_no_quiet_kind():
    ids = _two_kinds()
    g = _hidden(1, 60, 16)
    x = g.clone()
    x[0, 10:30] += 1.0
    mask = torch.ones(1, 60, dtype=torch.int64)
    mask[0, 40:] = 0  # the image pads and the text after them are padding: not judged
    said = locate_kinds("text.inputs_embeds", g, x, mask, {"input_ids": ids}, CONFIG)
    assert "on the video pads (20 of 40 tokens): the 20 text tokens are quiet" in said


def test_a_merged_token_is_named_by_its_item_frame_and_place_in_the_merged_grid():
    from qwen25vl.conformance.locate import locate_worst

    # an image of 4x6 patches (2x3 merged), then a video of 2 frames of 4x4 patches (2x2 merged each)
    inputs = {"image_grid_thw": torch.tensor([[1, 4, 6]]), "video_grid_thw": torch.tensor([[2, 4, 4]])}
    assert locate_worst("vision.merger", [4, 7], inputs, CONFIG) == (
        " = item 0 frame 0 merged token (row 1, col 1) of a 2x3 merged grid"
    )
    assert locate_worst("vision.merger", [6 + 4 + 3, 0], inputs, CONFIG) == (
        " = item 1 frame 1 merged token (row 1, col 1) of a 2x2 merged grid"
    )


def test_attention_that_sees_later_tokens_is_told_by_its_quiet_last_token():
    g = _hidden(2, 30, 16)
    falling = torch.linspace(1.0, 0.0, 30)[None, :, None]  # loud at the start, nothing at the last token
    x = g + falling * _hidden(2, 30, 16, seed=4)
    rows = compare.error_rows(g, x)
    said = locate_rows("text.layer.0", rows, {"input_ids": _ids(2, 30)}, CONFIG)
    assert rows["sees_ahead"] and "the others see tokens after them (a causal mask missing)" in said
    assert locate_rows("vision.block.0", rows, {"input_ids": _ids(2, 30)}, CONFIG).find("causal") == -1
    loud_last = g + 0.1 * _hidden(2, 30, 16, seed=5)  # the last token as wrong as the rest: no such signature
    assert not compare.error_rows(g, loud_last)["sees_ahead"]
    rising = g + torch.linspace(0.0, 1.0, 30)[None, :, None] * _hidden(2, 30, 16, seed=6)
    assert not compare.error_rows(g, rising)["sees_ahead"]


def test_the_frames_of_a_video_that_hold_the_error_are_said_when_the_others_are_quiet():
    """A bug of the time axis leaves some frames alone: said for text stages (by the video's pads, frame by
    frame) and vision ones (patches after the images'), with the time-position hint when only frame 0 is quiet."""
    vid = CONFIG.video_token_id
    m2 = CONFIG.vision.spatial_merge_size**2
    grid = torch.tensor([[3, 4, 4]])  # 3 frames of 4 merged tokens each
    ids = torch.arange(1000, 1030)[None]
    ids[0, 5:17] = vid
    inputs = {"input_ids": ids, "video_grid_thw": grid}
    g = _hidden(1, 30, 16)
    x = g + 1e-6 * _hidden(1, 30, 16, seed=3)
    x[0, 9:] += 0.5  # frames 1 and 2 of the video's pads, and every token after them
    said = locate_frames("text.layer.0", g, x, None, inputs, CONFIG)
    assert said.startswith("; in video 0 (3 frames) the error is in frames 1, 2: frame 0 is quiet")
    assert "as a time position is" in said
    patches = _hidden(2 * 4 * m2 + 3 * 4 * m2, 8)  # an image of 2x4 merged tokens first, then the video
    got = patches.clone()
    got[8 * m2 + 4 * m2 : 8 * m2 + 8 * m2] += 1.0  # the video's frame 1 only
    inputs_v = {**inputs, "image_grid_thw": torch.tensor([[1, 4, 2 * m2]])}
    said = locate_frames("vision.block.0", patches, got, None, inputs_v, CONFIG)
    assert said.startswith("; in video 0 (3 frames) the error is in frame 1: frames 0, 2 are quiet")
    assert "time position" not in said  # the vision tower has no time positions
    x = g + 1e-2 * _hidden(1, 30, 16, seed=4)  # every frame loud: nothing said
    assert locate_frames("text.layer.0", g, x, None, inputs, CONFIG) == ""
    assert locate_frames("text.layer.0", g, x, None, {"input_ids": ids}, CONFIG) == ""  # no video
    assert locate_frames("text.layer.0", g, x[:, :20], None, inputs, CONFIG) == ""  # not the golden's shape


def test_a_batch_row_at_noise_is_given_no_span():
    """Row 0 right (noise only), row 1 wrong on tokens 10 to 20: only row 1's span is said."""
    g = _hidden(2, 40, 16)
    x = g + 1e-7 * _hidden(2, 40, 16, seed=5)
    x[1, 10:21] += 1.0
    said = locate_rows("text.inputs_embeds", compare.error_rows(g, x), {"input_ids": _ids(2, 40)}, CONFIG)
    assert "the error in row 1 sits in token 10" in said and "in row 0" not in said


def test_a_pixel_is_named_by_patch_channel_and_place_and_swapped_channels_are_said():
    """preprocess.pixel_values rows are patches, columns [channel, frame, y, x]: a BGR port shows its error in
    channels 0 and 2 with channel 1 quiet."""
    from qwen25vl.conformance.locate import locate_channels, locate_worst

    v = CONFIG.vision
    width = v.in_chans * v.temporal_patch_size * v.patch_size**2
    inputs = {"image_grid_thw": torch.tensor([[1, 4, 4]])}
    col = (2 * v.temporal_patch_size + 1) * v.patch_size**2 + 3 * v.patch_size + 5  # blue, frame 1, (3, 5)
    said = locate_worst("preprocess.pixel_values", [6, col], inputs, CONFIG)
    assert said.endswith(": channel 2 (blue) of its frame 1, pixel (3, 5)") and "of a 4x4 grid" in said
    g = _hidden(16, width)
    bgr = g.reshape(16, v.in_chans, -1).flip(1).reshape(16, width)
    assert locate_channels("preprocess.pixel_values", g, bgr, CONFIG) == (
        "; the error is in channels 0 (red), 2 (blue): channel 1 (green) is quiet (mean squared error <= 1% of the "
        "loudest's)"
    )
    assert locate_channels("preprocess.pixel_values", g, g + 0.1 * _hidden(16, width, seed=2), CONFIG) == ""
