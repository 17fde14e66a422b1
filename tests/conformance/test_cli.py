"""The console command, the file exchange for ports in other languages, and the pytest plugin."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qwen25vl.conformance import case_runner
from qwen25vl.conformance.adapters.spec import SpecAdapter
from qwen25vl.conformance.compare import to_plain
from qwen25vl.tools import cli
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"


def test_usage_and_bad_arguments(capsys):
    assert cli.main([]) == 2
    assert cli.main(["nope"]) == 2
    assert cli.main(["conform", "--target", "no_such_port"]) == 2
    assert "not one of impl, spec" in capsys.readouterr().err
    assert cli.main(["conform", "--cases", "zzz"]) == 2
    assert cli.main(["conform", "--fixtures", "/nonexistent/folder"]) == 2
    assert "fixture folder not found" in capsys.readouterr().err


def test_bad_expectations_file(tmp_path, capsys):
    (tmp_path / "e.json").write_text("{bad")
    assert cli.main(["conform", "--target", "spec", "--expectations", str(tmp_path / "e.json")]) == 2
    assert "expectations file" in capsys.readouterr().err


def test_python_adapter_target_module_class(tmp_path, capsys):
    """`--target module:Class`: a port's Python adapter, here a planted bug (round half up in smart_resize).
    The run goes on past the failing stage, the report names it, and the exit code is 1."""
    code = cli.main(
        [
            "conform",
            "--target",
            "tests.conformance.planted:RoundHalfUp",
            "--cases",
            "exact_resize",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    assert (
        "FIRST DIVERGENCE  case exact_resize, stage fn.smart_resize" in out
        and "\nRESULT: FAIL (2 of 2 stages covered)" in out
    )
    status = {r["stage"]: r["status"] for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert status == {"fn.smart_resize": "fail", "fn.resize_bicubic": "pass"}
    assert cli.main(["conform", "--target", "tests.conformance.planted:NoSuchAdapter"]) == 2
    assert "cannot import tests.conformance.planted.NoSuchAdapter" in capsys.readouterr().err


def test_draft_expectations_turn_a_run_into_a_file_to_explain(tmp_path, capsys):
    """--draft-expectations: one entry per case and stage family that failed, the harness's diagnosis quoted
    in a reason to write, at_most measured where the stage has a relative error; the draft, used as the
    expectations file, makes the same run pass, and a worse bug behind it fails."""
    draft = tmp_path / "draft.json"
    argv = ["conform", "--target", "tests.conformance.planted:RoundHalfUp", "--cases", "exact_resize"]
    assert cli.main([*argv, "--draft-expectations", str(draft)]) == 1
    assert "0 expectations kept, 1 drafted" in capsys.readouterr().out
    entries = json.loads(draft.read_text())["expectations"]
    assert [(e["case"], e["stage"], e["status"]) for e in entries] == [("exact_resize", r"fn\.smart_resize", ["fail"])]
    assert entries[0]["reason"].startswith("TO EXPLAIN") and "at_most" not in entries[0]  # an exact stage
    assert cli.main([*argv, "--expectations", str(draft)]) == 0
    capsys.readouterr()
    from qwen25vl.conformance.expectations import draft_expectations
    from qwen25vl.conformance.results import StageResult

    rows = [
        StageResult("model_image", f"text.layer.{i}", "fail", note="n", values={"rel": rel}, local=local)
        for i, rel, local in ((0, 0.5, {"value": 2.3e-4}), (1, 0.5, {"value": 1.1e-4}))
    ]
    (entry,) = draft_expectations(rows, "p")["expectations"]
    assert entry["stage"] == r"text\.layer\.\d+" and entry["at_most"] == 3e-3  # 10 x 2.3e-4, rounded up
    assert re.fullmatch(entry["stage"], "text.layer.17")


def test_list_cases(capsys):
    assert cli.main(["conform", "--list"]) == 0
    out = capsys.readouterr().out
    assert "exact_windows" in out and "model_image" in out


def _write_outputs_like_a_port(inputs_dir: Path, out_dir: Path, skip=()):
    """What a port in another language does: read IN/<case>, write OUT/<case>. Here the 'port' is the spec."""
    spec = SpecAdapter("float32")
    for case_dir in sorted(p for p in inputs_dir.iterdir() if p.is_dir()):
        info = json.loads((case_dir / "case.json").read_text())
        dst = out_dir / case_dir.name
        dst.mkdir(parents=True)
        if info["kind"] == "exact":
            tensors = {}
            if (case_dir / "inputs.safetensors").is_file():
                from safetensors.torch import load_file

                tensors = load_file(str(case_dir / "inputs.safetensors"))
            for stage in info["stages"]:
                if stage in skip:
                    continue
                items = json.loads((case_dir / f"{stage}.inputs.json").read_text())["items"]
                resolved = case_runner._resolve([it["inputs"] for it in items], tensors)
                outs = spec.run_items(stage, resolved, tokenizer_dir=info.get("tokenizer"))
                (dst / f"{stage}.json").write_text(json.dumps({"items": to_plain(outs)}))
        else:
            from safetensors.torch import load_file

            spec.prepare(info["checkpoint"], dtype="float32", device="cpu")
            inputs = load_file(str(case_dir / "inputs.safetensors"))
            stages = [s for s in info["stages"] if not s.startswith(("preprocess.", "generate."))]
            out = {k: v.contiguous() for k, v in spec.run(inputs, capture=stages).items()}
            save_file(out, str(dst / "outputs.safetensors"))
            answer = spec.generate(inputs, max_new_tokens=info["max_new_tokens"], eos_token_id=info["eos_token_id"])
            (dst / "generate.tokens.json").write_text(json.dumps({k: v.tolist() for k, v in answer.items()}))


def test_export_inputs_then_judge_a_port_from_its_files(tmp_path, capsys):
    assert (
        cli.main(
            [
                "conform",
                "--cases",
                "exact_(windows|resize|positions)|model_image",
                "--export-inputs",
                str(tmp_path / "in"),
            ]
        )
        == 0
    )
    exported = json.loads((tmp_path / "in" / "exact_resize" / "fn.smart_resize.inputs.json").read_text())
    assert "expected" not in exported["items"][0]  # no golden values leak to the port
    _write_outputs_like_a_port(tmp_path / "in", tmp_path / "out", skip={"fn.resize_bicubic"})
    code = cli.main(
        [
            "conform",
            "--target",
            f"files:{tmp_path / 'out'}",
            "--cases",
            "exact_(windows|resize|positions)|model_image",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    res = {(r["case"], r["stage"]): r["status"] for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert res[("exact_windows", "fn.window_partition")] == "pass"
    assert res[("model_image", "vision.block.3")] == "pass"
    assert res[("model_image", "generate.tokens")] == "pass"
    assert res[("exact_resize", "fn.resize_bicubic")] == "not_covered"  # the port wrote no file for it
    assert res[("model_image", "preprocess.input_ids")] == "not_covered"


def test_jobs_run_cases_in_processes(capsys, tmp_path):
    code = cli.main(
        [
            "conform",
            "--target",
            "spec",
            "--cases",
            "exact_(windows|video)",
            "--jobs",
            "2",
            "--junit",
            str(tmp_path / "r.xml"),
        ]
    )
    assert code == 0
    assert (tmp_path / "r.xml").read_text().count("<testcase") == 2


def run_plugin(tmp_path, *args):
    """pytest with the conformance plugin on fixture folders, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "qwen25vl.conformance.plugin", *args]
        + ["-p", "no:cacheprovider", "-p", "no:randomly"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )


