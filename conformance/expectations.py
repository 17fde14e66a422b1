"""Expectations files: a port's known, explained divergences, turned into xfail (or xpass)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from . import stages
from .results import BAD, HARNESS_SAID, StageResult


def load_expectations(path: str | Path | None) -> list[dict]:
    """An expectations file: {"port": ..., "expectations": [{"case": regex, "stage": regex,
    "status": "fail"|"error"|"not_covered" or a list of them, "reason": ..., "at_most": x}]}; regexes
    match the whole name. "pass" in the list marks a divergence that sits at its budget's edge, where another
    CPU's rounding decides: a pass there keeps its status and notes the reason, where otherwise it is xpass
    (stale). at_most (optional, float and logit stages) bounds the known divergence: a failure past it stays
    a failure, since a new bug hides behind a known one at the same stage."""
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"expectations file {path}: {e}") from None
    out = data.get("expectations", []) if isinstance(data, dict) else None
    if not isinstance(out, list):
        raise ValueError(f'expectations file {path}: expected {{"expectations": [...]}}')
    for k, e in enumerate(out):
        for key in ("case", "stage", "reason"):
            if key not in e:
                raise ValueError(f"{path}: expectation {k} lacks {key!r}")
        bound = e.get("at_most")
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0):
            raise ValueError(f"{path}: expectation {k}: at_most must be a positive number, not {bound!r}")
    return out


def apply_expectations(results: list[StageResult], expectations: list[dict]) -> None:
    """Known divergences become xfail (with their reason); an expected failure that passed is xpass."""
    for r in results:
        for e in expectations:
            if re.fullmatch(e["case"], r.case) and re.fullmatch(e["stage"], r.stage):
                want = e.get("status", "fail")
                want = [want] if isinstance(want, str) else want
                past = _past_bound(r, e.get("at_most"))
                if r.status in BAD and r.status in want and past:
                    r.note = f"worse than expected: {past}; known: {e['reason']}" + (
                        HARNESS_SAID + r.note if r.note else ""
                    )
                elif r.status in BAD and r.status in want:
                    # the harness's own diagnosis stays beside the reason: it tells whether this is still that
                    r.status, r.note = "xfail", f"expected: {e['reason']}" + (HARNESS_SAID + r.note if r.note else "")
                elif r.status == "not_covered" and "not_covered" in want:
                    r.note = f"known: {e['reason']}"
                elif r.status == "pass" and "pass" in want:  # a known divergence at its budget's edge
                    r.note = f"known, within budget here: {e['reason']}"
                elif r.status == "pass":
                    r.status, r.note = "xpass", f"expected to fail ({e['reason']}) but passed"
                break


def _own_error(r: StageResult) -> tuple[float | None, str]:
    """The stage's own error and 'local ' or '': the local one where the harness fed it the port's own
    upstream value (diagnosis.py), since an upstream divergence is judged at its own stage; else end to end.
    The number is the one the stage is judged on: rel for float stages, mean KL for logits; None for others."""
    local = (r.local or {}).get("value")
    if isinstance(local, (int, float)) and local == local:
        return local, "local "
    values = r.values if isinstance(r.values, dict) else {}
    value = values.get("rel", values.get("mean_kl"))
    return (value, "") if isinstance(value, (int, float)) and value == value else (None, "")


def _past_bound(r: StageResult, bound: float | None) -> str:
    """'' when the stage's own error (_own_error) is within the expectation's bound (or either is absent),
    else what was measured against what was allowed."""
    value, said = _own_error(r)
    if bound is None or value is None or value <= bound:
        return ""
    return f"{said}{'KL' if r.stage == 'logits' else 'rel'} {value:.2e} > at_most {bound:.2e}"


# a drafted bound: this many times the largest error measured, so another CPU's rounding stays inside it
DRAFT_MARGIN = 10


def draft_expectations(results: list[StageResult], port: str, previous: list[dict] | None = None) -> dict:
    """An expectations file that turns this run's unexpected failures into xfail: `previous` entries first,
    then one entry per case and stage family (text.layer.{i} as one regex) with the statuses seen, a reason
    to be written (the harness's diagnosis of the first one is quoted in it) and, where every one was
    measured, at_most = DRAFT_MARGIN x the largest own error, one significant digit, rounded up."""
    groups: dict[tuple[str, str], list[StageResult]] = {}
    for r in results:
        if r.status in BAD:
            groups.setdefault((r.case, stages.template(r.stage)), []).append(r)
    drafted = []
    for (case, family), rows in groups.items():
        entry = {
            "case": re.escape(case),
            "stage": re.escape(family).replace(re.escape("{i}"), r"\d+"),
            "status": sorted({r.status for r in rows}),
            "reason": "TO EXPLAIN (why the port differs here, and why that is acceptable); the harness said: "
            + (rows[0].note or rows[0].metric),
        }
        errors = [_own_error(r)[0] for r in rows]
        if all(e is not None and e > 0 for e in errors):
            bound = DRAFT_MARGIN * max(errors)
            step = 10 ** math.floor(math.log10(bound))
            entry["at_most"] = float(f"{math.ceil(bound / step) * step:.1g}")
        drafted.append(entry)
    return {"port": port, "expectations": list(previous or []) + drafted}
