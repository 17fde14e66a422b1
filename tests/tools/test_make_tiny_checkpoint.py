"""tools/make_tiny_checkpoint.py: deterministic, loadable by transformers, non-degenerate, atomic."""

import hashlib
import json

import pytest
import torch
from qwen25vl.spec.checkpoint import expected_shapes
from qwen25vl.spec.config import Qwen25VLConfig
from qwen25vl.tools import make_tiny_checkpoint as mtc
from qwen25vl.tools.make_tiny_checkpoint import main, make_random_params, make_tiny_checkpoint, tiny_config
from safetensors.torch import load_file


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_deterministic(tiny_checkpoint, tmp_path):
    again = make_tiny_checkpoint(tmp_path / "again")
    assert _sha(again / "model.safetensors") == _sha(tiny_checkpoint / "model.safetensors")
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    assert _sha(other / "model.safetensors") != _sha(tiny_checkpoint / "model.safetensors")


def test_folder_contents(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
    }
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert raw["hidden_size"] == 32 and raw["vocab_size"] == 152064
    assert raw["num_attention_heads"] == 4 and raw["num_key_value_heads"] == 2  # tiled KV heads would show
    assert raw["rope_scaling"]["mrope_section"] == [1, 1, 2]
    # only keys the published config.json has (mlx-vlm refuses a vision_config.model_type)
    official = json.loads((mtc.TOKENIZER_DIR / "model_config" / "config.json").read_text())
    assert set(raw) <= set(official), set(raw) - set(official)
    assert set(raw["vision_config"]) <= set(official["vision_config"]), set(raw["vision_config"]) - set(
        official["vision_config"]
    )
    assert raw["vision_config"]["fullatt_block_indexes"] == [1, 3]
    assert raw["torch_dtype"] == "bfloat16"
    assert Qwen25VLConfig.from_file(tiny_checkpoint) == tiny_config()
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert {k: tuple(t.shape) for k, t in stored.items()} == expected_shapes(tiny_config())
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}


