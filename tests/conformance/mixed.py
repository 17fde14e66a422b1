"""A port that mixes precisions on purpose and may carry one real bug, as a real C++ port did:
float32 weights, its patch inputs rounded to float16 inside the convolution, the merger's GELU
through a tanh approximation (a float16 tanh table in the original), and optionally a small bug in
text layer 0 (its first RMSNorm with eps a little off). tests/conformance/test_diagnosis.py checks
the harness blames the text layer, calls the vision drift precision, and blames nothing once the
bug is gone and the profile declares the precisions.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from unittest import mock

import torch
import torch.nn.functional as F
from qwen25vl.conformance.adapters.spec import SpecAdapter
from qwen25vl.spec import text

PROFILE = {
    "vision.patch_embed": "float16-inputs",
    "vision.merger": "float16",
    "vision.*": "float32",
    "text.*": "float32",
}
BUGGY_EPS = 1.2e-6  # the spec's is 1e-6: a local error near 1e-4 in text.layer.0, nothing anywhere else


class MixedPrecisionPort(SpecAdapter):
    name = "mixed-precision port"
    text_bug = True
    profile = PROFILE

    def describe(self) -> dict:
        return {**super().describe(), "profile": self.profile}

    def _inputs(self, inputs: dict) -> dict:
        out = super()._inputs(inputs)
        for k in ("pixel_values", "pixel_values_videos"):
            if k in out:
                out[k] = out[k].to(torch.float16).to(out[k].dtype)
        return out

    def _quirks(self) -> ExitStack:
        """Inside: the merger's GELU is the tanh approximation, and text layer 0 has its eps off."""
        gelu, layer = F.gelu, text.decoder_layer

        def tanh_gelu(x, approximate="none"):
            return gelu(x, approximate="tanh")

        def layer0_bug(params, config, i, *args, **kwargs):
            if i == 0 and self.text_bug:
                config = dataclasses.replace(config, rms_norm_eps=BUGGY_EPS)
            return layer(params, config, i, *args, **kwargs)

        stack = ExitStack()
        stack.enter_context(mock.patch.object(F, "gelu", tanh_gelu))
        stack.enter_context(mock.patch.object(text, "decoder_layer", layer0_bug))
        return stack

    def run(self, inputs, *, capture):
        with self._quirks():
            return super().run(inputs, capture=capture)

    def run_stage(self, stage, feeds):
        with self._quirks():
            return super().run_stage(stage, self._inputs(feeds))


class MixedPrecisionPortFixed(MixedPrecisionPort):
    name = "mixed-precision port, text bug fixed"
    text_bug = False


class MixedPrecisionPortNoProfile(MixedPrecisionPort):
    name = "mixed-precision port, no profile declared"
    profile = None
