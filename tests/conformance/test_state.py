"""state.repeat: within one adapter's lifetime the model cases run again in reverse order, and a case
with the same text as another and a different image is in the suite; any difference is an error
"state leaks between requests" that names the case that ran before. A port that only generates (a
serving engine) is repeated on its tokens."""

import json

import pytest
from qwen25vl.tools import cli

pytestmark = pytest.mark.whole_runs  # .ci/run: not rerun on the scalar path (docs/testing.md)

MODEL = "model_(image|image_swap|video|batch|text)$"  # model_text runs on the other (tied) checkpoint


def conform(capsys, tmp_path, target, jobs=1, cases=MODEL, *extra):
    out = tmp_path / "r.json"
    code = cli.main(["conform", "--target", target, "--cases", cases, "--jobs", str(jobs), "--json", str(out), *extra])
    capsys.readouterr()
    report = json.loads(out.read_text())
    return code, [r for r in report["results"] if r["stage"] == "state.repeat"], report


@pytest.mark.parametrize("target, jobs", [("spec", 1), ("impl", 2)])
def test_spec_and_impl_give_the_same_answer_whatever_ran_before(capsys, tmp_path, target, jobs):
    code, repeat, report = conform(capsys, tmp_path, target, jobs)
    assert code == 0, report["first_divergence"]
    # a case repeated after one on another checkpoint runs on its own again (a reload is no leak)
    assert len(repeat) == 5 and all(r["status"] == "pass" for r in repeat), repeat


@pytest.mark.parametrize(
    "port, cases",
    [
        ("StaleRopeDeltas", "model_(image|video)$"),  # two cases whose rope_deltas differ
        ("StalePositions", "model_image$"),  # even one case, asked twice
        ("PrefixCacheByTokenIds", "model_image(_swap)?$"),  # the same text, another image
        # ports that only generate (serving engines): the repeat compares their tokens
        ("StaleRopeDeltasEngine", "model_(image|video)$"),
        ("ColdFirstRequestEngine", "model_(image|video)$"),  # only the first request is wrong
    ],
)
def test_leaky_ports_are_caught(capsys, tmp_path, port, cases):
    code, repeat, report = conform(capsys, tmp_path, f"tests.conformance.leaky:{port}", 1, cases, "--no-diagnosis")
    leaks = [r for r in repeat if r["status"] == "error"]
    assert code == 1 and leaks, repeat
    assert all("state leaks between requests" in r["metric"] for r in leaks)
    if port.endswith("Engine"):
        assert all("generate.tokens differ" in r["metric"] for r in leaks), leaks
    if port == "ColdFirstRequestEngine":
        assert [r["case"] for r in leaks] == ["model_image"] and "after nothing" in leaks[0]["where"], leaks
    if port == "PrefixCacheByTokenIds":
        swap = next(r for r in leaks if r["case"] == "model_image_swap")
        assert "with the outputs of model_image, which has the same token ids" in swap["metric"]
    elif port != "ColdFirstRequestEngine":
        assert all("after model_" in r["where"] for r in leaks)  # names the case that ran before


def test_state_repeat_selected_alone_runs_the_cases_and_reports_only_it(capsys, tmp_path):
    """`--stages state.repeat`: the port answers each model case once, unreported, then again."""
    code, repeat, report = conform(
        capsys, tmp_path, "tests.conformance.leaky:StalePositions", 1, "model_image$", "--stages", "state.repeat"
    )
    assert code == 1 and {r["stage"] for r in report["results"]} == {"state.repeat"}, report["results"]
    assert [r["status"] for r in repeat] == ["error"] and "state leaks between requests" in repeat[0]["metric"]
