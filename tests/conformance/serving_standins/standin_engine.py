"""What the vLLM and SGLang stand-ins share: a greedy engine over transformers' processor and model.

Both real engines render prompts with the checkpoint's Hugging Face tokenizer and preprocess with the
Hugging Face processor, so the stand-in does exactly that, then decodes greedily with transformers
(float32) and returns the top-k log-probs of every step. Stand-ins only check the adapters' glue;
they are not the engines."""

from __future__ import annotations

import torch
from qwen25vl.conformance.adapters.transformers import TransformersAdapter

CALLS: list[dict] = []  # every request the adapters sent, for the tests to inspect


class GreedyEngine:
    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint
        self.hf = TransformersAdapter("float32", "cpu")
        self.hf.prepare(checkpoint, dtype="float32", device="cpu")

    def tokenizer(self):
        return self.hf.processor(self.checkpoint).tokenizer

    def complete(self, prompt, images, max_new_tokens, stop_ids, k, *, repetition_penalty=None):
        """repetition_penalty None: what the engines do when a request leaves it unset, the checkpoint's
        generation_config.json (1.05 for Qwen2.5-VL) applies."""
        CALLS.append({"prompt": prompt, "images": len(images or []), "stop": list(stop_ids)})
        proc = self.hf.processor(self.checkpoint)
        inputs = proc(text=[prompt], images=images or None, return_tensors="pt")
        penalty = {} if repetition_penalty is None else {"repetition_penalty": repetition_penalty}
        with torch.no_grad():
            out = self.hf.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=151643,
                output_scores=True,
                return_dict_in_generate=True,
                **penalty,
            )
        tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        steps = []
        for score in out.scores:
            lp = torch.log_softmax(score[0].double(), -1)
            top = lp.topk(k)
            steps.append({int(i): float(v) for i, v in zip(top.indices, top.values)})
        return tokens, steps
