"""Each planted bug is flagged at the stage where it first shows (tests/conformance/planted)."""

from pathlib import Path

import pytest
from qwen25vl.conformance import runner

from .planted import IN_MODEL_CASES, PLANTED

pytestmark = pytest.mark.whole_runs  # .ci/run: not rerun on the scalar path (docs/testing.md)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.mark.parametrize("adapter, expected", [(a, e) for a, e in PLANTED.items()], ids=[a.__name__ for a in PLANTED])
def test_planted_bug_is_flagged_at_its_first_divergent_stage(adapter, expected):
    stage, cases = expected
    # fn.* stages come first in data-flow order, so a bug whose first stage is a fn.* stage is fully
    # judged by the exact cases; the model-stage bugs also run the one model case that shows them
    _, results = runner.run_suite(
        runner.select_cases(FIXTURES, cases), runner.SuiteOptions(), adapter=adapter("float32")
    )
    first = runner.first_divergence(results)
    assert first is not None, f"{adapter.__name__} passed everything"
    assert first.stage == stage, f"{adapter.__name__}: first divergence {first.stage}, expected {stage}: {first.where}"
    assert first.status == "fail"


@pytest.mark.parametrize(
    "adapter, expected", [(a, e) for a, e in IN_MODEL_CASES.items()], ids=[a.__name__ for a in IN_MODEL_CASES]
)
def test_input_bugs_show_in_a_model_case(adapter, expected):
    """The tokenizer and the resize run in the model cases too (fixtures v1 had only NFC texts and
    images that were multiples of 28 there): flagged on the model case alone, before any model stage."""
    stage, case = expected
    _, results = runner.run_suite(
        [FIXTURES / case], runner.SuiteOptions(only_stages=r"^preprocess\."), adapter=adapter("float32")
    )
    first = runner.first_divergence(results)
    assert first is not None, f"{adapter.__name__} passed every preprocess stage of {case}"
    assert first.stage == stage, f"{adapter.__name__}: first divergence {first.stage}, expected {stage}: {first.where}"
    assert first.status == "fail"


def test_model_stage_bugs_are_localised_by_teacher_forcing():
    from .planted import RotaryNotReordered

    _, results = runner.run_suite(
        [FIXTURES / "model_image"], runner.SuiteOptions(), adapter=RotaryNotReordered("float32")
    )
    first = runner.first_divergence(results)
    assert first.stage == "vision.block.0"
    assert "the stage itself is wrong" in first.note


def test_at_least_ten_planted_bugs():
    assert len(PLANTED) >= 10


def test_every_planted_bug_is_a_catalogue_entry():
    from qwen25vl.conformance import stages
    from qwen25vl.conformance.mistakes import CATALOGUE

    for adapter, (stage, _) in PLANTED.items():
        entry = next((m for m in CATALOGUE if issubclass(adapter, m.adapter)), None)
        assert entry is not None, f"{adapter.__name__} is not in the catalogue"
        assert entry.stage == stages.template(stage), f"{adapter.__name__}: {entry.stage} vs {stage}"
