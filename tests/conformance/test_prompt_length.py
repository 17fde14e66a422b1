"""A port whose prompt is another length than the golden one (each pair of video frames as its own
span, an extra newline, ...): the token-level difference is the prompt stage's failure, and the text
stages are still judged, on the tokens both prompts share."""

import torch
from qwen25vl.conformance import compare, runner
from qwen25vl.conformance.adapters.spec import SpecAdapter

from .test_planted import FIXTURES

NEWLINE = 198


class TwoExtraNewlines(SpecAdapter):
    """Builds its own prompt with two newline tokens more, at position 5, and runs the model on it."""

    def _own(self, inputs: dict) -> dict:
        out = dict(inputs)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        extra = torch.full((ids.shape[0], 2), NEWLINE, dtype=ids.dtype)
        out["input_ids"] = torch.cat([ids[:, :5], extra, ids[:, 5:]], 1)
        out["attention_mask"] = torch.cat([mask[:, :5], torch.ones_like(extra), mask[:, 5:]], 1)
        return out

    def build_inputs(self, *args, **kwargs):
        return self._own(super().build_inputs(*args, **kwargs))

    def run(self, inputs, *, capture):
        return super().run(self._own(inputs), capture=capture)


def test_token_difference_names_inserted_and_missing_ids():
    g = torch.tensor([[1, 2, 3, 4, 5]])
    assert compare.token_difference(g, torch.tensor([[1, 2, 9, 9, 3, 4, 5]])) == "row 0: 2 inserted at 2 [9, 9]"
    assert compare.token_difference(g, torch.tensor([[1, 2, 4, 5]])) == "row 0: 1 missing at 2 [3]"


def test_a_longer_prompt_is_reported_and_the_text_stages_are_still_judged():
    _, results = runner.run_suite(
        [FIXTURES / "model_image"], runner.SuiteOptions(repeat=False), adapter=TwoExtraNewlines("float32")
    )
    by = {r.stage: r for r in results if r.mode == "e2e"}
    ids = by["preprocess.input_ids"]
    assert ids.status == "fail" and f"2 inserted at 5 [{NEWLINE}, {NEWLINE}]" in ids.where, ids.where
    mask = by["preprocess.attention_mask"]  # the mask of that prompt: the same disagreement, not a malformed answer
    assert mask.status == "fail" and "the mask of the port's own prompt" in mask.where, (mask.status, mask.where)
    emb = by["text.inputs_embeds"]
    assert emb.status == "pass" and "judged on the" in emb.where and "tokens the port's prompt" in emb.where
    for s in ("text.position_ids", "text.layer.0", "text.layer.1", "text.norm", "logits"):
        assert by[s].status in ("pass", "fail"), (s, by[s].status, by[s].metric)  # judged, not a shape error
        assert "judged on the" in by[s].where, (s, by[s].where)
    assert runner.first_divergence(results).stage == "preprocess.input_ids"
