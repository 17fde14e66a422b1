"""A fixture checkpoint as a value: its files checked once, its config, and the golden logits.

Model cases name the checkpoint they were made from. The harness checks its files against the
checkpoint's own manifest.json (sha256) before judging anything against it, and derives the golden
logits from it: fixtures store the golden text.norm, and logits = text.norm @ lm_head^T in float64
(stored logits would cost L x 600 KB per case). One `Checkpoint` is made per folder by whoever runs
cases (CaseRunner keeps its own), so nothing is cached at module level.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from ..spec.checkpoint import checkpoint_files, to_hub_key
from ..spec.config import Qwen25VLConfig
from .fixtures import FixtureError, check_files


class Checkpoint:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @cached_property
    def problem(self) -> str | None:
        """Why the folder cannot be used (a missing or tampered file), or None."""
        folder = self.folder
        try:
            with open(folder / "manifest.json", encoding="utf-8") as f:
                bad = check_files(folder, json.load(f)["files"])
        except (OSError, ValueError, KeyError) as e:
            return f"checkpoint {folder}: cannot read its manifest.json ({e})"
        name, why = next(iter(bad.items()), (None, None))
        if why == "missing":
            return f"checkpoint file {folder / name} is missing"
        if why:
            return f"checkpoint file {folder / name}: sha256 mismatch (tampered or stale)"
        return None

    @cached_property
    def config(self) -> Qwen25VLConfig:
        return Qwen25VLConfig.from_file(self.folder)

    @cached_property
    def lm_head(self) -> torch.Tensor:
        """[V, C] float64: lm_head.weight, or the embedding when tied; only this tensor is read."""
        want = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        for fp in checkpoint_files(self.folder):
            with safe_open(str(fp), "pt") as f:
                key = next((k for k in f.keys() if to_hub_key(k) == want), None)
                if key is not None:
                    return f.get_tensor(key).double()
        raise FixtureError(f"no LM head in {self.folder}")

    def logits(self, norm: torch.Tensor) -> torch.Tensor:
        """Golden logits [B, L, V] float64 from the golden text.norm [B, L, C]."""
        return norm.double() @ self.lm_head.T
