"""Diagnosis of real-port failures (conformance/diagnosis.py): local errors, inherited drift,
precision profiles and signatures, on a port that mixes precisions on purpose and carries one small
bug in a text layer (tests/conformance/mixed.py), through an adapter and through the file exchange."""

import json
from pathlib import Path

import pytest
from qwen25vl.conformance import runner
from qwen25vl.conformance.adapters.spec import SpecAdapter
from qwen25vl.conformance.fixtures import load_case
from qwen25vl.conformance.mistakes import CATALOGUE, Patched, by_name
from qwen25vl.conformance.mistakes.positions import HeightWidthSwapped, _Decode
from qwen25vl.conformance.mistakes.text import VideosUnencodedWithImages
from qwen25vl.conformance.precision import Profile
from qwen25vl.conformance.tolerances import noise_at
from qwen25vl.spec import generate as spec_generate
from qwen25vl.spec import mrope
from qwen25vl.spec import vision as vision_spec
from qwen25vl.tools import cli
from safetensors.torch import load_file, save_file

from .mixed import PROFILE, MixedPrecisionPort, MixedPrecisionPortFixed

MIXED = "tests.conformance.mixed:"
ROOT = Path(__file__).resolve().parents[2]
DESCRIPTION = next(m.description for m in CATALOGUE if m.name == "videos_unencoded_with_images")


def conform(capsys, tmp_path, *argv):
    out = tmp_path / "r.json"
    code = cli.main(["conform", "--cases", "model_image$", "--json", str(out), *argv])
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    return code, text, report, {r["stage"]: r for r in report["results"] if r["mode"] == "e2e"}


def assert_blames_the_text_layer(code, text, report, by):
    assert code == 1
    first = report["first_divergence"]
    assert first["stage"] == "text.layer.0", first
    assert "text.layer.0 is itself wrong: local rel" in first["note"]
    assert "upstream drift explains none of it" in first["note"]
    assert "FIRST DIVERGENCE  case model_image, stage text.layer.0" in text and "  local      rel" in text
    layer = by["text.layer.0"]
    assert layer["local"]["value"] > layer["local"]["budget"]  # itself wrong ...
    assert layer["end_to_end"]["value"] > 10 * layer["local"]["value"]  # ... under a larger inherited drift
    assert "positions and golden mask" in layer["local"]["fed"]
    bad = [s for s, r in by.items() if r["status"] in ("fail", "error")]
    assert bad == ["text.layer.0"], bad


def assert_vision_drift_is_precision(by):
    assert by["vision.patch_embed"]["status"] == "pass" and by["vision.patch_embed"]["precision"] == "float16-inputs"
    assert by["vision.merger"]["status"] == "pass" and by["vision.merger"]["precision"] == "float16"
    for s in ("vision.block.0", "vision.block.3", "text.layer.1"):
        assert by[s]["status"] == "pass" and "drift inherited from upstream" in by[s]["note"], by[s]
        assert by[s]["end_to_end"]["value"] > by[s]["end_to_end"]["budget"]  # over the float32 budget ...
        assert by[s]["local"]["value"] <= by[s]["local"]["budget"]  # ... and yet locally right


@pytest.mark.parametrize("jobs", [1])
def test_adapter_blames_the_text_layer_and_calls_the_vision_drift_precision(capsys, tmp_path, jobs):
    code, text, report, by = conform(capsys, tmp_path, "--target", MIXED + "MixedPrecisionPort")
    assert_blames_the_text_layer(code, text, report, by)
    assert_vision_drift_is_precision(by)
    assert "float16-inputs" in text  # the report states the precision each stage was judged at


def test_adapter_with_the_bug_fixed_is_blamed_for_nothing(capsys, tmp_path):
    code, text, report, by = conform(capsys, tmp_path, "--target", MIXED + "MixedPrecisionPortFixed")
    assert code == 0 and report["first_divergence"] is None, report["first_divergence"]
    assert_vision_drift_is_precision(by)


