"""impl.Qwen25VL against the spec oracle: every captured stage over random batches (odd grids,
partial windows, several images and videos, left padding), GQA ratios, and greedy tokens."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qwen25vl.impl.model import Qwen25VL
from qwen25vl.spec import forward as spec_forward
from qwen25vl.spec.generate import generate_greedy

from .helpers import DEVICE, assert_close, vision_inputs

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def oracle(tiny_params):
    config, params = tiny_params
    return config, {k: v.to(torch.float64) for k, v in params.items()}


@pytest.fixture(scope="module")
def models(tiny_params):
    config, params = tiny_params
    return {dt: Qwen25VL.from_params(config, params, dtype=dt, device=DEVICE) for dt in DTYPES}


def test_from_pretrained_equals_from_params(request, models):
    """The checkpoint folder holds the tiny params: loading it gives the same model."""
    if DEVICE.type == "cuda":
        pytest.skip("the checkpoint folder needs the shared tokenizer files; CPU CI covers this")
    m = Qwen25VL.from_pretrained(request.getfixturevalue("tiny_checkpoint"), dtype=torch.float32, device="cpu")
    ref = models[torch.float32]
    for (n, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b.cpu()), n


def compare_stages(ref: dict, got: dict, inputs: dict, dtype, control: dict | None = None):
    """got (impl in dtype) against ref (spec in float64), stage by stage; control: the spec's own run in
    dtype on the same inputs, which widens the tolerance where this input's rounding noise is large
    (helpers.STAGE_CONTROL_FACTOR)."""
    real = inputs["attention_mask"].bool()
    assert set(got) == set(ref), set(ref) ^ set(got)
    for name, expected in ref.items():
        actual = got[name].cpu()
        if name in ("text.position_ids", "text.rope_deltas"):
            assert torch.equal(actual, expected), name
            continue
        own = None if control is None else control[name]
        if name.startswith("text.") or name == "logits":
            actual, expected = actual[real], expected[real]
            own = None if own is None else own[real]
        assert_close(actual, expected, dtype, kind="stage", what=name, control=own)


grid_hw = st.integers(1, 6).map(lambda u: 2 * u)  # patches; 2*odd units -> partial windows


@st.composite
def batches(draw):
    B = draw(st.integers(1, 3))
    texts = [draw(st.lists(st.integers(0, 151000), min_size=0 if b else 1, max_size=6)) for b in range(B)]
    images = draw(st.lists(st.tuples(st.integers(0, B - 1), st.tuples(st.just(1), grid_hw, grid_hw)), max_size=2))
    videos = draw(
        st.lists(st.tuples(st.integers(0, B - 1), st.tuples(st.integers(1, 2), grid_hw, grid_hw)), max_size=1)
    )
    spgt = [draw(st.sampled_from([0.5, 1.0, 2 / 24])) for _ in videos]
    return texts, images, videos, spgt, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=8)  # each example runs the float64 oracle with a 152k vocabulary
@given(batch=batches())
def test_stages_match_spec(oracle, models, dtype, batch):
    config, params = oracle
    texts, images, videos, spgt, seed = batch
    inputs = vision_inputs(config, texts, images, videos, seed=seed, spgt=spgt)
    _, ref = spec_forward.forward(params, config, inputs, capture="all")
    _, got = models[dtype].forward(inputs, capture="all")
    control = None
    if dtype != torch.float32:  # float32 noise is far below TOL; bfloat16's varies with the input
        _, control = spec_forward.forward({k: v.to(dtype) for k, v in params.items()}, config, inputs, capture="all")
    compare_stages(ref, got, inputs, dtype, control)


@pytest.mark.parametrize("heads,kv", [(4, 1), (4, 2), (4, 4), (6, 2)])
def test_gqa_ratios(heads, kv):
    """Other head layouts (kv groups 1..4), random params, float32, all stages."""
    from qwen25vl.tools.make_tiny_checkpoint import make_random_params, tiny_config

    c = tiny_config()
    hidden = 16 * heads
    config = dataclasses.replace(
        c,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        mrope_section=(2, 3, 3),  # head_dim 16
        vision=dataclasses.replace(c.vision, out_hidden_size=hidden),
    )
    params = make_random_params(config, 3, torch.float64)
    inputs = vision_inputs(config, [[5, 6, 7], [8]], [(1, (1, 6, 10))], [(0, (2, 4, 4))], seed=2)
    _, ref = spec_forward.forward(params, config, inputs, capture="all")
    model = Qwen25VL.from_params(config, params, dtype=torch.float32, device=DEVICE)
    _, got = model.forward(inputs, capture="all")
    compare_stages(ref, got, inputs, torch.float32)


def test_capture_subset_and_logits(oracle, models):
    config, params = oracle
    inputs = vision_inputs(config, [[1, 2, 3]], [(0, (1, 4, 6))], [], seed=5)
    logits, got = models[torch.float32].forward(inputs, capture=["vision.merger", "text.layer"])
    assert set(got) == {"vision.merger"} | {f"text.layer.{i}" for i in range(config.num_hidden_layers)}
    ref_logits, _ = spec_forward.forward(params, config, inputs)
    assert_close(logits.cpu(), ref_logits, torch.float32, kind="stage", what="logits")


@pytest.mark.parametrize("cuda_graph", [False] + ([True] if DEVICE.type == "cuda" else []))
def test_greedy_tokens_equal_spec(oracle, models, cuda_graph):
    """float32: the same tokens as spec.generate_greedy, batch of 3 with left padding, image + video."""
    config, params = oracle
    inputs = vision_inputs(
        config,
        [[100, 101, 102, 103], [7], [9, 10]],
        [(0, (1, 6, 10)), (2, (1, 4, 4))],
        [(1, (2, 4, 8))],
        seed=11,
        spgt=[0.5],
    )
    ref = generate_greedy(params, config, inputs, 12, eos_token_id=[151645])
    model = models[torch.float32]
    got = model.generate_from_inputs(inputs, 12, [151645], cuda_graph=cuda_graph)
    assert torch.equal(got, ref)
    assert model.last_stats["cuda_graph"] == cuda_graph


def test_eos_stops_rows_and_pads(oracle, models):
    """Pick the eos to be the token row 0 emits at step 2: row 0 stops there and is padded after;
    generation continues for the other rows; the result equals spec's."""
    config, params = oracle
    inputs = vision_inputs(config, [[100, 101, 102], [55, 56]], [], [], seed=0)
    model = models[torch.float32]
    free = model.generate_from_inputs(inputs, 6, [151645])
    eos = int(free[0, 2])
    got = model.generate_from_inputs(inputs, 6, [eos])
    assert torch.equal(got, generate_greedy(params, config, inputs, 6, eos_token_id=[eos]))
    assert got[0, 2] == eos and (got[0, 3:] == config.pad_token_id).all()


