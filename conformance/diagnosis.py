"""Diagnosis of a model run: is a stage itself wrong, or does it only inherit drift from upstream?

For every float stage k the port captured, the harness runs the spec's stage k in float64 on the
port's OWN output of stage k-1 (for the text layers: its own positions where it gives them, else the
golden ones, and the golden mask) and compares it with the port's stage k: the local error, judged
against the spec's teacher-forced control at the stage's precision (the port's profile, precision.py).
Then, per stage:

  local in budget, end to end in budget   pass
  local in budget, end to end not         "drift inherited from upstream": pass when the end-to-end
                                          error stays within the upstream error grown as the spec's
                                          own control grows over this stage, plus the local budget
  local out of budget                     fail: "the stage is itself wrong", blamed even when its
                                          end-to-end error happens to be small, unless it is right both
                                          end to end and on the golden input: then what the port reports
                                          upstream is not what the stage ran on (pass, and said)

A stage that is itself wrong is then compared with the spec at other precisions (a port that rounds
its patch inputs to float16 on purpose is told to declare it) and with the catalogue of known
mistakes run on the same inputs (mistakes.py). Both numbers go into the result (`local`,
`end_to_end`) and the report. A failing stage the port's own upstream value cannot feed (an error, absent,
not finite) gets the catalogue run on the spec's golden upstream value: a match is a hint in its note.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import compare, stages
from .compare import ALPHA
from .mistakes import LOCK as MISTAKES_LOCK
from .precision import SAYS, SIGNATURES, Profile, compute_dtype
from .reference import Reference
from .results import StageResult

# A precision signature explains a failure when the port is this much closer to the spec run at that
# precision than to the float64 spec, and within that precision's own budget.
SIGNATURE_SHARE = 0.25


def _metric(v: compare.Verdict) -> float:
    """The number a verdict is judged on: rel for floats, mean KL for logits."""
    return v.values.get("rel", v.values.get("mean_kl", float("nan")))


def _summary(v) -> dict:
    """status, metric, tolerance, value and budget of a Verdict or a StageResult."""
    return {
        "status": v.status,
        "metric": v.metric,
        "tolerance": v.tolerance,
        "value": _metric(v),
        "budget": v.values.get("budget"),
    }


def _growth(control: dict | None, control_prev: dict | None, precision: str) -> float:
    """How much the spec's own end-to-end error grows over one stage at this precision (>= 1)."""
    c, _ = compare.control_at(control, compute_dtype(precision))
    p, _ = compare.control_at(control_prev, compute_dtype(precision))
    if not isinstance(c, float) or not isinstance(p, float) or p <= 0:
        return 1.0
    return max(1.0, c / p)


def _positions(golden, own) -> tuple[torch.Tensor | None, str]:
    """The positions a port's decoder layers ran on: its own text.position_ids where it gave them (so that
    a layer is not blamed for the positions it was handed, which text.position_ids judges), else golden."""
    if (
        isinstance(own, torch.Tensor)
        and isinstance(golden, torch.Tensor)
        and own.shape == golden.shape
        and not (own.is_floating_point() or own.is_complex() or own.dtype == torch.bool)  # an error of its own
    ):
        return own.to(golden.dtype), "its own"
    return golden, "golden"


