"""Tolerance classes: each a small object that judges a port's value against the golden one.

A stage row (stages.py) names its tolerance object; fixture manifests record the object's `name`.
The arithmetic of every rule (relative errors, KL, top-k) lives in compare.py; an object here only
says which rule applies to an item table (`items`) and to a tensor of a model run (`tensor`), so a
new tolerance class is one object, not an if-chain in the runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import compare
from .compare import Verdict
from .precision import compute_dtype

SECONDS_MAX_ABS = 1e-9  # float-valued exact stages (second_per_grid_ts): only representation noise


@dataclass(frozen=True)
class Tolerance:
    name: str
    rule: str  # one line for FORMAT.md and the report

    # True where the budget comes from the spec's own control at the port's precision (float stages)
    scaled: ClassVar[bool] = False

    def items(self, expected: list, got, inputs: list) -> Verdict:
        return compare.exact_items(expected, got, inputs)

    def tensor(self, golden: torch.Tensor, got, *, control: dict | None, dtype: str, mask=None) -> Verdict:
        raise NotImplementedError(f"tolerance {self.name} does not judge tensors")


@dataclass(frozen=True)
class Exact(Tolerance):
    def tensor(self, golden, got, *, control=None, dtype="float32", mask=None) -> Verdict:
        if isinstance(got, torch.Tensor) and got.is_floating_point() and not golden.is_floating_point():
            return Verdict("error", f"wrong dtype: {got.dtype} for an integer stage", "equal")
        if golden.is_floating_point():  # seconds per grid: exact up to how a float holds them
            return compare.max_abs(golden, torch.as_tensor(got, dtype=torch.float64), limit=SECONDS_MAX_ABS)
        return compare.exact_tensor(golden, got, mask=mask)


@dataclass(frozen=True)
class MaxAbs(Tolerance):
    limit: float = 0.0

    def items(self, expected, got, inputs) -> Verdict:
        return compare.exact_items(expected, got, inputs, tol=self.limit)

    def tensor(self, golden, got, *, control=None, dtype="float32", mask=None) -> Verdict:
        return compare.max_abs(golden, got, limit=self.limit, mask=mask)


@dataclass(frozen=True)
class Floats(Tolerance):
    scaled: ClassVar[bool] = True

    def tensor(self, golden, got, *, control, dtype, mask=None) -> Verdict:
        return compare.floats(golden, got, control=control, dtype=dtype, mask=mask)


@dataclass(frozen=True)
class Logits(Tolerance):
    scaled: ClassVar[bool] = True

    def tensor(self, golden, got, *, control, dtype, mask=None) -> Verdict:
        return compare.logits(golden, got, control=control, dtype=dtype, mask=mask)


@dataclass(frozen=True)
class Tokens(Tolerance):
    def judge_tokens(self, gen: dict, got, *, precision: str, logit_noise: dict | None = None) -> Verdict:
        """gen: the case's generate.json; got: the port's answer (tokens [B, n], or (tokens, topk ids),
        or {"tokens", "topk", "topk_logprobs"}); precision: what the port decodes at; logit_noise: the
        manifest's measured noise per precision (None: the top-5 rule of older fixtures)."""
        tokens, topk, logprobs = answer_parts(got)
        noise = noise_at(logit_noise, precision)
        f64 = torch.float64
        return compare.tokens(
            torch.tensor(gen["tokens"], dtype=torch.int64),
            torch.tensor(gen["topk"], dtype=torch.int64),
            tokens,
            topk,
            golden_logits=torch.tensor(gen["topk_logits"], dtype=f64) if "topk_logits" in gen else None,
            golden_logprobs=torch.tensor(gen["topk_logprobs"], dtype=f64) if "topk_logprobs" in gen else None,
            got_logprobs=logprobs,
            noise=noise,
            eos=gen.get("eos_token_id"),
        )

    def same_answer(self, a, b, *, precision: str, logit_noise: dict | None = None) -> bool:
        """Two generate() answers agree: the same tokens, and where both give top-k log-probs, the ids
        both list within the logit noise at `precision` at every step (how a catalogue entry is matched
        to a port whose log-probs, not tokens, diverge)."""
        (ta, ka, la), (tb, kb, lb) = answer_parts(a), answer_parts(b)
        if ta is None or tb is None or not torch.equal(torch.as_tensor(ta), torch.as_tensor(tb)):
            return False
        noise = noise_at(logit_noise, precision)
        if noise is None or la is None or lb is None or ka is None or kb is None:
            return True
        ka, kb, la = torch.as_tensor(ka), torch.as_tensor(kb), torch.as_tensor(la, dtype=torch.float64)
        return all(compare.logprob_difference(ka[r], la[r], kb, lb, r, noise) is None for r in range(ka.shape[0]))


def answer_parts(got) -> tuple:
    """(tokens, topk ids, topk log-probs) of a generate() answer, None where it gives no such part."""
    if isinstance(got, dict):
        return got.get("tokens"), got.get("topk"), got.get("topk_logprobs")
    if isinstance(got, tuple):
        return (*got, None, None, None)[:3]
    return got, None, None


def noise_at(logit_noise: dict | None, precision: str) -> float | None:
    """The logit noise a port at `precision` is allowed (the manifest's measurement, at least the precision's
    floor), None for old fixtures."""
    if not logit_noise:
        return None
    measured, _ = compare.control_at(logit_noise, precision)
    floor = compare.LOGIT_NOISE_FLOOR[compute_dtype(precision)]
    return floor if precision == "float64" or measured is None else max(measured, floor)


EXACT = Exact("exact", "integers, strings, index tensors: equal, element for element (seconds within 1e-9)")
PIXELS = MaxAbs(
    "pixels", f"max |port - spec| <= {compare.PIXELS_MAX_ABS:g} (float32 arithmetic order only)", compare.PIXELS_MAX_ABS
)
COS_SIN = MaxAbs(
    "cos_sin",
    f"max abs error <= {compare.COS_SIN_MAX_ABS:g} (float32 tables pass, bfloat16 or interleaved sections do not)",
    compare.COS_SIN_MAX_ABS,
)
FLOAT = Floats("float", f"rel_err <= {compare.ALPHA:g} x control[dtype] + floor[dtype]")
LOGITS = Logits("logits", f"mean KL(spec || port) <= {compare.ALPHA:g} x control + floor, top-1 agreement")
TOKENS = Tokens("tokens", "greedy tokens equal until the first divergence, each side's pick in the other's top-5")

TOLERANCES = {t.name: t for t in (EXACT, PIXELS, COS_SIN, FLOAT, LOGITS, TOKENS)}
