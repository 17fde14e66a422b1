"""The proof: spec and impl pass the bundled fixtures; transformers passes with its explained expectations."""

from pathlib import Path

import pytest
from qwen25vl.conformance import runner
from qwen25vl.tools import cli

pytestmark = pytest.mark.whole_runs  # .ci/run: not rerun on the scalar path (docs/testing.md)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def test_spec_passes_its_own_fixtures_in_float32():
    desc, results = runner.run_suite(runner.select_cases(FIXTURES), runner.SuiteOptions(target="spec"))
    bad = [(r.case, r.stage, r.metric, r.where) for r in results if r.status != "pass"]
    assert not bad
    assert desc["dtype"] == "float32" and len(results) >= 70


def test_impl_main_job_passes(capsys):
    """`qwen25vl conform` with no arguments: the whole suite against impl."""
    code = cli.main(["conform"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "RESULT: PASS" in out and "target impl" in out


def test_impl_passes_in_bfloat16_on_the_cpu(capsys, tmp_path):
    """impl in bfloat16 on the CPU, with what from_params applies there (the float16 pack of the linears on
    CPUs below AVX512, impl.quant), passes every stage of the bundled suite."""
    code = cli.main(["conform", "--dtype", "bfloat16", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "RESULT: PASS" in out and "target impl" in out and "dtype bfloat16" in out


def test_transformers_passes_with_explained_expectations(capsys, tmp_path):
    code = cli.main(["conform", "--target", "transformers", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    xfail = [r for r in data["results"] if r["status"] == "xfail"]
    assert xfail and all(r["note"].startswith("expected: ") for r in xfail)
    passed = {(r["case"], r["stage"]) for r in data["results"] if r["status"] == "pass"}
    assert ("model_image", "logits") in passed and ("exact_windows", "fn.window_partition") in passed


def test_impl_missing_is_not_covered_never_passed(monkeypatch):
    import sys

    import qwen25vl.impl as pkg
    from qwen25vl.conformance.adapters.impl import ImplAdapter

    monkeypatch.delattr(pkg, "model", raising=False)
    monkeypatch.setitem(sys.modules, "qwen25vl.impl.model", None)  # import fails
    _, results = runner.run_suite(
        runner.select_cases(FIXTURES, "exact_windows|model_image"),
        runner.SuiteOptions(),
        adapter=ImplAdapter("float32", "cpu"),
    )
    assert results and all(r.status == "not_covered" for r in results)


def test_llama_cpp_target_names_a_bad_tree_or_tap(monkeypatch, capsys, tmp_path):
    """--llama-cpp DIR that is no llama.cpp tree, or a tap path that is no file: exit 2 with the path named,
    before any case runs (no build is attempted)."""
    for var in ("QWEN25VL_LLAMA_CPP_SRC", "QWEN25VL_LLAMA_CPP_TAP"):  # restored after: --llama-cpp sets the first
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QWEN25VL_LLAMA_CPP_TAP", str(tmp_path / "no-tap"))
    code = cli.main(["conform", "--target", "llama.cpp", "--llama-cpp", str(tmp_path), "--cases", "model_image$"])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path) in err and "not a llama.cpp source tree" in err
    monkeypatch.delenv("QWEN25VL_LLAMA_CPP_SRC")
    code = cli.main(["conform", "--target", "llama.cpp", "--cases", "model_image$"])
    err = capsys.readouterr().err
    assert code == 2 and "no-tap is not a file" in err
