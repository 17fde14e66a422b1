"""Expectations files: a port's known, explained divergences, turned into xfail (or xpass)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .results import BAD, StageResult


def load_expectations(path: str | Path | None) -> list[dict]:
    """An expectations file: {"port": ..., "expectations": [{"case": regex, "stage": regex,
    "status": "fail"|"error"|"not_covered" or a list of them, "reason": ...}]}; regexes match the whole
    name. "pass" in the list marks a divergence that sits at its budget's edge, where another CPU's rounding
    decides: a pass there keeps its status and notes the reason, where otherwise it is xpass (stale)."""
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
    return out


def apply_expectations(results: list[StageResult], expectations: list[dict]) -> None:
    """Known divergences become xfail (with their reason); an expected failure that passed is xpass."""
    for r in results:
        for e in expectations:
            if re.fullmatch(e["case"], r.case) and re.fullmatch(e["stage"], r.stage):
                want = e.get("status", "fail")
                want = [want] if isinstance(want, str) else want
                if r.status in BAD and r.status in want:
                    r.status, r.note = "xfail", f"expected: {e['reason']}"
                elif r.status == "not_covered" and "not_covered" in want:
                    r.note = f"known: {e['reason']}"
                elif r.status == "pass" and "pass" in want:  # a known divergence at its budget's edge
                    r.note = f"known, within budget here: {e['reason']}"
                elif r.status == "pass":
                    r.status, r.note = "xpass", f"expected to fail ({e['reason']}) but passed"
                break
