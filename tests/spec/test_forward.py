"""spec.forward against transformers' Qwen2_5_VLForConditionalGeneration, stage by stage, float64.

Both load the same tiny random checkpoint (tools/make_tiny_checkpoint.py) in float64 and see the same
model inputs (spec.tokens.build_inputs on real conversations with synthetic images).

Measured bound. transformers' float64 run is not a float64 computation throughout: its RMSNorm
normalises in float32, its eager softmax runs in float32, and its rotary angles are float32. The
worst relative error (max |spec - transformers| / max |spec|) measured over the cases below is
about 3e-7 at any stage (the patch embedding, a plain matmul, agrees to 1e-16); the test allows
1e-6. Integer stages (positions, rope_deltas) are equal.

transformers 5.24's eager attention returns NaN for every token of a left-padded row in float64:
its mask is float64's most negative number, cast to float32 for the softmax it becomes -inf, and a
padding query that sees no key gets a row of -inf. The padded batch is therefore compared with
transformers' sdpa attention (also float64, no such cast).
"""

import pytest
import torch
from qwen25vl.spec.forward import forward, precision_profile, select_stages, stage_names
from qwen25vl.spec.tokens import build_inputs

from tests.spec.hf_oracle import (
    gradient_image,
    hf_forward_stages,
    image_part,
    load_hf,
    load_spec,
    noise_image,
    tokenizer,
    user,
)

BOUND = 1e-6  # relative to the largest |value| of the stage; see the module docstring


def one_image():
    return [[user(image_part(noise_image(168, 224, 1)), "Describe this image.")]]  # grid (1, 12, 16): 4 windows


def padded_batch():
    return [
        [user(image_part(noise_image(168, 224, 1)), "Describe this image.")],
        [
            user(
                "Compare",
                image_part(gradient_image(112, 140)),
                "with",
                image_part(noise_image(84, 252, 2)),
                "please, in detail and at length.",
            )
        ],
    ]


def text_only():
    return [[user("Tell me a story about a lighthouse.")]]


def compare(config, inputs, spec, ref) -> dict:
    """Per-stage (max abs err, rel err) on real tokens; integer stages must be equal."""
    real = inputs["attention_mask"].bool()
    errors = {}
    for name in stage_names(config):
        if name not in spec:
            continue
        a, b = spec[name], ref[name]
        assert a.shape == b.shape, name
        if name == "text.position_ids":
            a, b = a[:, real], b[:, real]
        elif not name.startswith("vision.") and a.ndim == 3:
            a, b = a[real], b[real]
        if not a.is_floating_point():
            assert torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"
            continue
        err = (a - b.to(a.dtype)).abs().max().item()
        errors[name] = (err, err / a.abs().max().item())
    return errors


@pytest.mark.parametrize(
    "case,tied,attn", [("one_image", False, "eager"), ("padded_batch", False, "sdpa"), ("text_only", True, "eager")]
)
def test_every_stage_matches_transformers(case, tied, attn, tiny_checkpoint, tiny_checkpoint_tied):
    folder = str(tiny_checkpoint_tied if tied else tiny_checkpoint)
    config, params = load_spec(folder)
    inputs = build_inputs(
        {"one_image": one_image, "padded_batch": padded_batch, "text_only": text_only}[case](),
        None,
        None,
        tokenizer(folder),
    )
    logits, captured = forward(params, config, inputs, capture="all")
    ref_logits, ref = hf_forward_stages(load_hf(folder, attn=attn), config, inputs)
    errors = compare(config, inputs, captured, ref)
    print(f"\n{case} tied={tied} transformers attn={attn}")
    for name, (err, rel) in errors.items():
        print(f"  {name:20s} max abs {err:.2e}  rel {rel:.2e}")
    worst = max(errors, key=lambda n: errors[n][1])
    assert errors[worst][1] < BOUND, f"{worst}: {errors[worst]}"
    expected = (
        set(stage_names(config))
        if inputs["pixel_values"] is not None
        else {n for n in stage_names(config) if not n.startswith("vision.")}
    )
    assert set(captured) == expected
    assert logits is captured["logits"]


def test_tied_checkpoint_head_is_embedding(tiny_checkpoint_tied):
    config, params = load_spec(str(tiny_checkpoint_tied))
    assert config.tie_word_embeddings
    torch.testing.assert_close(params["lm_head.weight"], params["model.embed_tokens.weight"], rtol=0, atol=0)


# ---------------------------------------------------------------- capture selection


