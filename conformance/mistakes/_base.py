"""The catalogue entry and the one base class most variants need.

A variant is the spec adapter with one spec function replaced while the model runs. The spec's
modules are shared by the whole process, so a replacement is made with unittest.mock for the
length of one call and under `LOCK`: two variants (or a variant and the plain spec run by
another thread of the harness) must never see each other's replacement.
"""

from __future__ import annotations

import inspect
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from unittest import mock

from ...spec import image, tokens, video
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
    # a fn.* entry, for the ports that expose no function stage (llama.cpp, serving engines): the model case
    # that names it at a model stage the function feeds (FEEDS), or why no bundled model case can
    model_case: str = ""
    model_blind_spot: str = ""
    # a rule with no entry of its own that gives the same answer on the entry's case, said beside the name
    # (agreement.py): "a per-frame image budget ... gives the same frame size on model_video_budget's clip"
    alike: str = ""


# The spec functions build_inputs runs, by the protocol method that stands for each. A port has one
# implementation of each: a variant that overrides one of these methods makes its mistake in a model case's
# inputs too (Patched.build_inputs), so the model cases are judged on what a port would really send.
INPUT_SITES = {
    "smart_resize": ((image, "smart_resize"), (video, "smart_resize")),
    "resize_bicubic": ((image, "resize_bicubic"), (video, "resize_bicubic")),
    "patchify": ((image, "patchify"), (video, "patchify")),
    "sample_frame_indices": ((video, "sample_frame_indices"),),
    "render_chat": ((tokens, "render_chat"),),
    "expand_vision_tokens": ((tokens, "expand_vision_tokens"),),
}


class Patched(SpecAdapter):
    """The spec with spec-module attributes replaced during the model calls.

    model_patches(inputs) -> [(module, attribute, replacement), ...] for run, run_stage and
    generate (inputs: the model inputs, or the feeds of run_stage); input_patches(images, options)
    the same for build_inputs, which also runs every INPUT_SITES method the variant overrides.
    """

    _in_variant = False  # set while a routed method runs: its own calls of the spec function go to the spec

    def routed_patches(self) -> list:
        """INPUT_SITES, for the methods this class overrides: each site calls the method instead."""
        out = []
        for method, sites in INPUT_SITES.items():
            if getattr(type(self), method) is getattr(SpecAdapter, method):
                continue
            for module, attribute in sites:
                out.append((module, attribute, self._route(getattr(self, method), getattr(module, attribute))))
        return out

    def _route(self, method, spec_fn):
        # the spec function's keyword defaults the protocol method takes as required (merge_size)
        defaults = {k: p.default for k, p in inspect.signature(spec_fn).parameters.items() if p.default is not p.empty}
        accepted = inspect.signature(method).parameters

        def call(*args, **kwargs):
            if self._in_variant:
                return spec_fn(*args, **kwargs)
            self._in_variant = True
            try:
                missing = {k: v for k, v in defaults.items() if k in accepted and k not in kwargs}
                return method(*args, **missing, **kwargs)
            finally:
                self._in_variant = False

        return call

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

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):
        with self._patched(self.model_patches(inputs)):  # generate comes here too (SpecAdapter.generate)
            return super().generate_chunked(
                inputs, prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id
            )

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        with self._patched(self.routed_patches() + self.input_patches(images, options)):
            return super().build_inputs(conversations, images, videos, tokenizer_dir=tokenizer_dir, options=options)


def grid_of(inputs: dict):
    """grid_thw of every vision item of model inputs / feeds, images first: int64 [k, 3] (or None)."""
    import torch

    grids = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]
    return torch.cat(grids) if grids else None