def test_batch_equals_single_rows(models):
    """Left padding is invisible: each row of a batch generates what it generates alone."""
    config = models[torch.float32].config
    texts = [[100, 101, 102, 103, 104], [7]]
    batch = vision_inputs(config, texts, [(1, (1, 4, 6))], [], seed=4)
    together = models[torch.float32].generate_from_inputs(batch, 5, [151645])
    for b in range(2):
        images = [(0, (1, 4, 6))] if b == 1 else []
        single = vision_inputs(config, [texts[b]], images, [], seed=4)
        alone = models[torch.float32].generate_from_inputs(single, 5, [151645])
        assert torch.equal(alone[0], together[b, : alone.shape[1]])


@settings(max_examples=12)
@given(batch=batches(), cut=st.floats(0.0, 1.0))
def test_a_prefill_in_chunks_equals_the_prompt_at_once(models, batch, cut):
    """Any chunk size, on any batch (left padding, images and videos a boundary may split): the same last
    logits and the same keys and values in the cache as the prompt prefilled at once (float32)."""
    texts, images, videos, spgt, seed = batch
    model = models[torch.float32]
    inputs = vision_inputs(model.config, texts, images, videos, seed=seed, spgt=spgt)
    B, L = inputs["input_ids"].shape
    chunk = 1 + int(cut * (L - 1))
    model.setup_caches(B, L)
    whole, deltas = model.prefill(inputs)
    k, v = model.cache.k.clone(), model.cache.v.clone()
    model.setup_caches(B, L)
    got, got_deltas = model.prefill(inputs, chunk)
    assert torch.equal(got_deltas, deltas)
    torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.cache.k, k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.cache.v, v, rtol=1e-4, atol=1e-4)


def test_generate_in_chunks_gives_the_same_tokens_and_refuses_a_bad_chunk(oracle, models):
    config, params = oracle
    inputs = vision_inputs(
        config, [[100, 101, 102, 103], [7]], [(0, (1, 6, 10))], [(1, (2, 4, 8))], seed=11, spgt=[0.5]
    )
    ref = generate_greedy(params, config, inputs, 8, eos_token_id=[151645])
    model = models[torch.float32]
    for chunk in (1, 9, 10_000):
        assert torch.equal(model.generate_from_inputs(inputs, 8, [151645], prefill_chunk=chunk), ref), chunk
        assert model.last_stats["prefill_chunk"] == chunk
    for bad in (0, -1, 1.5, "4"):
        with pytest.raises(ValueError, match="prefill_chunk must be a positive integer or None"):
            model.generate_from_inputs(inputs, 2, [151645], prefill_chunk=bad)
    with pytest.raises(ValueError, match="a prefill in chunks needs the KV cache"):
        model._run(inputs, captured={}, wanted=set(), all_logits=False, cache=None, chunk=4)
