"""mlx-vlm (the MLX port of Qwen2.5-VL) as a target: its loader, processor, chat template, model and
greedy generation, judged like any port (docs/ports.md, "mlx-vlm").

Every stage calls mlx-vlm's own code. Stages are tapped by swapping a module instance's class for a
subclass whose __call__ records the output (MLX modules are called through their class, so an
instance attribute would not do), and swapped back after the run. Conversions to the canonical layout
come from conformance/conversions.py: vision blocks run in window order (un-permuted with the spec's
window_partition), rope_deltas count from each row's real tokens. mlx is imported lazily so that the
module imports without it; known divergences are in conformance/expectations/mlx-vlm.json.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ...spec.forward import INPUT_KEYS
from .. import conversions
from .base import ChunkedGeneration, NotCovered
from .serving import processor_options, video_frames
from .transformers import open_image

INSTALL_HINT = 'mlx-vlm is not importable: pip install -e ".[mlx]" (mlx[cpu] 0.32.4 and mlx-vlm 0.7.10)'


def _import_mlx():
    try:
        import mlx.core as mx
        import mlx_vlm
    except ImportError as e:
        raise ValueError(f"target mlx-vlm: {INSTALL_HINT} ({e})") from None
    return mx, mlx_vlm


def _three_sections(pos: torch.Tensor) -> torch.Tensor:
    """mlx-vlm's positions as [3, B, L]. Text only, it gives the one row [B, L] that every section shares:
    its rotary (rope_utils._mrope_apply_cos_sin, ndim 2) gives every frequency slot that one position."""
    return pos.expand(3, -1, -1) if pos.dim() == 2 else pos


def _to_torch(a) -> torch.Tensor:
    """An mlx array -> a torch tensor on the CPU (floats as float32, integers as int64)."""
    import mlx.core as mx

    if mx.issubdtype(a.dtype, mx.floating):
        return torch.from_numpy(np.array(a.astype(mx.float32)))
    return torch.from_numpy(np.array(a)).to(torch.int64)


def _to_mlx(t):
    import mlx.core as mx

    if t is None:
        return None
    t = torch.as_tensor(t)
    return mx.array(t.numpy() if not t.is_floating_point() else t.to(torch.float32).numpy())


@contextlib.contextmanager
def _tapped(modules: dict, record):
    """Each named module's __call__ wrapped in place: record(name, args, kwargs, output) after it runs."""
    saved = {}
    try:
        for name, module in modules.items():
            base = type(module)

            def call(self, *args, _name=name, _base=base, **kwargs):
                out = _base.__call__(self, *args, **kwargs)
                record(_name, args, kwargs, out)
                return out

            saved[name] = base
            module.__class__ = type(f"Tapped{base.__name__}", (base,), {"__call__": call})
        yield
    finally:
        for name, base in saved.items():
            modules[name].__class__ = base


