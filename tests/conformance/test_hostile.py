"""A port cannot take the harness down: each hostile port (tests/conformance/hostile) runs through the
real command line with --jobs 1 and 2; the crash, hang, exit, memory blow-up or garbage becomes an
error on exactly the stage that was running, every other stage is still judged, and the report,
JSON and JUnit are written."""

import json
import xml.etree.ElementTree as ET

import pytest
from qwen25vl.tools import cli

HOSTILE = "tests.conformance.hostile:"


def conform(capsys, tmp_path, target, cases, jobs, *extra):
    out_json, out_xml = tmp_path / "r.json", tmp_path / "r.xml"
    code = cli.main(
        [
            "conform",
            "--target",
            HOSTILE + target,
            "--cases",
            cases,
            "--jobs",
            str(jobs),
            "--json",
            str(out_json),
            "--junit",
            str(out_xml),
            *extra,
        ]
    )
    text = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    ET.fromstring(out_xml.read_text())  # well-formed
    by_stage = {(r["case"], r["stage"]): r for r in report["results"]}
    return code, text, report, by_stage


def assert_only(by_stage, bad_key, status="error"):
    """`bad_key` has `status`; every other stage passed."""
    assert by_stage[bad_key]["status"] == status, by_stage[bad_key]
    others = {k: r["status"] for k, r in by_stage.items() if k != bad_key}
    assert others and set(others.values()) == {"pass"}, others


JOBS = pytest.mark.parametrize("jobs", [1, 2])


@JOBS
def test_abort_is_an_error_of_the_stage_that_ran(capsys, tmp_path, jobs):
    code, text, report, by_stage = conform(capsys, tmp_path, "AbortInWindows", "exact_(windows|resize|prompt)", jobs)
    assert code == 1
    key = ("exact_windows", "fn.window_partition")
    assert_only(by_stage, key)
    assert "port crashed: signal 6 (SIGABRT) in fn.window_partition" in by_stage[key]["metric"]
    assert report["first_divergence"]["case"] == "exact_windows"
    assert "FIRST DIVERGENCE  case exact_windows, stage fn.window_partition" in text
    assert report["target"]["worker_restarts"] >= 0 and "RESULT: FAIL" in text


@JOBS
def test_a_native_hang_with_signals_blocked_is_killed_at_the_timeout(capsys, tmp_path, jobs):
    code, text, report, by_stage = conform(
        capsys, tmp_path, "NativeHangInWindows", "exact_(windows|resize)", jobs, "--timeout", "4"
    )
    key = ("exact_windows", "fn.window_partition")
    assert_only(by_stage, key)
    assert "port timed out after 4 s in fn.window_partition" in by_stage[key]["metric"]
    assert code == 1


@JOBS
@pytest.mark.parametrize("target, says", [("ExitInResize", "exit code 3"), ("SysExitInResize", "sys.exit(4)")])
def test_exit_is_contained(capsys, tmp_path, jobs, target, says):
    code, text, report, by_stage = conform(capsys, tmp_path, target, "exact_(resize|windows)", jobs)
    key = ("exact_resize", "fn.smart_resize")
    assert_only(by_stage, key)
    assert says in by_stage[key]["metric"] and code == 1


@JOBS
def test_garbage_is_never_credited(capsys, tmp_path, jobs):
    code, text, report, by_stage = conform(capsys, tmp_path, "ZerosFromResize", "exact_resize", jobs, "-v")
    r = by_stage[("exact_resize", "fn.smart_resize")]
    assert r["status"] == "error"
    assert r["metric"].startswith("0/") and "malformed" in r["metric"], r["metric"]
    assert r["values"]["bad"] == r["values"]["items"]  # not one item credited, refusal items included
    assert "expected (h, w): two integers, got (0, 0, 0)" in r["where"]
    assert "expected (h, w): two integers, got (0, 0, 0)" in text  # -v prints the full text


@JOBS
def test_an_answer_that_cannot_be_sent_back_is_an_error(capsys, tmp_path, jobs):
    code, text, report, by_stage = conform(
        capsys, tmp_path, "LambdaFromBuildInputs", "model_image", jobs, "--stages", "preprocess|vision.patch_embed"
    )
    pre = {k: r for k, r in by_stage.items() if k[1].startswith("preprocess.")}
    assert pre and all(r["status"] == "error" and "cannot be sent back" in r["metric"] for r in pre.values())
    assert by_stage[("model_image", "vision.patch_embed")]["status"] == "pass"


@JOBS
def test_a_port_that_prints_without_end_does_not_reach_the_report(capsys, tmp_path, jobs):
    code, text, report, by_stage = conform(capsys, tmp_path, "ChattyTokenizer", "exact_prompt", jobs)
    assert code == 0 and set(r["status"] for r in report["results"]) == {"pass"}
    assert len(text) < 20_000 and "port log line" not in text and "RESULT: PASS" in text


