"""A stand-in for vLLM's offline API (LLM, SamplingParams, outputs), enough for the vllm target's glue."""

from __future__ import annotations

from dataclasses import dataclass

from standin_engine import GreedyEngine

__version__ = "stand-in"


@dataclass
class SamplingParams:
    temperature: float = 1.0
    max_tokens: int = 16
    logprobs: int | None = None
    stop_token_ids: list | None = None
    ignore_eos: bool = False
    repetition_penalty: float | None = None  # None: the checkpoint's generation_config.json applies


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    token_ids: list
    logprobs: list


@dataclass
class RequestOutput:
    outputs: list


class LLM:
    def __init__(self, model: str, dtype: str = "auto", limit_mm_per_prompt=None, seed: int = 0):
        self.engine = GreedyEngine(model)

    def get_tokenizer(self):
        return self.engine.tokenizer()

    def generate(self, requests, params: SamplingParams, use_tqdm: bool = True):
        assert params.temperature == 0.0 and not params.ignore_eos
        out = []
        for r in requests:
            mm = r.get("multi_modal_data", {})
            if "video" in mm:
                raise NotImplementedError("the stand-in has no video processor (transformers' needs torchvision)")
            tokens, steps = self.engine.complete(
                r["prompt"],
                mm.get("image"),
                params.max_tokens,
                params.stop_token_ids,
                params.logprobs,
                repetition_penalty=params.repetition_penalty,
            )
            out.append(
                RequestOutput([CompletionOutput(tokens, [{t: Logprob(v) for t, v in s.items()} for s in steps])])
            )
        return out