def test_without_a_profile_the_vision_stages_are_matched_to_their_precision_signature(capsys, tmp_path):
    code, text, report, by = conform(capsys, tmp_path, "--target", MIXED + "MixedPrecisionPortNoProfile")
    patch = by["vision.patch_embed"]
    assert patch["status"] == "fail" and patch["precision"] == "float32"
    assert "matches float16 rounding of the stage's inputs" in patch["note"]
    assert 'declare {"vision.patch_embed": "float16-inputs"} in your profile if intended' in patch["note"]
    assert by["text.layer.0"]["status"] == "fail"  # still itself wrong, whatever happens upstream
    # the same port, with the profile given on the command line
    code, _, report, by = conform(
        capsys, tmp_path, "--target", MIXED + "MixedPrecisionPortNoProfile", "--profile", json.dumps(PROFILE)
    )
    assert report["first_divergence"]["stage"] == "text.layer.0"


def _write_outputs_like_a_port(port, inputs_dir: Path, out_dir: Path, profile) -> None:
    """A port in another language: read IN/<case>, write OUT/<case>/outputs.safetensors and port.json."""
    info = json.loads((inputs_dir / "model_image" / "case.json").read_text())
    port.prepare(info["checkpoint"], dtype="float32", device="cpu")
    inputs = load_file(str(inputs_dir / "model_image" / "inputs.safetensors"))
    names = [s for s in info["stages"] if not s.startswith(("preprocess.", "generate."))]
    (out_dir / "model_image").mkdir(parents=True)
    outputs = {k: v.contiguous() for k, v in port.run(inputs, capture=names).items()}
    save_file(outputs, str(out_dir / "model_image" / "outputs.safetensors"))
    (out_dir / "port.json").write_text(json.dumps({"name": "a C++ port", "dtype": "float32", "profile": profile}))


@pytest.mark.parametrize("port, blamed", [(MixedPrecisionPort, True), (MixedPrecisionPortFixed, False)])
def test_the_file_exchange_gets_the_same_diagnosis(capsys, tmp_path, port, blamed):
    assert cli.main(["conform", "--cases", "model_image$", "--export-inputs", str(tmp_path / "in")]) == 0
    _write_outputs_like_a_port(port("float32"), tmp_path / "in", tmp_path / "out", PROFILE)
    capsys.readouterr()
    code, text, report, by = conform(capsys, tmp_path, "--target", f"files:{tmp_path / 'out'}")
    assert_vision_drift_is_precision(by)
    if blamed:
        assert_blames_the_text_layer(code, text, report, by)
    else:
        assert code == 0 and report["first_divergence"] is None


def test_profiles_pick_the_most_specific_pattern_and_refuse_unknown_precisions(capsys):
    p = Profile.parse(PROFILE, "bfloat16")
    assert p("vision.patch_embed") == "float16-inputs" and p("vision.block.7") == "float32"
    assert p("logits") == "bfloat16"  # no pattern: the port's dtype
    assert Profile.parse("float16", "float32")("text.layer.3") == "float16"
    with pytest.raises(ValueError, match="'float8' is not a precision"):
        Profile.parse({"vision.*": "float8"}, "float32")
    # generation is judged at the coarsest precision anywhere in the profile (the float16 merger's noise
    # reaches the log-probs), unless the profile names generate.tokens itself
    assert Profile.parse(PROFILE, "float32").end_to_end("generate.tokens") == "float16"
    assert Profile.parse({"vision.*": "bfloat16-inputs"}, "float32").end_to_end("generate.tokens") == "bfloat16"
    assert (
        Profile.parse({**PROFILE, "generate.tokens": "float32"}, "float32").end_to_end("generate.tokens") == "float32"
    )
    assert Profile.parse(None, "float32").end_to_end("generate.tokens") == "float32"
    assert cli.main(["conform", "--profile", '{"vision.*": "float8"}']) == 2
    assert "'float8' is not a precision" in capsys.readouterr().err
    assert cli.main(["conform", "--profile", "{not json"]) == 2
    assert "--profile: not a JSON object" in capsys.readouterr().err


class _VideoNeverEncoded(VideosUnencodedWithImages):
    """Like mlx-vlm 0.7.10 given an image and a video: the tower encodes the image alone, so every vision
    stage is short of rows (an error), and the video pads keep their token embedding."""

    def run(self, inputs, *, capture):
        captured = super().run(inputs, capture=capture)
        return {k: v[1:] if k.startswith("vision.") else v for k, v in captured.items()}


