"""The catalogue of known mistakes (conformance/mistakes/): each entry's adapter is flagged by the
harness at the entry's stage on the bundled fixtures it names, or passes them when it is a declared
blind spot (so this test notices when the fixtures improve); docs/mistakes.md is the generated table."""

import re
from pathlib import Path

import pytest
from qwen25vl.conformance import runner, stages
from qwen25vl.conformance.mistakes import CATALOGUE, by_name, for_stage, markdown_table

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"


def up_to(stage: str) -> str:
    """A regex of every stage up to `stage` in data-flow order: the stages after it (generation
    above all) need not run to find the first divergence."""
    names = [s.name for s in stages._TABLE]
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
    assert {m.name for m in for_stage("vision.block.3")} == {m.name for m in CATALOGUE if m.stage == "vision.block.{i}"}
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


@pytest.mark.parametrize(
    "name, case, stage",
    [
        ("rope_positions_bf16", "model_text", "text.layer.0"),
        ("mrope_interleaved", "model_image", "text.layer.0"),
        ("text_rmsnorm_eps_unread", "model_text", "text.layer.0"),
        ("resize_ties_away_from_zero", "model_resize_tie", "preprocess.input_ids"),
    ],
)
def test_a_function_level_mistake_is_named_in_a_model_case(name, case, stage):
    """Ports that expose no fn.* stage (llama.cpp, serving engines) show a wrong MRoPE table first in the
    decoder layers (the table's entries are candidates there: FEEDS; model_text's positions run past 256,
    where bfloat16 no longer holds every integer) and a resize rule in their model inputs (model_resize_tie's
    image is a tie on both sides)."""
    m = by_name(name)
    paths = runner.select_cases(FIXTURES, f"^{case}$")
    _, results = runner.run_suite(
        paths, runner.SuiteOptions(only_stages=up_to("text.layer.{i}")), adapter=m.adapter("float32")
    )
    first = runner.first_divergence(results)
    assert first is not None and first.stage == stage, first
    assert m.description in first.note, first.note


def test_a_norm_entry_also_explains_the_final_norm():
    """llama.cpp's decoder runs its RMSNorms with eps 0; where its layers carry float16 attention noise the
    final norm is where the port shows it alone (also=("text.norm",))."""
    named = {m.name for m in for_stage("text.norm")}
    assert {"rmsnorm_eps_zero", "text_rmsnorm_eps_unread", "rmsnorm_eps_outside_sqrt"} <= named
