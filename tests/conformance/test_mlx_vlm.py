"""`qwen25vl conform --target mlx-vlm`: mlx-vlm 0.7.10 judged on the bundled fixtures, as a user runs it.

Restricted to the cases exact_resize, exact_positions, model_image, model_video* (the pattern
`model_video` picks all five clips), model_text, model_resize_tie and model_thin (about 110 s on 2 cores):
the exact stages mlx-vlm exposes, the image requests that pass end to end (a resize tie, a thin strip), the
video requests where its time-position and frame-size divergences live, and the text-only request on the tied
checkpoint (model_batch, with the padding divergences, is left to `qwen25vl conform --target mlx-vlm`). CI
installs the [mlx] extra, so these run there.
"""

import importlib.util
import json
from pathlib import Path

import pytest
from qwen25vl.tools import cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "fixtures" / "checkpoints" / "tiny"
EXPECTATIONS = ROOT / "conformance" / "expectations" / "mlx-vlm.json"

# mlx-vlm computes in MLX: torch's SIMD path changes nothing it is judged on
pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("mlx_vlm") is None, reason='mlx-vlm is not installed (pip install -e ".[mlx]")'
    ),
    pytest.mark.simd_independent,
]


def test_bundled_checkpoint_loads_unchanged_in_mlx_vlm():
    from mlx_vlm import load

    model, processor = load(str(TINY))
    config = json.loads((TINY / "config.json").read_text())
    assert len(model.language_model.model.layers) == config["num_hidden_layers"]
    assert len(model.vision_tower.blocks) == config["vision_config"]["depth"]
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]


def test_conform_mlx_vlm_matches_its_expectations(capsys, tmp_path):
    report = tmp_path / "r.json"
    code = cli.main(
        [
            "conform",
            "--target",
            "mlx-vlm",
            "--cases",
            "exact_resize|exact_positions|model_image|model_video|model_text|model_resize_tie|model_thin",
            "--json",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    results = json.loads(report.read_text())["results"]
    status = {(r["case"], r["stage"]): r["status"] for r in results}
    # every unexpected failure would have made the exit status 1; the expectations must also be live
    assert not [k for k, s in status.items() if s == "xpass"], out
    assert status[("model_video", "text.position_ids")] == "xfail"
    assert status[("exact_positions", "fn.rope_index")] == "xfail"
    assert status[("model_image", "logits")] == "pass" and status[("model_image", "vision.block.0")] == "pass"
    assert status[("exact_resize", "fn.smart_resize")] in ("pass", "xfail")
    # text only on the tied checkpoint: mlx-vlm's [B, L] positions are the same position on all 3 axes
    assert status[("model_text", "text.position_ids")] == "pass" and status[("model_text", "logits")] == "pass"
    assert status[("model_resize_tie", "preprocess.image_grid_thw")] == "pass"  # Python's round: ties to even
    # the 8 px strip's side rounds to 0 and the min_pixels branch scales it (transformers' processor)
    assert status[("model_thin", "preprocess.image_grid_thw")] == "pass" and status[("model_thin", "logits")] == "pass"
    assert status[("model_video_fps", "text.position_ids")] == "xfail"  # 0, 1, 2 for 0, 2, 5
    assert status[("model_video_sparse", "text.position_ids")] == "xfail"  # 0, 1, 2 for 0, 1600, 3200
    assert status[("model_video_file", "text.position_ids")] == "xfail"  # 0, 1, 2 for 0, 2, 5 (19/15 s a patch)
    # a per-request budget, set on mlx-vlm's video processor as a user sets it in its config, and frame lists
    # handed to prepare_inputs as decoded frames: every clip's preprocessing is judged, by Qwen3-VL's rule
    for case in ("model_video", "model_video_fps", "model_video_sparse", "model_video_file"):
        assert status[(case, "preprocess.input_ids")] == status[(case, "preprocess.video_grid_thw")] == "xfail", case
    # a video file with no budget: mlx-vlm decodes and samples it itself, and sizes its frames by Qwen3-VL's rule
    assert status[("model_video_budget", "preprocess.input_ids")] == "xfail"
    assert status[("model_video_budget", "preprocess.video_grid_thw")] == "xfail"
    assert status[("model_video_budget", "logits")] == "pass"  # one temporal patch: its time rule is not reached
    # an image and a video in one request: only the image is encoded, and the report says which pads are wrong
    embeds = next(r for r in results if (r["case"], r["stage"]) == ("model_video_image", "text.inputs_embeds"))
    assert embeds["status"] == "xfail" and "the error is on the video pads (40 of 89 tokens)" in embeds["where"]
    assert json.loads(EXPECTATIONS.read_text())["port"] == "mlx-vlm"


def test_mlx_vlm_absent_says_how_to_install(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "mlx_vlm", None)  # import fails
    code = cli.main(["conform", "--target", "mlx-vlm", "--cases", "exact_resize", "--in-process"])
    assert code == 2
    assert 'pip install -e ".[mlx]"' in capsys.readouterr().err
