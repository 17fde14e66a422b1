"""`qwen25vl conform`: the harness's command line (the `qwen25vl` dispatcher is tools/cli.py).

qwen25vl conform                         the whole bundled suite against impl
qwen25vl conform --target spec|transformers|files:DIR|module:Class
qwen25vl conform --cases model_ --stages 'vision\\.' --jobs 2 --json r.json --junit r.xml
qwen25vl conform --export-inputs DIR     inputs of every case, for a port in another language
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from . import chunked, report, runner, stages
from .expectations import draft_expectations
from .precision import PRECISIONS, Profile
from .repeat import REPEAT_STAGE

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "fixtures"
EXPECTATIONS = Path(__file__).resolve().parent / "expectations"


def default_expectations(target: str) -> Path | None:
    """conformance/expectations/<target>.json when it exists (module:Class and files:DIR use their prefix)."""
    path = EXPECTATIONS / f"{target.split(':')[0]}.json"
    return path if path.is_file() else None


def _llama_cpp_setup(tree: str | None) -> None:
    """--target llama.cpp: the tree goes to the workers through the environment, and the tap is built here,
    once, before any worker starts (its first build takes minutes; a worker's call timeout would cut it)."""
    from .adapters import llama_cpp

    if tree is not None:
        os.environ["QWEN25VL_LLAMA_CPP_SRC"] = tree
    os.environ["QWEN25VL_LLAMA_CPP_TAP"] = str(llama_cpp.ensure_tap(llama_cpp.llama_cpp_source()))


def conform_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwen25vl conform",
        description="Judge a Qwen2.5-VL port stage by stage against the spec's golden fixtures.",
    )
    p.add_argument(
        "--target",
        default="impl",
        help="impl (default), spec, transformers, mlx-vlm, llama.cpp, vllm, sglang, files:DIR (outputs written by "
        "a port), module:Class",
    )
    p.add_argument(
        "--llama-cpp",
        default=None,
        metavar="DIR",
        help="--target llama.cpp: the llama.cpp source tree to build the tap against (default: "
        "$QWEN25VL_LLAMA_CPP_SRC, else the tree llama-cpp-python 0.3.36's sdist vendors, downloaded)",
    )
    p.add_argument("--fixtures", default=str(BUNDLED), help=f"fixture folder (default: the bundled {BUNDLED})")
    p.add_argument("--cases", default=None, help="regex on case names")
    p.add_argument("--stages", default=None, help="regex on stage names")
    p.add_argument("--dtype", default=None, help="dtype the target runs in (default: the adapter's)")
    p.add_argument("--device", default=None, help="device for the target (default: the adapter's)")
    p.add_argument("--jobs", "-j", type=int, default=1, help="cases run in N supervised worker processes")
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds allowed per port call; past it the worker is killed and the stage is an error "
        "(default 120; 0: no limit)",
    )
    p.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        metavar="GIB",
        help="resident memory allowed to the port's worker, GiB (default: 80%% of this machine's memory)",
    )
    p.add_argument(
        "--profile",
        default=None,
        help='precision per stage pattern, as JSON or one precision for all: \'{"vision.patch_embed": '
        '"float16-inputs", "vision.*": "float32"}\' (default: the port\'s own, from describe() or port.json); '
        "precisions: " + ", ".join(PRECISIONS),
    )
    p.add_argument(
        "--no-diagnosis",
        action="store_true",
        help="judge end to end only: no local errors, precision signatures or known-mistake matching",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="call the port in the harness's own process, for a debugger (a crash then ends the run)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="target impl only: judge the tensor-parallel model, sharded over N ranks; run under "
        "`torchrun --nproc-per-node N` (in process; rank 0 prints and writes the report)",
    )
    p.add_argument(
        "--teacher-forced",
        choices=("first", "all", "none"),
        default="first",
        help="rerun stages fed the golden input: the first failing one (default), all, none",
    )
    p.add_argument(
        "--expectations",
        default=None,
        help="known divergences (default: conformance/expectations/<target>.json when it exists)",
    )
    p.add_argument("--no-expectations", action="store_true", help="report known divergences as failures")
    p.add_argument(
        "--draft-expectations",
        default=None,
        metavar="FILE",
        help="write the expectations in use plus one entry per new failure (reason to write, at_most measured)",
    )
    p.add_argument("--json", default=None, help="write the report as JSON")
    p.add_argument("--junit", default=None, help="write the report as JUnit XML")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per stage, passing ones too")
    p.add_argument(
        "--export-inputs",
        default=None,
        metavar="DIR",
        help="write every case's inputs for a port in another language, then exit",
    )
    p.add_argument("--list", action="store_true", help="list the cases and their stages, then exit")
    return p


