"""spec.generate_greedy against transformers' generate (do_sample=False, repetition_penalty=1.0, num_beams=1).

Same tiny float64 checkpoint on both sides, 32 new tokens, the tokens must be identical.

Video positions. transformers 5.24 starts the text after a video at (span start) + max(h, w) / 2
(rope_index_transformers_v53), the reference at 1 + the largest position so far (the training
rule). For the odd-frame video below (3 temporal patches at 2 tokens per second, 4 x 4 merged
tokens) the two rules give different text positions after the video, which the test shows first;
the greedy tokens are then compared with the spec run under the transformers rule, which is the
only way a token-for-token comparison with that version is meaningful.

The left-padded batch uses transformers' sdpa attention: its eager attention returns NaN for
left-padded rows in float64 (see test_forward.py).
"""

import pytest
import torch
from qwen25vl.spec.forward import prefill
from qwen25vl.spec.generate import generate_greedy
from qwen25vl.spec.mrope import rope_index, rope_index_transformers_v53
from qwen25vl.spec.tokens import build_inputs

from tests.spec.hf_oracle import (
    gradient_image,
    hf_generate,
    hf_kwargs,
    image_part,
    load_hf,
    load_spec,
    noise_image,
    tokenizer,
    user,
)

NEW = 32
VIDEO_OPTIONS = {"min_pixels": 3136, "max_pixels": 112 * 112}  # 112 x 112 frames: 8 x 8 patches each


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def video_part(n_frames):
    frames = [noise_image(112, 112, 10 + k) for k in range(n_frames)]
    return {"type": "video", "video": frames}


CASES = {
    "one_image": [[user(image_part(noise_image(168, 224, 1)), "What is in this picture?")]],
    "two_images_text_between": [
        [user(image_part(gradient_image(112, 140)), "and then", image_part(noise_image(84, 252, 2)), "what differs?")]
    ],
    "image_mid_prompt": [
        [user("Here is a photo", image_part(noise_image(140, 196, 3)), "of my garden. Which plants grow there?")]
    ],
    "multi_turn": [
        [
            user(image_part(gradient_image(168, 168)), "What is this?"),
            assistant("A colour gradient."),
            user("Which colours does it use?"),
        ]
    ],
    "padded_batch": [
        [user(image_part(noise_image(168, 224, 1)), "Describe it.")],
        [
            user(
                "Compare",
                image_part(gradient_image(112, 140)),
                "with",
                image_part(noise_image(84, 252, 2)),
                "please, in detail and at great length.",
            )
        ],
    ],
}


def build(case, folder):
    return build_inputs(CASES[case], None, None, tokenizer(folder))


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(case, tiny_checkpoint):
    folder = str(tiny_checkpoint)
    config, params = load_spec(folder)
    inputs = build(case, folder)
    eos = [config.eos_token_id, config.pad_token_id]
    got = generate_greedy(params, config, inputs, NEW, eos_token_id=eos)
    want = hf_generate(load_hf(folder, attn="sdpa" if case == "padded_batch" else "eager"), config, inputs, NEW, eos)
    assert got.dtype == torch.int64
    assert got.shape == (inputs["input_ids"].shape[0], NEW)  # no early stop: all 32 tokens are compared
    assert got.tolist() == want.tolist()
    if case == "padded_batch":
        assert (inputs["attention_mask"][:, 0] == 0).any()  # the batch really is padded


def test_video_odd_frames_equal_transformers_under_its_position_rule(tiny_checkpoint):
    folder = str(tiny_checkpoint)
    config, params = load_spec(folder)
    inputs = build_inputs(
        [[user(video_part(5), "What happens in this clip?")]],
        None,
        None,
        tokenizer(folder),
        video_options=VIDEO_OPTIONS,
    )
    assert inputs["video_grid_thw"].tolist() == [[3, 8, 8]]  # 5 frames padded to 6: 3 temporal patches
    args = (inputs["input_ids"], None, inputs["video_grid_thw"], inputs["second_per_grid_ts"], inputs["attention_mask"])
    training, _ = rope_index(*args, config=config)
    v53, _ = rope_index_transformers_v53(*args, config=config)
    end = int((inputs["input_ids"][0] == config.video_token_id).nonzero()[-1]) + 1
    assert torch.equal(training[:, :, :end], v53[:, :, :end])  # the video itself is placed alike
    assert training[0, 0, end] == v53[0, 0, end] + 1  # text after it: 1 + max (t reaches 4) vs s + 8/2
    model = load_hf(folder)
    kw = hf_kwargs(inputs, config)
    hf_positions, _ = model.model.get_rope_index(
        kw["input_ids"],
        kw["mm_token_type_ids"],
        None,
        kw["video_grid_thw"],
        kw["second_per_grid_ts"],
        kw["attention_mask"],
    )
    assert torch.equal(hf_positions, v53)  # transformers 5.24 follows the v53 rule here
    eos = [config.eos_token_id, config.pad_token_id]
    got = generate_greedy(params, config, inputs, NEW, eos_token_id=eos, rope_rule=rope_index_transformers_v53)
    want = hf_generate(model, config, inputs, NEW, eos)
    assert got.shape == (1, NEW) and got.tolist() == want.tolist()


