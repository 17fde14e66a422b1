"""Golden model cases from the user's own Qwen2.5-VL checkpoint, streamed from its safetensors.

    qwen25vl fixtures --checkpoint DIR --out DIR [--cases model_image model_video ...]
    qwen25vl fixtures --real-dims --out DIR [--cases ...]     a random checkpoint at the real head dims

The cases are the bundled ones (tools/generate_fixtures.py MODEL_CASES), computed by the same code
(write_model) in float64 by the spec, with the spec's bfloat16/float16/float32 controls. A real
checkpoint does not fit in memory in float64 (7B: 61 GB), so the spec runs on `StreamedParams`: a
read-only mapping that reads each tensor from its shard when the spec asks for it (safetensors'
lazy safe_open, never pickle) and keeps nothing, so the resident set is about one layer's weights
plus activations. The embedding and the LM head are never materialised: `StreamedTable` reads only
the embedding rows of the token ids asked for, and multiplies by the LM head in chunks of vocabulary
rows. The spec itself is unchanged: it indexes, transposes and multiplies what params gives it.
The output folder is a fixtures folder `qwen25vl conform --fixtures OUT` accepts: OUT/checkpoints/own holds
links to the user's files by absolute path and their sha256 (docs/own-checkpoint.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..conformance.precision import COMPUTE
from ..spec.checkpoint import CheckpointError, checkpoint_files, expected_shapes, to_hub_key
from ..spec.config import ConfigError, Qwen25VLConfig
from .generate_fixtures import MODEL_CASES, deterministic, write_checkpoint_manifest, write_model
from .make_tiny_checkpoint import make_tiny_checkpoint, real_dims_config

MODEL_TYPE = "qwen2_5_vl"  # config.json's model_type in the published 3B/7B/32B/72B folders
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# links to the user's files, where the bundled folder keeps its checkpoint (one level down is a case)
CHECKPOINT_LINKS = "checkpoints/own"
REAL_DIMS_CHECKPOINT = "checkpoints/real_dims"  # --real-dims: the checkpoint itself, made inside the folder
LINKED_SUFFIXES = (".json", ".safetensors", ".txt", ".jinja", ".model")
VOCAB_CHUNK_ROWS = 8192  # LM head rows per matmul: 8192 x 3584 float64 = 235 MB at 7B width


class StreamedTable:
    """A [V, C] table (embedding or LM head) left on disk: `table[ids]` reads only those rows,
    `x @ table.T` multiplies chunk by chunk of rows. shape, dtype and device as a tensor's."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype):
        self._path, self._key = path, key
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device("cpu")

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        with safe_open(str(self._path), framework="pt") as f:
            return f.get_slice(self._key)[start:stop].to(self.dtype, copy=True)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        unique, where = torch.unique(ids, return_inverse=True)
        rows = torch.cat([self._rows(int(i), int(i) + 1) for i in unique]) if unique.numel() else None
        if rows is None:
            return torch.empty(*ids.shape, self.shape[1], dtype=self.dtype)
        return rows[where]

    @property
    def T(self) -> _TransposedTable:  # noqa: N802 (the tensor attribute the spec uses)
        return _TransposedTable(self)


class _TransposedTable:
    """table.T as the right operand of `x @ table.T`: [..., C] -> [..., V], chunked over V."""

    def __init__(self, table: StreamedTable):
        self.table = table

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        vocab = self.table.shape[0]
        return torch.cat(
            [x @ self.table._rows(a, min(a + VOCAB_CHUNK_ROWS, vocab)).T for a in range(0, vocab, VOCAB_CHUNK_ROWS)],
            dim=-1,
        )


