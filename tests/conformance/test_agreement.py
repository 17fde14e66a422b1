"""One run's catalogue names checked against each other (conformance/mistakes/agreement.py), and the data-flow
order of the preprocess stages (a grid is upstream of the prompt). The results are written by hand, as the
stages write them; the fn stages' own runs are injected."""

from pathlib import Path

from qwen25vl.conformance import stages
from qwen25vl.conformance.diagnosis import name_mistakes
from qwen25vl.conformance.mistakes import by_name
from qwen25vl.conformance.mistakes.agreement import _fails_alone, named_spans, reconcile
from qwen25vl.conformance.results import StageResult, first_divergence

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
NFRAMES = by_name("nframes_rounded")
UNSCALED = by_name("video_time_unscaled")
MAX_SIDE = by_name("text_after_span_max_side")


def likely(*entries) -> str:
    """A note as name_mistakes writes it for these entries (each reproduces the port)."""
    return name_mistakes(list(entries), lambda m: m, lambda m: True)


def row(case, stage, note="", status="fail", where="", mode="e2e") -> StageResult:
    return StageResult(case, stage, status, where=where, mode=mode, note=note)


def never(*_):
    raise AssertionError("no fn stage passes in this run: nothing to run alone")


def test_notes_are_read_back_into_entries():
    note = "x is itself wrong; " + likely(UNSCALED, MAX_SIDE) + "; teacher-forced: pass"
    [(start, end, found)] = named_spans(note)
    assert found == (UNSCALED, MAX_SIDE)
    assert note[start:end] == likely(UNSCALED, MAX_SIDE)
    assert not named_spans("no known mistake matches")


def test_a_function_stage_that_names_nothing_rules_the_entry_out():
    # round and ceil agree on the model case's clip; fn.sample_frame_indices in the same run says neither
    fn = row("exact_video_frames", "fn.sample_frame_indices", "no known mistake matches", mode="items")
    grid = row("model_video_file", "preprocess.video_grid_thw", likely(NFRAMES))
    reconcile([fn, grid], [], fails_alone=never)
    assert "likely mistake" not in grid.note
    assert grid.note.startswith("consistent with nframes_rounded (frame count round(")
    assert "in model_video_file only: fn.sample_frame_indices in exact_video_frames rules it out" in grid.note
    assert fn.note == "no known mistake matches"


def test_a_passing_function_stage_rules_out_an_entry_that_fails_it():
    fn = row("exact_video_frames", "fn.sample_frame_indices", status="pass", mode="items")
    grid = row("model_video_file", "preprocess.video_grid_thw", likely(NFRAMES))
    asked = []

    def fails_alone(m, stage, path):
        asked.append((m.name, stage))
        return True

    reconcile([fn, grid], [], fails_alone=fails_alone)
    assert asked == []  # no case folder given: the entry cannot be run there, so nothing is ruled out
    assert grid.note == likely(NFRAMES)
    reconcile([fn, grid], [FIXTURES / "exact_video_frames"], fails_alone=fails_alone)
    assert asked == [("nframes_rounded", "fn.sample_frame_indices")]
    assert "fn.sample_frame_indices in exact_video_frames rules it out (the port passes it, where nframes_rounded " in (
        grid.note
    )


def test_an_entry_is_run_alone_on_the_function_stage():
    assert _fails_alone(NFRAMES, "fn.sample_frame_indices", FIXTURES / "exact_video_frames")


def test_an_entry_the_function_stage_names_stays():
    fn = row("exact_video_frames", "fn.sample_frame_indices", likely(NFRAMES), mode="items")
    grid = row("model_video_file", "preprocess.video_grid_thw", likely(NFRAMES))
    reconcile([fn, grid], [], fails_alone=never)
    assert grid.note == fn.note == likely(NFRAMES)


def test_two_entries_at_two_cases_are_a_conflict_not_two_names():
    # tokens_per_second 1: video_time_unscaled fits model_video_fps's positions, not model_video's
    fps = row("model_video_fps", "text.position_ids", likely(UNSCALED))
    plain = row("model_video", "text.position_ids", "no known mistake matches")
    deltas = row("model_video", "text.rope_deltas", likely(MAX_SIDE))
    reconcile([fps, plain, deltas], [], fails_alone=never)
    for r in (fps, deltas):
        assert "likely mistake" not in r.note, r.note
    assert "consistent with video_time_unscaled" in fps.note
    assert "at model_video text.position_ids it does not reproduce the port (no known mistake fits there)" in fps.note
    assert deltas.note.startswith(
        "no single known mistake explains every case: model_video text.rope_deltas fits text_after_span_max_side"
    )


def test_a_stage_after_an_unrelated_failure_of_its_case_rules_nothing_out():
    # the decoder fails first in model_video: its tokens cannot show a decode-step entry named elsewhere
    decode = by_name("decode_without_deltas")
    named = row("model_image", "generate.tokens", likely(decode))
    layer = row("model_video", "text.layer.0", "no known mistake matches")
    tokens = row("model_video", "generate.tokens", "no known mistake matches")
    reconcile([named, layer, tokens], [], fails_alone=never)
    assert named.note == likely(decode)
    # with nothing before it failing, the same tokens rule it out
    tokens.note, named.note = "no known mistake matches", likely(decode)
    reconcile([named, tokens], [], fails_alone=never)
    assert named.note.startswith("consistent with decode_without_deltas")


def test_the_prompt_points_at_the_grid_it_follows():
    grid = row(
        "model_batch", "preprocess.image_grid_thw", "no known mistake matches", where="first at [2, 1]: golden 8, got 6"
    )
    ids = row("model_batch", "preprocess.input_ids", "no known mistake matches", where="the port's prompt differs: ...")
    other = row("model_text", "preprocess.input_ids", "no known mistake matches")
    reconcile([ids, grid, other], [], fails_alone=never)
    assert ids.note.startswith(
        "the grid of image 2 (from 0, over the batch) differs (preprocess.image_grid_thw: first at"
    )
    assert other.note == "no known mistake matches"


def test_a_grid_is_upstream_of_the_prompt():
    key = stages.order_key
    assert key("fn.tokenize") < key("preprocess.image_grid_thw") < key("preprocess.pixel_values")
    assert key("preprocess.video_grid_thw") < key("preprocess.pixel_values_videos") < key("preprocess.input_ids")
    assert key("preprocess.second_per_grid_ts") < key("preprocess.input_ids") < key("preprocess.attention_mask")
    assert key("preprocess.attention_mask") < key("vision.patch_embed")
    results = [
        row("model_batch", s) for s in ("preprocess.input_ids", "preprocess.pixel_values", "preprocess.image_grid_thw")
    ]
    assert first_divergence(results).stage == "preprocess.image_grid_thw"


def test_an_entry_whose_case_cannot_tell_it_from_another_rule_says_so():
    clip = by_name("video_budget_whole_clip")
    here = row("model_video_budget", "preprocess.video_grid_thw", likely(clip))
    elsewhere = row("model_video", "preprocess.video_grid_thw", likely(clip))
    reconcile([here, elsewhere], [], fails_alone=never)
    assert here.note.startswith(likely(clip) + "; video_budget_whole_clip is not told apart from another rule here: ")
    assert "112x140" in here.note
    assert elsewhere.note == likely(clip)