def test_video_odd_frames_equal_transformers_fed_the_training_rule(tiny_checkpoint, monkeypatch):
    """The spec's own (training-time) video rule, end to end: transformers' model and generate loop, with
    only its get_rope_index replaced by the training-rule positions (its decode steps then follow from the
    rope_deltas that come back, in its convention: padded length), must produce the spec's greedy tokens."""
    folder = str(tiny_checkpoint)
    config, params = load_spec(folder)
    inputs = build_inputs(
        [[user(video_part(5), "What happens in this clip?")]],
        None,
        None,
        tokenizer(folder),
        video_options=VIDEO_OPTIONS,
    )
    positions, deltas = rope_index(
        inputs["input_ids"],
        None,
        inputs["video_grid_thw"],
        inputs["second_per_grid_ts"],
        inputs["attention_mask"],
        config=config,
    )
    v53, _ = rope_index_transformers_v53(
        inputs["input_ids"],
        None,
        inputs["video_grid_thw"],
        inputs["second_per_grid_ts"],
        inputs["attention_mask"],
        config=config,
    )
    assert not torch.equal(positions, v53)  # the two rules really differ on this prompt
    model = load_hf(folder)
    calls = []

    def training_rule(*args, **kwargs):
        calls.append(1)
        return positions, deltas + (inputs["attention_mask"] == 0).sum(1, keepdim=True)

    monkeypatch.setattr(model.model, "get_rope_index", training_rule)
    eos = [config.eos_token_id, config.pad_token_id]
    want = hf_generate(model, config, inputs, NEW, eos)
    assert calls  # transformers did take its positions from the patched function
    got = generate_greedy(params, config, inputs, NEW, eos_token_id=eos)  # default rule: training time
    assert got.shape == (1, NEW) and got.tolist() == want.tolist()


def test_tied_checkpoint(tiny_checkpoint_tied):
    folder = str(tiny_checkpoint_tied)
    config, params = load_spec(folder)
    inputs = build("two_images_text_between", folder)
    eos = config.eos_token_id
    assert (
        generate_greedy(params, config, inputs, NEW, eos_token_id=eos).tolist()
        == hf_generate(load_hf(folder), config, inputs, NEW, eos).tolist()
    )


def test_eos_stops_rows_and_fills_with_pad(tiny_checkpoint):
    """Take a token that row 0 produces early as eos: row 0 stops there and is padded, row 1 runs on."""
    folder = str(tiny_checkpoint)
    config, params = load_spec(folder)
    inputs = build("padded_batch", folder)
    free = generate_greedy(params, config, inputs, 12, eos_token_id=config.eos_token_id)
    stop = int(free[0, 3])
    first = [row.tolist().index(stop) if stop in row.tolist() else None for row in free]
    assert first[0] is not None and first[0] <= 3
    got = generate_greedy(params, config, inputs, 12, eos_token_id=[stop, config.eos_token_id])
    want = hf_generate(load_hf(folder, attn="sdpa"), config, inputs, 12, [stop, config.eos_token_id])
    assert got.tolist() == want.tolist()
    assert got[0, first[0]] == stop and (got[0, first[0] + 1 :] == config.pad_token_id).all()
    # once every row has stopped, generation ends early
    single = build("one_image", folder)
    free = generate_greedy(params, config, single, 3, eos_token_id=config.eos_token_id)[0].tolist()
    solo = generate_greedy(params, config, single, 12, eos_token_id=free[2])
    assert solo[0].tolist() == free[: free.index(free[2]) + 1]


def test_first_new_token_position_is_max_plus_one(tiny_checkpoint):
    """Decode positions: the first generated token sits at 1 + the largest prompt position of its row."""
    from qwen25vl.spec.mrope import decode_positions

    folder = str(tiny_checkpoint)
    config, params = load_spec(folder)
    inputs = build("padded_batch", folder)
    position_ids, deltas = rope_index(
        inputs["input_ids"], inputs["image_grid_thw"], None, None, inputs["attention_mask"], config=config
    )
    real = inputs["attention_mask"].bool()
    maxima = [int(position_ids[:, b, real[b]].max()) for b in range(2)]
    L = inputs["input_ids"].shape[1]
    assert decode_positions(deltas, L, 2)[:, :, 0].tolist() == [[m + 1 for m in maxima]] * 3
    _, _, cache, spec_deltas = prefill(params, config, inputs)
    assert torch.equal(spec_deltas, deltas)
    assert len(cache) == config.num_hidden_layers
    assert cache[0][0].shape == (2, config.num_key_value_heads, L, config.head_dim)


