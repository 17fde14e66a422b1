"""Reports: a terminal table, the first divergent stage explained, JSON and JUnit XML."""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET
from collections import Counter

from . import stages
from .results import BAD, HARNESS_SAID, StageResult, first_divergence

ORDER = ("pass", "fail", "error", "not_covered", "xfail", "xpass")


def summary(results: list[StageResult]) -> dict:
    c = Counter(r.status for r in results)
    return {s: c.get(s, 0) for s in ORDER} | {"total": len(results)}


def coverage(results: list[StageResult]) -> dict:
    """How much of the suite the port was judged on: a stage it does not expose is not covered."""
    judged = [r for r in results if r.mode != "teacher"]
    missing = [f"{r.case}/{r.stage}" for r in judged if r.status == "not_covered"]
    return {"covered": len(judged) - len(missing), "total": len(judged), "not_covered": missing}


def exit_code(results: list[StageResult]) -> int:
    """0 when nothing failed or errored unexpectedly, 1 otherwise."""
    return int(any(r.status in BAD for r in results))


def _cut(s: str, n: int) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def table(results: list[StageResult], *, verbose: bool = False) -> str:
    """One line per stage: case, stage, status, metric, tolerance. Passing stages of a passing case
    are folded into one line, and stages not covered are left to one summary line, unless verbose;
    verbose also prints the full texts (metric, where, note) under each line."""
    lines = [f"{'case':<24} {'stage':<26} {'status':<11} {'precision':<15} {'metric':<46} tolerance", "-" * 156]
    by_case: dict[str, list[StageResult]] = {}
    for r in results:
        by_case.setdefault(r.case, []).append(r)
    for case, rows in by_case.items():
        shown = rows if verbose else [r for r in rows if r.status != "not_covered"]
        if not shown:
            continue
        if not verbose and all(r.status == "pass" for r in shown):
            lines.append(f"{_cut(case, 24):<24} {f'{len(shown)} stages':<26} {'pass':<11}")
            continue
        for r in shown:
            st = r.status.upper() if r.status in BAD else r.status
            if r.mode == "teacher":
                st += "(tf)"
            elif r.status == "pass" and r.note.startswith("drift inherited"):
                st = "pass/drift"  # over its end-to-end budget, right on its own input
            lines.append(
                f"{_cut(case, 24):<24} {_cut(r.stage, 26):<26} {st:<11} {r.precision:<15} {_cut(r.metric, 46):<46} "
                f"{_cut(r.tolerance, 60)}"
            )
            if verbose:
                local = f"{r.local['metric']} (budget {r.local['tolerance']}; fed {r.local['fed']})" if r.local else ""
                for label, text in (("metric", r.metric), ("local", local), ("where", r.where), ("note", r.note)):
                    if text and (label != "metric" or len(str(text)) > 46):
                        lines.append(f"{'':<27}{label}: {text}")
            elif r.note and r.status != "pass":  # the diagnosis in full: it is what a port author reads
                note = r.note.split(HARNESS_SAID)[0] if r.status == "xfail" else r.note  # -v has the rest
                lines += textwrap.wrap(" ".join(note.split()), 150, initial_indent=" " * 27, subsequent_indent=" " * 29)
    return "\n".join(lines)


def not_covered_line(results: list[StageResult]) -> str | None:
    """'not covered: 70 stages (fn.smart_resize x1, vision.block.* x12, ...); -v lists them'."""
    rows = [r for r in results if r.status == "not_covered" and r.mode != "teacher"]
    if not rows:
        return None
    groups = Counter(stages.template(r.stage).replace("{i}", "*") for r in rows)
    text = ", ".join(f"{k}" + (f" x{n}" if n > 1 else "") for k, n in groups.items())
    return f"not covered: {len(rows)} stages ({_cut(text, 400)}); -v lists them"


