"""Write a tiny, deterministic, random Qwen2.5-VL checkpoint in Hugging Face layout.

    python -m qwen25vl.tools.make_tiny_checkpoint OUT_DIR [--tied] [--layout hub|v5] [--seed N]

The folder holds config.json, generation_config.json, model.safetensors and the real Qwen2 tokenizer
and preprocessor files, so transformers, the spec and every port can load it like a real checkpoint.
The shapes are THE tiny config (`tiny_config()`); the real vocabulary is kept so the real tokenizer
and its special token ids work. `make_random_params` builds the same kind of weights for any config
(real 3B/7B shapes for benchmarks) without writing files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..spec.checkpoint import expected_shapes, to_v5_key
from ..spec.config import Qwen25VLConfig, VisionConfig

TOKENIZER_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "qwen2_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json")
MODEL_CONFIG_FILES = ("preprocessor_config.json", "generation_config.json")

# A stop that random weights never produce on their own: the LM head row of <|endoftext|> (151643,
# the second id of generation_config.json's eos list) is STOP_SCALE x the row of STOP_AFTER, the
# token fixtures/model_batch's row 1 picks at step 4 in the unplanted checkpoint. STOP_AFTER was
# chosen (by scanning every step of every model case) as the pick whose logit stays at least 1.2
# below the top at every other step, so the scaled row wins there alone, by 0.5 logit (no near tie
# at any precision): that row stops, the other runs on, and a port that stops only at <|im_end|>
# (151645), or never stops, is told apart. Only the tiny config's untied head is planted.
STOP_ID, STOP_AFTER, STOP_SCALE = 151643, 77934, 1.12


# The activation range of a real vision tower (lablup/mlxcel#1601: in the 3B one residual channel carries
# 5.4e2 by block 15 and 2.3e4 by block 31) that random weights never reach: in the tied checkpoint, block
# 0's MLP bias writes OUTLIER into residual channel OUTLIER_CHANNEL of every patch, and the later norms'
# weights undo it (the other channels x OUTLIER / sqrt(width), that one / sqrt(width)), as trained
# weights do. OUTLIER is exact in bfloat16 and float16; its square (4.2e8) is not a float16 (max 65504),
# so a norm that sums squares in float16 gets inf and erases the row.
OUTLIER, OUTLIER_CHANNEL = 20480.0, 5

# The same in the decoder, where trained models grow it at a few tokens only: the first token and
# delimiters (Sun et al. 2024, "Massive activations in large language models"; Qwen2 among them). In the
# tied checkpoint, layer 0's MLP writes TEXT_OUTLIER x (n/4)^2 into residual channel TEXT_OUTLIER_CHANNEL
# of every TEXT_OUTLIER_TOKEN (<|im_start|>, the first token of every chat prompt), n being the channel
# after the norm (3.0 to 5.4: 1.2e4 to 3.7e4 written, under float16's 65504), and nothing into any other token:
# channel TEXT_OUTLIER_CHANNEL is zero in every other token's embedding and in the merger's output, and
# layer 0's attention writes nothing into it, so the MLP unit that reads only that channel is exactly
# zero elsewhere. Nothing undoes it: the later norms turn such a row into one channel, as in a trained
# model (an attention sink), and a norm that sums squares in float16 turns it into zeros.
TEXT_OUTLIER, TEXT_OUTLIER_CHANNEL, TEXT_OUTLIER_TOKEN = 20480.0, 14, 151644
TEXT_OUTLIER_UNIT = 39  # the MLP unit of layer 0 that writes it
# (channel 14 and unit 39 of 32 x 64 searched: every greedy step of model_text and model_outliers is
# picked by at least 0.093 logit, against a bfloat16 noise of 0.026 and 0.034)


def tiny_config(*, tied: bool = False) -> Qwen25VLConfig:
    """The tiny config every test uses: real vocabulary, 2 text layers, 4 vision blocks.

    Small, but every axis a port can get wrong has at least two of something: 4 query heads on 2 KV
    heads (tiling the KV heads instead of repeating each one shows), three distinct MRoPE sections,
    4 vision heads, windowed and full-attention blocks. Text width 32 keeps the embedding and the
    untied LM head at the real vocabulary (2 x 152064 x 32 bf16, 19.5 MB) the bulk of the fixtures.
    """
    return Qwen25VLConfig(
        vocab_size=152064,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: query heads 0,1 read KV head 0 and 2,3 read KV head 1
        mrope_section=(1, 1, 2),  # head_dim 8 -> 4 frequencies: 1 temporal, 1 height, 2 width
        rope_theta=1_000_000.0,
        tie_word_embeddings=tied,
        vision=VisionConfig(
            depth=4,
            hidden_size=64,
            num_heads=4,  # head_dim 16: 4 row and 4 column rotary frequencies
            intermediate_size=112,
            fullatt_block_indexes=(1, 3),
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=32,
            tokens_per_second=2,
        ),
    )


def real_dims_config() -> Qwen25VLConfig:
    """The tiny config at the real head dims: what the tiny one cannot show, at the width of one.

    Every Qwen2.5-VL size has text head_dim 128 with MRoPE sections (16, 24, 24) and vision head_dim 80
    (20 row and 20 column rotary frequencies, not a power of two). A port's fused attention and rotary
    kernels are specialised on these (MLX's fused SDPA, llama.cpp's flash attention, Triton blocks padded
    to a power of two), and at the tiny config's 8 and 16 take another path, or none; a constant that only
    holds at 128 (a rotary dimension of 64) is invisible at 8. Widths stay small (2 text layers of 4 query
    heads on 2 KV heads, 4 vision blocks of 4 heads) except the MLPs, which keep the real 3B widths (11008,
    3420: not a multiple of 64), and the vocabulary, which is the 3B's (151936, tied as in the 3B).
    """
    tiny = tiny_config(tied=True)
    return replace(
        tiny,
        vocab_size=151936,
        hidden_size=512,  # 4 heads of 128
        intermediate_size=11008,
        mrope_section=(16, 24, 24),
        vision=replace(tiny.vision, hidden_size=320, intermediate_size=3420, out_hidden_size=512),  # 4 heads of 80
    )


def _init_std(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the random init of one tensor, chosen so activations stay O(1).

    Norm weights sit near 1; matrices get std 1/sqrt(fan_in) so each projection keeps the scale of
    its input (halved for the projections that write into the residual stream); biases are small.
    Embeddings are small (std 0.1) so the layers' updates dominate the residual stream: with tied
    embeddings a large embedding would make "repeat the current token" the greedy answer everywhere.
    """
    if "norm" in key or "ln_q" in key:
        return 1.0, 0.1
    if key.endswith(".bias"):
        return 0.0, 0.05
    if "embed_tokens" in key:
        return 0.0, 0.1
    fan_in = math.prod(shape[1:])
    scale = 0.5 if key.endswith(("o_proj.weight", "down_proj.weight", "attn.proj.weight")) else 1.0
    return 0.0, scale / math.sqrt(fan_in)


