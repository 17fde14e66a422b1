"""state.chunked: every model case with a golden generation is generated again with the prompt prefilled
in chunks, the first boundary inside the first vision span, and judged against the golden tokens. A
port whose own answer is already wrong passes when the chunking does not change it; the catalogue's
chunk mistakes (test_mistakes.py) are named."""

import json
from pathlib import Path

import pytest
import torch
from qwen25vl.conformance import runner
from qwen25vl.conformance.adapters.base import NotCovered
from qwen25vl.conformance.adapters.spec import SpecAdapter
from qwen25vl.conformance.chunked import chunk_for
from qwen25vl.conformance.mistakes.chunks import ChunkPositionsFromStart
from qwen25vl.conformance.mistakes.positions import DecodeWithoutDeltas
from qwen25vl.spec.config import Qwen25VLConfig
from qwen25vl.tools import cli

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
IMAGE, VIDEO = 151655, 151656  # the config's image and video pad ids


def ids(*runs):
    """A [1, L] prompt from (token, count) runs."""
    return torch.tensor([[t for t, n in runs for _ in range(n)]])


@pytest.fixture(scope="module")
def config():
    return Qwen25VLConfig.from_file(FIXTURES / "checkpoints" / "tiny" / "config.json")


def test_the_first_boundary_falls_inside_the_first_vision_span(config):
    chunk, where = chunk_for(ids((1, 15), (IMAGE, 64), (2, 9)), config)
    assert 15 < chunk < 79 and chunk == 15 + 32
    assert where == "chunks of 47 tokens, boundaries at 47 (the first inside the image span 15..78)"
    chunk, where = chunk_for(ids((1, 4), (VIDEO, 6), (2, 3), (IMAGE, 4), (2, 30)), config)
    assert chunk == 7 and "the video span 4..9" in where and "boundaries at 7, 14, 21, 28, 35, 42" in where
    # a padded batch: row 0 has no image, row 1 does; one merged token is split before it
    batch = torch.tensor([[0, 0, 0, 0, 5, 6], [5, IMAGE, 6, 7, 8, 9]])
    assert chunk_for(batch, config)[0] == 1
    assert chunk_for(ids((3, 9)), config) == (5, "chunks of 5 tokens, boundaries at 5 (the first inside the text)")
    assert chunk_for(ids((3, 1)), config) is None


def run(adapter, cases):
    opts = runner.SuiteOptions(only_stages="^(generate.tokens|state.chunked)$", repeat=False)
    _, results = runner.run_suite(runner.select_cases(FIXTURES, cases), opts, adapter=adapter)
    return {(r.case, r.stage): r for r in results}


def test_the_spec_passes_on_every_model_case_with_a_generation():
    got = run(SpecAdapter("float32"), "model_")
    chunked = {case: r for (case, stage), r in got.items() if stage == "state.chunked"}
    generated = {case for (case, stage) in got if stage == "generate.tokens"}
    assert set(chunked) == generated and len(chunked) >= 9
    assert all(r.status == "pass" and "chunks of" in r.where for r in chunked.values()), chunked


class CrashesInChunks(SpecAdapter):
    failure = RuntimeError("chunk boundary inside an image")

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):
        if prefill_chunk is not None:
            raise self.failure
        return super().generate_chunked(
            inputs, prefill_chunk=None, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id
        )


class NoChunks(CrashesInChunks):
    failure = NotCovered("this port has no chunked prefill")


class WrongDecodeAndChunks(ChunkPositionsFromStart, DecodeWithoutDeltas):
    """Wrong at every generation, and wrong again, differently, when prefilled in chunks."""


@pytest.mark.parametrize(
    "port, status, says",
    [
        (CrashesInChunks, "error", "RuntimeError: chunk boundary inside an image"),
        (NoChunks, "not_covered", "this port has no chunked prefill"),
        # the answer is wrong at once and in chunks alike: generate.tokens reports it, the chunking is fine
        (DecodeWithoutDeltas, "pass", "the same answer as the prompt prefilled at once"),
        (WrongDecodeAndChunks, "fail", "the prompt prefilled at once gives another answer (fail at generate.tokens)"),
        (ChunkPositionsFromStart, "fail", "the same prompt prefilled at once passes: the chunking changes the answer"),
    ],
)
def test_what_state_chunked_says(port, status, says):
    got = run(port("float32"), "model_image$")
    r = got[("model_image", "state.chunked")]
    assert r.status == status, r
    assert says in f"{r.metric} {r.note}", r
    assert "(the first inside the image span 18..71)" in r.where
    plain = got[("model_image", "generate.tokens")].status
    assert plain == ("fail" if issubclass(port, DecodeWithoutDeltas) else "pass")


def test_state_chunked_is_a_stage_the_command_line_selects(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["conform", "--target", "spec", "--cases", "model_thin", "--stages", "state.chunked", "--json", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert {r["stage"] for r in json.loads(out.read_text())["results"]} == {"state.chunked"}


def test_a_chunk_bug_on_a_text_only_prompt_rules_out_vision():
    """On model_text the chunking cannot touch vision features or positions: the note says what is left."""
    r = run(ChunkPositionsFromStart("float32"), "model_text$")[("model_text", "state.chunked")]
    assert r.status == "fail" and "the prompt is text only" in r.note and "earlier chunks' cache" in r.note, r
    image = run(ChunkPositionsFromStart("float32"), "model_image$")[("model_image", "state.chunked")]
    assert "text only" not in image.note
