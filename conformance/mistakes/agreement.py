"""One run's names checked against each other, before the report.

Each stage names the entries that reproduce the port on that stage's own inputs (diagnosis.name_mistakes),
and one case can make two rules agree: round and ceil give the same frame count on one clip. So an entry
stays "likely mistake" only where it reproduces the port wherever it applies in the run:

  a fn.* stage of the entry (its stage or `also`), judged in the run, that fails without naming it, or
  that passes where the entry would fail it                                   rules it out
  another failing stage (any case) where the entry was tried and did not reproduce the port, with no
  earlier failure of that case's preprocessing or model run to blame instead   rules it out

An entry ruled out is said as "consistent with <name> (...) in <cases> only" with the reason; two
entries named at different places, each ruled out by the other's, are said as a conflict: "no single
known mistake explains every case: model_video_fps text.position_ids fits video_time_unscaled, ...".
The notes are rewritten in place; the names are read back from the notes, which name_mistakes writes
from the entries' own fields. A prompt (preprocess.input_ids, its mask) that differs in a case whose grid
differs too is pointed at the grid: the number of vision pads follows it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from .. import stages
from ..results import BAD, StageResult
from . import CATALOGUE, LOCK, for_stage
from ._base import Mistake

LIKELY = "likely mistake: "
NO_MATCH = "no known mistake matches"
OR = "; or "


def _fragment(m: Mistake) -> str:
    return f"{m.description} (seen in {m.seen})"  # as diagnosis.name_mistakes writes it


@functools.lru_cache(maxsize=4096)  # a run's notes are read many times over, and do not change until all are rewritten
def named_spans(note: str) -> tuple[tuple[int, int, tuple[Mistake, ...]], ...]:
    """(start, end, entries) of every 'likely mistake: ...' list in a note."""
    spans, start = [], 0
    by_length = sorted(CATALOGUE, key=lambda m: -len(_fragment(m)))
    while (k := note.find(LIKELY, start)) >= 0:
        pos, found = k + len(LIKELY), []
        while True:
            m = next((m for m in by_length if note.startswith(_fragment(m), pos)), None)
            if m is None:
                break
            found.append(m)
            pos += len(_fragment(m))
            if not note.startswith(OR, pos):
                break
            pos += len(OR)
        if found and note[pos - len(OR) : pos] == OR:  # a trailing "; or " that no entry follows
            pos -= len(OR)
        if found:
            spans.append((k, pos, tuple(found)))
        start = max(pos, k + len(LIKELY))
    return tuple(spans)


def _named(r: StageResult) -> list[Mistake]:
    return [m for _, _, found in named_spans(r.note) for m in found]


def _tried(r: StageResult) -> bool:
    """Whether the catalogue ran at r (its verdict says which entries matched, or that none did)."""
    return r.status == "fail" and (NO_MATCH in r.note or bool(named_spans(r.note)))


def _group(stage: str) -> str:
    """The model's stages run on the fixture's inputs, not on the port's preprocessing: two separate flows."""
    return "items" if stage.startswith("fn.") else "preprocess" if stage.startswith("preprocess.") else "model"


def _where(r: StageResult) -> str:
    return f"{r.case} {r.stage}"


