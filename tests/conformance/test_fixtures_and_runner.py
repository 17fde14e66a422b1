"""Fixture format, sha256 checks, the runner's statuses and the reports, on synthetic cases and toy adapters."""

import json
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from qwen25vl.conformance import case_runner, report, runner, stages
from qwen25vl.conformance.adapters.base import Adapter
from qwen25vl.conformance.adapters.spec import SpecAdapter
from qwen25vl.conformance.fixtures import FixtureError, find_cases, load_case, request_media, sha256_file, write_case
from qwen25vl.conformance.golden import Checkpoint

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def toy_case(root: Path, name="toy") -> Path:
    """A two-stage exact case written by hand (expected values computed by hand)."""
    items = {
        "items": [
            {
                "label": "70x70",
                "inputs": {"height": 70, "width": 70, "factor": 28, "min_pixels": 3136, "max_pixels": 12845056},
                "expected": [56, 56],
            },
            {
                "label": "ratio 201",
                "inputs": {"height": 28, "width": 5628, "factor": 28, "min_pixels": 3136, "max_pixels": 12845056},
                "expected": {"error": "ValueError"},
            },
        ]
    }
    frames = {
        "items": [
            {
                "label": "4 frames",
                "inputs": {
                    "total_frames": 4,
                    "video_fps": 2.0,
                    "fps": 2.0,
                    "min_frames": 4,
                    "max_frames": 768,
                    "nframes": None,
                },
                "expected": [0, 1, 2, 3],
            }
        ]
    }
    manifest = {
        "case": name,
        "kind": "exact",
        "description": "toy",
        "stages": {
            "fn.smart_resize": {"tolerance": "exact", "items": "a.json", "files": ["a.json"]},
            "fn.sample_frame_indices": {"tolerance": "exact", "items": "b.json", "files": ["b.json"]},
        },
    }
    write_case(root / name, manifest, {"a.json": items, "b.json": frames})
    return root / name


class Toy(Adapter):
    name = "toy"

    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        if max(height, width) / min(height, width) > 200:
            raise ValueError("ratio")
        return (56, 56)


def run(adapter, paths, **kw):
    return runner.run_suite([Path(p) for p in paths], runner.SuiteOptions(**kw), adapter=adapter)[1]


def test_write_case_hashes_every_file_and_round_trips(tmp_path):
    path = toy_case(tmp_path)
    case = load_case(path)
    assert case.bad_files == {}
    assert case.manifest["files"]["a.json"] == sha256_file(path / "a.json")
    assert find_cases(tmp_path) == [path]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_not_covered_is_not_a_failure(tmp_path):
    res = run(Toy(), [toy_case(tmp_path)])
    by = {r.stage: r for r in res}
    assert by["fn.smart_resize"].status == "pass"
    assert by["fn.sample_frame_indices"].status == "not_covered"
    assert report.exit_code(res) == 0


def test_tampered_and_missing_files_error_only_their_stage(tmp_path):
    path = toy_case(tmp_path)
    (path / "a.json").write_text((path / "a.json").read_text().replace("56", "57"))
    res = {r.stage: r for r in run(Toy(), [path])}
    assert res["fn.smart_resize"].status == "error" and "sha256 mismatch" in res["fn.smart_resize"].metric
    assert res["fn.sample_frame_indices"].status == "not_covered"  # the other stage still ran
    (path / "b.json").unlink()
    res = {r.stage: r for r in run(Toy(), [path])}
    assert res["fn.sample_frame_indices"].status == "error" and "missing" in res["fn.sample_frame_indices"].metric
    assert report.exit_code(list(res.values())) == 1  # an error is never a silent pass


def test_no_manifest_is_reported_not_raised(tmp_path):
    (tmp_path / "empty").mkdir()
    res = runner.CaseRunner(Toy()).run(tmp_path / "empty")
    assert res[0].status == "error" and "no manifest.json" in res[0].metric


def test_a_port_that_hangs_times_out_and_the_run_goes_on(tmp_path):
    class Hangs(Toy):
        def smart_resize(self, *a, **k):
            time.sleep(30)

        def sample_frame_indices(self, *a, **k):
            return [0, 1, 2, 3]

    t0 = time.perf_counter()
    res = {r.stage: r for r in run(Hangs(), [toy_case(tmp_path)], timeout=0.5)}
    assert time.perf_counter() - t0 < 10
    assert res["fn.smart_resize"].status == "error" and "timed out" in res["fn.smart_resize"].metric
    assert res["fn.sample_frame_indices"].status == "pass"
    assert report.exit_code(list(res.values())) == 1


