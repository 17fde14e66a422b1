"""A stand-in for SGLang's offline Engine (generate with return_logprob), enough for the sglang target's glue."""

from __future__ import annotations

from standin_engine import GreedyEngine

__version__ = "stand-in"


class Engine:
    def __init__(self, model_path: str, dtype: str = "auto", random_seed: int = 0):
        self.engine = GreedyEngine(model_path)

    def generate(self, prompt, image_data=None, sampling_params=None, return_logprob=False, top_logprobs_num=0):
        p = sampling_params
        tokens, steps = self.engine.complete(
            prompt,
            image_data,
            p["max_new_tokens"],
            p["stop_token_ids"],
            top_logprobs_num,
            repetition_penalty=p.get("repetition_penalty"),
        )
        chosen = [(s.get(t, -1e9), t, None) for t, s in zip(tokens, steps)]
        top = [[(v, t, None) for t, v in s.items()] for s in steps]
        return {"text": "", "meta_info": {"output_token_logprobs": chosen, "output_top_logprobs": top}}
