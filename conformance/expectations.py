"""Expectations files: a port's known, explained divergences, turned into xfail (or xpass)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .results import BAD, HARNESS_SAID, StageResult


def load_expectations(path: str | Path | None) -> list[dict]:
    """An expectations file: {"port": ..., "expectations": [{"case": regex, "stage": regex,
    "status": "fail"|"error"|"not_covered" or a list of them, "reason": ..., "rel_at_most": x}]}; regexes
    match the whole name. "pass" in the list marks a divergence that sits at its budget's edge, where another
    CPU's rounding decides: a pass there keeps its status and notes the reason, where otherwise it is xpass
    (stale). rel_at_most (optional, float stages) bounds the known divergence: a failure past it stays a
    failure, since a new bug hides behind a known one at the same stage."""
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
        bound = e.get("rel_at_most")
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0):
            raise ValueError(f"{path}: expectation {k}: rel_at_most must be a positive number, not {bound!r}")
    return out


def apply_expectations(results: list[StageResult], expectations: list[dict]) -> None:
    """Known divergences become xfail (with their reason); an expected failure that passed is xpass."""
    for r in results:
        for e in expectations:
            if re.fullmatch(e["case"], r.case) and re.fullmatch(e["stage"], r.stage):
                want = e.get("status", "fail")
                want = [want] if isinstance(want, str) else want
                past = _past_bound(r, e.get("rel_at_most"))
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


def _past_bound(r: StageResult, bound: float | None) -> str:
    """'' when the result's relative error is within the expectation's bound (or either is absent), else what
    was measured against what was allowed."""
    rel = r.values.get("rel") if isinstance(r.values, dict) else None
    if bound is None or not isinstance(rel, (int, float)) or rel <= bound:
        return ""
    return f"rel {rel:.2e} > rel_at_most {bound:.2e}"