class StreamedParams(Mapping):
    """The spec's params mapping (hub key -> tensor in `dtype`) read from the shards on each access.

    The shapes are checked against the config's key table up front (from the headers only), so a
    wrong or incomplete checkpoint is refused before any compute; lm_head is the embedding when tied.
    """

    def __init__(self, folder: str | os.PathLike, config: Qwen25VLConfig, dtype: torch.dtype):
        self.dtype = dtype
        self._where: dict[str, tuple[Path, str]] = {}
        on_disk: dict[str, tuple[int, ...]] = {}
        for path in checkpoint_files(folder):
            try:
                with safe_open(str(path), framework="pt") as f:
                    shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
            for key, shape in shapes.items():
                hub = to_hub_key(key)
                if hub in self._where:
                    raise CheckpointError(f"{folder}: tensor {hub} is stored twice (second time in {path.name})")
                self._where[hub], on_disk[hub] = (path, key), shape
        if config.tie_word_embeddings and EMBED in self._where:
            self._where[HEAD], on_disk[HEAD] = self._where[EMBED], on_disk[EMBED]
        self._shapes = expected_shapes(config)
        missing = sorted(set(self._shapes) - set(self._where))
        unexpected = sorted(set(self._where) - set(self._shapes))
        wrong = [f"{k}: {on_disk[k]} (config says {v})" for k, v in self._shapes.items() if on_disk.get(k, v) != v]
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"{folder} does not match its config.json: missing {missing[:20]}, unexpected {unexpected[:20]}, "
                f"wrong shape {wrong[:20]}"
            )

    def __getitem__(self, key: str):
        if key not in self._shapes:
            raise KeyError(key)
        path, stored = self._where[key]
        if key in (EMBED, HEAD):
            return StreamedTable(path, stored, self._shapes[key], self.dtype)
        # opened per read and copied out: no mapping of the shard outlives the read, so the resident set
        # holds only the tensors the spec still uses (a handle kept open keeps every page it touched)
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(stored).to(self.dtype, copy=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def streamed_weights(folder: str | os.PathLike) -> dict:
    """dtype name -> (config, StreamedParams) for float64 and every compute precision: what
    conformance.reference.Reference takes as `loaded`."""
    config = Qwen25VLConfig.from_file(folder)
    return {name: (config, StreamedParams(folder, config, dtype)) for name, dtype in COMPUTE.items()}


def link_checkpoint(checkpoint: Path, folder: Path) -> Path:
    """folder/: a link to each model file of `checkpoint` (config, tokenizer, safetensors) and the
    manifest.json of their sha256 the harness checks, so the user's folder is never written to and a
    changed checkpoint file is caught before judging. Pickles and docs are left out."""
    folder.mkdir(parents=True)
    for path in sorted(checkpoint.iterdir()):
        if path.is_file() and path.suffix in LINKED_SUFFIXES and path.name != "manifest.json":
            (folder / path.name).symlink_to(path)
    write_checkpoint_manifest(folder, f"qwen25vl fixtures --checkpoint {checkpoint}")
    return folder


def _model_type(config_json: Path) -> object:
    try:
        raw = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {config_json} as JSON: {e}") from None
    return raw.get("model_type") if isinstance(raw, dict) else None


def fixtures_from_checkpoint(
    checkpoint: str | os.PathLike | None, out: str | os.PathLike, cases=None, *, real_dims: bool = False
) -> list[str]:
    """Write the model cases `cases` (default: all of MODEL_CASES) for `checkpoint` into the new folder `out`.

    Everything is written into a temporary folder beside `out` and renamed at the end, so a failure
    leaves no half-written `out`. The checkpoint folder is also the tokenizer folder. real_dims (with no
    checkpoint): make the real-dims checkpoint (make_tiny_checkpoint.real_dims_config, the same bits on
    every CPU) inside `out` (out/checkpoints/real_dims) and write the cases for it.
    """
    out = Path(out)
    names = list(MODEL_CASES) if not cases else list(cases)
    unknown = [n for n in names if n not in MODEL_CASES]
    if unknown:
        raise ValueError(f"--cases {unknown}: no such model case; the cases are {list(MODEL_CASES)}")
    if out.exists():
        raise ValueError(f"--out {str(out)!r} exists already; name a new folder")
    if real_dims:
        if checkpoint is not None:
            raise ValueError("--real-dims makes its own checkpoint: give --checkpoint or --real-dims, not both")
        return _real_dims_fixtures(out, names)
    if checkpoint is None:
        raise ValueError("no checkpoint: give --checkpoint DIR (or --real-dims)")
    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_dir():
        raise ValueError(f"--checkpoint {str(checkpoint)!r} does not exist or is not a folder")
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"--checkpoint {str(checkpoint)!r} has no config.json (a Hugging Face model folder has one)")
    model_type = _model_type(checkpoint / "config.json")
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"--checkpoint {str(checkpoint)!r}: config.json has model_type {model_type!r}, not {MODEL_TYPE!r}; "
            "the goldens are of Qwen2.5-VL (Qwen2-VL and Qwen3-VL differ in the vision tower and positions)"
        )
    loaded = streamed_weights(checkpoint)  # config and shard checks before anything is written
    return _write_cases(out, names, lambda partial: (link_checkpoint(checkpoint, partial / CHECKPOINT_LINKS), loaded))


