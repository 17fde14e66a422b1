"""state.repeat: does the port answer a request the same whatever ran before it?

Four real ports (and transformers #43952) shipped bugs that show only on the second request: cached
rope_deltas or positions, prefix caches keyed on token ids that hand one image's activations to the
same text with another image. Within one adapter's lifetime the case runner keeps every model case
the port answered (`ModelRun`); `repeat_runs` asks the port each one again, in reverse order, and
compares the port with itself. Any difference, or a case answered with the outputs of another case
that has the same token ids and other pixels, is an error "state leaks between requests" that names
the case that ran before. The file exchange gets the same from <case>@repeat folders (files.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from . import compare, stages
from .adapters.base import NotCovered
from .precision import compute_dtype
from .results import StageResult
from .supervisor import describe_failure
from .tolerances import answer_parts

REPEAT_STAGE = "state.repeat"
REPEAT_SUFFIX = "@repeat"  # the file exchange's folder for a case's second run (export_inputs)


@dataclass
class ModelRun:
    """One model case as the port answered it, kept to run it again (state.repeat)."""

    case: object
    inputs: dict
    capture: list
    captured: dict
    tokens: object
    before: str | None  # the model case that ran just before it


def tokens_of(answer):
    """The token tensor of a generate() answer (a tensor, a tuple, or a dict)."""
    tokens = answer_parts(answer)[0]
    return None if tokens is None else torch.as_tensor(tokens)


def answered_tokens(answer):
    """tokens_of(answer), or None where the answer holds no token tensor (garbage is judged elsewhere)."""
    try:
        return tokens_of(answer)
    except (TypeError, ValueError, RuntimeError):
        return None


def repeat_runs(runner) -> list[StageResult]:
    """state.repeat: run every model case this runner ran once more, in reverse order, on the same
    adapter, and compare the port with itself. A port that keeps positions, rope_deltas or a
    prefix cache from an earlier request answers differently the second time (the first case
    repeated runs right after itself; a case with the same text as another and a different image
    shows a cache keyed on token ids)."""
    out, before_now = [], runner._last_model_case
    for run in reversed(runner._runs):
        out.append(_repeat_one(runner, run, before_now))
        before_now = run.case.name
    return out


def _repeat_one(runner, run: ModelRun, before_now: str | None) -> StageResult:
    s, case = REPEAT_STAGE, run.case
    again_case = dataclasses.replace(case, manifest={**case.manifest, "case": case.name + REPEAT_SUFFIX}, _cache={})
    gen = case.json("generate.json") if "generate.tokens" in case.stages else None
    t0 = time.perf_counter()
    try:
        # the case before may run on another checkpoint (model_text's tied one): loading this case's own
        # again is not state kept between requests
        runner._prepare(runner.checkpoint(case.checkpoint()))
        runner.adapter.begin_case(again_case)
        # a port that only generates (run() not covered) is asked for its tokens alone
        again = (
            runner.call(lambda: runner.adapter.run(dict(run.inputs), capture=list(run.capture))) if run.capture else {}
        )
        tokens = None
        if run.tokens is not None and gen is not None:
            tokens = runner.call(
                lambda: runner.adapter.generate(
                    dict(run.inputs), max_new_tokens=int(gen["max_new_tokens"]), eos_token_id=gen["eos_token_id"]
                )
            )
    except NotCovered as e:
        return StageResult(case.name, s, "not_covered", f"repeat: {e}", mode="repeat")
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return StageResult(case.name, s, "error", f"repeat: {describe_failure(e)}", mode="repeat")
    finally:
        try:
            runner.adapter.begin_case(case)
        except Exception:
            pass
    where = f"its run after {run.before or 'nothing'} and its run after {before_now or 'nothing'}"
    twin = _answered_like_a_twin(runner._runs, run)
    if twin is not None:
        return StageResult(
            case.name,
            s,
            "error",
            f"state leaks between requests: the port answered {case.name} with the outputs of {twin}, which has "
            "the same token ids and other pixels (a cache keyed on token ids?)",
            "equal",
            f"its first run, after {run.before or 'nothing'}",
            "repeat",
        )
    diff = _first_change(runner, run, again, tokens)
    secs = time.perf_counter() - t0
    if diff is None:
        return StageResult(
            case.name, s, "pass", "the same outputs when run again", "equal", where, "repeat", seconds=secs
        )
    return StageResult(
        case.name,
        s,
        "error",
        f"state leaks between requests: {diff}",
        "equal",
        f"between {where}",
        "repeat",
        note=f"the port's answer to {case.name} depends on what ran before it ({before_now or 'nothing'})",
        seconds=secs,
    )


def _answered_like_a_twin(runs: list[ModelRun], run: ModelRun) -> str | None:
    """An earlier case with the same input_ids and other pixels whose vision outputs this run repeats."""
    for other in runs:
        if other is run:
            return None
        same_ids = torch.equal(other.inputs["input_ids"], run.inputs["input_ids"])
        pixels = [k for k in ("pixel_values", "pixel_values_videos") if run.inputs.get(k) is not None]
        other_pixels = any(
            other.inputs.get(k) is None
            or tuple(other.inputs[k].shape) != tuple(run.inputs[k].shape)
            or not torch.equal(other.inputs[k], run.inputs[k])
            for k in pixels
        )
        first = next((k for k in ("vision.patch_embed", "vision.merger") if k in run.captured), None)
        if same_ids and pixels and other_pixels and first and first in other.captured:
            if torch.equal(other.captured[first], run.captured[first]):
                return other.case.name
    return None


def _non_finite_change(a: torch.Tensor, b: torch.Tensor) -> str:
    """'' when a and b hold the same NaN and infinities in the same places (the same answer twice: a NaN is
    an error of its own stage, not a leak between requests), else what changed."""
    for name, where in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        wa, wb = where(a), where(b)
        if not torch.equal(wa, wb):
            return f"{name} at {int((wa != wb).sum())} places in one run and not the other"
    return ""


def _first_change(runner, run: ModelRun, again, tokens) -> str | None:
    """The first stage (data-flow order) whose value differs between the two runs, or None."""
    if not isinstance(again, dict):
        return f"the second run returned {type(again).__name__}"
    for stage in sorted((k for k in run.captured if stages.is_known(k)), key=stages.order_key):
        a, b = run.captured[stage], again.get(stage)
        if not isinstance(a, torch.Tensor) or compare.not_dense(a):
            continue  # no value to repeat: an error of its own stage already
        if not isinstance(b, torch.Tensor) or compare.not_dense(b) or tuple(b.shape) != tuple(a.shape):
            return f"{stage} comes back {'missing' if b is None else 'with another shape or kind'}"
        if a.is_floating_point():
            odd = _non_finite_change(a, b)
            if odd:
                return f"{stage} differs ({odd})"
            a, b = (torch.where(torch.isfinite(a), a, 0.0), torch.where(torch.isfinite(b), b, 0.0))
            hidden = stages.info(stage).tolerance.name == "float"  # weighed as the judge weighs it
            rel = compare.float_errors(a.double(), b.double(), channels=hidden)["rel"]
            limit = compare.FLOOR.get(compute_dtype(runner.profile(stage)), compare.FLOOR["bfloat16"])
            if not rel <= limit:
                return f"{stage} differs (rel {rel:.2e} > {limit:.0e})"
        elif not torch.equal(a, b):
            return f"{stage} differs ({int((a != b).sum())} values)"
    t_a = answered_tokens(run.tokens)
    if t_a is not None:
        t_b = answered_tokens(tokens)
        if t_b is None or tuple(t_b.shape) != tuple(t_a.shape) or not torch.equal(t_a, t_b):
            return "generate.tokens differ"
    return None