DRAWS = ("normal", "uniform-int")
UNIFORM_STEPS = 2**20  # uniform draws are k / UNIFORM_STEPS x sqrt(3) std, k in [-UNIFORM_STEPS, UNIFORM_STEPS]


def _key_seed(seed: int, key: str) -> int:
    """A per-tensor seed from (seed, key), stable across runs and Python versions (no hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def make_random_params(
    config: Qwen25VLConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    *,
    device: str | torch.device = "cpu",
    prefixes: tuple[str, ...] | None = None,
    draw: str = "normal",
) -> dict[str, torch.Tensor]:
    """Random params (hub names, `expected_shapes(config)` order) for any config, deterministic in seed.

    Drawn in float32 from one torch.Generator on `device`, then cast to dtype; with
    tie_word_embeddings, lm_head.weight is the embedding tensor itself. prefixes: make only the keys
    that start with one of them (e.g. ("visual.blocks.0.",) for one real-size block); every tensor
    is seeded from (seed, its key), so a subset holds the same values as the full set.
    draw "normal" (torch.randn: its bits depend on the CPU's vector path, ATEN_CPU_CAPABILITY) or
    "uniform-int" (torch.randint scaled: the same bits on every CPU, for checkpoints made where they are used).
    """
    if draw not in DRAWS:
        raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}")
    params = {}
    for key, shape in expected_shapes(config).items():
        if prefixes is not None and not key.startswith(tuple(prefixes)):
            continue
        # a tied lm_head is the embedding: same tensor, or the same draw when only the head is asked for
        source = "model.embed_tokens.weight" if key == "lm_head.weight" and config.tie_word_embeddings else key
        if source in params:
            params[key] = params[source]
            continue
        mean, std = _init_std(source, shape)
        gen = torch.Generator(device=device).manual_seed(_key_seed(seed, source))
        if draw == "normal":
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std)
        else:  # uniform with the same std: integers scaled by a constant are exact on every CPU
            t = torch.randint(-UNIFORM_STEPS, UNIFORM_STEPS + 1, shape, generator=gen, device=device)
            t = t.to(torch.float32).mul_(std * math.sqrt(3) / UNIFORM_STEPS)
        params[key] = t.add_(mean).to(dtype)
    return params


def plant_stop(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tiny checkpoint's stop (STOP_ID's LM head row := STOP_SCALE x STOP_AFTER's), in place; returns params."""
    head = params["lm_head.weight"]
    head[STOP_ID] = (head[STOP_AFTER].float() * STOP_SCALE).to(head.dtype)
    return params


def plant_outliers(params: dict[str, torch.Tensor], config: Qwen25VLConfig) -> dict[str, torch.Tensor]:
    """The tied checkpoint's vision outlier channel (OUTLIER, OUTLIER_CHANNEL), in place; returns params."""
    width, c = config.vision.hidden_size, OUTLIER_CHANNEL
    bias = params["visual.blocks.0.mlp.down_proj.bias"]
    bias[c] = OUTLIER
    undo = torch.full((width,), OUTLIER / math.sqrt(width))
    undo[c] = 1 / math.sqrt(width)
    norms = [f"visual.blocks.{b}.norm{k}.weight" for b in range(1, config.vision.depth) for k in (1, 2)]
    for key in norms + ["visual.merger.ln_q.weight"]:
        params[key] = (params[key].float() * undo).to(params[key].dtype)
    return params


def plant_text_outlier(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tied checkpoint's decoder outlier (TEXT_OUTLIER at TEXT_OUTLIER_TOKEN only), in place; returns params.

    Layer 0's MLP unit TEXT_OUTLIER_UNIT reads channel c alone (gate and up rows e_c) and writes channel c
    alone (down column k e_c, k = TEXT_OUTLIER / 16): at <|im_start|> its input carries channel c at n = 3 to
    5.4 (the embedding's 2.0 dominates the row, so the norm makes it most of sqrt(32)), and it writes
    k x silu(n) x n, about k n^2; everywhere else channel c is exactly 0 at its input (the embedding column,
    the merger's output row and layer 0's o_proj row are zero), so it writes exactly 0. The final norm's
    weight on c is 1/8, so the tied head's column c (2.0 at <|im_start|> alone) moves no other token's
    logits by much.
    """
    c, token, unit = TEXT_OUTLIER_CHANNEL, TEXT_OUTLIER_TOKEN, TEXT_OUTLIER_UNIT
    embed = params["model.embed_tokens.weight"]  # the tied head too: the same tensor
    embed[:, c] = 0
    embed[token, c] = 2.0
    for key in ("visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias", "model.layers.0.self_attn.o_proj.weight"):
        params[key][c] = 0
    mlp = "model.layers.0.mlp"
    for key in (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"):
        params[key][unit] = 0
        params[key][unit, c] = 1.0
    down = params[f"{mlp}.down_proj.weight"]
    down[:, unit] = 0
    down[c, unit] = TEXT_OUTLIER / 16
    params["model.norm.weight"][c] = 1 / 8
    return params


def _config_json(config: Qwen25VLConfig, dtype: torch.dtype) -> dict:
    raw = config.to_dict()
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    # only keys the published config.json has (mlx-vlm refuses a vision_config carrying a model_type);
    # the pad id lives in generation_config.json, as in the published folders
    raw["vision_config"].pop("model_type", None)
    raw.pop("pad_token_id", None)
    raw["initializer_range"] = 0.02
    raw["use_cache"] = True
    return raw


def make_tiny_checkpoint(
    folder: str | os.PathLike,
    *,
    seed: int = 0,
    tied: bool = False,
    layout: str = "hub",
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    config: Qwen25VLConfig | None = None,
    draw: str = "normal",
) -> Path:
    """Write a checkpoint folder and return its path.

    layout "hub" stores visual.* / model.* / lm_head.weight; "v5" stores transformers v5 in-memory
    names (model.visual.*, model.language_model.*). tied: tie_word_embeddings, lm_head not stored (the tiny
    config's tied checkpoint also carries the outlier channels, plant_outliers and plant_text_outlier).
    The folder is built in a temporary sibling and renamed into place, so it is never half-written;
    an existing non-empty folder is an error unless overwrite. config: another config (default tiny),
    with nothing planted. draw: make_random_params'.
    """
    if layout not in ("hub", "v5"):
        raise ValueError(f"layout must be 'hub' or 'v5', got {layout!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if config is not None and config.tie_word_embeddings != tied:
        raise ValueError(f"tied={tied} disagrees with config.tie_word_embeddings={config.tie_word_embeddings}")
    folder = Path(folder).resolve()
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not overwrite)):
        raise ValueError(f"output folder {str(folder)!r} exists and is not empty (pass overwrite=True to replace it)")
    missing = [f for f in TOKENIZER_FILES if not (TOKENIZER_DIR / f).is_file()]
    missing += [f for f in MODEL_CONFIG_FILES if not (TOKENIZER_DIR / "model_config" / f).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer files {missing} not found under {TOKENIZER_DIR}")

    planted = config is None
    if config is None:
        config = tiny_config(tied=tied)
    params = make_random_params(config, seed, dtype, draw=draw)
    if planted and not tied:
        plant_stop(params)
    if planted and tied:
        plant_outliers(params, config)
        plant_text_outlier(params)
    if tied:
        del params["lm_head.weight"]  # as in the published 3B checkpoint
    rename = to_v5_key if layout == "v5" else (lambda k: k)
    tensors = {rename(k): t.contiguous() for k, t in params.items()}

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_config_json(config, dtype), indent=2) + "\n", encoding="utf-8")
        for name in TOKENIZER_FILES:
            shutil.copyfile(TOKENIZER_DIR / name, tmp / name)
        for name in MODEL_CONFIG_FILES:
            shutil.copyfile(TOKENIZER_DIR / "model_config" / name, tmp / name)
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint folder is meant to be shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        if folder.exists():  # empty, or overwrite: move the old one aside, then swap in the new one
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.rename(folder, old / "x")
            os.rename(tmp, folder)
            shutil.rmtree(old)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen25vl.tools.make_tiny_checkpoint", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir", help="folder to create (must not exist or be empty)")
    parser.add_argument(
        "--tied",
        action="store_true",
        help="tie_word_embeddings (lm_head not stored), with the vision and decoder outlier channels",
    )
    parser.add_argument("--layout", choices=("hub", "v5"), default="hub", help="tensor key names (default hub)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32", "float64"), default="bfloat16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.add_argument(
        "--real-dims",
        action="store_true",
        help="real_dims_config(): text head_dim 128, vision head_dim 80, tied, uniform integer draw (same bits on every CPU)",
    )
    args = parser.parse_args(argv)
    try:
        path = make_tiny_checkpoint(
            args.out_dir,
            seed=args.seed,
            tied=args.tied or args.real_dims,
            layout=args.layout,
            dtype=getattr(torch, args.dtype),
            overwrite=args.overwrite,
            **({"config": real_dims_config(), "draw": "uniform-int"} if args.real_dims else {}),
        )
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
