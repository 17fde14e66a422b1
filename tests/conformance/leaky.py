"""Ports whose answer depends on the requests before it, as four real ports (and transformers #43952)
shipped: rope_deltas kept from the previous request, positions continued from the previous request,
and a prefix cache keyed on token ids that hands one image's activations to another image.
tests/conformance/test_state.py checks state.repeat catches each and passes impl and spec."""

from __future__ import annotations

import torch
from qwen25vl.conformance.adapters.base import NotCovered
from qwen25vl.conformance.adapters.spec import SpecAdapter
from qwen25vl.spec import mrope


class StaleRopeDeltas(SpecAdapter):
    """rope_deltas cached on the model and not reset: each request decodes with the previous one's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._previous = None

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        pos, deltas = mrope.rope_index(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
        )
        stale = self._previous if self._previous is not None and self._previous.shape == deltas.shape else deltas
        self._previous = deltas
        return pos, stale


class StalePositions(SpecAdapter):
    """Positions continued from the previous request (a position counter never reset)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._next = 0

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        pos, deltas = mrope.rope_index(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
        )
        offset, self._next = self._next, int(pos.max()) + 1
        return pos + offset, deltas + offset


class PrefixCacheByTokenIds(SpecAdapter):
    """A prefix cache keyed on the prompt's token ids only: the same text with another image gets the
    first image's activations."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: dict[bytes, dict] = {}

    def run(self, inputs, *, capture):
        key = inputs["input_ids"].numpy().tobytes()
        if key not in self._cache:
            self._cache[key] = super().run(inputs, capture=capture)
        return {k: v.clone() for k, v in self._cache[key].items() if isinstance(v, torch.Tensor)}


class _Engine:
    """Answers generate() only, as a serving engine does: run() is not covered, so state.repeat can
    compare nothing but the tokens."""

    def run(self, inputs, *, capture):
        raise NotCovered("this port only generates (a serving engine)")


class StaleRopeDeltasEngine(_Engine, StaleRopeDeltas):
    """StaleRopeDeltas behind an engine that only generates."""


class ColdFirstRequestEngine(_Engine, SpecAdapter):
    """The first request after loading runs before the vision encoder's cache is filled and sees zeros
    for its pixels (vllm-ascend#1081: only the first request comes back corrupted)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._warm = False

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        if not self._warm:
            self._warm = True
            inputs = {k: torch.zeros_like(v) if k.startswith("pixel_values") else v for k, v in inputs.items()}
        return super().generate(inputs, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
