"""The catalogue of known mistakes (conformance/mistakes/): each entry's adapter is flagged by the
harness at the entry's stage on the bundled fixtures it names, or passes them when it is a declared
blind spot (so this test notices when the fixtures improve); docs/mistakes.md is the generated table."""

import re
from pathlib import Path

import pytest
from qwen25vl.conformance import runner, stages
from qwen25vl.conformance.mistakes import CATALOGUE, for_stage, markdown_table, model_stages_fed_by

pytestmark = pytest.mark.whole_runs  # .ci/run: not rerun on the scalar path (docs/testing.md)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"


def up_to(stage: str) -> str:
    """A regex of every stage up to `stage` in data-flow order: the stages after it (generation
    above all) need not run to find the first divergence."""
    names = sorted((s.name for s in stages._TABLE), key=lambda n: stages.order_key(n.replace("{i}", "0")))
    upto = names[: names.index(stage) + 1]
    return "^(" + "|".join(re.escape(n).replace(re.escape("{i}"), r"\d+") for n in upto) + ")$"


def _run(m):
    paths = runner.select_cases(FIXTURES, m.cases)
    assert paths, f"{m.name}: no fixture case matches {m.cases!r}"
    opts = runner.SuiteOptions(only_stages=up_to(m.stage))
    _, results = runner.run_suite(paths, opts, adapter=m.adapter("float32"))
    return results


@pytest.mark.parametrize("m", CATALOGUE, ids=[m.name for m in CATALOGUE])
def test_mistake_is_flagged_at_its_stage(m):
    first = runner.first_divergence(_run(m))
    if m.blind_spot:
        assert first is None, f"{m.name} is now caught at {first.stage} ({first.where}): drop its blind_spot"
        return
    assert first is not None, f"{m.name} passed every stage of {m.cases!r}"
    assert stages.template(first.stage) == m.stage or first.stage == m.stage, (
        f"{m.name}: first divergence {first.stage} in {first.case}, expected {m.stage}: {first.where}"
    )
    # a wrong shape is an error, not a failure: right for images_resized_to_largest
    assert first.status in runner.BAD, f"{m.name}: {first.stage} is {first.status}: {first.metric}"
    if first.status == "fail":
        # the catalogue runs on the same inputs (a float model stage: the port's own upstream value; a
        # fn.* stage: the items the port got wrong; preprocess, positions, tokens: the same request)
        # and names the entry
        assert m.description in first.note, f"{m.name} not named at {first.stage}: {first.note}"


def test_catalogue_shape():
    assert len(CATALOGUE) >= 30
    names = [m.name for m in CATALOGUE]
    assert len(set(names)) == len(names)
    for m in CATALOGUE:
        assert stages.is_known(m.stage.replace("{i}", "0")), f"{m.name}: unknown stage {m.stage}"
        assert m.description and "\n" not in m.description and len(m.description) <= 120, m.name
        assert m.seen and ("#" in m.seen or "§" in m.seen), f"{m.name}: seen must cite an issue or a section"


def test_for_stage_matches_templates():
    # the vision blocks' own entries, and window_partition's (FEEDS: the blocks attend inside its segments)
    block = {m.name for m in CATALOGUE if m.stage in ("vision.block.{i}", "fn.window_partition")}
    assert {m.name for m in for_stage("vision.block.3")} == block
    assert [m.name for m in for_stage("fn.tokenize")] == [m.name for m in CATALOGUE if m.stage == "fn.tokenize"]
    assert for_stage("no.such.stage") == []


def test_up_to_keeps_the_earlier_stages_only():
    rx = re.compile(up_to("vision.block.{i}"))
    assert all(rx.match(s) for s in ("fn.smart_resize", "preprocess.input_ids", "vision.patch_embed", "vision.block.3"))
    assert not any(rx.match(s) for s in ("vision.merger", "text.layer.0", "generate.tokens"))


def test_docs_table_is_generated():
    assert (ROOT / "docs" / "mistakes.md").read_text() == markdown_table(), (
        "docs/mistakes.md is stale: python -m qwen25vl.conformance.mistakes > docs/mistakes.md"
    )


def test_preprocess_stages_also_try_the_mistakes_of_the_functions_that_feed_them():
    """A model case's build_inputs runs the tokenizer and the resize: their entries explain its failures
    (llama.cpp's tokenizer without NFC shows first in model_batch's input_ids)."""
    from qwen25vl.conformance import mistakes

    assert "tokenizer_without_nfc" in {m.name for m in mistakes.for_stage("preprocess.input_ids")}
    assert "letterbox" in {m.name for m in mistakes.for_stage("preprocess.pixel_values")}
    assert "letterbox" not in {m.name for m in mistakes.for_stage("preprocess.input_ids")}


