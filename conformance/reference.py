"""The spec, run by the harness itself on a port's own intermediate values.

The goldens say what the whole model computes from the inputs; they cannot say whether a stage is
wrong or only inherits drift from the stages before it. For that the harness runs the spec's stage
k on the port's OWN output of stage k-1 (its own positions where it gives them) and compares it
with the port's stage k: the local error. The same call at another precision gives the precision
signatures (precision.py), and the mistakes catalogue runs its variants the same way. It needs
nothing from the port beyond its captured stages, so it works for every target, files included.
"""

from __future__ import annotations

import torch

from ..spec.checkpoint import load_checkpoint
from .adapters.spec import SpecAdapter
from .precision import COMPUTE, ROUNDED_INPUTS, compute_dtype

_PIXELS = ("pixel_values", "pixel_values_videos")


def round_inputs(stage: str, feeds: dict, dtype: torch.dtype) -> dict:
    """The stage's float input rounded to `dtype` (and back): pixels for the patch embedding, the
    hidden state for every other stage."""
    out = dict(feeds)
    keys = _PIXELS if stage == "vision.patch_embed" else ("hidden",)
    for k in keys:
        if out.get(k) is not None:
            out[k] = out[k].to(dtype).to(torch.float64)
    return out


class Reference:
    """The spec prepared on one checkpoint, at whatever precision is asked for (made lazily).
    adapter_class: the spec adapter or a variant of it (a mistake of the catalogue)."""

    def __init__(self, checkpoint: str, adapter_class: type[SpecAdapter] = SpecAdapter, loaded: dict | None = None):
        self.checkpoint = str(checkpoint)
        self.adapter_class = adapter_class
        self._adapters: dict[str, SpecAdapter] = {}
        self._loaded = {} if loaded is None else loaded  # dtype -> (config, params), shared with variants

    def variant(self, adapter_class: type[SpecAdapter]) -> Reference:
        """The same checkpoint run by a variant of the spec adapter; the weights are loaded once for all."""
        return Reference(self.checkpoint, adapter_class, self._loaded)

    def adapter(self, dtype: str) -> SpecAdapter:
        if dtype not in self._adapters:
            a = self.adapter_class(dtype)
            if type(a).prepare is SpecAdapter.prepare:  # the shared weights, under the variant's own config hook
                if dtype not in self._loaded:
                    self._loaded[dtype] = load_checkpoint(self.checkpoint, dtype=COMPUTE[dtype])
                a.use_weights(*self._loaded[dtype])
            else:  # a variant that changes the weights as it loads them gets its own copy
                a.prepare(self.checkpoint, dtype=dtype, device="cpu")
            self._adapters[dtype] = a
        return self._adapters[dtype]

    def stage(self, stage: str, feeds: dict, precision: str = "float64") -> torch.Tensor:
        """The spec's `stage` at `precision` on `feeds` (model inputs, "hidden": the previous stage's
        value, "position_ids"); float64 out."""
        if precision in ROUNDED_INPUTS:
            feeds = round_inputs(stage, feeds, ROUNDED_INPUTS[precision])
        dtype = compute_dtype(precision)
        assert dtype in COMPUTE, precision
        with torch.no_grad():
            return self.adapter(dtype).run_stage(stage, feeds).double()
