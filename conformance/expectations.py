"""Expectations files: a port's known, explained divergences, turned into xfail (or xpass)."""

from __future__ import annotations

import json
import re
from pathlib import Path

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


def _past_bound(r: StageResult, bound: float | None) -> str:
    """'' when the stage's own error is within the expectation's bound (or either is absent), else what was
    measured against what was allowed. Its own error: the local one where the harness fed it the port's own
    upstream value (diagnosis.py), since an upstream divergence is judged at its own stage; else end to end.
    The number is the one the stage is judged on: rel for float stages, mean KL for logits."""
    local = (r.local or {}).get("value")
    if isinstance(local, (int, float)) and local == local:
        value, said = local, "local "
    else:
        values = r.values if isinstance(r.values, dict) else {}
        value, said = values.get("rel", values.get("mean_kl")), ""
    if bound is None or not isinstance(value, (int, float)) or value <= bound:
        return ""
    return f"{said}{'KL' if r.stage == 'logits' else 'rel'} {value:.2e} > at_most {bound:.2e}"