class _VideoNeverEncodedNoisy(_VideoNeverEncoded):
    """The same short vision stages, and inputs_embeds wrong in a way no catalogue entry describes."""

    def run(self, inputs, *, capture):
        captured = super().run(inputs, capture=capture)
        embeds = captured["text.inputs_embeds"]
        return {**captured, "text.inputs_embeds": embeds + 0.5 * embeds.abs().max()}


@pytest.mark.parametrize("port, named", [(_VideoNeverEncoded, True), (_VideoNeverEncodedNoisy, False)])
def test_a_stage_fed_by_an_error_is_matched_to_the_catalogue_on_the_spec_input(port, named):
    # the port's own vision.merger cannot feed text.inputs_embeds (wrong shape): the catalogue runs on the
    # spec's vision.merger instead and names the mistake, as a hint; the stage's verdict is its own
    paths = runner.select_cases(ROOT / "fixtures", "model_video_image$")
    opts = runner.SuiteOptions(only_stages=r"^(vision\..*|text\.inputs_embeds)$")
    _, results = runner.run_suite(paths, opts, adapter=port("float32"))
    by = {r.stage: r for r in results if r.mode == "e2e"}
    assert by["vision.merger"].status == "error", by["vision.merger"]
    embeds = by["text.inputs_embeds"]
    assert embeds.status == "fail" and "local error not measured: vision.merger is an error" in embeds.note
    said = "run on the spec's own vision.merger instead, the catalogue says: likely mistake: " + DESCRIPTION
    assert (said in embeds.note) == named, embeds.note


# ---- a stage is judged on the inputs it ran on (the blind audit of 2026-12-07)


def _model_image(port, only=None):
    paths = runner.select_cases(ROOT / "fixtures", "model_image$")
    opts = runner.SuiteOptions(only_stages=only)
    _, results = runner.run_suite(paths, opts, adapter=port("float32"))
    return results, {r.stage: r for r in results if r.mode == "e2e"}


def test_a_right_patch_embedding_is_not_blamed_for_the_ports_own_preprocessing():
    # the port preprocesses wrongly (build_inputs) but its model runs on the pixels it is given: its patch
    # embedding matched them end to end, so its own pixels are not what it is judged on
    results, by = _model_image(by_name("normalize_mean_std_half").adapter, r"^(preprocess\..*|vision\.patch_embed)$")
    assert by["preprocess.pixel_values"].status == "fail"
    assert by["vision.patch_embed"].status == "pass", by["vision.patch_embed"]
    assert runner.first_divergence(results).stage == "preprocess.pixel_values"


class _PositionsUncaptured(HeightWidthSwapped):
    """Wrong positions (height and width exchanged) that the port does not expose."""

    def run(self, inputs, *, capture):
        hidden = ("text.position_ids", "text.rope_deltas")
        return {k: v for k, v in super().run(inputs, capture=capture).items() if k not in hidden}


@pytest.mark.parametrize("port", [HeightWidthSwapped, _PositionsUncaptured])
def test_a_decoder_layer_is_judged_on_the_positions_it_ran_on(port):
    results, by = _model_image(port, r"^(text\.position_ids|text\.rope_deltas|vision\.merger|text\..*)$")
    layer = by["text.layer.0"]
    assert layer.status == "fail"
    if port is HeightWidthSwapped:  # positions given: text.position_ids is the first divergence, not the layer
        assert runner.first_divergence(results).stage == "text.position_ids"
        assert "its own positions" in layer.local["fed"] and "is itself wrong" not in layer.note, layer.note
    else:  # right alone, wrong on its own input: the side inputs it took are named
        assert "golden positions" in layer.local["fed"]
        assert "fed the golden input it passes, yet the spec disagrees" in layer.note, layer.note
        assert "its positions (text.position_ids)" in layer.note


class _ReportsWhatItDidNotRunOn(SpecAdapter):
    """A right port whose captures are not what its stages ran on: text.layer.1 is reported rounded to
    bfloat16 (a dump in a coarser dtype), and its positions as floats (an error of text.position_ids)."""

    def run(self, inputs, *, capture):
        out = super().run(inputs, capture=capture)
        out["text.layer.1"] = out["text.layer.1"].bfloat16()
        out["text.position_ids"] = out["text.position_ids"].float()
        return out


