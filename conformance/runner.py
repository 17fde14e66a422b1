"""Run a suite of fixture cases against a target and collect the results.

The parts, one concern each (as onnx's backend test loader / runner / case split):
  targets.py       a target name -> an adapter object
  supervisor.py    the adapter in a supervised worker process (crashes, hangs, memory)
  case_runner.py   one case: every stage judged (golden.py: the checkpoint; locate.py: where)
  expectations.py  known divergences -> xfail / xpass
  results.py       StageResult, the first divergence
  this module      the suite: which cases, how many workers, in which process
"""

from __future__ import annotations

import copy
import re
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .adapters.base import Adapter
from .case_runner import CaseRunner
from .expectations import apply_expectations, load_expectations  # noqa: F401  (the suite's API)
from .fixtures import find_cases
from .mistakes.agreement import reconcile
from .results import BAD, StageResult, first_divergence  # noqa: F401  (the suite's API)
from .supervisor import PortCrashed, PortFailed, SupervisedAdapter, default_memory_limit
from .targets import make_adapter


@dataclass
class SuiteOptions:
    target: str = "impl"
    dtype: str | None = None
    device: str | None = None
    timeout: float | None = 120.0  # seconds per port call; None: no limit
    teacher: str = "first"
    only_stages: str | None = None
    in_process: bool = False  # call the port in this process (for a debugger); a crash ends the run
    profile: object = None  # precision per stage pattern (precision.py); None: the port's own declaration
    diagnose: bool = True  # local errors, precision signatures and known mistakes (diagnosis.py)
    repeat: bool = True  # run the model cases again in reverse order: state.repeat (case_runner.py)
    memory_limit: int | None = field(default_factory=default_memory_limit)  # bytes resident, supervised only


def select_cases(fixtures: str | Path, only: str | None = None) -> list[Path]:
    paths = find_cases(fixtures)
    if only:
        rx = re.compile(only)
        paths = [p for p in paths if rx.search(p.name)]
    return paths


def _run_supervised(paths: list[Path], opts: SuiteOptions, jobs: int) -> tuple[dict, list[StageResult]]:
    """Each of `jobs` supervised workers takes the next case until none is left (a crash costs only
    the stage that was running: see supervisor.py). BadTarget (a ValueError) is raised before any case."""
    n = max(1, min(jobs, len(paths)))
    adapters = [
        SupervisedAdapter(
            opts.target,
            dtype=opts.dtype,
            device=opts.device,
            timeout=opts.timeout,
            memory_limit=opts.memory_limit,
            threads=1 if n > 1 else None,
        )
        for _ in range(n)
    ]
    try:
        try:
            desc = adapters[0].describe()
        except (PortCrashed, PortFailed) as e:  # the report is still written: every stage says why
            desc = {
                "name": opts.target,
                "dtype": opts.dtype or "float32",
                "device": opts.device or "cpu",
                "error": str(e),
            }
            for a in adapters:
                a._description = desc
        queue = list(enumerate(paths))
        lock = threading.Lock()
        rows: dict[int, list[StageResult]] = {}

        def work(adapter: SupervisedAdapter) -> None:
            runner = CaseRunner(
                adapter,
                timeout=None,
                teacher=opts.teacher,
                only_stages=opts.only_stages,
                profile=opts.profile,
                diagnose=opts.diagnose,
            )
            mine = []
            while True:
                with lock:
                    if not queue:
                        break
                    k, path = queue.pop(0)
                rows[k] = run_case(runner, path)
                mine.append(k)
            if opts.repeat and mine:  # the same worker, the same adapter: its model cases once more
                rows[mine[-1]] = rows[mine[-1]] + run_case(runner, None)

        threads = [threading.Thread(target=work, args=(a,), daemon=True) for a in adapters]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        restarts = sum(a.restarts for a in adapters)
    finally:
        for a in adapters:
            a.close()
    desc = {**desc, "workers": n, "worker_restarts": restarts}
    return desc, [r for k in sorted(rows) for r in rows[k]]


def run_case(runner: CaseRunner, path: Path | None) -> list[StageResult]:
    """runner.run(path) (runner.repeat() for None), or, should the harness itself fail on what a port
    returned, one error row that says so: the case is still in the report and the run is not a pass (a lost
    case must never read as success)."""
    try:
        return runner.repeat() if path is None else runner.run(path)
    except Exception as e:  # a harness bug: reported, never swallowed into a shorter, passing report
        return [
            StageResult(
                "state.repeat" if path is None else Path(path).name,
                "harness",
                "error",
                note=f"the harness failed while judging this case ({traceback.format_exception_only(e)[-1].strip()} "
                f"at {_innermost(e)}); the port's answers were not judged: please report it, with this case",
            )
        ]


class OnCopies:
    """An adapter called in the harness's own process, on copies of what it is handed: a port that writes into
    its input tensors would otherwise change the fixtures' inputs and the feeds the harness judges other
    stages on (a supervised worker gets copies anyway, by pickling). Everything else passes through."""

    def __init__(self, adapter: Adapter):
        self._adapter = adapter

    def __getattr__(self, name: str):
        attr = getattr(self._adapter, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def on_copies(*args, **kwargs):
            return attr(*copy.deepcopy(args), **copy.deepcopy(kwargs))

        return on_copies


def _innermost(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"


def run_suite(
    paths: list[Path],
    opts: SuiteOptions,
    *,
    jobs: int = 1,
    expectations: list[dict] | None = None,
    adapter: Adapter | None = None,
) -> tuple[dict, list[StageResult]]:
    """Run every case; returns (the adapter's description, results in case then data-flow order).

    By default the target runs in supervised worker processes (`jobs` of them). With an adapter
    object, or opts.in_process, it is called in this process (timeouts by SIGALRM, no crash safety)."""
    if adapter is None and not opts.in_process:
        desc, results = _run_supervised(paths, opts, jobs)
    else:
        adapter = OnCopies(adapter or make_adapter(opts.target, dtype=opts.dtype, device=opts.device))
        runner = CaseRunner(
            adapter,
            timeout=opts.timeout,
            teacher=opts.teacher,
            only_stages=opts.only_stages,
            profile=opts.profile,
            diagnose=opts.diagnose,
        )
        results = [r for p in paths for r in run_case(runner, p)]
        if opts.repeat:
            results += run_case(runner, None)
        desc = adapter.describe()
    if opts.diagnose:  # a name one case's coincidence made, and the rest of the run rules out, is not said
        reconcile(results, paths)
    apply_expectations(results, expectations or [])
    return desc, results