def test_timeout_outside_the_main_thread():
    with pytest.raises(case_runner.StageTimeout):
        import threading

        box = {}

        def go():
            try:
                case_runner.call_with_timeout(lambda: time.sleep(5), 0.2)
            except case_runner.StageTimeout as e:
                box["e"] = e

        th = threading.Thread(target=go)
        th.start()
        th.join()
        raise box["e"]


def test_expectations_turn_known_failures_into_xfail(tmp_path):
    class Wrong(Toy):
        def smart_resize(self, *a, **k):
            return (84, 84)

    res = run(Wrong(), [toy_case(tmp_path)])
    assert report.exit_code(res) == 1
    exp = [{"case": "toy", "stage": r"fn\.smart_resize", "status": "fail", "reason": "round half up"}]
    res = run(Wrong(), [toy_case(tmp_path)])
    runner.apply_expectations(res, exp)
    r = next(r for r in res if r.stage == "fn.smart_resize")
    assert r.status == "xfail" and "round half up" in r.note
    assert report.exit_code(res) == 0
    res = run(Toy(), [toy_case(tmp_path)])
    runner.apply_expectations(res, exp)
    assert next(r for r in res if r.stage == "fn.smart_resize").status == "xpass"
    # a divergence at its budget's edge: "pass" among the statuses keeps a pass a pass, with the reason
    edge = [dict(exp[0], status=["fail", "pass"], reason="eps at the budget's edge")]
    res = run(Toy(), [toy_case(tmp_path)])
    runner.apply_expectations(res, edge)
    r = next(r for r in res if r.stage == "fn.smart_resize")
    assert r.status == "pass" and "eps at the budget's edge" in r.note
    res = run(Wrong(), [toy_case(tmp_path)])
    runner.apply_expectations(res, edge)
    assert next(r for r in res if r.stage == "fn.smart_resize").status == "xfail"


def test_expectations_bound_the_known_divergence_and_keep_the_diagnosis(tmp_path):
    """at_most: a failure past the known divergence's size stays a failure (a new bug behind a known one),
    judged on the stage's own (local) error where the harness measured one; within it the xfail keeps the
    harness's own diagnosis after the reason, and the table shows the reason."""
    from qwen25vl.conformance.results import StageResult

    def failing(rel):
        return StageResult(
            "model_image",
            "text.layer.3",
            "fail",
            metric=f"rel {rel:.2e}",
            note="its own diagnosis",
            values={"rel": rel},
        )

    exp = [{"case": "model_.*", "stage": r"text\.layer\..*", "reason": "no eps in the norm", "at_most": 2e-3}]
    near, far = failing(1e-3), failing(0.4)
    runner.apply_expectations([near, far], exp)
    assert near.status == "xfail" and near.note.startswith("expected: no eps") and "its own diagnosis" in near.note
    assert far.status == "fail" and "rel 4.00e-01 > at_most" in far.note and "no eps" in far.note
    # far end to end from an upstream divergence, near on its own input: the known divergence, no more
    inherited, own_far = failing(0.4), failing(1e-3)
    inherited.local, own_far.local = {"value": 1e-3}, {"value": 0.3}
    runner.apply_expectations([inherited, own_far], exp)
    assert inherited.status == "xfail" and own_far.status == "fail" and "local rel 3.00e-01" in own_far.note
    assert report.exit_code([near]) == 0 and report.exit_code([near, far]) == 1
    shown = report.table([near])
    assert "no eps in the norm" in shown and "its own diagnosis" not in shown
    assert "its own diagnosis" in report.table([near], verbose=True)
    bad = tmp_path / "bad.json"
    for bound in (0, -1, "1e-3", True):
        bad.write_text(json.dumps({"expectations": [dict(exp[0], at_most=bound)]}))
        with pytest.raises(ValueError, match="at_most"):
            runner.load_expectations(bad)


def test_reports_json_junit_table(tmp_path):
    class Wrong(Toy):
        def smart_resize(self, *a, **k):
            return (84, 84)

    res = run(Wrong(), [toy_case(tmp_path)])
    desc = {"name": "toy", "dtype": "float32"}
    data = json.loads(report.to_json(desc, res, 1.0))
    assert data["summary"]["fail"] == 1 and data["first_divergence"]["stage"] == "fn.smart_resize"
    root = ET.fromstring(report.to_junit(desc, res))
    cases = root.findall(".//testcase")
    assert len(cases) == 2
    assert root.find(".//testcase[@name='fn.smart_resize']/failure") is not None
    assert root.find(".//testcase[@name='fn.sample_frame_indices']/skipped") is not None
    text = report.render(desc, res)
    assert "FIRST DIVERGENCE" in text and "spec/resize.py: smart_resize" in text and "\nRESULT: FAIL (" in text


