"""compare.py on synthetic values; every expected number is worked out by hand in the test."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from qwen25vl.conformance import compare


def test_first_difference_names_the_path_and_values():
    assert compare.first_difference([[1, 2], [3, 4]], [[1, 2], [3, 4]]) is None
    assert compare.first_difference([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == "[1][1]: expected 4, got 5"
    assert compare.first_difference({"a": [1]}, {"a": [1, 2]}) == ".a: expected length 1, got 2"
    assert compare.first_difference("ab", "ac") == (
        "value: first difference at character 1 (lengths 2 and 2; 1 shared characters shown before it): "
        "expected 'ab', got 'ac'"
    )
    long = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" * 3 + "Picture 1: <|vision_start|>"
    d = compare.first_difference(long, long.replace("Picture 1: ", "Picture 1:"))
    assert "character 184" in d and "Picture 1: <|vision_start|>'" in d and "Picture 1:<|vision_start|>'" in d


def test_first_difference_integers_are_not_floats():
    # an index returned as a float is a port bug even when the value matches
    assert compare.first_difference([3], [3.0]) == "[0]: expected 3, got 3.0"
    assert compare.first_difference([True], [1]) is not None


def test_exact_items_reports_the_first_bad_item_with_its_label():
    v = compare.exact_items([[56, 56], [84, 84], [28, 28]], [[56, 56], [84, 85], [28, 29]], ["a", "b", "c"])
    assert v.status == "fail"
    assert v.metric == "1/3 items equal"
    assert v.where.startswith("item 1 'b': [1]: expected 84, got 85")
    assert v.values["bad_items"] == [1, 2]


def test_exact_items_refusal_is_a_result_and_a_crash_is_an_error():
    ok = compare.exact_items([{"error": "ValueError"}], [{"error": "ValueError"}])
    assert ok.status == "pass"
    crash = compare.exact_items([[1, 1]], [{"error": "RuntimeError", "crash": "boom"}])
    assert crash.status == "error" and "port raised RuntimeError: boom" in crash.where


def test_item_tensors_int_exact_float_within_tol():
    e = {"pv": torch.tensor([[1.0, 2.0]]), "grid": torch.tensor([[1, 2, 2]])}
    assert compare.item_difference(e, {"pv": [[1.0, 2.0 + 5e-6]], "grid": [[1, 2, 2]]}, tol=1e-5) is None
    assert "max |diff|" in compare.item_difference(e, {"pv": [[1.0, 2.1]], "grid": [[1, 2, 2]]}, tol=1e-5)
    assert "wrong dtype" in compare.item_difference(e, {"pv": [[1.0, 2.0]], "grid": torch.tensor([[1.0, 2, 2]])}, tol=0)
    nan = compare.item_difference(e, {"pv": [[1.0, float("nan")]], "grid": [[1, 2, 2]]}, tol=1.0)
    assert nan is not None and "inf" in nan  # NaN never passes a tolerance


def test_float_errors_by_hand():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    x = torch.tensor([[3.0, 4.5], [0.0, 0.0]])
    e = compare.float_errors(g, x)
    assert e["rel"] == pytest.approx(0.5 / 5.0)  # ||(0, .5)|| / ||(3, 4)||
    assert e["max_abs"] == pytest.approx(0.5)
    assert e["worst"] == [0, 1]
    assert e["cosine"] == pytest.approx((9 + 18) / (5 * math.sqrt(9 + 20.25)))


def test_mask_excludes_padded_positions():
    g = torch.zeros(1, 3, 2)
    g[0, 1:] = 1.0
    x = g.clone()
    x[0, 0] = 100.0  # garbage at a padded position
    assert compare.float_errors(g, x, torch.tensor([[0, 1, 1]]))["rel"] == 0.0
    assert compare.float_errors(g, x)["rel"] > 1


def test_float_budget_is_alpha_control_plus_floor():
    budget, text = compare.float_budget({"bfloat16": 0.01, "float32": 1e-7}, "bfloat16")
    assert budget == pytest.approx(2 * 0.01 + 2.3e-3)
    assert "bfloat16 control" in text
    assert compare.float_budget({"bfloat16": 0.01}, "float16")[0] == pytest.approx(2 * 0.01 + 2.8e-4)
    assert compare.float_budget({"bfloat16": 0.01}, "float64")[0] == pytest.approx(1e-6)


def test_floats_pass_fail_at_the_budget():
    g = torch.tensor([1.0, 0.0])
    ctl = {"float32": 0.0}
    assert compare.floats(g, torch.tensor([1.0 + 0.9e-6, 0.0]), control=ctl, dtype="float32").status == "pass"
    assert compare.floats(g, torch.tensor([1.0 + 1e-5, 0.0]), control=ctl, dtype="float32").status == "fail"


@pytest.mark.parametrize(
    "got, why",
    [
        (torch.tensor([1.0, float("nan")]), "non-finite"),
        (torch.tensor([1.0, 2.0, 3.0]), "wrong shape"),
        (torch.tensor([1, 2]), "wrong dtype"),
        ([1.0, 2.0], "expected a tensor"),
    ],
)
def test_bad_outputs_are_errors_not_failures(got, why):
    v = compare.floats(torch.tensor([1.0, 2.0]), got, control=None, dtype="float32")
    assert v.status == "error" and why in v.metric


def test_exact_tensor_rejects_float_and_finds_first_difference():
    g = torch.tensor([[0, 1, 2]])
    assert compare.exact_tensor(g, torch.tensor([[0, 1, 2]])).status == "pass"
    v = compare.exact_tensor(g, torch.tensor([[0, 1, 3]]))
    assert v.status == "fail" and v.where == "first at [0, 2]: golden 2, got 3"
    assert compare.exact_tensor(g, g.float()).status == "error"
    masked = compare.exact_tensor(g, torch.tensor([[9, 1, 2]]), mask=torch.tensor([[0, 1, 1]]))
    assert masked.status == "pass"


def test_logit_stats_by_hand():
    # two classes: p = softmax(0, 0) = (.5, .5); q = softmax(0, log 3) = (.25, .75)
    g = torch.tensor([[[0.0, 0.0]]])
    x = torch.tensor([[[0.0, math.log(3.0)]]])
    s = compare.logit_stats(g, x)
    assert s["mean_kl"] == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    identical = compare.logits(g, g.clone(), control={"float32": {"mean_kl": 0.0, "top1": 1.0}}, dtype="float32")
    assert identical.status == "pass"


def test_logits_top1_gate():
    g = torch.zeros(1, 50, 2)
    g[..., 0] = 2.0
    x = g.clone()
    x[0, :5] = torch.tensor([0.0, 2.0])  # 5 of 50 positions flip: 0.9 < 1 - max(0.02, 3 / 50)
    control = {"bfloat16": {"mean_kl": 10.0, "top1": 1.0}}
    v = compare.logits(g, x, control=control, dtype="bfloat16")
    assert v.status == "fail" and v.values["top1"] == 0.9
    x[0, 3:5] = g[0, 3:5]  # three flips of 50 are within the slack of three positions
    assert compare.logits(g, x, control=control, dtype="bfloat16").status == "pass"


def test_tokens_rule():
    gold = torch.tensor([[5, 6, 7]])
    topk = torch.tensor([[[5, 1, 2, 3, 4], [6, 9, 10, 11, 12], [7, 1, 2, 3, 4]]])
    assert compare.tokens(gold, topk, torch.tensor([[5, 6, 7]])).metric == "identical"
    near = compare.tokens(gold, topk, torch.tensor([[5, 9, 1]]))  # diverges at step 1 onto a top-5 token
    assert near.status == "pass" and "step 1" in near.where
    far = compare.tokens(gold, topk, torch.tensor([[5, 99, 1]]))
    assert far.status == "fail" and "golden 6, got 99" in far.metric
    # the port's own top-5 must hold the golden pick too
    own = compare.tokens(gold, topk, torch.tensor([[5, 9, 1]]), torch.tensor([[[5] * 5, [9, 1, 2, 3, 4], [1] * 5]]))
    assert own.status == "fail"


@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=20))
def test_rel_error_of_identical_tensors_is_zero(values):
    t = torch.tensor(values, dtype=torch.float32)
    assert compare.float_errors(t, t.clone())["rel"] == 0.0


def test_items_a_port_does_not_cover_are_left_out():
    v = compare.exact_items([[1], [2], [3]], [[1], {"not_covered": "video"}, [4]])
    assert v.status == "fail" and v.metric == "1/2 items equal (1 not covered)"
    assert compare.exact_items([[1], [2]], [[1], {"not_covered": "x"}]).status == "pass"


def test_tokens_near_tie_rule_eos_and_log_probs():
    gold = torch.tensor([[5, 6, 7, 2]])  # 2 is eos
    topk = torch.tensor([[[5, 1, 2, 3, 4], [6, 9, 10, 11, 12], [7, 1, 2, 3, 4], [2, 1, 3, 4, 8]]])
    logits = torch.tensor([[[9.0, 1, 1, 1, 1], [4.0, 3.99, 1, 1, 1], [5.0, 2.0, 1, 1, 1], [3.0, 1, 1, 1, 1]]])
    kw = dict(golden_logits=logits, noise=0.05, eos=2)
    # a divergence at a near tie (gap 0.01 <= noise 0.05) passes
    assert compare.tokens(gold, topk, torch.tensor([[5, 9, 1, 1]]), **kw).status == "pass"
    # in the golden top-5 but not a near tie (gap 3.0): the old top-5 rule let this pass
    far = compare.tokens(gold, topk, torch.tensor([[5, 6, 1, 1]]), **kw)
    assert far.status == "fail" and "not a near tie" in far.metric
    # a row that goes on after the golden eos never passes
    on = compare.tokens(
        torch.tensor([[5, 2, 0]]),
        topk[:, :3],
        torch.tensor([[5, 2, 7]]),
        golden_logits=logits[:, :3],
        noise=0.05,
        eos=2,
    )
    assert on.status == "fail" and "goes on after eos at step 1" in on.metric
    # a row that stops and pads with an eos id instead of the golden pad has not gone on
    padded = compare.tokens(
        torch.tensor([[5, 2, 0]]),
        topk[:, :3],
        torch.tensor([[5, 2, 2]]),
        golden_logits=logits[:, :3],
        noise=0.05,
        eos=[2, 3],
    )
    assert padded.status == "pass", padded.metric
    # top-k log-probs are judged at every step before the divergence, for the ids both sides give
    lp = torch.log_softmax(logits, -1)
    got_ids, got_lp = topk.clone(), lp.clone()
    ok = compare.tokens(gold, topk, gold, got_ids, golden_logprobs=lp, got_logprobs=got_lp, **kw)
    assert ok.status == "pass"
    got_lp[0, 2, 0] += 0.2
    bad = compare.tokens(gold, topk, gold, got_ids, golden_logprobs=lp, got_logprobs=got_lp, **kw)
    assert bad.status == "fail" and "step 2: log-prob of 7" in bad.metric


def test_tokens_of_another_length_are_judged_on_the_steps_both_have_then_by_their_length():
    """A wrong stop is a failure that says which row had not ended, not a shape error: the batch that stops
    when its first row ends, and the port that goes one step past max_new_tokens."""
    gold = torch.tensor([[5, 6, 7, 8], [5, 2, 0, 0]])  # row 1 ends with eos 2 at step 1, then padding
    topk = torch.stack([torch.arange(k, k + 5) for k in range(100)])[gold]  # each pick its own top-1
    stopped = compare.tokens(gold, topk, gold[:, :2], eos=2)
    assert stopped.status == "fail" and stopped.values["first_step"] == 2
    assert (
        "row 0 had not ended (golden step 2: 7)" in stopped.metric
        and "row 1 ended with eos at step 1" in stopped.metric
    )
    assert "the batch stopped when one row ended" in stopped.metric
    longer = compare.tokens(gold[:1], topk[:1], torch.tensor([[5, 6, 7, 8, 9]]), eos=2)
    assert longer.status == "fail" and "max_new_tokens = 4 steps, the port goes on to 5" in longer.metric
    wrong_early = compare.tokens(gold, topk, torch.tensor([[5, 99], [5, 2]]), eos=2)  # the divergence comes first
    assert wrong_early.status == "fail" and "golden 6, got 99" in wrong_early.metric


def test_top_k_the_port_gives_is_checked_before_it_is_trusted():
    """NaN log-probs, ids that are not token ids, and a top-k without the port's own pick (so its log-probs would
    never meet the golden ids) are errors, not passes."""
    gold = torch.tensor([[5, 6]])
    topk = torch.tensor([[[5, 1, 2, 3, 4], [6, 9, 10, 11, 12]]])
    lp = torch.log_softmax(torch.randn(1, 2, 5, dtype=torch.float64), -1)
    kw = dict(golden_logprobs=lp, noise=0.05)
    assert compare.tokens(gold, topk, gold, topk, got_logprobs=lp, **kw).status == "pass"
    nan = compare.tokens(gold, topk, gold, topk, got_logprobs=torch.full_like(lp, float("nan")), **kw)
    assert nan.status == "error" and "hold NaN" in nan.metric
    garbage = compare.tokens(gold, topk, gold, torch.full_like(topk, 3), got_logprobs=lp, **kw)
    assert garbage.status == "error" and "does not hold its own pick 5" in garbage.metric
    negative = compare.tokens(gold, topk, torch.tensor([[5, -6]]))
    assert negative.status == "error" and "row 0 step 1: -6 is not a token id" in negative.metric


def test_same_answer_needs_equal_tokens_and_log_probs_within_the_noise():
    """How the catalogue matches a port at generate.tokens: tokens alone would name every entry whose tokens
    happen to equal the golden ones for a port that diverges in log-probs only."""
    from qwen25vl.conformance.tolerances import TOKENS

    tokens = torch.tensor([[5, 7, 9]])
    ids = torch.tensor([[[5, 1], [7, 2], [9, 3]]])
    lp = torch.tensor([[[-0.1, -2.0], [-0.2, -2.5], [-0.3, -3.0]]], dtype=torch.float64)
    port = {"tokens": tokens, "topk": ids, "topk_logprobs": lp}
    noise = {"float32": 1e-4}
    same = {"precision": "float32", "logit_noise": noise}
    assert TOKENS.same_answer({**port, "topk_logprobs": lp + 5e-5}, port, **same)
    assert not TOKENS.same_answer(
        {**port, "topk_logprobs": lp + torch.tensor([0, 0, 1e-3])[None, :, None]}, port, **same
    )
    assert not TOKENS.same_answer({**port, "tokens": torch.tensor([[5, 7, 8]])}, port, **same)
    assert TOKENS.same_answer(tokens, port, **same)  # no log-probs on one side: tokens decide
    assert TOKENS.same_answer((tokens, ids), port, **same)