def test_pytest_plugin_items_per_stage(tmp_path):
    exact = [str(FIXTURES / "exact_windows"), str(FIXTURES / "exact_resize")]
    proc = run_plugin(tmp_path, *exact, "--conform-target", "spec", "-q", "-n", "2")  # under pytest-xdist
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout and "bringing up nodes" in proc.stdout


def test_pytest_plugin_holds_the_chunked_prefill_of_a_model_case(tmp_path):
    """A model case with a generation has a state.chunked item beside its fixture's stages."""
    proc = run_plugin(tmp_path, str(FIXTURES / "model_thin"), "--conform-target", "spec", "-v")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "::generate.tokens PASSED" in proc.stdout and "::state.chunked PASSED" in proc.stdout


# ---- the command line refuses what it cannot do, before doing any work


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--stages", "no_such_stage"], "matches no stage of the selected cases; the stages are: fn.smart_resize"),
        (["--cases", "no_such_case"], "matches no case; the cases are: exact_patches"),
        (["--stages", "vision.(block"], "--stages 'vision.(block' is not a valid regular expression"),
        (["--cases", "*model"], "--cases '*model' is not a valid regular expression"),
        (["--jobs", "0"], "--jobs 0: must be at least 1"),
        (["--timeout", "-1"], "--timeout -1: must be a number of seconds >= 0"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--memory-limit", "0"], "--memory-limit 0: must be a positive number"),
        (["--in-process", "--jobs", "2"], "--in-process runs one case at a time"),
        (["--tp", "0"], "--tp 0: must be at least 1"),
        (["--tp", "2", "--target", "spec"], "--tp 2 shards qwen25vl.impl; target 'spec' is not impl"),
        (["--tp", "2", "--jobs", "2"], "--tp 2 runs the cases in the ranks' own processes: drop --jobs"),
        (["--tp", "2"], "--tp 2 must run under `torchrun --nproc-per-node 2` (WORLD_SIZE is 1)"),
        (["--json", "r.out", "--junit", "./r.out"], "--json and --junit name the same file"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(capsys, argv, says):
    assert cli.main(["conform", *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


def test_report_paths_are_checked_before_the_run(capsys, tmp_path):
    t0 = time.perf_counter()
    assert cli.main(["conform", "--json", str(tmp_path / "missing" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["conform", "--junit", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 5  # refused before any case ran (the suite takes longer)


def test_dtype_for_an_adapter_that_takes_no_arguments(capsys):
    code = cli.main(["conform", "--target", "tests.conformance.hostile:OnlyResize", "--dtype", "bfloat16"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--dtype was given but OnlyResize() takes no 'dtype' argument" in err and "Traceback" not in err


def test_a_partial_port_is_told_its_coverage(capsys, tmp_path):
    code = cli.main(["conform", "--target", "tests.conformance.hostile:OnlyResize", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    cov = report["coverage"]
    assert code == 0 and cov["covered"] == 1 and cov["total"] > 60 and len(cov["not_covered"]) == cov["total"] - 1
    assert f"RESULT: PASS (1 of {cov['total']} stages covered)" in out
    assert "not covered: " in out and "-v lists them" in out
    assert out.count("not_covered") == 1  # in the totals line only: no row each
    assert not list(tmp_path.glob(".r.json*"))  # the atomic write left no temporary file


def test_export_inputs_keeps_what_it_did_not_write(tmp_path):
    own = tmp_path / "exact_resize" / "fn.smart_resize.json"
    own.parent.mkdir(parents=True)
    own.write_text('{"items": []}')  # a port's output beside the exported inputs
    assert cli.main(["conform", "--cases", "exact_resize", "--export-inputs", str(tmp_path)]) == 0
    assert own.read_text() == '{"items": []}'
    assert (tmp_path / "exact_resize" / "case.json").is_file()
    assert cli.main(["conform", "--cases", "exact_resize", "--export-inputs", str(tmp_path)]) == 0  # again: fine
    assert own.is_file()
