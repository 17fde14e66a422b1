"""The serving targets (--target vllm / sglang) against stand-ins with the engines' call signatures.

Neither engine installs on a CPU-only machine; the stand-ins (tests/conformance/serving_standins/)
render and preprocess with the Hugging Face tokenizer and processor, as both engines do, and decode
with transformers. What is checked is the adapters' glue: one request per conversation with its own
images, the eos list, rows padded after their eos, the top-5 log-prob tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from qwen25vl.conformance.adapters.serving import SglangAdapter, VllmAdapter, pad_rows, row_media, top_table
from qwen25vl.conformance.fixtures import load_case

ROOT = Path(__file__).resolve().parents[2]
STANDINS = Path(__file__).resolve().parent / "serving_standins"
FIXTURES = ROOT / "fixtures"


@pytest.fixture
def standins(monkeypatch):
    monkeypatch.syspath_prepend(str(STANDINS))
    for name in ("vllm", "sglang", "standin_engine"):
        sys.modules.pop(name, None)
    yield
    for name in ("vllm", "sglang", "standin_engine"):
        sys.modules.pop(name, None)


def test_row_media_splits_the_request_by_conversation():
    text = {"type": "text", "text": "x"}
    convs = [
        [{"role": "user", "content": [{"type": "image"}, text, {"type": "image"}]}],
        [{"role": "user", "content": "no media"}],
        [{"role": "user", "content": [{"type": "video"}, {"type": "image"}]}],
    ]
    assert row_media(convs, ["a", "b", "c"], ["v"]) == [(["a", "b"], []), ([], []), (["c"], ["v"])]
    with pytest.raises(ValueError, match="name 3 images and 1 videos, the request lists 4 and 1"):
        row_media(convs, ["a", "b", "c", "d"], ["v"])


def test_rows_of_different_length_are_padded_after_their_eos():
    got = pad_rows([[5, 151643], [7, 8, 9, 10]], 151643)
    assert got.tolist() == [[5, 151643, 151643, 151643], [7, 8, 9, 10]]
    assert got.dtype == torch.int64


def test_top_table_keeps_the_k_most_likely_even_with_the_pick_added():
    step = {1: -0.1, 2: -3.0, 3: -1.0, 4: -2.0, 5: -2.5, 99: -9.0}  # 99: the sampled token, outside the top 5
    assert top_table(step) == ([1, 3, 4, 5, 2], [-0.1, -1.0, -2.0, -2.5, -3.0])
    with pytest.raises(ValueError, match="returned 2 log-probs for a step, 5 were asked for"):
        top_table({1: -0.1, 2: -0.2})


@pytest.mark.parametrize("adapter_class", [VllmAdapter, SglangAdapter])
def test_serving_adapter_sends_one_request_per_row_with_the_eos_list(standins, adapter_class):
    import standin_engine

    case = load_case(FIXTURES / "model_batch")
    gen = case.json("generate.json")
    adapter = adapter_class(dtype="float32", device="cpu")
    adapter.prepare(str(case.checkpoint()), dtype="float32", device="cpu")
    adapter.begin_case(case)
    inputs = case.tensors(case.manifest["inputs"])
    standin_engine.CALLS.clear()
    got = adapter.generate(dict(inputs), max_new_tokens=gen["max_new_tokens"], eos_token_id=gen["eos_token_id"])
    request = case.json("request.json")
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    per_row = [len(imgs) for imgs, _ in row_media(request["conversations"], request["images"], request["videos"])]
    assert [c["images"] for c in standin_engine.CALLS] == per_row
    assert all(c["stop"] == eos for c in standin_engine.CALLS)
    assert all(c["prompt"].endswith("<|im_start|>assistant\n") for c in standin_engine.CALLS)
    B = len(request["conversations"])
    assert got["tokens"].shape[0] == B and got["topk"].shape == (*got["tokens"].shape, 5)
    assert got["topk_logprobs"].shape == got["topk"].shape
    # each step's pick is the most likely token of that step (greedy), wherever the row has not ended
    live = got["topk_logprobs"][..., 0] < 0
    assert torch.equal(got["tokens"][live], got["topk"][..., 0][live])
    # the inputs of a case never begun match no request: not covered, never a wrong answer
    other = dict(inputs, input_ids=inputs["input_ids"] + 1)
    with pytest.raises(Exception, match="match none"):
        adapter.generate(other, max_new_tokens=2, eos_token_id=eos)


def test_a_video_file_is_not_covered_not_handed_over_as_frames(standins):
    from qwen25vl.conformance.adapters.base import NotCovered

    case = load_case(FIXTURES / "model_video_file")
    adapter = VllmAdapter(dtype="float32", device="cpu")
    adapter.prepare(str(case.checkpoint()), dtype="float32", device="cpu")
    adapter.begin_case(case)
    with pytest.raises(NotCovered, match=r"a video file \(video0.mov\): this adapter hands engines frame lists"):
        adapter.generate(dict(case.tensors(case.manifest["inputs"])), max_new_tokens=2, eos_token_id=[151645])


def test_conform_target_vllm_passes_generate_on_image_cases(tmp_path):
    """The whole command, as a user with vLLM would run it (the stand-in in its place)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(STANDINS), os.environ.get("PYTHONPATH", "")]))
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "qwen25vl", "conform", "--target", "vllm", "--device", "cpu", "--dtype", "float32"]
        + ["--cases", "model_image$", "--stages", "generate.tokens", "--json", str(report)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert report.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(report.read_text())["results"]
    got = {(r["case"], r["stage"]): r["status"] for r in results}
    assert got == {("model_image", "generate.tokens"): "pass"}, proc.stdout[-3000:]


def test_a_leaked_repetition_penalty_is_caught_by_the_log_probs(standins):
    """generation_config.json carries repetition_penalty 1.05; an engine request that leaves it unset gets
    it. The greedy tokens of model_image survive it, the log-probs do not: the tokens rule fails it."""
    from qwen25vl.conformance import stages

    case = load_case(FIXTURES / "model_image")
    gen = case.json("generate.json")
    noise = case.stages["generate.tokens"].get("logit_noise")

    class Leaky(VllmAdapter):
        def complete(self, conversation, images, videos, options, *, max_new_tokens, eos):
            params = self._vllm.SamplingParams

            def without_penalty(**kw):
                kw.pop("repetition_penalty")
                return params(**kw)

            self._vllm.SamplingParams = without_penalty
            try:
                return super().complete(conversation, images, videos, options, max_new_tokens=max_new_tokens, eos=eos)
            finally:
                self._vllm.SamplingParams = params

    verdicts = {}
    for klass in (VllmAdapter, Leaky):
        adapter = klass(dtype="float32", device="cpu")
        adapter.prepare(str(case.checkpoint()), dtype="float32", device="cpu")
        adapter.begin_case(case)
        got = adapter.generate(
            dict(case.tensors(case.manifest["inputs"])),
            max_new_tokens=gen["max_new_tokens"],
            eos_token_id=gen["eos_token_id"],
        )
        verdicts[klass.__name__] = stages.info("generate.tokens").tolerance.judge_tokens(
            gen, got, precision="float32", logit_noise=noise
        )
    assert verdicts["VllmAdapter"].status == "pass", verdicts["VllmAdapter"].metric
    assert verdicts["Leaky"].status == "fail" and "log-prob" in verdicts["Leaky"].metric
