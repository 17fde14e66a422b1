"""What the harness says of one stage of one case: a StageResult, and the first divergence of a run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import stages

BAD = ("fail", "error")

# joins an expectation's reason and the harness's own diagnosis in an xfail's note (the table shows the reason)
HARNESS_SAID = " | the harness: "


@dataclass
class StageResult:
    case: str
    stage: str
    status: str  # pass | fail | error | not_covered | xfail | xpass
    metric: str = ""
    tolerance: str = ""
    where: str = ""
    mode: str = ""  # items | e2e | teacher
    note: str = ""
    seconds: float = 0.0
    values: dict = field(default_factory=dict)
    precision: str = ""  # what a float stage was judged at (the port's profile, conformance/precision.py)
    local: dict = field(default_factory=dict)  # the stage fed the port's own upstream value (diagnosis.py)
    end_to_end: dict = field(default_factory=dict)  # the stage as the port ran it from the inputs

    def to_dict(self) -> dict:
        return asdict(self)


def first_divergence(results: list[StageResult]) -> StageResult | None:
    """The earliest unexpected failure in data-flow order (exact function stages first, then the model)."""
    bad = [r for r in results if r.status in BAD]
    if not bad:
        return None

    def key(r):
        try:
            return stages.order_key(r.stage)
        except KeyError:
            return (-1, 0)

    return min(bad, key=key)
