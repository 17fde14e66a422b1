"""pytest plugin: every (case, stage) of the fixtures becomes one test item.

    pytest -p qwen25vl.conformance.plugin fixtures/ --conform-target spec
    pytest -p qwen25vl.conformance.plugin fixtures/ -n 2 --dist loadfile     (pytest-xdist, one case per worker)

Each case's manifest.json is collected as a file; its stages are the items. A case runs once per
process (the first of its items runs it; the rest read the cached results), so `--dist loadfile`
keeps a case on one worker. not_covered -> skipped, an expected divergence -> xfailed, fail/error
-> failed with the harness's explanation (metric, tolerance, worst coordinates, spec function).
"""

from __future__ import annotations

import json

import pytest

from . import chunked, report, runner, stages
from .cli import default_expectations
from .fixtures import FORMAT, load_case
from .supervisor import SupervisedAdapter, default_memory_limit


def pytest_addoption(parser):
    g = parser.getgroup("qwen25vl conform")
    g.addoption("--conform-target", default="impl", help="impl (default), spec, transformers, files:DIR, module:Class")
    g.addoption("--conform-dtype", default=None, help="dtype of the target (default: the adapter's)")
    g.addoption("--conform-device", default=None, help="device of the target")
    g.addoption("--conform-timeout", type=float, default=120.0, help="seconds per port call")
    g.addoption(
        "--conform-in-process",
        action="store_true",
        help="call the port in the pytest process (for a debugger); by default it runs in a supervised worker",
    )
    g.addoption(
        "--conform-expectations",
        default=None,
        help="expectations file (default: conformance/expectations/<target>.json when it exists)",
    )


def pytest_collect_file(file_path, parent):
    if file_path.name != "manifest.json":
        return None
    try:
        fmt = json.loads(file_path.read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError):
        return None
    if fmt != FORMAT:
        return None  # e.g. the checkpoint folder's own manifest
    return CaseFile.from_parent(parent, path=file_path)


class CaseFile(pytest.File):
    def collect(self):
        case = load_case(self.path.parent, verify=False)
        # a model case with a generation is also generated with its prompt prefilled in chunks (chunked.py)
        extra = [chunked.STAGE] if chunked.applies(case) else []
        for stage in sorted([*case.stages, *extra], key=stages.order_key):
            yield StageItem.from_parent(self, name=stage, stage=stage)


class ConformanceFailure(Exception):
    def __init__(self, result):
        super().__init__(result.metric)
        self.result = result


_STATE: dict = {}


def _results(config, case_dir) -> dict:
    """Run the case once in this process; {stage: StageResult}."""
    key = str(case_dir)
    if key not in _STATE:
        if "runner" not in _STATE:  # one runner per process: the checkpoint is loaded once, not once per case
            opt = config.getoption
            target = opt("--conform-target")
            dtype, device, timeout = opt("--conform-dtype"), opt("--conform-device"), opt("--conform-timeout")
            if opt("--conform-in-process"):
                adapter = runner.make_adapter(target, dtype=dtype, device=device)
            else:  # a crash or hang of the port fails the stage that was running, not the pytest session
                adapter = SupervisedAdapter(
                    target, dtype=dtype, device=device, timeout=timeout, memory_limit=default_memory_limit()
                )
                timeout = None  # the supervisor enforces it
            exp = opt("--conform-expectations")
            _STATE["expectations"] = runner.load_expectations(default_expectations(target) if exp is None else exp)
            _STATE["runner"] = runner.CaseRunner(adapter, timeout=timeout)
        rows = _STATE["runner"].run(case_dir)
        runner.apply_expectations(rows, _STATE["expectations"])
        _STATE[key] = {}
        for r in rows:
            _STATE[key].setdefault(r.stage, r)  # the end-to-end result; a teacher-forced rerun is in its note
    return _STATE[key]


class StageItem(pytest.Item):
    def __init__(self, *, stage: str, **kwargs):
        super().__init__(**kwargs)
        self.stage = stage

    def runtest(self):
        rows = _results(self.config, self.path.parent)
        r = rows.get(self.stage) or rows.get("manifest")
        if r is None:
            pytest.skip(f"not run: {self.stage}")
        if r.status == "not_covered":
            pytest.skip(f"not covered: {r.metric}")
        if r.status == "xfail":
            pytest.xfail(r.note)
        if r.status in runner.BAD:
            raise ConformanceFailure(r)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            return report.explain(excinfo.value.result)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, 0, f"{self.path.parent.name}::{self.stage}"
