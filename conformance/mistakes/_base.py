"""The catalogue entry and the one base class most variants need.

A variant is the spec adapter with one spec function replaced while the model runs. The spec's
modules are shared by the whole process, so a replacement is made with unittest.mock for the
length of one call and under `LOCK`: two variants (or a variant and the plain spec run by
another thread of the harness) must never see each other's replacement.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from unittest import mock

from ..adapters.spec import SpecAdapter

LOCK = threading.RLock()  # held while a variant's replacements are in place (see the module doc)


@dataclass(frozen=True)
class Mistake:
    name: str  # short unique id, e.g. "merger_tanh_gelu"
    stage: str  # where it first shows: a registry name or template ("vision.block.{i}")
    description: str  # one line a port author understands
    seen: str  # where real ports shipped it: "owner/repo#123", or the research section that describes it
    adapter: type  # a SpecAdapter subclass making exactly this mistake, and nothing else
    cases: str = "exact_"  # the bundled fixture cases (regex on case names) that show it
    blind_spot: str = ""  # non-empty: the bundled fixtures cannot show it, and why
    also: tuple[str, ...] = ()  # later stages it explains where a port hides `stage` (text.norm for a norm)


class Patched(SpecAdapter):
    """The spec with spec-module attributes replaced during the model calls.

    model_patches(inputs) -> [(module, attribute, replacement), ...] for run, run_stage and
    generate (inputs: the model inputs, or the feeds of run_stage); input_patches(images, options)
    the same for build_inputs.
    """

    def model_patches(self, inputs: dict) -> list:
        return []

    def input_patches(self, images, options) -> list:
        return []

    @contextmanager
    def _patched(self, patches: list):
        with LOCK, ExitStack() as stack:
            for module, name, new in patches:
                stack.enter_context(mock.patch.object(module, name, new))
            yield

    def run(self, inputs, *, capture):
        with self._patched(self.model_patches(inputs)):
            return super().run(inputs, capture=capture)

    def run_stage(self, stage, feeds):
        with self._patched(self.model_patches(feeds)):
            return super().run_stage(stage, feeds)

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        with self._patched(self.model_patches(inputs)):
            return super().generate(inputs, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        with self._patched(self.input_patches(images, options)):
            return super().build_inputs(conversations, images, videos, tokenizer_dir=tokenizer_dir, options=options)


def grid_of(inputs: dict):
    """grid_thw of every vision item of model inputs / feeds, images first: int64 [k, 3] (or None)."""
    import torch

    grids = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]
    return torch.cat(grids) if grids else None