def test_stage_names_of_tiny_config(tiny_checkpoint):
    config, _ = load_spec(str(tiny_checkpoint))  # vision depth 4, 2 text layers
    assert stage_names(config) == [
        "vision.patch_embed",
        "vision.block.0",
        "vision.block.1",
        "vision.block.2",
        "vision.block.3",
        "vision.merger",
        "text.inputs_embeds",
        "text.position_ids",
        "text.rope_deltas",
        "text.layer.0",
        "text.layer.1",
        "text.norm",
        "logits",
    ]


def test_capture_selection(tiny_checkpoint):
    config, params = load_spec(str(tiny_checkpoint))
    assert select_stages(config, ()) == set()
    assert select_stages(config, "all") == set(stage_names(config))
    assert select_stages(config, ["vision.block", "logits"]) == {f"vision.block.{i}" for i in range(4)} | {"logits"}
    assert select_stages(config, "text.layer.1") == {"text.layer.1"}
    assert select_stages(config, ["text."]) == {n for n in stage_names(config) if n.startswith("text.")}
    with pytest.raises(ValueError, match="'text.layer.7' names no stage"):
        select_stages(config, ["text.layer.7"])
    with pytest.raises(ValueError, match="'vision.block.1x' names no stage"):
        select_stages(config, ["vision.block.1x"])


def test_capture_none_and_some(tiny_checkpoint):
    config, params = load_spec(str(tiny_checkpoint))
    inputs = build_inputs(one_image(), None, None, tokenizer(str(tiny_checkpoint)))
    logits, none = forward(params, config, inputs)
    assert none == {}
    logits2, some = forward(params, config, inputs, capture=["vision.merger", "text.layer.1"])
    assert set(some) == {"vision.merger", "text.layer.1"}
    torch.testing.assert_close(logits, logits2, rtol=0, atol=0)
    n_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    assert some["vision.merger"].shape == (n_tokens, config.hidden_size)


# ---------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def good(tiny_checkpoint):
    config, params = load_spec(str(tiny_checkpoint))
    return config, params, build_inputs(one_image(), None, None, tokenizer(str(tiny_checkpoint)))


def test_pixel_rows_must_match_grid(good):
    config, params, inputs = good
    bad = {**inputs, "pixel_values": inputs["pixel_values"][:-4]}
    with pytest.raises(
        ValueError,
        match=r"inputs\['pixel_values'\].*has 188 rows but grid_thw \[\[1, 12, 16\]\] "
        r"needs sum\(t\*h\*w\) = 192",
    ):
        forward(params, config, bad)


def test_image_pad_count_must_match_features(good):
    config, params, inputs = good
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == config.image_token_id).nonzero()[0])
    ids[0, first] = 1000  # one placeholder fewer than the image has tokens
    with pytest.raises(ValueError, match="holds 47 image pad tokens .* gave 48 image features"):
        forward(params, config, {**inputs, "input_ids": ids})


def test_input_ids_out_of_vocab(good):
    config, params, inputs = good
    ids = inputs["input_ids"].clone()
    ids[0, 0] = config.vocab_size
    V = config.vocab_size
    with pytest.raises(ValueError, match=rf"token id {V}, outside the vocabulary 0\.\.{V - 1}"):
        forward(params, config, {**inputs, "input_ids": ids})


def test_attention_mask_shape_mismatch(good):
    config, params, inputs = good
    with pytest.raises(ValueError, match=r"attention_mask'\] has shape \(1, 72\), input_ids has \(1, 73\)"):
        forward(params, config, {**inputs, "attention_mask": inputs["attention_mask"][:, 1:]})


def test_other_bad_inputs(good):
    config, params, inputs = good
    with pytest.raises(ValueError, match="must be given together"):
        forward(params, config, {**inputs, "image_grid_thw": None})
    with pytest.raises(ValueError, match="unknown keys"):
        forward(params, config, {**inputs, "pixel_value": None})
    with pytest.raises(TypeError, match="int64 tensor"):
        forward(params, config, {**inputs, "input_ids": inputs["input_ids"].float()})
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        forward(params, config, {**inputs, "attention_mask": inputs["attention_mask"] * 2})


# ---------------------------------------------------------------- precision_profile (numbers in test_precision.py)


def test_precision_profile_float64_is_exact(good):
    config, params, inputs = good
    profile = precision_profile(params, config, inputs, torch.float64)
    assert list(profile) == stage_names(config)
    assert all(v["max_abs"] == 0 for v in profile.values())