def _real_dims_fixtures(out: Path, names: list[str]) -> list[str]:
    def make(partial: Path) -> tuple[Path, dict]:
        folder = make_tiny_checkpoint(
            partial / REAL_DIMS_CHECKPOINT, tied=True, config=real_dims_config(), draw="uniform-int"
        )
        write_checkpoint_manifest(folder, "qwen25vl fixtures --real-dims")
        return folder, streamed_weights(folder)

    return _write_cases(out, names, make)


def _write_cases(out: Path, names: list[str], checkpoint_in) -> list[str]:
    """The cases `names`, written into a temporary sibling of `out` renamed at the end (nothing half-written).
    checkpoint_in(partial) -> (the checkpoint folder it put inside partial, its streamed weights)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    partial.chmod(0o755)  # mkdtemp's 0700 is for the temporary name only; the result is an ordinary folder
    try:
        folder, loaded = checkpoint_in(partial)
        with deterministic(), torch.no_grad():
            for name in names:
                write_model(name, partial, str(folder), checkpoint=folder, loaded=loaded)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return names


def shard_checkpoint(folder: str | os.PathLike, shards: int) -> list[Path]:
    """Split folder/model.safetensors into `shards` files with a model.safetensors.index.json, as the
    published multi-file checkpoints are (for tests and measurements; keys spread in sorted order)."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    keys = sorted(tensors)
    if not 1 < shards <= len(keys):
        raise ValueError(f"shards must be between 2 and the tensor count {len(keys)}, got {shards}")
    names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map = {key: names[k * shards // len(keys)] for k, key in enumerate(keys)}
    for name in names:
        save_file({k: tensors[k] for k in keys if weight_map[k] == name}, str(folder / name), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (folder / "model.safetensors").unlink()
    return [folder / n for n in names]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="qwen25vl fixtures",
        description="Golden model cases (float64 spec, streamed weights) from your own Qwen2.5-VL checkpoint, or "
        "from a random one at the real head dims, for `qwen25vl conform --fixtures OUT` (docs/own-checkpoint.md).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="Hugging Face model folder: config.json, tokenizer, safetensors")
    source.add_argument(
        "--real-dims",
        action="store_true",
        help="make a random checkpoint at the real head dims (text 128, vision 80; 261 MB) inside OUT and "
        "write the cases for it: what the bundled tiny checkpoint cannot show (docs/own-checkpoint.md)",
    )
    p.add_argument("--out", required=True, help="new fixtures folder to write (must not exist)")
    p.add_argument(
        "--cases", nargs="+", default=None, help=f"model cases to write (default: all of {list(MODEL_CASES)})"
    )
    args = p.parse_args(argv)
    try:
        names = fixtures_from_checkpoint(args.checkpoint, args.out, args.cases, real_dims=args.real_dims)
    except (ValueError, ConfigError, CheckpointError) as e:
        print(f"qwen25vl fixtures: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written, a full disk, a file gone while it was read
        print(f"qwen25vl fixtures: {e} (nothing was written to --out {args.out!r})", file=sys.stderr)
        return 2
    print(f"wrote {len(names)} cases under {args.out}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