def test_stage_order_and_teacher_forcing_inputs():
    assert (
        stages.order_key("fn.smart_resize")
        < stages.order_key("preprocess.input_ids")
        < stages.order_key("vision.patch_embed")
        < stages.order_key("vision.block.2")
        < stages.order_key("vision.block.10")
        < stages.order_key("vision.merger")
        < stages.order_key("text.layer.0")
        < stages.order_key("logits")
    )
    assert stages.info("vision.block.7").read.startswith("spec/vision.py")
    assert stages.previous("vision.block.0", 4) == "vision.patch_embed"
    assert stages.previous("text.layer.3", 4) == "text.layer.2"
    assert stages.previous("vision.merger", 4) == "vision.block.3"
    assert stages.model_stages(2, 1)[-3:] == ["text.layer.0", "text.norm", "logits"]
    assert stages.previous("text.inputs_embeds", 4) == "vision.merger"
    assert stages.previous("text.inputs_embeds", 4, vision=False) is None  # text only: the embedding alone


def test_a_text_only_case_measures_inputs_embeds_locally_from_the_input_ids():
    """model_text runs no vision stage: text.inputs_embeds is judged locally on the input ids alone, and a
    wrong embedding is blamed there, not left 'not measured' for want of a vision.merger."""

    class WrongEmbedding(SpecAdapter):
        def prepare(self, checkpoint, *, dtype, device):
            super().prepare(checkpoint, dtype=dtype, device=device)
            embed = self.params["model.embed_tokens.weight"]
            self.params = {**self.params, "model.embed_tokens.weight": embed * 1.01}

    _, results = runner.run_suite(
        runner.select_cases(FIXTURES, "^model_text$"),
        runner.SuiteOptions(only_stages="^text\\.inputs_embeds$"),
        adapter=WrongEmbedding("float32"),
    )
    (r,) = [r for r in results if r.stage == "text.inputs_embeds" and r.mode == "e2e"]
    assert r.status == "fail", r
    assert "fed the model inputs" in r.note and "did not capture" not in r.note, r.note


def test_bundled_fixtures_are_intact_and_small():
    # what a clone carries: git stores a content once, so the two checkpoints' tokenizer files count once.
    # 61.4 MB today: the checkpoint and tokenizer 35, the other cases about 1 to 4 each; a case that needs more
    # (full logits, a real-size image) is a mistake this catches
    by_content = {sha256_file(p): p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file()}
    total = sum(by_content.values())
    assert total < 63e6, f"bundled fixtures are {total / 1e6:.1f} MB of distinct content"
    for path in find_cases(FIXTURES):
        case = load_case(path)
        assert case.bad_files == {}, (path, case.bad_files)
        for stage, entry in case.stages.items():
            assert stages.is_known(stage), stage
            assert entry["tolerance"] == stages.info(stage).tolerance.name
    for checkpoint in ("tiny", "tiny_tied"):
        assert Checkpoint(FIXTURES / "checkpoints" / checkpoint).problem is None


def test_request_media_resolves_frame_lists_and_files(tmp_path):
    request = {
        "images": ["media/a.png"],
        "videos": [{"frames": ["media/f0.png", "media/f1.png"], "fps": 1.5}, {"file": "media/v.mov"}],
    }
    images, videos = request_media(tmp_path, request)
    assert images == [str(tmp_path / "media/a.png")]
    assert videos == [
        {"frames": [str(tmp_path / "media/f0.png"), str(tmp_path / "media/f1.png")], "fps": 1.5},
        {"file": str(tmp_path / "media/v.mov")},
    ]
    for bad in ({"file": "v.mov", "frames": []}, {"fps": 2.0}, "v.mov"):
        with pytest.raises(FixtureError, match=r"request.json: videos\[0\] must hold either 'frames' or 'file'"):
            request_media(tmp_path, {"videos": [bad]})


def test_the_video_file_case_is_decoded_and_sampled_by_the_port():
    case = load_case(FIXTURES / "model_video_file")
    (video,) = case.media()[1]
    assert set(video) == {"file"} and video["file"].endswith(".mov")
    got = SpecAdapter("float64").build_inputs(
        case.json("request.json")["conversations"],
        [],
        [video],
        tokenizer_dir=str(case.checkpoint()),
        options=case.json("request.json")["options"],
    )
    golden = case.tensors("inputs.safetensors")
    assert got["video_grid_thw"].tolist() == golden["video_grid_thw"].tolist() == [[3, 8, 10]]  # 6 frames sampled
    assert got["second_per_grid_ts"].tolist() == pytest.approx([19 / 15])  # 2 / (6 / 19 * 5 fps), not 2 / 2 fps
    torch.testing.assert_close(got["pixel_values_videos"], golden["pixel_values_videos"], rtol=0, atol=1e-6)