@JOBS
def test_a_memory_hog_is_stopped_by_the_limit(capsys, tmp_path, jobs):
    code, text, report, by_stage = conform(
        capsys, tmp_path, "MemoryHogInWindows", "exact_(windows|resize)", jobs, "--memory-limit", "1.5"
    )
    key = ("exact_windows", "fn.window_partition")
    assert_only(by_stage, key)
    assert "exceeded the memory limit" in by_stage[key]["metric"] and "1.50 GiB" in by_stage[key]["metric"]


def test_the_memory_of_the_ports_helper_processes_counts_against_the_limit(capsys, tmp_path):
    code, text, report, by_stage = conform(
        capsys, tmp_path, "ChildMemoryHogInWindows", "exact_(windows|resize)", 1, "--memory-limit", "1.5"
    )
    key = ("exact_windows", "fn.window_partition")
    assert_only(by_stage, key)
    assert "exceeded the memory limit" in by_stage[key]["metric"]


@JOBS
def test_nan_from_the_model_is_an_error_of_that_stage(capsys, tmp_path, jobs):
    code, text, report, by_stage = conform(
        capsys, tmp_path, "NaNVision", "model_image$", jobs, "--stages", "vision\\.(patch_embed|block\\.[01])$|state"
    )
    assert by_stage[("model_image", "vision.block.0")]["status"] == "error"
    # the same NaN in both runs is the same answer: no leak between requests
    assert by_stage[("model_image", "state.repeat")]["status"] == "pass"
    assert "NaN" in by_stage[("model_image", "vision.block.0")]["metric"]
    assert by_stage[("model_image", "vision.patch_embed")]["status"] == "pass"


@JOBS
def test_every_stage_errors_and_the_reports_are_still_written(capsys, tmp_path, jobs):
    code, text, report, by_stage = conform(capsys, tmp_path, "AbortOnLoad", "exact_(windows|resize)", jobs)
    assert code == 1 and by_stage
    assert all(r["status"] == "error" for r in by_stage.values())
    assert all("signal 6 (SIGABRT)" in r["metric"] for r in by_stage.values())
    assert "RESULT: FAIL" in text


def test_tensors_without_values_and_a_garbage_description_are_errors_not_a_lost_case(capsys, tmp_path):
    """A meta or sparse tensor has no values to compare and describe() may answer None: each is an error of its
    own stage (the judge once raised inside torch and the case vanished from a passing report)."""
    code, text, report, by_stage = conform(capsys, tmp_path, "OddTensorsNoDescription", "model_image$", 1)
    assert code == 1 and "describe() returned NoneType, not a dict" in text
    for stage, kind in (("text.norm", "meta device"), ("vision.merger", "layout torch.sparse_coo")):
        r = by_stage[("model_image", stage)]
        assert r["status"] == "error" and kind in r["metric"], r
    assert by_stage[("model_image", "vision.block.0")]["status"] == "pass"
    assert by_stage[("model_image", "state.repeat")]["status"] == "pass"


def test_a_port_that_writes_into_its_inputs_changes_nothing_in_process(capsys, tmp_path):
    """In process the port is handed copies: scribbling over its input tensors after computing leaves the
    fixtures' inputs and the diagnosis's feeds as they were (supervised, pickling copies them anyway)."""
    code, text, report, by_stage = conform(
        capsys, tmp_path, "ScribblesOverItsInputs", "model_image$", 1, "--in-process"
    )
    assert code == 0 and {r["status"] for r in by_stage.values()} == {"pass"}, text


def test_a_misspelt_stage_key_is_an_error_of_the_stage_it_meant(capsys, tmp_path):
    code, text, report, by_stage = conform(capsys, tmp_path, "MisspeltKeys", "model_image$", 1, "--stages", "vision")
    r = by_stage[("model_image", "vision.block.0")]
    assert r["status"] == "error" and "not captured under its name, but as 'vision.blocks.0'" in r["metric"]
    assert by_stage[("model_image", "vision.block.1")]["status"] == "pass" and code == 1


def test_ctrl_c_stops_the_run_cleanly_and_writes_no_report(tmp_path):
    """SIGINT to the harness while a port hangs: exit 130 with one line, no traceback, no report half written."""
    import signal
    import subprocess
    import sys
    import time

    out_json = tmp_path / "r.json"
    argv = [sys.executable, "-m", "qwen25vl.tools.cli", "conform", "--target", HOSTILE + "NativeHangInWindows"]
    argv += ["--cases", "exact_windows", "--timeout", "60", "--json", str(out_json)]
    # as from a shell: SIGINT at its default (a pytest-xdist worker ignores it, and a child would inherit that)
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(8)  # the worker is up and hanging in fn.window_partition
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; no report written" in err and "Traceback" not in err
    assert not out_json.exists() and not list(tmp_path.iterdir())
