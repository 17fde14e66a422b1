"""Precisions a port may run a stage at, and the profile a port declares.

Real ports mix precisions on purpose: float32 weights with float16 patch inputs inside a
convolution, a float16 table for the merger's GELU, a bfloat16 text decoder. A precision names how
the spec is run to measure what such a port may differ by (its control):

  float64 | float32 | bfloat16 | float16   the stage computed in that dtype
  float16-inputs | bfloat16-inputs          computed in float32 on inputs rounded to that dtype

A profile maps stage patterns to precisions, e.g.
  {"vision.patch_embed": "float16-inputs", "vision.*": "float32", "text.*": "float32"}
(port.json for the file exchange, describe()["profile"] for an adapter, --profile on the command
line). A stage takes the precision of the most specific pattern that matches it (an exact name,
then the longest pattern); stages no pattern matches take the port's dtype.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping

import torch

COMPUTE = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROUNDED_INPUTS = {"float16-inputs": torch.float16, "bfloat16-inputs": torch.bfloat16}
PRECISIONS = (*COMPUTE, *ROUNDED_INPUTS)
# the signatures tried when a stage fails locally: what a port may have done on purpose
SIGNATURES = ("float16-inputs", "bfloat16-inputs", "float16", "bfloat16")
SAYS = {
    "float16-inputs": "float16 rounding of the stage's inputs",
    "bfloat16-inputs": "bfloat16 rounding of the stage's inputs",
    "float16": "the stage computed in float16",
    "bfloat16": "the stage computed in bfloat16",
    "float32": "the stage computed in float32",
    "float64": "the stage computed in float64",
}


def compute_dtype(precision: str) -> str:
    """The dtype the arithmetic runs in: 'float16-inputs' -> 'float32'."""
    return "float32" if precision in ROUNDED_INPUTS else precision


def check(precision: str, where: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{where}: {precision!r} is not a precision ({', '.join(PRECISIONS)})")
    return precision


class Profile:
    """Stage name -> the precision it is judged at."""

    def __init__(self, patterns: Mapping[str, str] | None, default: str, *, source: str = "profile"):
        self.default = check(str(default).replace("torch.", ""), f"{source} default dtype")
        self.patterns = {}
        for pattern, precision in (patterns or {}).items():
            if not isinstance(pattern, str) or not isinstance(precision, str):
                raise ValueError(
                    f"{source}: entries are 'stage pattern': 'precision' strings, got {pattern!r}: {precision!r}"
                )
            self.patterns[pattern] = check(precision, f"{source} entry {pattern!r}")
        self.source = source

    @classmethod
    def parse(cls, value, default: str, *, source: str = "profile") -> Profile:
        """A dict, a JSON object as text, a single precision for every stage, or None."""
        if value is None or isinstance(value, Profile):
            return value if isinstance(value, Profile) else cls(None, default, source=source)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source}: not a JSON object: {e}") from None
            else:
                return cls({"*": check(text, source)}, default, source=source)
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{source}: expected a mapping of stage patterns to precisions, got {type(value).__name__}"
            )
        return cls(value, default, source=source)

    def __call__(self, stage: str) -> str:
        if stage in self.patterns:
            return self.patterns[stage]
        matches = [p for p in self.patterns if fnmatch.fnmatchcase(stage, p)]
        return self.patterns[max(matches, key=len)] if matches else self.default

    def end_to_end(self, stage: str) -> str:
        """The precision an end-to-end result (generation) is judged at: the stage's own where the profile
        names it, else the coarsest the profile declares anywhere. Every stage's rounding reaches the
        tokens' log-probs: float16 vision under a float32 decoder leaves float16-sized noise there."""
        if stage in self.patterns:
            return self.patterns[stage]
        declared = [self.default, *self.patterns.values()]
        return max((_noise_dtype(p) for p in declared), key=COARSENESS.index)

    def describe(self) -> dict:
        return {"default": self.default, **self.patterns}


# compute dtypes from the finest to the coarsest (the logit noise each leaves grows along it)
COARSENESS = ("float64", "float32", "float16", "bfloat16")


def _noise_dtype(precision: str) -> str:
    """The dtype whose noise a precision leaves downstream: inputs rounded to float16 leave float16's
    (unlike compute_dtype, which says what the arithmetic runs in)."""
    rounded = ROUNDED_INPUTS.get(precision)
    return precision if rounded is None else str(rounded).removeprefix("torch.")