class MlxVlmAdapter(ChunkedGeneration):
    name = "mlx-vlm"

    def __init__(self, dtype: str = "float32", device: str = "cpu"):
        if str(dtype) != "float32" or device != "cpu":
            raise ValueError(f"target mlx-vlm: judged in float32 on cpu here; got dtype {dtype!r}, device {device!r}")
        self.dtype, self.device = "float32", "cpu"
        self.model = self.processor = None
        _import_mlx()

    def describe(self) -> dict:
        from importlib.metadata import version

        return {"name": "mlx-vlm", "version": version("mlx-vlm"), "dtype": self.dtype, "device": self.device}

    # ---- exact-stage functions mlx-vlm exposes
    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        # the image processor Qwen2.5-VL's processor builds (mlx-vlm shares Qwen3-VL's) calls this one
        from mlx_vlm.models.qwen3_vl.processing_qwen3_vl import _smart_resize_image

        return _smart_resize_image(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)

    def rope_index(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        """LanguageModel.get_rope_index, unbound: it reads only these config fields (and takes no
        second_per_grid_ts: see expectations/mlx-vlm.json)."""
        import types

        from mlx_vlm.models.qwen2_5_vl.language import LanguageModel

        fields = ("image_token_id", "video_token_id", "vision_start_token_id")
        cfg = types.SimpleNamespace(**{k: config[k] for k in fields})
        cfg.vision_config = types.SimpleNamespace(spatial_merge_size=config["vision_config"]["spatial_merge_size"])
        pos, deltas = LanguageModel.get_rope_index(
            types.SimpleNamespace(config=cfg),
            _to_mlx(input_ids),
            _to_mlx(image_grid_thw),
            _to_mlx(video_grid_thw),
            _to_mlx(attention_mask),
        )
        pos, deltas = _three_sections(_to_torch(pos)), _to_torch(deltas)
        if attention_mask is None:
            return pos, deltas.reshape(-1, 1)
        return pos, conversions.rope_deltas_padded(
            deltas, "unpadded", torch.as_tensor(attention_mask), "mlx-vlm rope_deltas"
        )

    # ---- the model
    def prepare(self, checkpoint, *, dtype, device):
        import mlx.core as mx
        from mlx_vlm import load

        self.model, self.processor = load(str(checkpoint))
        self.model.set_dtype(mx.float32)  # the checkpoint is bfloat16; judged in float32
        self.checkpoint = str(checkpoint)

    def _processor(self, folder: str):
        """The processor mlx_vlm.load returned, or (preprocessing before the model is loaded) the same
        class, mlx-vlm's Qwen2_5_VLProcessor, built from the folder."""
        if self.processor is None:
            from mlx_vlm.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

            self.processor = Qwen2_5_VLProcessor.from_pretrained(folder)
        return self.processor

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        """mlx-vlm's own chat template (the processor's) and prepare_inputs: its image processor, and its
        video processor, given a video file through its OpenCV loader and frame sampling (at the request's
        fps) or a frame list as decoded frames at the list's rate. A pixel budget is what a user sets in
        the checkpoint's preprocessor config: images take it as prepare_inputs' min_pixels / max_pixels, the
        video processor (which prepare_inputs passes none) as the same settings on a copy of it."""
        import copy

        from mlx_vlm.utils import prepare_inputs

        proc = self._processor(tokenizer_dir)
        image_budget = processor_options(options)
        video_options = image_budget.pop("videos_kwargs", {})
        video_budget = {k: v for k, v in video_options.items() if k != "fps"}
        if videos and video_budget:
            proc = copy.copy(proc)
            proc.video_processor = copy.copy(proc.video_processor)
            vars(proc.video_processor).update(video_budget)
        texts = [proc.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        imgs = [open_image(p).convert("RGB") for p in images] or None
        media = image_budget if images else {}
        if videos:
            # a file: mlx-vlm's loader samples it at the requested fps; frames: [T, C, H, W] uint8 as its loader
            # returns them, at the rate they were taken
            media["videos"] = [v["file"] if "file" in v else video_frames(v).transpose(0, 3, 1, 2) for v in videos]
            media["fps"] = [video_options.get("fps", 2.0) if "file" in v else v["fps"] for v in videos]
        out = prepare_inputs(proc, images=imgs, prompts=texts, padding=True, padding_side="left", **media)
        # it computes no second_per_grid_ts (its positions never read one): that stage is not covered
        return {k: _to_torch(v) for k, v in out.items() if k in INPUT_KEYS}

    def _call_kwargs(self, inputs: dict) -> dict:
        """The canonical model-inputs dict as mlx-vlm's Model.__call__ takes it. Images and videos in one
        request are handed over both, as mlx-vlm's own generate does: its get_input_embeddings then encodes
        the images alone (one grid, pixel_values first), and the report shows what that does to the videos."""
        kw = {
            "pixel_values": _to_mlx(inputs.get("pixel_values")),
            "mask": _to_mlx(inputs.get("attention_mask")),
            "image_grid_thw": _to_mlx(inputs.get("image_grid_thw")),
            "video_grid_thw": _to_mlx(inputs.get("video_grid_thw")),
        }
        if inputs.get("pixel_values_videos") is not None:
            kw["pixel_values_videos"] = _to_mlx(inputs["pixel_values_videos"])
        return {k: v for k, v in kw.items() if v is not None}

    def run(self, inputs, *, capture):
        m = self.model
        vis, text = m.vision_tower, m.language_model.model
        got: dict = {}
        modules = {"vision.patch_embed": vis.patch_embed, "vision.merger": vis, "text": text, "text.norm": text.norm}
        modules.update({f"vision.block.{i}": b for i, b in enumerate(vis.blocks)})
        modules.update({f"text.layer.{i}": layer for i, layer in enumerate(text.layers)})

        def record(name, args, kwargs, out):
            if name == "text":  # Qwen2Model: what it is given
                got["text.inputs_embeds"] = _to_torch(kwargs["inputs_embeds"])
                if kwargs.get("position_ids") is not None:
                    got["text.position_ids"] = _three_sections(_to_torch(kwargs["position_ids"]))
            else:
                got[name] = _to_torch(out)

        m.language_model._rope_deltas = m.language_model._position_ids = None  # no state from an earlier request
        with _tapped(modules, record):
            out = m(_to_mlx(inputs["input_ids"]), **self._call_kwargs(inputs))
        got["logits"] = _to_torch(out.logits)
        grid = inputs.get("image_grid_thw", inputs.get("video_grid_thw"))
        if grid is not None:
            v = m.config.vision_config
            for i in range(len(vis.blocks)):  # mlx-vlm runs the blocks in window order
                got[f"vision.block.{i}"] = conversions.unpermute_windows(
                    got[f"vision.block.{i}"],
                    torch.as_tensor(grid),
                    window_size=v.window_size,
                    patch_size=v.patch_size,
                    merge_size=v.spatial_merge_size,
                    where=f"mlx-vlm vision.block.{i}",
                )
        deltas = m.language_model._rope_deltas
        if deltas is not None and inputs.get("attention_mask") is not None:
            got["text.rope_deltas"] = conversions.rope_deltas_padded(
                _to_torch(deltas), "unpadded", inputs["attention_mask"], "mlx-vlm rope_deltas"
            )
        return {k: v for k, v in got.items() if k in capture}

    def _row_inputs(self, inputs: dict, row: int) -> dict:
        """Row `row` of a left-padded batch on its own: its real tokens and its images' pixel rows."""
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        keep = slice(None) if mask is None else mask[row].bool()
        out = {"input_ids": ids[row][keep][None]}
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        grid = inputs.get("image_grid_thw")
        if grid is not None:
            cfg = self.model.config
            items = conversions.vision_row_items(ids, grid, cfg.image_token_id, cfg.vision_config.spatial_merge_size)
            sizes = [int(g.prod()) for g in grid]
            starts = np.cumsum([0] + sizes)
            if items[row]:
                out["image_grid_thw"] = grid[items[row]]
                out["pixel_values"] = torch.cat([inputs["pixel_values"][starts[k] : starts[k + 1]] for k in items[row]])
        for key in ("pixel_values_videos", "video_grid_thw"):
            if inputs.get(key) is not None:
                if len(ids) > 1:
                    raise NotCovered("batched video requests: rows are split for images only")
                out[key] = inputs[key]
        return out

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):
        """mlx-vlm's generate_step, greedy (temperature 0, no penalties), one row at a time (its
        generate takes one prompt); rows that stopped are padded with an eos id. Judged on tokens and
        top-k ids: the log-probs generate_step yields differ from float64 by about 1e-5 at step 0 (a
        float32 log-softmax over 152064 entries), above the 3e-6 float32 noise budget of the tokens rule,
        while the logits stage itself passes with mean KL 3e-13. prefill_chunk: generate_step's own
        `prefill_step_size` (None: its default, 2048); mlx-vlm runs a longer prompt through the model in
        chunks of that many tokens."""
        import mlx.core as mx
        from mlx_vlm.generate.ar import generate_step

        eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
        tokens, topk = [], []
        for row in range(inputs["input_ids"].shape[0]):
            r = self._row_inputs(inputs, row)
            kw = self._call_kwargs(r)
            self.model.language_model._rope_deltas = self.model.language_model._position_ids = None
            ids, k_ids = [], []
            steps = generate_step(
                _to_mlx(r["input_ids"]),
                self.model,
                kw.pop("pixel_values", None),
                kw.pop("mask", None),
                max_tokens=max_new_tokens,
                temperature=0.0,
                repetition_penalty=None,
                **({} if prefill_chunk is None else {"prefill_step_size": prefill_chunk}),
                **kw,
            )
            for token, lp in steps:
                lp = _to_torch(mx.reshape(lp, (-1,)))
                best = lp.topk(5)
                ids.append(int(token))
                k_ids.append(best.indices.tolist())
                if int(token) in eos or len(ids) >= max_new_tokens:
                    break
            tokens.append(ids)
            topk.append(k_ids)
        pad = min(eos)
        return {
            "tokens": conversions.pad_generated(tokens, sorted(eos), pad, "mlx-vlm generate"),
            "topk": conversions.pad_generated(topk, sorted(eos), pad, "mlx-vlm top-k", fill=pad),
        }
