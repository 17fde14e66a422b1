"""Planted bugs: faulty adapters, each the spec with ONE thing broken the way a real port broke it
(/work/shared/research/ports.md §3). They are entries of the catalogue of known mistakes
(conformance/mistakes/), kept here under their planted names because the README, the docs and the
CLI tests use them as `--target tests.conformance.planted:RoundHalfUp`.
tests/conformance/test_planted.py asserts that the harness flags each at the stage where it first
shows (`PLANTED`: adapter -> (expected first divergent stage, the fixture cases that show it)).

They double as examples of the adapter protocol: subclass an adapter, override a method.
"""

from __future__ import annotations

from qwen25vl.conformance.mistakes import by_name


def _planted(name: str, entry: str) -> type:
    """The catalogue entry's adapter under its planted name (same behaviour, own class name)."""
    base = by_name(entry).adapter
    return type(name, (base,), {"__doc__": f"{by_name(entry).description} (seen in {by_name(entry).seen})."})


RoundHalfUp = _planted("RoundHalfUp", "resize_ties_away_from_zero")
ImageTokenCount = _planted("ImageTokenCount", "image_tokens_unmerged")
PatchOrderRaster = _planted("PatchOrderRaster", "patch_order_raster")
WindowNoDedup = _planted("WindowNoDedup", "window_no_dedup")
WrongFullAttention = _planted("WrongFullAttention", "full_attention_shifted")
RotaryNotReordered = _planted("RotaryNotReordered", "rotary_not_reordered")
InterleavedMRoPE = _planted("InterleavedMRoPE", "mrope_interleaved")
RopeTablesBf16 = _planted("RopeTablesBf16", "rope_positions_bf16")
TextPositionAfterImage = _planted("TextPositionAfterImage", "text_after_span_token_count")
NoVideoTimeScaling = _planted("NoVideoTimeScaling", "video_time_unscaled")
LostRopeDeltas = _planted("LostRopeDeltas", "decode_without_deltas")
RightPadding = _planted("RightPadding", "right_padding")
NoDefaultSystemPrompt = _planted("NoDefaultSystemPrompt", "no_default_system_prompt")
# the blind spots of the v1 fixtures (issue 11): each is caught only since fixtures v2
GqaTiled = _planted("GqaTiled", "gqa_heads_tiled")  # needs >= 2 KV heads with >= 2 query heads each
ScatterTransposed = _planted("ScatterTransposed", "scatter_transposed")  # needs an image in every batch row
StopsOnImEndOnly = _planted("StopsOnImEndOnly", "stops_on_im_end_only")  # needs a stop at 151643
NeverStops = _planted("NeverStops", "never_stops")  # needs a golden row that stops
NoNfc = _planted("NoNfc", "tokenizer_without_nfc")  # needs a text NFC changes
Gpt2Regex = _planted("Gpt2Regex", "gpt2_pretokenizer")  # needs a text the two regexes split apart
LinspaceFloat64 = _planted("LinspaceFloat64", "frames_linspace_float64")  # needs a count float32 rounds apart
Letterbox = _planted("Letterbox", "letterbox")  # in a model case: needs an image the resize changes
WindowInverseWrongWay = _planted("WindowInverseWrongWay", "window_inverse_is_permutation")  # needs a non-involution

# adapter -> (the first stage where it must be flagged, the cases that show it)
PLANTED = {
    RoundHalfUp: ("fn.smart_resize", "exact_"),
    ImageTokenCount: ("fn.expand_vision_tokens", "exact_"),
    PatchOrderRaster: ("fn.patchify", "exact_"),
    WindowNoDedup: ("fn.window_partition", "exact_"),
    WrongFullAttention: ("vision.block.0", "exact_|model_image"),
    RotaryNotReordered: ("vision.block.0", "exact_|model_image"),
    InterleavedMRoPE: ("fn.mrope_cos_sin", "exact_"),
    RopeTablesBf16: ("fn.mrope_cos_sin", "exact_"),
    TextPositionAfterImage: ("fn.rope_index", "exact_"),
    NoVideoTimeScaling: ("fn.rope_index", "exact_"),
    LostRopeDeltas: ("fn.decode_positions", "exact_"),
    RightPadding: ("preprocess.input_ids", "exact_|model_batch"),
    NoDefaultSystemPrompt: ("fn.render_chat", "exact_"),
    GqaTiled: ("text.layer.0", "model_image"),
    ScatterTransposed: ("text.inputs_embeds", "model_batch"),
    StopsOnImEndOnly: ("generate.tokens", "model_batch"),
    NeverStops: ("generate.tokens", "model_batch"),
    NoNfc: ("fn.tokenize", "exact_"),
    Gpt2Regex: ("fn.tokenize", "exact_"),
    LinspaceFloat64: ("fn.sample_frame_indices", "exact_"),
    Letterbox: ("fn.preprocess_image", "exact_"),
    WindowInverseWrongWay: ("vision.merger", "model_image"),
}

# the same blind spots in the model cases: adapter -> (the first stage flagged, the one model case)
IN_MODEL_CASES = {
    NoNfc: ("preprocess.input_ids", "model_batch"),  # 'Cafe\u0301' in row 1's prompt
    Letterbox: ("preprocess.pixel_values", "model_batch"),  # the 100x300 image, resized to 112x308
}
