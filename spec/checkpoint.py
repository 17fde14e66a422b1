"""Checkpoint loading: a Hugging Face folder -> (Qwen25VLConfig, params in hub key names).

The whole contract is one visible key table, `expected_shapes(config)`: every tensor the model
reads, with the shape the config implies. A checkpoint is accepted only if it matches that table
exactly; every missing, unexpected or wrongly shaped tensor is collected and reported in ONE error,
so a config/checkpoint mismatch shows up as a list, not as the first failing matmul.

Only safetensors are read. PyTorch `.bin` files are pickles: unpickling runs code chosen by whoever
wrote the file, so a folder that has only `.bin` files is refused before anything is opened.

Two key layouts are accepted and mapped to the hub names (the names the published files use):
  hub (and what transformers writes back)   transformers v5 in memory / some re-saved files
  visual.*                                   model.visual.*
  model.*  (embed_tokens, layers, norm)      model.language_model.*
  lm_head.weight                             lm_head.weight
With tie_word_embeddings, lm_head.weight is the embedding matrix; a file may omit it (the 3B
checkpoint does) or store an identical copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import Qwen25VLConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder cannot be read, or its tensors do not match its config.

    `problems` maps a kind ("missing", "unexpected", "wrong shape", "not floating point", "not finite")
    to the full list of entries; the message shows the first 40 of each kind.
    """

    def __init__(self, message: str, problems: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.problems = problems or {}


def expected_shapes(config: Qwen25VLConfig) -> dict[str, tuple[int, ...]]:
    """The key table: hub key name -> shape, for every tensor of the model, lm_head.weight included."""
    return {key: tuple(size for size, _ in dims) for key, dims in _key_table(config).items()}


def _key_table(config: Qwen25VLConfig) -> dict[str, tuple[tuple[int, str], ...]]:
    """expected_shapes with each size paired with the config fields it comes from (for error messages).

    Legend: Cv/Iv vision hidden/intermediate, C/I text hidden/intermediate, V vocab, N/K heads and
    kv heads, D text head dim. Linear weights are [out, in] as torch stores them; no transposes.
    """
    v = config.vision
    m2 = v.spatial_merge_size**2
    N, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    Cv = (v.hidden_size, f"vision_config.hidden_size={v.hidden_size}")
    Iv = (v.intermediate_size, f"vision_config.intermediate_size={v.intermediate_size}")
    Cv3 = (3 * v.hidden_size, f"3*vision_config.hidden_size={3 * v.hidden_size}")
    Cm = (m2 * v.hidden_size, f"vision_config.spatial_merge_size**2*hidden_size={m2 * v.hidden_size}")
    Out = (v.out_hidden_size, f"vision_config.out_hidden_size={v.out_hidden_size}")
    C = (config.hidden_size, f"hidden_size={config.hidden_size}")
    I = (config.intermediate_size, f"intermediate_size={config.intermediate_size}")  # noqa: E741
    V = (config.vocab_size, f"vocab_size={config.vocab_size}")
    ND = (N * D, f"num_attention_heads*head_dim={N * D}")
    KD = (K * D, f"num_key_value_heads*head_dim={K * D} (head_dim = hidden_size/num_attention_heads = {D})")
    patch = (
        Cv,
        (v.in_chans, f"vision_config.in_chans={v.in_chans}"),
        (v.temporal_patch_size, f"vision_config.temporal_patch_size={v.temporal_patch_size}"),
        (v.patch_size, f"vision_config.patch_size={v.patch_size}"),
        (v.patch_size, f"vision_config.patch_size={v.patch_size}"),
    )
    # Conv3d with kernel = stride: one [Cv, c, tp, p, p] filter bank applied to each pixel_values row
    table: dict[str, tuple[tuple[int, str], ...]] = {"visual.patch_embed.proj.weight": patch}
    for i in range(v.depth):
        b = f"visual.blocks.{i}"
        table |= {
            f"{b}.norm1.weight": (Cv,),
            f"{b}.norm2.weight": (Cv,),
            f"{b}.attn.qkv.weight": (Cv3, Cv),  # rows [q | k | v], each head-major
            f"{b}.attn.qkv.bias": (Cv3,),
            f"{b}.attn.proj.weight": (Cv, Cv),
            f"{b}.attn.proj.bias": (Cv,),
            f"{b}.mlp.gate_proj.weight": (Iv, Cv),
            f"{b}.mlp.gate_proj.bias": (Iv,),
            f"{b}.mlp.up_proj.weight": (Iv, Cv),
            f"{b}.mlp.up_proj.bias": (Iv,),
            f"{b}.mlp.down_proj.weight": (Cv, Iv),
            f"{b}.mlp.down_proj.bias": (Cv,),
        }
    table |= {
        "visual.merger.ln_q.weight": (Cv,),
        "visual.merger.mlp.0.weight": (Cm, Cm),  # nn.Sequential index 1 is the GELU
        "visual.merger.mlp.0.bias": (Cm,),
        "visual.merger.mlp.2.weight": (Out, Cm),
        "visual.merger.mlp.2.bias": (Out,),
        "model.embed_tokens.weight": (V, C),
    }
    for i in range(config.num_hidden_layers):
        b = f"model.layers.{i}"
        table |= {
            f"{b}.input_layernorm.weight": (C,),
            f"{b}.self_attn.q_proj.weight": (ND, C),
            f"{b}.self_attn.q_proj.bias": (ND,),
            f"{b}.self_attn.k_proj.weight": (KD, C),
            f"{b}.self_attn.k_proj.bias": (KD,),
            f"{b}.self_attn.v_proj.weight": (KD, C),
            f"{b}.self_attn.v_proj.bias": (KD,),
            f"{b}.self_attn.o_proj.weight": (C, ND),
            f"{b}.post_attention_layernorm.weight": (C,),
            f"{b}.mlp.gate_proj.weight": (I, C),
            f"{b}.mlp.up_proj.weight": (I, C),
            f"{b}.mlp.down_proj.weight": (C, I),
        }
    table |= {"model.norm.weight": (C,), "lm_head.weight": (V, C)}
    return table


def to_hub_key(key: str) -> str:
    """Map a transformers-v5 key to its hub name; hub keys pass through unchanged."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def to_v5_key(key: str) -> str:
    """The inverse of `to_hub_key`: hub name -> transformers v5 in-memory name."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    return key


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder, in a fixed order.

    A single `model.safetensors`, else the shards named by `model.safetensors.index.json`.
    Raises CheckpointError for a missing folder, a `.bin`-only folder, or a broken index.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist or is not a folder")
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if (folder / INDEX_FILE).is_file():
        return _shards_from_index(folder / INDEX_FILE)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"checkpoint folder {str(folder)!r} holds only PyTorch pickle files {pickles}; refusing to open them: "
            "unpickling executes code stored in the file. Convert the checkpoint to safetensors "
            f"({SINGLE_FILE} or sharded with {INDEX_FILE}) with a tool you trust"
        )
    raise CheckpointError(f"checkpoint folder {str(folder)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path} is not valid JSON: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no 'weight_map' object mapping tensor names to shard files")
    names = sorted({str(n) for n in weight_map.values()})
    bad = []
    for n in weight_map.values():
        if (not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors")) and n not in bad:
            bad.append(n)
    if bad:
        raise CheckpointError(
            f"{index_path} names shards that are not plain .safetensors file names in the folder: {bad}"
        )
    missing = [n for n in names if not (index_path.parent / n).is_file()]
    if missing:
        raise CheckpointError(f"{index_path} names shard files that are not in the folder: {missing}")
    return [index_path.parent / n for n in names]


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of all files, keys as stored; a key in two files is an error."""
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    repeated = []
    for path in files:
        try:
            part = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
        for key, tensor in part.items():
            if key in tensors:
                repeated.append(f"{key} (in {where[key]} and {path.name})")
            tensors[key], where[key] = tensor, path.name
    if repeated:
        raise CheckpointError(f"tensors stored twice: {repeated}")
    return tensors


def check_params(params: dict[str, torch.Tensor], config: Qwen25VLConfig, *, source: str = "checkpoint") -> None:
    """Compare params (hub names) with the key table; raise ONE CheckpointError listing every problem.

    A wrong shape names the config fields its expected sizes come from; a layer count that differs
    from the file's says so; fields that config.json lacked (config.defaulted) are named as a likely cause.
    """
    table = _key_table(config)
    problems = {
        "missing": [k for k in table if k not in params],
        "unexpected": sorted(k for k in params if k not in table),
        "wrong shape": [
            f"{k} has shape {list(params[k].shape)}, config says [{', '.join(name for _, name in table[k])}]"
            for k in table
            if k in params and tuple(params[k].shape) != tuple(size for size, _ in table[k])
        ],
        "not floating point": [
            f"{k} {params[k].dtype}" for k in table if k in params and not params[k].is_floating_point()
        ],
    }
    problems = {kind: items for kind, items in problems.items() if items}
    if problems:
        lines = [f"{kind} {len(items)}: {_short(items)}" for kind, items in problems.items()]
        lines += _layer_counts(params, config) + ([config.defaults_note] if config.defaulted else [])
        raise CheckpointError(f"{source} does not match its config:\n  " + "\n  ".join(lines), problems)


def _layer_counts(params: dict[str, torch.Tensor], config: Qwen25VLConfig) -> list[str]:
    """A line per block stack whose indices in the file are not 0..(the config's count - 1)."""
    lines = []
    for prefix, field, want in (
        ("model.layers.", "num_hidden_layers", config.num_hidden_layers),
        ("visual.blocks.", "vision_config.depth", config.vision.depth),
    ):
        found = sorted(
            {int(i) for k in params if k.startswith(prefix) for i in [k[len(prefix) :].split(".")[0]] if i.isdigit()}
        )
        if found != list(range(want)):
            runs, start = [], None
            for j, i in enumerate(found):
                start = i if start is None else start
                if j + 1 == len(found) or found[j + 1] != i + 1:
                    runs.append(f"{start}..{i}" if i > start else f"{start}")
                    start = None
            lines.append(f"{prefix}N in the file: N = {', '.join(runs) or 'none'}; config says {field}={want}")
    return lines


def check_weights_finite(params: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every tensor that holds a NaN or an infinity, with counts.

    One pass, torch.isfinite(t).all() per tensor; the counts are taken only for the offending ones.
    """
    bad = []
    for key, t in params.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan = int(torch.isnan(t).sum())
            inf = int(torch.isinf(t).sum())
            bad.append(f"{key} ({nan} NaN, {inf} inf of {t.numel()} values)")
    if bad:
        raise CheckpointError(
            f"{source} holds non-finite weights in {len(bad)} tensor(s): {_short(bad)}. A model built from them "
            "computes NaN; re-download or re-convert the checkpoint (load_checkpoint(..., check_finite=False) "
            "loads it anyway, for inspection)",
            {"not finite": bad},
        )


def _short(items: list[str], limit: int = 40) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_checkpoint(
    folder: str | os.PathLike, *, dtype: torch.dtype | None = None, check_finite: bool = True
) -> tuple[Qwen25VLConfig, dict[str, torch.Tensor]]:
    """Read config.json and the safetensors of `folder`.

    Returns (config, params): params maps every hub key of `expected_shapes(config)` to a tensor,
    lm_head.weight always present (the embedding itself when tied). dtype: cast every tensor to it
    (torch.float64 for the oracle); None keeps the stored dtype. check_finite: refuse a checkpoint with
    a NaN or infinite weight, naming every such tensor (False only to inspect a broken file).
    Raises ConfigError for a bad config.json and CheckpointError for everything about the tensors.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"load_checkpoint: dtype must be a floating torch.dtype or None, got {dtype!r}")
    folder = Path(folder)
    files = checkpoint_files(folder)  # checked before config.json so a .bin folder gets the clear refusal
    config = Qwen25VLConfig.from_file(folder)
    stored = _read_tensors(files)

    params: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    clashes = []
    for key, tensor in stored.items():
        hub = to_hub_key(key)
        if hub in params:
            clashes.append(f"{origin[hub]} and {key}")
        params[hub], origin[hub] = tensor, key
    if clashes:
        raise CheckpointError(f"{folder}: the same tensor is stored under both key layouts: {clashes}")

    embed = params.get("model.embed_tokens.weight")
    if config.tie_word_embeddings and embed is not None:
        head = params.get("lm_head.weight")
        if head is not None and (head.shape != embed.shape or not torch.equal(head, embed)):
            raise CheckpointError(
                f"{folder}: tie_word_embeddings is true but the stored lm_head.weight differs from "
                "model.embed_tokens.weight; the config and the weights disagree"
            )
        params["lm_head.weight"] = embed
    check_params(params, config, source=str(folder))
    if check_finite:
        check_weights_finite(params, source=str(folder))

    if dtype is not None:
        cast = {id(t): t.to(dtype) for t in params.values()}  # keep tied tensors one object
        params = {k: cast[id(t)] for k, t in params.items()}
    return config, params


def stop_token_ids(folder: str | os.PathLike) -> list[int]:
    """The ids greedy generation stops at: generation_config.json's eos_token_id, which the published
    folders set to [151645, 151643] (<|im_end|> ends an assistant turn, <|endoftext|> ends a document),
    else config.json's single eos_token_id. A port that stops on <|im_end|> only runs past an
    <|endoftext|>; fixtures/model_batch has a row that stops there."""
    folder = Path(folder)
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        if ids is None:
            continue
        ids = [ids] if isinstance(ids, int) else ids
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise CheckpointError(f"{path}: eos_token_id must be an id or a list of ids, got {ids!r}")
        return list(ids)
    raise CheckpointError(f"{folder}: neither generation_config.json nor config.json names an eos_token_id")