def test_a_right_stage_is_not_blamed_for_the_upstream_value_the_port_reports():
    results, by = _model_image(_ReportsWhatItDidNotRunOn, r"^text\..*$")
    assert by["text.position_ids"].status == "error" and by["text.layer.1"].status == "fail"
    norm = by["text.norm"]  # fed the rounded layer.1 it is off locally, yet right end to end and on the golden
    assert norm.status == "pass" and "is not what this stage ran on" in norm.note, norm.note
    assert "golden" in by["text.layer.0"].local["fed"]  # positions that are an error are not fed
    assert by["text.layer.0"].status == "pass"


class _MergerRaises(Patched):
    """A port whose merger raises: its one run captures nothing, its run_stage raises at the merger."""

    def model_patches(self, inputs):
        def merger(params, config, x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

        return [(vision_spec, "patch_merger", merger)]


def test_a_run_that_raises_is_traced_to_the_stage_that_raises_alone():
    results, by = _model_image(_MergerRaises, r"^(vision\..*|text\.inputs_embeds)$")
    first = runner.first_divergence(results)
    assert first.stage == "vision.patch_embed" and first.status == "error"
    assert "vision.block.3 pass, and vision.merger raises: the fault lies in vision.merger" in first.note, first.note
    assert "teacher-forced: error" in by["vision.merger"].note


class _DecodePlusTwo(_Decode):
    """Decode positions two past the right ones (no catalogue entry makes this one)."""

    @staticmethod
    def positions(rope_deltas, start, steps):
        return mrope.decode_positions(rope_deltas + 2, start, steps)


class _FirstTokenFromTheLastButOne(SpecAdapter):
    """The run is right; generate picks its first token from the last-but-one prompt position."""

    def generate_chunked(self, inputs, **kwargs):
        real = spec_generate.prefill

        def prefill(*args, **kw):
            hidden, captured, cache, deltas = real(*args, **kw)
            return hidden.roll(1, dims=1), captured, cache, deltas

        with Patched._patched(self, [(spec_generate, "prefill", prefill)]):
            return super().generate_chunked(inputs, **kwargs)


@pytest.mark.parametrize(
    "port, said",
    [
        (_DecodePlusTwo, "the prefill is right and the fault is in the decode steps (from step 1)"),
        (_FirstTokenFromTheLastButOne, "yet step 0 differs: generate does not pick the first token from those logits"),
        (by_name("gqa_heads_tiled").adapter, "upstream, text.layer.0 fails: the tokens follow from it"),
    ],
)
def test_wrong_tokens_no_entry_explains_are_traced_through_the_stages_judged_before(port, said):
    results, by = _model_image(port)
    tokens = by["generate.tokens"]
    assert tokens.status == "fail" and "no known mistake matches" in tokens.note
    assert said in tokens.note, tokens.note


def _logprobs_off_by(times: float) -> type:
    """A port whose decode log-probs, from step 1 on, are off by `times` the spec's own float32 noise."""
    measured = load_case(ROOT / "fixtures" / "model_image").stages["generate.tokens"]["logit_noise"]
    noise = noise_at(measured, "float32")  # what the judge allows: the measurement, at least the floor

    class Port(SpecAdapter):
        def generate_chunked(self, inputs, **kwargs):
            out = super().generate_chunked(inputs, **kwargs)
            lp = out["topk_logprobs"].clone()
            lp[:, 1:] += times * noise
            return {**out, "topk_logprobs": lp}

    return Port


# the ratio printed adds the spec's own rounding on this CPU to the port's offset: not asserted to the digit
@pytest.mark.parametrize(
    "times, said", [(1.5, "x the spec's own noise at this precision: the drift"), (10, "decode steps (from step 1)")]
)
def test_log_probs_just_past_the_noise_are_read_as_drift_and_far_past_it_as_a_decode_fault(times, said):
    _, by = _model_image(_logprobs_off_by(times))
    tokens = by["generate.tokens"]
    assert tokens.status == "fail" and said in tokens.note, tokens.note