def explain(r: StageResult) -> str:
    """The first divergent stage: what it means, where it went wrong, which spec function to read."""
    try:
        st = stages.info(r.stage)
        meaning, read = st.meaning, st.read
    except KeyError:
        meaning, read = "the fixture case itself", "fixtures/FORMAT.md"
    out = [
        f"FIRST DIVERGENCE  case {r.case}, stage {r.stage}: {r.status}",
        f"  metric     {r.metric}",
        f"  tolerance  {r.tolerance}",
    ]
    if r.precision:
        out.append(f"  precision  {r.precision}")
    if r.local:
        out.append(f"  local      {r.local['metric']} (budget {r.local['tolerance']}; fed {r.local['fed']})")
    if r.where:
        out.append(f"  where      {_cut(r.where, 600)}")
    if r.note:
        out.append(f"  note       {r.note}")
    out += [f"  meaning    {meaning}", f"  read       {read}"]
    return "\n".join(out)


def render(desc: dict, results: list[StageResult], *, verbose: bool = False, seconds: float | None = None) -> str:
    s = summary(results)
    head = (
        f"qwen25vl conform: target {desc.get('name', '?')} {desc.get('version', '')} "
        f"dtype {desc.get('dtype', '?')} device {desc.get('device', '?')}"
        + (f" tensor-parallel {desc['tp']} ranks" if desc.get("tp") else "")
    )
    if desc.get("error"):  # describe() failed or answered garbage: said once, at the top
        head += f"\n(the port's description: {desc['error']})"
    lines = [head, table(results, verbose=verbose), ""]
    first = first_divergence(results)
    if first:
        lines += [explain(first), ""]
    tail = ", ".join(f"{s[k]} {k}" for k in ORDER if s[k]) or "nothing run"
    lines.append(f"{s['total']} stages: {tail}" + (f" in {seconds:.1f} s" if seconds is not None else ""))
    if not verbose and (nc := not_covered_line(results)):
        lines.append(nc)
    if desc.get("worker_restarts"):
        lines.append(f"the port's worker was restarted {desc['worker_restarts']} time(s) after a crash or hang")
    cov = coverage(results)
    lines.append(
        "RESULT: "
        + ("FAIL" if exit_code(results) else "PASS")
        + f" ({cov['covered']} of {cov['total']} stages covered)"
    )
    return "\n".join(lines)


def to_json(desc: dict, results: list[StageResult], seconds: float | None = None) -> str:
    first = first_divergence(results)
    return json.dumps(
        {
            "target": desc,
            "summary": summary(results),
            "coverage": coverage(results),
            "seconds": seconds,
            "first_divergence": first.to_dict() if first else None,
            "results": [r.to_dict() for r in results],
        },
        indent=1,
        default=str,
    )


def to_junit(desc: dict, results: list[StageResult]) -> str:
    """JUnit XML: one testsuite per case, one testcase per stage; not_covered and xfail are skipped."""
    root = ET.Element("testsuites", name=f"qwen25vl conform {desc.get('name', '')}")
    by_case: dict[str, list[StageResult]] = {}
    for r in results:
        by_case.setdefault(r.case, []).append(r)
    for case, rows in by_case.items():
        c = Counter(r.status for r in rows)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=case,
            tests=str(len(rows)),
            failures=str(c["fail"]),
            errors=str(c["error"]),
            skipped=str(c["not_covered"] + c["xfail"]),
        )
        for r in rows:
            tc = ET.SubElement(
                suite,
                "testcase",
                classname=case,
                name=r.stage + (" [teacher]" if r.mode == "teacher" else ""),
                time=f"{r.seconds:.3f}",
            )
            text = f"{r.metric} | tolerance {r.tolerance} | {r.where} | {r.note}"
            if r.status == "fail":
                ET.SubElement(tc, "failure", message=_cut(r.metric, 200)).text = text
            elif r.status == "error":
                ET.SubElement(tc, "error", message=_cut(r.metric, 200)).text = text
            elif r.status in ("not_covered", "xfail"):
                ET.SubElement(tc, "skipped", message=f"{r.status}: {_cut(r.note or r.metric, 200)}")
            else:
                ET.SubElement(tc, "system-out").text = text
    return ET.tostring(root, encoding="unicode")
