"""state.chunked: does the port answer the same when it prefills the prompt in chunks?

Serving engines and mlx-vlm run a long prompt through the decoder a chunk at a time. Four real ports
shipped five bugs that show only then: every chunk given the first chunk's positions (mlx-vlm#1737), the
last chunk's (mistral.rs#2083), positions sliced on one side only (vllm#10388), vision rows paired
with chunk-local ids (mistral.rs#2301), an image split across micro-batches (llama.cpp#16876). A
model case's prompt is shorter than any default chunk, so the harness asks for one: for every model
case with a golden generation, the port's `generate_chunked` runs with a chunk size whose first
boundary falls inside the first vision span (the hardest place: the span's positions and features
are split), and its answer is judged against the golden tokens as generate.tokens is.
"""

from __future__ import annotations

import time

import torch

from . import stages
from .adapters.base import NotCovered
from .results import StageResult
from .supervisor import call_with_timeout, describe_failure

STAGE = "state.chunked"


def applies(case) -> bool:
    """A case gets state.chunked when it has a golden generation (a model case's generate.tokens): the
    one place that says so, for the runner, the command line, the pytest plugin and the file exchange."""
    return "generate.tokens" in case.stages


def vision_spans(input_ids: torch.Tensor, config) -> list[tuple[int, int, str]]:
    """The runs of image/video pad tokens of row 0 that has any: [(start, end, "image"|"video")], end
    exclusive; rows are left padded, so every row's spans sit at the same offsets from its end."""
    kinds = {config.image_token_id: "image", config.video_token_id: "video"}
    for row in input_ids.tolist():
        spans, k = [], 0
        while k < len(row):
            if row[k] in kinds:
                start = k
                while k < len(row) and row[k] == row[start]:
                    k += 1
                spans.append((start, k, kinds[row[start]]))
            else:
                k += 1
        if spans:
            return spans
    return []


def chunk_for(input_ids: torch.Tensor, config) -> tuple[int, str] | None:
    """The prefill chunk to ask for and where its boundaries fall, or None for a one-token prompt.
    With a vision span: start + half its length, so the first boundary splits the span (a span of
    one merged token is split before it); text only: half the prompt."""
    L = input_ids.shape[1]
    if L < 2:
        return None
    spans = vision_spans(input_ids, config)
    if spans:
        start, end, kind = spans[0]
        chunk = max(start + (end - start) // 2, 1)
        where = f"the {kind} span {start}..{end - 1}"
    else:
        chunk, where = (L + 1) // 2, "the text"
    bounds = list(range(chunk, L, chunk))
    shown = ", ".join(str(b) for b in bounds[:6]) + (", ..." if len(bounds) > 6 else "")
    return chunk, f"chunks of {chunk} tokens, boundaries at {shown} (the first inside {where})"


def chunked_result(runner, case, inputs: dict, ck, unchunked: StageResult | None, unchunked_answer) -> StageResult:
    """state.chunked of one model case: the port's generate_chunked against the golden generation.
    unchunked, unchunked_answer: the case's generate.tokens result and the port's answer there. Where
    that already fails, the chunked answer passes when it is the same answer (the failure is the
    port's, not the chunking's: generate.tokens reports it) and fails when the chunking changes it."""
    gen = case.json("generate.json")
    picked = chunk_for(inputs["input_ids"], ck.config)
    if picked is None:
        return StageResult(case.name, STAGE, "not_covered", "a one-token prompt has no chunk boundary", mode="e2e")
    chunk, where = picked

    def answer(port):
        return port.generate_chunked(
            dict(inputs),
            prefill_chunk=chunk,
            max_new_tokens=int(gen["max_new_tokens"]),
            eos_token_id=gen["eos_token_id"],
        )

    t0 = time.perf_counter()
    try:
        got = call_with_timeout(lambda: answer(runner.adapter), runner.timeout)
    except NotCovered as e:
        return StageResult(case.name, STAGE, "not_covered", str(e), where=where, mode="e2e")
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return StageResult(case.name, STAGE, "error", describe_failure(e), where=where, mode="e2e")
    tol = stages.info(STAGE).tolerance
    noise = case.stages.get("generate.tokens", {}).get("logit_noise")
    precision = runner.profile.end_to_end("generate.tokens")
    v = tol.judge_tokens(gen, got, precision=precision, logit_noise=noise)
    note = ""
    if v.status == "fail" and unchunked is not None and unchunked.status != "pass" and unchunked_answer is not None:
        if tol.same_answer(got, unchunked_answer, precision=precision, logit_noise=noise):
            return StageResult(
                case.name,
                STAGE,
                "pass",
                "the same answer as the prompt prefilled at once",
                "equal to the port's own unchunked answer where that is not the golden one",
                f"{where}; generate.tokens is {unchunked.status} on its own",
                "e2e",
                seconds=time.perf_counter() - t0,
            )
        note = f"the prompt prefilled at once gives another answer ({unchunked.status} at generate.tokens)"
    if v.status == "fail":
        if unchunked is not None and unchunked.status == "pass":
            note = "the same prompt prefilled at once passes: the chunking changes the answer"
        if not vision_spans(inputs["input_ids"], ck.config):  # text only: no vision feature, no vision position
            text_only = (
                "the prompt is text only, so neither vision features nor vision positions are involved: what "
                "is left is each chunk's attention to the earlier chunks' cache, its mask, or its positions' offset"
            )
            note = f"{note}; {text_only}" if note else text_only
        found = runner._name_mistakes(
            STAGE,
            lambda m: answer(runner._variant(ck, m)),
            lambda theirs: tol.same_answer(theirs, got, precision=precision, logit_noise=noise),
        )
        note = "; ".join(x for x in (note, found) if x)
    return StageResult(
        case.name,
        STAGE,
        v.status,
        v.metric,
        v.tolerance,
        f"{where}; {v.where}" if v.where and not v.where.startswith(v.metric) else where,
        "e2e",
        note=note,
        seconds=time.perf_counter() - t0,
        values=v.values,
    )
