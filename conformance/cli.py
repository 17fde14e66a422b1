"""`qwen25vl conform`: the harness's command line (the `qwen25vl` dispatcher is qwen25vl/cli.py).

qwen25vl conform                         the whole bundled suite against impl
qwen25vl conform --target spec|transformers|files:DIR|module:Class
qwen25vl conform --cases model_ --stages 'vision\\.' --jobs 2 --json r.json --junit r.xml
qwen25vl conform --export-inputs DIR     inputs of every case, for a port in another language
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import report, runner

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "fixtures"
EXPECTATIONS = Path(__file__).resolve().parent / "expectations"


def default_expectations(target: str) -> Path | None:
    """conformance/expectations/<target>.json when it exists (module:Class and files:DIR use their prefix)."""
    path = EXPECTATIONS / f"{target.split(':')[0]}.json"
    return path if path.is_file() else None


def conform_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwen25vl conform",
        description="Judge a Qwen2.5-VL port stage by stage against the spec's golden fixtures.",
    )
    p.add_argument(
        "--target",
        default="impl",
        help="impl (default), spec, transformers, files:DIR (outputs written by a port), module:Class",
    )
    p.add_argument("--fixtures", default=str(BUNDLED), help=f"fixture folder (default: the bundled {BUNDLED})")
    p.add_argument("--cases", default=None, help="regex on case names")
    p.add_argument("--stages", default=None, help="regex on stage names")
    p.add_argument("--dtype", default=None, help="dtype the target runs in (default: the adapter's)")
    p.add_argument("--device", default=None, help="device for the target (default: the adapter's)")
    p.add_argument("--jobs", "-j", type=int, default=1, help="cases run in N processes")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per port call (default 120)")
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


def conform(argv: list[str]) -> int:
    args = conform_parser().parse_args(argv)
    try:
        paths = runner.select_cases(args.fixtures, args.cases)
    except ValueError as e:
        print(f"qwen25vl conform: {e}", file=sys.stderr)
        return 2
    if not paths:
        print(
            f"qwen25vl conform: no fixture case under {args.fixtures}"
            + (f" matches {args.cases!r}" if args.cases else ""),
            file=sys.stderr,
        )
        return 2
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
            print(f"qwen25vl conform: {e}", file=sys.stderr)
            return 2
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
        timeout=args.timeout,
        teacher=args.teacher_forced,
        only_stages=args.stages,
    )
    t0 = time.perf_counter()
    try:
        expectations = [] if args.no_expectations else runner.load_expectations(exp_path)
        # one process: build the adapter here, so a bad target fails before any case runs
        adapter = runner.make_adapter(args.target, dtype=args.dtype, device=args.device) if args.jobs <= 1 else None
        desc, results = runner.run_suite(paths, opts, jobs=args.jobs, expectations=expectations, adapter=adapter)
    except ValueError as e:
        print(f"qwen25vl conform: {e}", file=sys.stderr)
        return 2
    secs = time.perf_counter() - t0
    print(report.render(desc, results, verbose=args.verbose, seconds=secs))
    if args.json:
        Path(args.json).write_text(report.to_json(desc, results, secs), encoding="utf-8")
    if args.junit:
        Path(args.junit).write_text(report.to_junit(desc, results), encoding="utf-8")
    return report.exit_code(results)


if __name__ == "__main__":
    sys.exit(conform(sys.argv[1:]))