FUNCTION_ENTRIES = [m for m in CATALOGUE if m.stage.startswith("fn.")]


def _model_bound(m) -> str:
    """The last model stage (data-flow order) that m's function feeds: where a model run may stop."""
    return max(model_stages_fed_by(m.stage), key=lambda n: stages.order_key(n.replace("{i}", "0")))


def test_every_function_entry_says_which_model_case_shows_it():
    for m in FUNCTION_ENTRIES:
        assert bool(m.model_case) != bool(m.model_blind_spot), f"{m.name}: give model_case or model_blind_spot"
        if m.model_case:
            assert model_stages_fed_by(m.stage), f"{m.name}: FEEDS names no model stage that {m.stage} feeds"
    assert not any(m.model_case or m.model_blind_spot for m in CATALOGUE if not m.stage.startswith("fn."))


@pytest.mark.parametrize("m", [m for m in FUNCTION_ENTRIES if m.model_case], ids=lambda m: m.name)
def test_a_function_level_mistake_is_named_in_its_model_case(m):
    """Ports that expose no fn.* stage (llama.cpp, serving engines) are judged on the model cases: each
    function-level entry is made the same way in a model case's inputs and run (a port has one resize, one
    chat template, one rotary table) and shows at a model stage its function feeds (FEEDS). A wrong table
    shows first in the decoder layers (model_text's positions run past 256, where bfloat16 no longer holds
    every integer); a resize rule in a model case's inputs (model_resize_tie's image is a tie on both sides)."""
    paths = runner.select_cases(FIXTURES, f"^{m.model_case}$")
    assert paths, f"{m.name}: no model case {m.model_case}"
    _, results = runner.run_suite(
        paths, runner.SuiteOptions(only_stages=up_to(_model_bound(m))), adapter=m.adapter("float32")
    )
    first = runner.first_divergence(results)
    assert first is not None, f"{m.name} passed {m.model_case}"
    fed = set(model_stages_fed_by(m.stage))  # names and templates ("text.layer.{i}")
    if first.status == "error" and first.stage.startswith("preprocess.") and first.stage not in fed:
        # build_inputs raised: every preprocess stage is the same error, and the first of them is a grid
        first = next(
            (r for r in results if r.case == first.case and r.stage in fed and r.metric == first.metric), first
        )
    assert stages.template(first.stage) in fed, f"{m.name}: first divergence {first.stage}"
    assert first.status in runner.BAD, first
    if first.status == "fail":
        assert m.description in first.note, f"{m.name} not named at {first.stage}: {first.note}"


@pytest.mark.parametrize(
    "m", [m for m in FUNCTION_ENTRIES if m.model_blind_spot and model_stages_fed_by(m.stage)], ids=lambda m: m.name
)
def test_a_model_blind_spot_passes_every_model_case(m):
    """A declared model blind spot must be one: when a model case starts to show it, this fails, and the
    entry gets its model_case."""
    paths = runner.select_cases(FIXTURES, "^model_")
    _, results = runner.run_suite(
        paths, runner.SuiteOptions(only_stages=up_to(_model_bound(m))), adapter=m.adapter("float32")
    )
    first = runner.first_divergence(results)
    assert first is None, f"{m.name} is now shown by {first.case} at {first.stage}: give it model_case"


def test_a_variant_breaks_build_inputs_like_its_function():
    """A variant of a function build_inputs runs (INPUT_SITES) is a Patched one, so the model cases see it."""
    from qwen25vl.conformance.adapters.spec import SpecAdapter
    from qwen25vl.conformance.mistakes import Patched
    from qwen25vl.conformance.mistakes._base import INPUT_SITES

    for m in CATALOGUE:
        overridden = [k for k in INPUT_SITES if getattr(m.adapter, k) is not getattr(SpecAdapter, k)]
        assert not overridden or issubclass(m.adapter, Patched), f"{m.name} overrides {overridden}: make it Patched"


def test_a_norm_entry_also_explains_the_final_norm():
    """llama.cpp's decoder runs its RMSNorms with eps 0; where its layers carry float16 attention noise the
    final norm is where the port shows it alone (also=("text.norm",))."""
    named = {m.name for m in for_stage("text.norm")}
    assert {"rmsnorm_eps_zero", "text_rmsnorm_eps_unread", "rmsnorm_eps_outside_sqrt"} <= named