def test_an_adapter_that_takes_frame_lists_only_is_told_the_video_is_a_file():
    class FramesOnly(SpecAdapter):
        def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
            videos = [{"frames": v["frames"], "fps": v["fps"]} for v in videos]  # KeyError on a file
            return super().build_inputs(conversations, images, videos, tokenizer_dir=tokenizer_dir, options=options)

    _, results = runner.run_suite(
        runner.select_cases(FIXTURES, "^model_video_file$"),
        runner.SuiteOptions(only_stages="^(preprocess\\.video_grid_thw|text\\.position_ids)$"),
        adapter=FramesOnly("float32"),
    )
    status = {r.stage: r for r in results}
    assert status["preprocess.video_grid_thw"].status == "error"
    assert "KeyError" in status["preprocess.video_grid_thw"].metric
    assert "this request's video is a file" in status["preprocess.video_grid_thw"].metric
    assert status["text.position_ids"].status == "pass"  # the model still runs on the golden inputs


def test_fixture_errors_name_the_file(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(FixtureError, match="not valid JSON"):
        load_case(tmp_path / "bad")
    with pytest.raises(FixtureError, match="not found"):
        find_cases(tmp_path / "nope")


def test_bad_model_outputs_are_reported_per_stage(tmp_path):
    """NaN, wrong dtype, wrong shape, a missing capture and a raising generate, in one run of a real
    model case: each is reported on its own stage and every other stage is still judged."""
    from qwen25vl.conformance.adapters.spec import SpecAdapter

    class Broken(SpecAdapter):
        def run(self, inputs, *, capture):
            out = super().run(inputs, capture=capture)
            out["vision.block.0"] = torch.full_like(out["vision.block.0"], float("nan"))
            out["text.position_ids"] = out["text.position_ids"].float()
            out["text.layer.0"] = out["text.layer.0"][:, :-1]
            del out["text.norm"]
            return out

        def generate(self, inputs, **kw):
            raise RuntimeError("decoder exploded")

    res = {r.stage: r for r in runner.CaseRunner(Broken("float32")).run(FIXTURES / "model_image")}
    assert res["vision.block.0"].status == "error" and "non-finite" in res["vision.block.0"].metric
    assert res["text.position_ids"].status == "error" and "dtype" in res["text.position_ids"].metric
    assert res["text.layer.0"].status == "error" and "wrong shape" in res["text.layer.0"].metric
    assert res["text.norm"].status == "not_covered"
    assert res["generate.tokens"].status == "error" and "decoder exploded" in res["generate.tokens"].metric
    assert res["vision.block.1"].status == "pass" and res["logits"].status == "pass"
    assert res["preprocess.input_ids"].status == "pass"
    assert report.exit_code(list(res.values())) == 1


def test_a_tampered_model_case_errors_every_stage_that_reads_the_file(tmp_path):
    dst = tmp_path / "model_image"
    shutil.copytree(FIXTURES / "model_image", dst)
    (tmp_path / "checkpoints").symlink_to(FIXTURES / "checkpoints")
    data = bytearray((dst / "golden.safetensors").read_bytes())
    data[-1] ^= 1
    (dst / "golden.safetensors").write_bytes(bytes(data))
    from qwen25vl.conformance.adapters.spec import SpecAdapter

    res = {r.stage: r for r in runner.CaseRunner(SpecAdapter("float32")).run(dst)}
    assert res["vision.block.0"].status == "error" and "sha256" in res["vision.block.0"].metric
    assert res["preprocess.input_ids"].status == "pass"  # reads other files
    assert res["generate.tokens"].status == "pass"
    assert report.exit_code(list(res.values())) == 1


def test_every_stage_the_spec_captures_has_a_tolerance_class_and_a_meaning():
    from qwen25vl.spec.config import Qwen25VLConfig
    from qwen25vl.spec.forward import stage_names

    names = stage_names(Qwen25VLConfig())  # the real 7B sizes: 32 vision blocks, 28 layers
    assert len(names) == 1 + 32 + 1 + 3 + 28 + 2
    for name in names:
        assert stages.is_known(name), name
        assert stages.info(name).tolerance.name in ("exact", "float", "logits"), name


def test_a_harness_failure_on_a_case_is_an_error_row_not_a_lost_case(tmp_path, monkeypatch):
    """Should the harness raise while judging a case, the case stays in the report as an error that says so,
    and the run fails: a case that vanished would leave a shorter report that passes."""

    def broken(self, path):
        raise RuntimeError("judging went wrong")

    monkeypatch.setattr(case_runner.CaseRunner, "run", broken)
    res = run(Toy(), [toy_case(tmp_path)])
    assert [(r.case, r.stage, r.status) for r in res] == [("toy", "harness", "error")]
    assert "the harness failed while judging this case (RuntimeError: judging went wrong" in res[0].note
    assert report.exit_code(res) == 1
