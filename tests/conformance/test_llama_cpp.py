"""llama.cpp's own code on the bundled checkpoint: its converter (text GGUF + --mmproj), then the conformance tap
(conformance/llama_cpp_tap, built by tools/build_llama_cpp.sh) through mtmd's tokenizer, image preprocessing, clip
vision encoder and the decoder, tensors read through the eval callbacks. Needs QWEN25VL_LLAMA_CPP_SRC (a llama.cpp
tree) and QWEN25VL_LLAMA_CPP_TAP (the tap the build script printed); CI sets both."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qwen25vl.tools import cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "fixtures" / "checkpoints" / "tiny"
IMAGE = ROOT / "fixtures" / "model_batch" / "media" / "image0.png"
LLAMA_CPP_SRC = os.environ.get("QWEN25VL_LLAMA_CPP_SRC", "")
TAP = os.environ.get("QWEN25VL_LLAMA_CPP_TAP", "")
EOS = (151645, 151643)
IM_START, VISION_START, VISION_END = 151644, 151652, 151653


EXPECTATIONS = ROOT / "conformance" / "expectations" / "llama.cpp.json"

# llama.cpp computes in ggml, built for this CPU: torch's SIMD path changes nothing it is judged on
pytestmark = [
    pytest.mark.skipif(
        not (Path(LLAMA_CPP_SRC) / "convert_hf_to_gguf.py").is_file() or not Path(TAP).is_file(),
        reason="no llama.cpp build: set QWEN25VL_LLAMA_CPP_SRC to a llama.cpp tree and QWEN25VL_LLAMA_CPP_TAP to the "
        "path `bash tools/build_llama_cpp.sh` prints (.ci/run does both)",
    ),
    pytest.mark.simd_independent,
]


def test_tap_runs_llama_cpp_on_the_converted_checkpoint(tmp_path):
    from qwen25vl.conformance.adapters.llama_cpp import _passes
    from safetensors.numpy import load_file

    src = Path(LLAMA_CPP_SRC)
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    text, mmproj = tmp_path / "tiny.gguf", tmp_path / "tiny-mmproj.gguf"
    for extra, out in (([], text), (["--mmproj"], mmproj)):
        subprocess.run(
            [sys.executable, str(src / "convert_hf_to_gguf.py"), str(TINY), "--outtype", "f32", "--outfile", str(out)]
            + extra,
            check=True,
            capture_output=True,
            env=env,
            timeout=300,
        )
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("<|im_start|>user\n<__media__>Describe.<|im_end|>\n<|im_start|>assistant\n")
    n_predict = 5

    def tap(out, **env):
        out.mkdir(exist_ok=True)
        args = [str(text), str(mmproj), str(prompt), str(out), str(n_predict), ",".join(map(str, EOS)), str(IMAGE)]
        run = subprocess.run([TAP, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        assert run.returncode == 0, run.stderr[-2000:]
        return load_file(str(out / "tap.safetensors"))

    tapped = tap(tmp_path)
    config = json.loads((TINY / "config.json").read_text())

    ids = tapped["input_ids"]
    assert ids[0] == IM_START
    image_positions = (ids == -1).nonzero()[0]
    assert ids[image_positions[0] - 1] == VISION_START and ids[image_positions[-1] + 1] == VISION_END
    assert tapped["positions_thw"].shape == (3 * len(ids),)
    # every vision block and the merger were reached through clip's callback, one row per merged image token
    for block in range(config["vision_config"]["depth"]):
        assert f"vision.layer_out-{block}" in tapped
    assert tapped["vision.ffn_down"].shape == (len(image_positions), config["hidden_size"])
    for layer in range(config["num_hidden_layers"]):
        assert f"text.l_out-{layer}" in tapped

    # every prompt token is an output while the tap records: the last layer, the final norm and the logits
    # hold a row per token (llama.cpp alone computes them at the last position only)
    def rows(name, t=tapped):
        return [p.reshape(-1, p.shape[-1]) for p in _passes(t, name)]

    last_layer = f"text.l_out-{config['num_hidden_layers'] - 1}"
    # (an embeddings context names the final norm's output result_embd_pooled)
    for name in (last_layer, "text.result_embd_pooled", "text.result_output"):
        assert sum(len(r) for r in rows(name)) == len(ids), name
    # the last row the callback saw is the logits llama.cpp hands out
    assert rows("text.result_output")[-1][-1].tolist() == tapped["text.last_logits"].tolist()
    # QWEN25VL_TAP_LAST_ONLY=1 keeps llama.cpp's own graph, which computes those at the last position only; the
    # greedy tokens agree (the two graphs' last-position logits differ by about 1e-6, and only the first step
    # reads them: its top two are 0.06 apart)
    last_only = tap(tmp_path / "last_only", QWEN25VL_TAP_LAST_ONLY="1")
    for name in ("text.result_norm", "text.result_output"):
        assert sum(len(r) for r in rows(name, last_only)) == 1, name
    assert "text.result_embd_pooled" not in last_only
    assert last_only["generated"].tolist() == tapped["generated"].tolist()
    generated = tapped["generated"].tolist()
    assert 1 <= len(generated) <= n_predict
    assert generated[0] == int(tapped["text.last_logits"].argmax())
    assert all(token not in EOS for token in generated[:-1])
    top5 = tapped["generated_top5"].reshape(-1, 5)
    assert (
        top5[:, 0].tolist() == generated and top5[0].tolist() == tapped["text.last_logits"].argsort()[::-1][:5].tolist()
    )
    # the image's encoder output as the decoder received it, and mtmd's preprocessed pixels of the image
    assert tapped["vision.mm_embd"].shape == (len(image_positions), config["hidden_size"])
    h, w, c = tapped["vision.pixels"].shape
    assert c == 3 and (h // 28) * (w // 28) == len(image_positions)


def test_conform_llama_cpp_matches_its_expectations(capsys, tmp_path):
    """`qwen25vl conform --target llama.cpp` on the image cases and the text-only one, as a user runs it: the
    harness's own findings (run without expectations) are exactly what expectations/llama.cpp.json lists, and
    the three real preprocessing divergences and the decoder's missing RMSNorm eps are named by the catalogue."""
    from qwen25vl.conformance.expectations import apply_expectations, load_expectations
    from qwen25vl.conformance.results import StageResult

    report = tmp_path / "r.json"
    code = cli.main(
        [
            "conform",
            "--target",
            "llama.cpp",
            "--cases",
            "model_batch|model_image|model_text|model_resize_tie|model_thin",
            "--no-expectations",
        ]
        + ["--json", str(report)]
    )
    out = capsys.readouterr().out
    raw = json.loads(report.read_text())["results"]
    assert code == 1, out  # llama.cpp diverges: without its expectations the run fails
    results = {(r["case"], r["stage"]): r for r in raw}
    status = {k: r["status"] for k, r in results.items()}
    # llama.cpp's preprocessing agrees where no resize is needed; its positions agree
    assert status[("model_image", "preprocess.pixel_values")] == "pass"
    assert status[("model_image", "text.position_ids")] == "pass" and status[("model_image", "logits")] == "pass"
    assert status[("model_image", "generate.tokens")] == "pass"
    # n_batch = n_ubatch = 45 (QWEN25VL_TAP_BATCH) decodes the image's 54 tokens in two batches: the same tokens
    assert status[("model_image", "state.chunked")] == "pass"
    assert "inside the image span 18..71" in results[("model_image", "state.chunked")]["where"]
    # where llama.cpp's own answer is wrong (the letterbox), the chunked one is that same answer
    assert results[("model_batch", "state.chunked")]["metric"] == "the same answer as the prompt prefilled at once"
    # the tokenizer without NFC and the letterbox, named by the catalogue
    assert "tokenizer without the NFC normalizer" in results[("model_batch", "preprocess.input_ids")]["note"]
    assert "letterboxed" in results[("model_batch", "preprocess.pixel_values")]["note"]
    # text only, on the tied checkpoint: llama.cpp's decoder norms run with eps 0 (its qwen2vl loader never
    # reads layer_norm_rms_epsilon), named at the final norm, where float16 attention noise does not hide it
    assert status[("model_text", "preprocess.input_ids")] == "pass" and status[("model_text", "text.norm")] == "fail"
    assert "eps 0 in the text model" in results[("model_text", "text.norm")]["note"]
    # a resize tie (126x294 = 4.5 x 10.5 patches) rounded away from zero: grid 10x22, not 8x20
    assert "rounds ties away from zero" in results[("model_resize_tie", "preprocess.image_grid_thw")]["note"]
    # an 8x288 strip: mtmd clamps the first rounding to 28 (qwen-vl-utils' rule), grid 2x20, not 2x24
    assert "qwen-vl-utils' smart_resize" in results[("model_thin", "preprocess.image_grid_thw")]["note"]
    # the patch embedding is judged on llama.cpp's own pixels: only its float16 im2col is left (declared)
    patch = results[("model_batch", "vision.patch_embed")]
    assert patch["status"] == "pass" and "the port's own preprocess.pixel_values" in patch["note"]
    # the expectations file turns exactly these failures into xfail, and none of its entries is stale
    fields = {"case", "stage", "status", "metric", "note"}
    judged = [StageResult(**{k: v for k, v in r.items() if k in fields}) for r in raw]
    apply_expectations(judged, load_expectations(EXPECTATIONS))
    left = {(r.case, r.stage): r.status for r in judged if r.status in ("fail", "error", "xpass")}
    assert not left, left
    assert {r.status for r in judged} >= {"xfail", "pass"}
    assert json.loads(EXPECTATIONS.read_text())["port"] == "llama.cpp"