def _fail(message: str) -> int:
    print(f"qwen25vl conform: {message}", file=sys.stderr)
    return 2


def _compile(flag: str, pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{flag} {pattern!r} is not a valid regular expression: {e}") from None


def _check_output_path(flag: str, path: str | None) -> None:
    """A report path must be writable before the run starts, not after it."""
    if path is None:
        return
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    if not out.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {out.parent} is not writable")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps, xpu)") from None
    available = {
        "cpu": lambda: True,
        "cuda": torch.cuda.is_available,
        "mps": lambda: hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }.get(dev.type)
    if available is None:
        raise ValueError(f"--device {device!r}: device type {dev.type!r} is not supported here (cpu, cuda, mps, xpu)")
    if not available():
        raise ValueError(f"--device {device!r}: no {dev.type} device on this machine")


def _write_atomically(path: str, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a report."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as an open() would have made it: mkstemp makes it private
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stage_names(paths: list[Path]) -> list[str]:
    from .fixtures import load_case

    names: set[str] = set()
    for p in paths:
        try:
            case = load_case(p, verify=False)
        except ValueError:
            continue
        names |= set(case.stages)
        # the runner adds state.chunked to a case with a generation (chunked.py), and state.repeat to every
        # model case (repeat.py)
        names |= {chunked.STAGE} if chunked.applies(case) else set()
        names |= {REPEAT_STAGE} if case.kind == "model" else set()
    return sorted(names, key=lambda n: stages.order_key(n) if stages.is_known(n) else (-1, 0))


def _check_tp(args) -> None:
    """--tp N: the impl target, in process (a supervised worker cannot join the ranks' group), one job."""
    if args.tp < 1:
        raise ValueError(f"--tp {args.tp}: must be at least 1")
    if args.tp == 1:
        return
    if args.target != "impl":
        raise ValueError(f"--tp {args.tp} shards qwen25vl.impl; target {args.target!r} is not impl")
    if args.jobs > 1:
        raise ValueError(f"--tp {args.tp} runs the cases in the ranks' own processes: drop --jobs")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp:
        raise ValueError(f"--tp {args.tp} must run under `torchrun --nproc-per-node {args.tp}` (WORLD_SIZE is {world})")


def _tp_adapter(args):
    """This rank's ImplAdapter over the torchrun group; ranks other than 0 print nothing and write no report."""
    from .adapters.impl import ImplAdapter

    adapter, rank = ImplAdapter.under_torchrun(args.tp, dtype=args.dtype, device=args.device)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - every rank judges the same stages; one reports
        args.json = args.junit = args.draft_expectations = None
    return adapter


def conform(argv: list[str]) -> int:
    args = conform_parser().parse_args(argv)
    # everything the command line can get wrong is refused here, before any work
    try:
        cases_rx = _compile("--cases", args.cases)
        stages_rx = _compile("--stages", args.stages)
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: must be at least 1")
        if args.timeout < 0 or args.timeout != args.timeout:
            raise ValueError(f"--timeout {args.timeout:g}: must be a number of seconds >= 0 (0: no limit)")
        if args.memory_limit is not None and not args.memory_limit > 0:
            raise ValueError(f"--memory-limit {args.memory_limit:g}: must be a positive number of GiB")
        if args.in_process and args.jobs > 1:
            raise ValueError("--in-process runs one case at a time: drop --jobs")
        _check_tp(args)
        _check_output_path("--json", args.json)
        _check_output_path("--junit", args.junit)
        _check_output_path("--draft-expectations", args.draft_expectations)
        outputs = [(k, os.path.realpath(v)) for k, v in (("--json", args.json), ("--junit", args.junit),
                   ("--draft-expectations", args.draft_expectations)) if v]  # fmt: skip
        for i, (k, path) in enumerate(outputs):
            same = next((k2 for k2, p2 in outputs[i + 1 :] if p2 == path), None)
            if same:
                raise ValueError(f"{k} and {same} name the same file {path}: one would overwrite the other")
        _check_device(args.device)
        profile = (
            None if args.profile is None else Profile.parse(args.profile, args.dtype or "float32", source="--profile")
        )
        all_paths = runner.select_cases(args.fixtures)
    except ValueError as e:
        return _fail(str(e))
    if not all_paths:
        return _fail(f"no fixture case under {args.fixtures}")
    paths = [p for p in all_paths if cases_rx is None or cases_rx.search(p.name)]
    if not paths:
        names = ", ".join(p.name for p in all_paths)
        return _fail(f"--cases {args.cases!r} matches no case; the cases are: {names}")
    if stages_rx is not None:
        names = _stage_names(paths)
        if not any(stages_rx.search(n) for n in names):
            return _fail(
                f"--stages {args.stages!r} matches no stage of the selected cases; the stages are: " + ", ".join(names)
            )
    if args.list:
        from .fixtures import load_case

        for p in paths:
            c = load_case(p, verify=False)
            print(f"{c.name:<28} {c.kind:<6} {len(c.stages):>3} stages  {c.manifest.get('description', '')}")
        return 0
    if args.export_inputs:
        from .adapters.files import export_inputs

        try:
            names = export_inputs(paths, args.export_inputs)
        except (ValueError, OSError) as e:
            return _fail(str(e))
        print(
            f"wrote the inputs of {len(names)} cases under {args.export_inputs} "
            "(output layout: conformance/adapters/files.py, fixtures/FORMAT.md)"
        )
        return 0
    exp_path = args.expectations
    if exp_path is None and not args.no_expectations:
        exp_path = default_expectations(args.target)
    opts = runner.SuiteOptions(
        target=args.target,
        dtype=args.dtype,
        device=args.device,
        timeout=args.timeout or None,
        teacher=args.teacher_forced,
        only_stages=args.stages,
        in_process=args.in_process or args.tp > 1,
        profile=profile,
        diagnose=not args.no_diagnosis,
    )
    if args.memory_limit is not None:
        opts.memory_limit = int(args.memory_limit * 2**30)
    t0 = time.perf_counter()
    try:
        if args.llama_cpp is not None or args.target == "llama.cpp":
            _llama_cpp_setup(args.llama_cpp)
        expectations = [] if args.no_expectations else runner.load_expectations(exp_path)
        # in process: build the adapter here, so a bad target fails before any case runs (the
        # supervised workers report a bad target the same way, from their first call)
        if args.tp > 1:
            adapter = _tp_adapter(args)
        elif args.in_process:
            adapter = runner.make_adapter(args.target, dtype=args.dtype, device=args.device)
        else:
            adapter = None
        desc, results = runner.run_suite(paths, opts, jobs=args.jobs, expectations=expectations, adapter=adapter)
    except ValueError as e:
        return _fail(str(e))
    except KeyboardInterrupt:  # the workers are gone (run_suite closes them); no report is half written
        print("qwen25vl conform: interrupted; no report written", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # the judging threads may still be inside torch: leave now, as a normal exit would abort over them
        os._exit(130)
    secs = time.perf_counter() - t0
    print(report.render(desc, results, verbose=args.verbose, seconds=secs))
    if args.json:
        _write_atomically(args.json, report.to_json(desc, results, secs))
    if args.junit:
        _write_atomically(args.junit, report.to_junit(desc, results))
    if args.draft_expectations:
        draft = draft_expectations(results, desc.get("name") or args.target, previous=expectations)
        _write_atomically(args.draft_expectations, json.dumps(draft, indent=1, ensure_ascii=False) + "\n")
        new = len(draft["expectations"]) - len(expectations)
        print(
            f"wrote {args.draft_expectations}: {len(expectations)} expectations kept, {new} drafted (write their reasons)"
        )
    return report.exit_code(results)


if __name__ == "__main__":
    sys.exit(conform(sys.argv[1:]))