def test_loads_in_transformers(tiny_checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float64, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.vision_config.depth == 4 and model.config.text_config.num_key_value_heads == 2


@pytest.mark.parametrize("which", ["tiny_checkpoint", "tiny_checkpoint_tied"])
def test_logits_are_not_degenerate(which, request):
    """Greedy tokens depend on the input and the top-1 is never a near-tie (untied and tied)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(request.getfixturevalue(which), dtype=torch.float64)
    ids = torch.randint(0, 151643, (8, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # [8, 12, V]
    top2 = logits.topk(2, dim=-1).values
    margins = top2[..., 0] - top2[..., 1]
    assert margins.min() > 1e-4
    assert logits.std() > 0.3  # measured 1.0 untied, 0.57 tied; smallest margin 2e-3
    assert len(set(logits[:, -1].argmax(-1).tolist())) >= 6  # 8 prompts, (nearly) all different next tokens
    # the prediction is not just "repeat the current token"
    assert (logits.argmax(-1) == ids).float().mean() < 0.5


def test_norm_weights_near_one_and_small_biases():
    params = make_random_params(tiny_config(), seed=0, dtype=torch.float32)
    for key, t in params.items():
        if key.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "ln_q.weight", "model.norm.weight")):
            assert (t - 1).abs().max() < 0.5, key
        elif key.endswith(".bias"):
            assert t.abs().max() < 0.3, key


def test_tied_and_v5(tiny_checkpoint_tied, tmp_path):
    stored = load_file(str(tiny_checkpoint_tied / "model.safetensors"))
    assert "lm_head.weight" not in stored
    assert json.loads((tiny_checkpoint_tied / "config.json").read_text())["tie_word_embeddings"] is True
    v5 = load_file(str(make_tiny_checkpoint(tmp_path / "v5", layout="v5") / "model.safetensors"))
    assert all(k.startswith(("model.visual.", "model.language_model.", "lm_head.")) for k in v5)


def test_random_params_any_config_and_subsets():
    config = Qwen25VLConfig()  # class defaults = 7B shapes
    part = make_random_params(config, seed=3, dtype=torch.bfloat16, prefixes=("visual.blocks.5.", "visual.merger."))
    assert set(part) == {k for k in expected_shapes(config) if k.startswith(("visual.blocks.5.", "visual.merger."))}
    assert part["visual.merger.mlp.0.weight"].shape == (5120, 5120)
    # every tensor is drawn from its own seed: the subset equals the same keys of the tiny full set
    tiny_all = make_random_params(tiny_config(), seed=3, dtype=torch.float32)
    tiny_part = make_random_params(tiny_config(), seed=3, dtype=torch.float32, prefixes=("model.norm.",))
    assert torch.equal(tiny_part["model.norm.weight"], tiny_all["model.norm.weight"])
    tied = make_random_params(tiny_config(tied=True), seed=0, dtype=torch.float32, prefixes=("lm_head.",))
    embed = make_random_params(tiny_config(tied=True), seed=0, dtype=torch.float32, prefixes=("model.embed_tokens.",))
    assert torch.equal(tied["lm_head.weight"], embed["model.embed_tokens.weight"])


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--tied", "--layout", "v5", "--seed", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert Qwen25VLConfig.from_file(tmp_path / "cli").tie_word_embeddings
    assert main([str(tmp_path / "cli")]) == 2  # exists, not empty
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([str(tmp_path / "cli"), "--overwrite", "--seed", "2"]) == 0
    assert not Qwen25VLConfig.from_file(tmp_path / "cli").tie_word_embeddings


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout must be 'hub' or 'v5', got 'v4'"):
        make_tiny_checkpoint(tmp_path / "a", layout="v4")
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        make_tiny_checkpoint(tmp_path / "a", seed=-1)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        make_tiny_checkpoint(tmp_path / "a", dtype=torch.int8)
    assert not (tmp_path / "a").exists()


def test_nothing_written_half_way(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mtc, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        make_tiny_checkpoint(tmp_path / "half")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one is left


def test_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    folder = make_tiny_checkpoint(tmp_path / "empty")
    assert (folder / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_tied_checkpoint_carries_a_real_towers_outlier_channel(tiny_checkpoint, tiny_checkpoint_tied):
    """Block 0's MLP writes OUTLIER into one residual channel of every patch and the later norms undo it;
    the text weights are the untied draw's but for the decoder's outlier (the next test)."""
    from qwen25vl.spec import vision
    from qwen25vl.spec.checkpoint import load_checkpoint
    from qwen25vl.tools.make_tiny_checkpoint import OUTLIER, OUTLIER_CHANNEL

    tied, untied = (load_file(str(f / "model.safetensors")) for f in (tiny_checkpoint_tied, tiny_checkpoint))
    text_planted = {
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
    }
    for key, t in tied.items():
        if key.startswith("model.") and key not in text_planted:
            assert torch.equal(t, untied[key]), key
    assert tied["visual.blocks.0.mlp.down_proj.bias"][OUTLIER_CHANNEL].item() == OUTLIER
    assert tied["visual.blocks.1.norm1.weight"].float().abs().median() > 1000  # scaled up by OUTLIER / sqrt(64)

    config, params = load_checkpoint(tiny_checkpoint_tied, dtype=torch.float32)
    cfg = config.vision
    pixels = torch.randn(
        4 * 6, 3 * cfg.temporal_patch_size * cfg.patch_size**2, generator=torch.Generator().manual_seed(1)
    )
    captured: dict = {}
    vision.vision_encoder(params, config, pixels, torch.tensor([[1, 4, 6]]), capture=captured)
    hidden = captured["vision.block.0"]
    assert (hidden[:, OUTLIER_CHANNEL].abs() > 0.9 * OUTLIER).all()  # every patch
    others = torch.cat([hidden[:, :OUTLIER_CHANNEL], hidden[:, OUTLIER_CHANNEL + 1 :]], 1)
    assert others.abs().max() < 100


def test_tied_checkpoint_carries_a_decoder_outlier_at_im_start_only(tiny_checkpoint_tied):
    """Layer 0's MLP writes a massive activation into one channel of every <|im_start|> and exactly nothing
    into that channel of any other token (image pads included), as trained decoders do at the first token."""
    from qwen25vl.spec import forward
    from qwen25vl.spec.checkpoint import load_checkpoint
    from qwen25vl.tools.make_tiny_checkpoint import (
        TEXT_OUTLIER,
        TEXT_OUTLIER_CHANNEL,
        TEXT_OUTLIER_TOKEN,
        TEXT_OUTLIER_UNIT,
    )

    config, params = load_checkpoint(tiny_checkpoint_tied, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 151000, (1, 40), generator=gen)
    ids[0, [0, 17, 31]] = TEXT_OUTLIER_TOKEN
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    _, captured, _, _ = forward.prefill(params, config, inputs, capture=["text.layer.0"])
    hidden = captured["text.layer.0"][0]
    at = ids[0] == TEXT_OUTLIER_TOKEN
    channel = hidden[:, TEXT_OUTLIER_CHANNEL]
    assert (channel[at].abs() > TEXT_OUTLIER / 2).all() and (channel[at].abs() < 65504).all()  # float16 holds it
    assert channel[~at].abs().max() < 10
    # elsewhere the unit that writes it adds exactly nothing: without it the other rows are the same bits
    params["model.layers.0.mlp.down_proj.weight"] = params["model.layers.0.mlp.down_proj.weight"].clone()
    params["model.layers.0.mlp.down_proj.weight"][:, TEXT_OUTLIER_UNIT] = 0
    _, without, _, _ = forward.prefill(params, config, inputs, capture=["text.layer.0"])
    assert torch.equal(without["text.layer.0"][0][~at], hidden[~at])
    assert not torch.equal(without["text.layer.0"][0][at], hidden[at])
    others = torch.cat([hidden[:, :TEXT_OUTLIER_CHANNEL], hidden[:, TEXT_OUTLIER_CHANNEL + 1 :]], 1)
    assert others.abs().max() < 100