class _Run:
    """The results of one run, with what each failing stage said of the catalogue."""

    def __init__(self, results: list[StageResult], paths: dict[str, Path], fails_alone):
        self.rows = [r for r in results if r.mode != "teacher" and stages.is_known(r.stage)]
        self.paths = paths
        self.fails_alone = fails_alone  # (entry, stage, case path) -> bool: the entry fails the fn stage alone
        self._alone: dict[tuple, bool] = {}

    def _blamed_upstream(self, r: StageResult, m: Mistake) -> bool:
        """An earlier failure of r's case and flow that m does not cover: r may fail for that one instead."""
        key = stages.order_key(r.stage)
        return any(
            o.case == r.case
            and o.status in BAD
            and _group(o.stage) == _group(r.stage) != "items"
            and stages.order_key(o.stage) < key
            and m not in for_stage(o.stage)
            for o in self.rows
        )

    def against(self, m: Mistake, here: StageResult) -> list[tuple[StageResult, str]]:
        """(result, why) for every place in the run that rules m out."""
        out = []
        own_fn = {s for s in (m.stage, *m.also) if s.startswith("fn.")}
        for o in self.rows:
            if o is here or m not in for_stage(o.stage):
                continue
            if o.stage in own_fn and o.status in ("pass", "xpass") and o.case in self.paths:
                key = (m.name, o.case, o.stage)
                if key not in self._alone:
                    try:
                        self._alone[key] = self.fails_alone(m, o.stage, self.paths[o.case])
                    except Exception:  # an entry that cannot run there rules nothing out
                        self._alone[key] = False
                if self._alone[key]:
                    out.append((o, f"{o.stage} in {o.case} rules it out (the port passes it, where {m.name} fails it)"))
            elif _tried(o) and m not in _named(o) and not self._blamed_upstream(o, m):
                if o.stage.startswith("fn."):
                    out.append(
                        (o, f"{o.stage} in {o.case} rules it out (there it does not reproduce the port's items)")
                    )
                else:
                    there = ", ".join(x.name for x in _named(o)) or "no known mistake"
                    out.append((o, f"at {_where(o)} it does not reproduce the port ({there} fits there)"))
        return out

    def rewritten(self, r: StageResult) -> str:
        """r's note with each list of names replaced by what the run allows to say."""
        note = r.note
        for start, end, found in reversed(named_spans(note)):
            note = note[:start] + self._said(r, found) + note[end:]
        return note

    def _said(self, r: StageResult, found: tuple[Mistake, ...]) -> str:
        kept, out = [], []
        conflict = [(_where(r), [m.name for m in found])]
        for m in found:
            against = self.against(m, r)
            if not against:
                kept.append(m)
                continue
            why = against[0][1] + (f" (and {len(against) - 1} more)" if len(against) > 1 else "")
            cases = sorted({o.case for o in self.rows if m in _named(o)})
            out.append(f"consistent with {m.name} ({m.description}) in {', '.join(cases)} only: {why}")
            for o, _ in against:
                if _named(o) and (_where(o), [x.name for x in _named(o)]) not in conflict:
                    conflict.append((_where(o), [x.name for x in _named(o)]))
        alike = [  # the entry's own case, where another rule gives the same answer
            f"{m.name} is not told apart from another rule here: {m.alike}"
            for m in kept
            if m.alike and re.search(m.cases, r.case)
        ]
        if not out:
            return "; ".join([LIKELY + OR.join(_fragment(m) for m in found), *alike])
        lead = []
        if kept:
            lead = [LIKELY + OR.join(_fragment(m) for m in kept), *alike]
        elif len(conflict) > 1:
            fits = ", ".join(f"{where} fits {' or '.join(names)}" for where, names in conflict)
            lead = [f"no single known mistake explains every case: {fits}"]
        return "; ".join(lead + out)


_GRIDS = {"preprocess.image_grid_thw": "image", "preprocess.video_grid_thw": "video"}


def _grid_first(results: list[StageResult]) -> None:
    """A prompt that differs where a grid of the same case differs too: its vision pads follow the grid
    (prod(grid_thw) / 4 of them), so the note points at the grid, which comes first in the data flow."""
    grids = {(r.case, r.stage): r for r in results if r.stage in _GRIDS and r.status in BAD and r.mode != "teacher"}
    for r in results:
        if r.stage not in ("preprocess.input_ids", "preprocess.attention_mask") or r.status not in BAD:
            continue
        for (case, stage), g in grids.items():
            if case != r.case:
                continue
            m = re.match(r"first at \[(\d+), \d+\]", g.where)
            kind = _GRIDS[stage]
            which = f"the grid of {kind} {m.group(1)} (from 0, over the batch)" if m else f"a {kind} grid"
            said = (
                f"{which} differs ({stage}: {g.where or g.metric}): the prompt's vision pads follow the grid "
                f"(prod(grid_thw) / 4 per item), so the prompt differs by what the grid does"
            )
            r.note = f"{said}; {r.note}" if r.note else said


def _fails_alone(m: Mistake, stage: str, path: Path) -> bool:
    """Whether entry m fails fn stage `stage` of the exact case at `path` (the port passes it there)."""
    from ..case_runner import CaseRunner  # case_runner imports this package

    runner = CaseRunner(m.adapter("float64"), timeout=None, only_stages=f"^{re.escape(stage)}$", diagnose=False)
    with LOCK:
        rows = runner.run(path)
    return any(row.stage == stage and row.status in BAD for row in rows)


def reconcile(results: list[StageResult], paths, *, fails_alone=_fails_alone) -> None:
    """Rewrite the notes of `results` (one run over the case folders `paths`) so that no entry is named where
    the run rules it out (the module doc). fails_alone(entry, stage, case path): injected by tests."""
    from ..fixtures import FixtureError, load_case

    by_case = {}
    for p in paths:
        try:
            by_case[load_case(p, verify=False).name] = Path(p)
        except FixtureError:
            continue
    run = _Run(results, by_case, fails_alone)
    # every result is judged on the notes as the stages wrote them: rewritten all at once, at the end
    try:
        notes = [(r, run.rewritten(r)) for r in run.rows if named_spans(r.note)]
    except Exception as e:  # a fault of this check must not cost the port its report, nor hide the names
        notes = [(r, f"{r.note} (not checked against the rest of the run: {type(e).__name__}: {e})") for r in run.rows]
        notes = [(r, n) for r, n in notes if named_spans(r.note)]
    for r, note in notes:
        r.note = note
    _grid_first(results)