class Diagnosis:
    """Local judgement of one model run. judge(stage, golden, got, precision, control_key) -> Verdict
    is the case runner's own judge, so local and end-to-end use the same tolerance objects."""

    def __init__(self, case, reference: Reference, profile: Profile, judge: Callable, mistakes_for: Callable):
        self.case = case
        self.depth = (int(case.manifest["depth"]["vision"]), int(case.manifest["depth"]["text"]))
        self.reference = reference
        self.profile = profile
        self.judge = judge
        self.mistakes_for = mistakes_for  # stage -> [Mistake]; the catalogue, injected
        self._variants: dict[str, Reference] = {}

    def previous(self, stage: str) -> str | None:
        """The stage whose output feeds `stage` (None: the model inputs)."""
        return stages.previous(stage, *self.depth, vision=self.case.has_vision)

    def feeds(
        self, stage: str, inputs: dict, golden: dict, captured: dict, *, own_pixels: bool = True
    ) -> tuple[dict | None, str]:
        """The spec's inputs for `stage` from the port's own previous output; (None, why) when absent.

        own_pixels: a patch embedding is fed the port's own preprocessing (build_inputs) where it gave
        pixels on the same grid, for a port that preprocesses by itself whatever it is given (llama.cpp);
        False for a port whose patch embedding matched the given pixels end to end."""
        prev = self.previous(stage)
        positions, whose = _positions(golden.get("text.position_ids"), captured.get("text.position_ids"))
        feeds = {**inputs, "position_ids": positions}
        if prev is None:
            own = captured.get("preprocess.pixel_values")
            golden_pixels = inputs.get("pixel_values")
            if stage == "vision.patch_embed" and own_pixels and own is not None and golden_pixels is not None:
                if own.shape == golden_pixels.shape and bool(torch.isfinite(own).all()):
                    return {
                        **feeds,
                        "pixel_values": own.to(golden_pixels.dtype),
                    }, "the port's own preprocess.pixel_values"
            return feeds, "the model inputs"
        got = captured.get(prev)
        if not isinstance(got, torch.Tensor) or not got.is_floating_point():
            return None, f"the port did not capture {prev}"
        if not bool(torch.isfinite(got).all()):
            return None, f"the port's {prev} is not finite"
        what = f"the port's own {prev}"
        if stage.startswith("text.layer."):  # the stages that take positions and the mask
            what += f", {whose} positions and golden mask"
        return {**feeds, "hidden": got.detach().double()}, what

    def run(self, results: list[StageResult], captured: dict, inputs: dict, golden: dict) -> None:
        by_stage = {r.stage: r for r in results if r.mode == "e2e"}
        order = sorted((s for s in by_stage if stages.is_known(s)), key=stages.order_key)
        upstream_bad: str | None = None
        for stage in order:
            r = by_stage[stage]
            row = stages.info(stage)
            if not row.tolerance.scaled or r.status not in ("pass", "fail") or stage not in captured:
                if r.status in ("fail", "error") and upstream_bad is None:
                    upstream_bad = stage
                continue
            prev = self.previous(stage)
            if prev is not None and prev in by_stage and by_stage[prev].status == "error":
                r.note = join_notes(
                    r.note,
                    f"local error not measured: {prev} is an error",
                    self._on_golden(r, stage, inputs, golden, captured),
                )
                continue
            self.one(r, stage, captured, inputs, golden, by_stage, upstream_bad)
            if r.status == "fail" and upstream_bad is None:
                upstream_bad = stage

    def one(self, r: StageResult, stage: str, captured, inputs, golden, by_stage, upstream_bad) -> None:
        precision = self.profile(stage)
        r.precision = precision
        r.end_to_end = _summary(r)  # a StageResult carries a verdict's fields
        # a patch embedding that matched the model inputs ran on them, whatever its own preprocessing gives
        feeds, fed = self.feeds(stage, inputs, golden, captured, own_pixels=r.status != "pass")
        if feeds is None:
            r.note = join_notes(
                r.note, f"local error not measured: {fed}", self._on_golden(r, stage, inputs, golden, captured)
            )
            return
        try:
            ref = self.reference.stage(stage, feeds)
        except Exception as e:  # the spec refuses the port's value (a shape the spec cannot take)
            r.note = join_notes(
                r.note, f"local error not measured: the spec cannot run on {fed} ({type(e).__name__}: {e})"
            )
            return
        local = self.judge(stage, ref, captured[stage], precision, "control_teacher")
        r.local = {**_summary(local), "fed": fed}
        if local.status == "error":
            return
        if local.status == "pass":
            if r.status == "fail":
                self._inherited(r, stage, local, by_stage)
            return
        if r.status == "pass" and self._right_on_golden(
            r, stage, captured[stage], inputs, golden, precision, fed, local
        ):
            return
        # the stage itself is wrong
        r.status = "fail"
        upstream = "upstream drift explains none of it (measured on the port's own input)"
        if upstream_bad is not None:
            upstream += f"; upstream, {upstream_bad} fails too"
        r.note = join_notes(
            f"{stage} is itself wrong: local {local.metric} (budget {local.tolerance}, fed {fed}); {upstream}",
            self._signature(stage, feeds, captured[stage], ref, local, precision),
            self._mistake(stage, feeds, captured[stage], precision),
        )

    def _right_on_golden(self, r: StageResult, stage: str, got, inputs, golden, precision, fed, local) -> bool:
        """A stage within budget end to end whose local check failed: is it right on the golden input? Then
        what the port reports upstream (a capture rounded to bfloat16, positions it did not use) is not what
        this stage ran on: the stage passes, and the note says so. False when it is wrong on that too."""
        prev = self.previous(stage)
        if prev is None or not isinstance(golden.get(prev), torch.Tensor):
            return False
        feeds, _ = self.feeds(stage, inputs, golden, {prev: golden[prev]})  # golden upstream, golden positions
        try:
            on_golden = self.judge(stage, self.reference.stage(stage, feeds), got, precision, "control_teacher")
        except Exception:  # noqa: BLE001 - the spec refused: no second opinion
            return False
        if on_golden.status != "pass":
            return False
        r.note = join_notes(
            r.note,
            f"on {fed} it is off (local {local.metric}), yet right end to end and on the golden {prev}: what the "
            f"port reports as {prev} is not what this stage ran on (a capture in a coarser dtype, or positions it "
            "did not use), so the stage is not blamed",
        )
        return True

    def _on_golden(self, r: StageResult, stage: str, inputs: dict, golden: dict, captured: dict) -> str:
        """For a failing stage whose own input the port cannot give (its previous stage is an error, absent
        or not finite): the catalogue's entries run on the spec's golden previous output. Only a match is
        said, as a hint, and the verdict stays: the port's stage ran on its own input, not on this one."""
        prev = self.previous(stage)
        got = captured.get(stage)
        if r.status != "fail" or prev is None or got is None:
            return ""
        feeds, _ = self.feeds(stage, inputs, golden, {prev: golden.get(prev)})  # as if the port had given it
        named = self._mistake(stage, feeds, got, r.precision or self.profile(stage)) if feeds is not None else ""
        if not named.startswith("likely mistake"):
            return ""
        return f"run on the spec's own {prev} instead, the catalogue says: {named}"

    def _inherited(self, r: StageResult, stage: str, local: compare.Verdict, by_stage: dict) -> None:
        prev = self.previous(stage)
        up = by_stage.get(prev) if prev else None
        up_value = (up.end_to_end or {}).get("value") if up is not None else None
        value, budget = r.end_to_end.get("value"), local.values.get("budget")
        entry = self.case.stages.get(stage, {})
        if stage == "logits" or up_value is None or value is None or budget is None:
            allowed = None  # KL does not grow like a relative error: local in budget is the verdict
        else:
            grow = _growth(entry.get("control"), self.case.stages.get(prev, {}).get("control"), r.precision)
            allowed = ALPHA * grow * up_value + budget
        if allowed is None or value <= allowed:
            r.status = "pass"
            r.note = join_notes(
                r.note,
                f"drift inherited from upstream: end to end {r.end_to_end['metric'].split(' max_abs')[0]} is over its "
                f"{r.precision} budget, but fed {r.local['fed']} the stage is within budget (local "
                f"{local.metric.split(' max_abs')[0]})",
            )
        else:
            r.note = join_notes(
                r.note,
                f"end-to-end error {value:.2e} grows faster than upstream drift explains (allowed {allowed:.2e}: "
                f"{ALPHA:g} x growth x {prev} {up_value:.2e} + local budget), though the stage is locally within budget",
            )

    def _signature(self, stage, feeds, got, ref, local, precision) -> str:
        """'matches float16 rounding of the stage's inputs; declare ...' when another precision explains it."""
        best = None
        for p in SIGNATURES:
            if p == precision:
                continue
            try:
                at_p = self.reference.stage(stage, feeds, p)
            except Exception:
                continue
            v = self.judge(stage, at_p, got, p, "control_teacher")
            closer = _metric(v) <= SIGNATURE_SHARE * _metric(local)
            if v.status == "pass" and closer and (best is None or _metric(v) < best[1]):
                best = (p, _metric(v))
        if best is None:
            return ""
        p, d = best
        return (
            f"matches {SAYS[p]} ({d:.1e} from the spec run that way): declare "
            f'{{"{stage}": "{p}"}} in your profile if intended'
        )

    def _mistake(self, stage, feeds, got, precision) -> str:
        def answer(m):
            return self._variants.setdefault(m.name, self.reference.variant(m.adapter)).stage(stage, feeds)

        def same(variant):
            return self.judge(stage, variant, got, precision, "control_teacher").status == "pass"

        return name_mistakes(self.mistakes_for(stage), answer, same)


def name_mistakes(entries: list, answer_of: Callable, same: Callable[[object], bool]) -> str:
    """'likely mistake: ...' for the catalogue entries whose answer (`answer_of(entry)`, run under the
    catalogue's lock: variants swap spec functions while they run) is the port's (`same(answer)`);
    'no known mistake matches'; or '' when the stage has no entries."""
    if not entries:
        return ""
    found = []
    for m in entries:
        try:
            with MISTAKES_LOCK:
                matched = same(answer_of(m))
        except Exception:  # an entry that cannot run on these inputs names nothing
            continue
        if matched:
            found.append(f"{m.description} (seen in {m.seen})")
    return ("likely mistake: " + "; or ".join(found)) if found else "no known mistake matches"


def join_notes(*parts: str) -> str:
    """Notes joined with "; ", the empty ones left out."""
    return "; ".join(p for p in parts if p)