def test_argmax_ties_go_to_lowest_index(tiny_checkpoint):
    """A zero LM head makes every logit 0: a V-way tie, which greedy resolves to token 0."""
    folder = str(tiny_checkpoint)
    config, params = load_spec(folder)
    flat = {**params, "lm_head.weight": torch.zeros_like(params["lm_head.weight"])}
    got = generate_greedy(flat, config, build("one_image", folder), 4, eos_token_id=config.eos_token_id)
    assert got.tolist() == [[0, 0, 0, 0]]


def test_bad_arguments(tiny_checkpoint):
    folder = str(tiny_checkpoint)
    config, params = load_spec(folder)
    inputs = build("one_image", folder)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        generate_greedy(params, config, inputs, 0, eos_token_id=1)
    with pytest.raises(ValueError, match="eos_token_id must be one id or a list of ids in 0..152063"):
        generate_greedy(params, config, inputs, 2, eos_token_id=[152064])
    right = {**inputs, "attention_mask": inputs["attention_mask"].clone()}
    right["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="needs left padding"):
        generate_greedy(params, config, right, 2, eos_token_id=1)


def test_returned_logits_are_the_decode_loops_and_match_one_full_forward(tiny_checkpoint):
    """return_logits gives the logits each token was picked from (argmax = the token), and the cached decode
    loop computes the same distribution as one forward over prompt + tokens at the decode positions (a
    stale cache, a wrong decode position or a dropped mask would part them)."""
    from qwen25vl.spec.forward import forward

    folder = str(tiny_checkpoint)
    config, params = load_spec(folder)
    inputs = build("padded_batch", folder)
    new, logits = generate_greedy(params, config, inputs, 6, eos_token_id=config.eos_token_id, return_logits=True)
    assert logits.shape == (*new.shape, config.vocab_size)
    assert torch.equal(logits.argmax(-1), new)
    assert torch.equal(new, generate_greedy(params, config, inputs, 6, eos_token_id=config.eos_token_id))
    B, L = inputs["input_ids"].shape
    ids = torch.cat([inputs["input_ids"], new], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)
    full, _ = forward(params, config, {**inputs, "input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(logits, full[:, L - 1 : L - 1 + new.shape[1]], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", ["padded_batch", "image_mid_prompt"])
def test_a_prefill_in_chunks_gives_the_prompt_at_once(case, tiny_checkpoint):
    """Chunks of one token, a boundary inside the first image, and one chunk as long as the prompt: the
    same tokens and, in float64, the same logits and layer outputs (each chunk takes the whole prompt's
    positions and embeddings at its own offset and attends to the cache the chunks before it wrote)."""
    folder = str(tiny_checkpoint)
    config, params = load_spec(folder)
    inputs = build(case, folder)
    L = inputs["input_ids"].shape[1]
    first_pad = int((inputs["input_ids"][0] == config.image_token_id).nonzero()[0])
    new, logits = generate_greedy(params, config, inputs, 6, eos_token_id=config.eos_token_id, return_logits=True)
    hidden, captured, cache, deltas = prefill(params, config, inputs, capture="text")
    for chunk in (1, first_pad + 3, L):
        got, got_logits = generate_greedy(
            params, config, inputs, 6, eos_token_id=config.eos_token_id, return_logits=True, prefill_chunk=chunk
        )
        assert torch.equal(got, new), chunk
        torch.testing.assert_close(got_logits, logits, rtol=1e-9, atol=1e-9)
        h, c, k, d = prefill(params, config, inputs, capture="text", prefill_chunk=chunk)
        assert torch.equal(d, deltas) and k[0][0].shape == cache[0][0].shape
        torch.testing.assert_close(h, hidden, rtol=1e-9, atol=1e-9)
        for name in ("text.layer.0", "text.position_ids"):
            torch.testing.assert_close(c[name], captured[name], rtol=1e-9, atol=1e-9)


def test_a_bad_prefill_chunk_is_refused_before_any_compute(tiny_checkpoint):
    folder = str(tiny_checkpoint)
    config, params = load_spec(folder)
    inputs = build("one_image", folder)
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(ValueError, match="prefill_chunk must be a positive integer or None, got"):
            generate_greedy(params, config, inputs, 2, eos_token_id=1, prefill_chunk=bad)
