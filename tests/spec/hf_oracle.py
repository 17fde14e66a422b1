"""transformers as the second reference for the spec tests: load the same folder, run it, read its stages.

transformers is imported only here and in the tests (never in spec/). Its stages are read with
forward hooks and put into the spec's canonical layout (docs/INTERFACES.md): vision blocks back
from window order to pixel_values row order with transformers' own window index, several vision
calls (images, then videos) concatenated, rope_deltas moved to the padded-length convention.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from qwen25vl.spec.checkpoint import load_checkpoint
from qwen25vl.spec.tokens import load_tokenizer


@functools.lru_cache(maxsize=4)
def load_hf(folder: str, dtype: torch.dtype = torch.float64, attn: str = "eager"):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation=attn).eval()


@functools.lru_cache(maxsize=4)
def load_spec(folder: str, dtype: torch.dtype = torch.float64):
    return load_checkpoint(folder, dtype=dtype)


@functools.lru_cache(maxsize=1)
def tokenizer(folder: str):
    return load_tokenizer(folder)


def hf_kwargs(inputs: dict, config) -> dict:
    """The model-inputs dict as transformers' keyword arguments, with mm_token_type_ids (0 text,
    1 image pad, 2 video pad): without them transformers 5.24 silently falls back to 1-D positions."""
    ids = inputs["input_ids"]
    mm = torch.zeros_like(ids)
    mm[ids == config.image_token_id] = 1
    mm[ids == config.video_token_id] = 2
    return {**{k: v for k, v in inputs.items() if v is not None}, "mm_token_type_ids": mm}


def hf_forward_stages(model, config, inputs: dict) -> tuple[torch.Tensor, dict]:
    """Run transformers' forward; return (logits, stages by spec name) in the spec's canonical layout."""
    from transformers.vision_utils import get_vision_window_index

    visual, lm = model.model.visual, model.model.language_model
    calls, current, got, hooks = [], {}, {}, []

    def visual_pre(module, args, kwargs):
        current.clear()
        current["grid"] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def visual_post(module, args, kwargs, out):
        grid = current["grid"]
        v = config.vision
        window_index, _ = get_vision_window_index(
            grid, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size
        )
        P = current["vision.patch_embed"].shape[0]
        # transformers' own permutation applied to row numbers: slot s of window order holds row rows[s]
        rows = module.permute_input_for_window_attn(torch.arange(P, dtype=torch.float64)[:, None], window_index, P)
        rows = rows[:, 0].long()
        call = {"vision.patch_embed": current["vision.patch_embed"], "vision.merger": out.pooler_output}
        for i in range(v.depth):
            row_order = torch.empty_like(current[i])
            row_order[rows] = current[i]
            call[f"vision.block.{i}"] = row_order
        calls.append(call)

    hooks.append(visual.register_forward_pre_hook(visual_pre, with_kwargs=True))
    hooks.append(visual.register_forward_hook(visual_post, with_kwargs=True))
    hooks.append(visual.patch_embed.register_forward_hook(lambda m, a, o: current.__setitem__("vision.patch_embed", o)))
    for i, blk in enumerate(visual.blocks):
        hooks.append(blk.register_forward_hook(lambda m, a, o, i=i: current.__setitem__(i, o)))

    def lm_pre(module, args, kwargs):
        got["text.inputs_embeds"] = kwargs["inputs_embeds"]
        got["text.position_ids"] = kwargs["position_ids"]

    hooks.append(lm.register_forward_pre_hook(lm_pre, with_kwargs=True))
    for i, layer in enumerate(lm.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(f"text.layer.{i}", o)))
    hooks.append(lm.norm.register_forward_hook(lambda m, a, o: got.__setitem__("text.norm", o)))
    try:
        with torch.no_grad():
            logits = model(**hf_kwargs(inputs, config)).logits
    finally:
        for h in hooks:
            h.remove()
    for name in calls[0] if calls else ():
        got[name] = torch.cat([c[name] for c in calls])
    # transformers: max + 1 - (unpadded length); the spec: max + 1 - (padded length L)
    mask = inputs["attention_mask"]
    if got["text.position_ids"] is None:  # no vision input: transformers uses arange(L) on all three axes
        B, L = mask.shape
        got["text.position_ids"] = torch.arange(L).expand(3, B, L)
        model.model.rope_deltas = torch.zeros(B, 1, dtype=torch.int64)
    got["text.rope_deltas"] = model.model.rope_deltas - (mask == 0).sum(1, keepdim=True)
    got["logits"] = logits
    return logits, got


def hf_generate(model, config, inputs: dict, max_new_tokens: int, eos_token_id) -> torch.Tensor:
    """transformers' greedy search, pure argmax: the new tokens int64 [B, n]."""
    with torch.no_grad():
        out = model.generate(
            **hf_kwargs(inputs, config),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=eos_token_id,
            pad_token_id=config.pad_token_id,
        )
    return out[:, inputs["input_ids"].shape[1] :]


# ---------------------------------------------------------------- synthetic media and conversations


def noise_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def gradient_image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def user(*parts) -> dict:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"role": "user", "content": content}


def image_part(array) -> dict:
    return {"type": "image", "image": array}
