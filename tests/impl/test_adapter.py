"""conformance's ImplAdapter: teacher-forced stages go through impl's public one-stage methods, and an
error inside impl is an error of the stage, never "not covered"."""

import pytest
import torch
from qwen25vl.conformance.adapters.base import NotCovered
from qwen25vl.conformance.adapters.impl import ImplAdapter
from qwen25vl.impl.model import Qwen25VL


@pytest.fixture(scope="module")
def adapter(tiny_params):
    config, params = tiny_params
    a = ImplAdapter(dtype="float32", device="cpu")
    a.model = Qwen25VL.from_params(config, params, dtype=torch.float32, device="cpu")
    a.config = config
    return a


def test_merger_stage_equals_the_tower(adapter):
    x = torch.randn(16, adapter.config.vision.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = adapter.model.visual.merge(x)
    assert torch.equal(adapter.run_stage("vision.merger", {"hidden": x}), want)


def test_impl_errors_surface(adapter, monkeypatch):
    def broken(x):
        raise AttributeError("'VisionTower' object has no attribute 'ln_q'")

    monkeypatch.setattr(adapter.model.visual, "merge", broken)
    with pytest.raises(AttributeError, match="ln_q"):
        adapter.run_stage("vision.merger", {"hidden": torch.zeros(4, adapter.config.vision.hidden_size)})


def test_stage_without_method_is_not_covered(adapter):
    with pytest.raises(NotCovered, match="teacher-forced text.inputs_embeds"):
        adapter.run_stage("text.inputs_embeds", {"hidden": torch.zeros(1, 32)})
