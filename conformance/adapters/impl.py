"""The fast path (qwen25vl.impl) as a target: the default of `qwen25vl conform`.

impl takes preprocessing, the chat template, window partition, rotary positions and MRoPE indices
from spec by design (impl/model.py docstring), so those fn.* stages call the very functions impl
imports; what impl computes itself is judged on its own code: the rotary tables it builds
(`mrope_half_tables`, fn.mrope_cos_sin), every model stage end to end, teacher-forced vision
blocks and decoder layers (its modules fed the golden input), and its cached greedy decode.
Whatever impl does not expose (yet) is reported as not covered, never as passed.
"""

from __future__ import annotations

import torch

from .base import NotCovered
from .spec import SpecAdapter, torch_dtype


def _impl():
    try:
        from ...impl import model
    except ImportError as e:
        raise NotCovered(f"qwen25vl.impl is not importable: {e}") from None
    return model


class ImplAdapter(SpecAdapter):
    name = "impl"

    def __init__(self, dtype: str | None = None, device: str | None = None, attention: str = "auto"):
        cuda = torch.cuda.is_available()
        device = device or ("cuda" if cuda else "cpu")
        dtype = dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
        super().__init__(dtype, device)
        self.attention = attention
        self.model = None

    def run_items(self, stage, items, *, tokenizer_dir=None):
        _impl()  # no impl, nothing of it passes: the fn.* stages are not covered either
        return super().run_items(stage, items, tokenizer_dir=tokenizer_dir)

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        _impl()
        return super().build_inputs(conversations, images, videos, tokenizer_dir=tokenizer_dir, options=options)

    def describe(self) -> dict:
        return {
            "name": "impl",
            "version": "qwen25vl.impl",
            "dtype": self.dtype,
            "device": self.device,
            "attention": self.attention,
        }

    def prepare(self, checkpoint, *, dtype, device):
        m = _impl()
        if not hasattr(m, "Qwen25VL") or not hasattr(m.Qwen25VL, "from_pretrained"):
            raise NotCovered("qwen25vl.impl has no Qwen25VL.from_pretrained")
        self.model = m.Qwen25VL.from_pretrained(
            checkpoint, dtype=torch_dtype(self.dtype), device=self.device, attention=self.attention
        )
        self.config = self.model.config

    def mrope_cos_sin(self, position_ids, *, head_dim, theta, mrope_section):
        m = _impl()
        if not hasattr(m, "mrope_half_tables"):
            raise NotCovered("impl has no mrope_half_tables")
        from types import SimpleNamespace

        cfg = SimpleNamespace(head_dim=head_dim, rope_theta=theta, mrope_section=tuple(mrope_section))
        cos, sin = m.mrope_half_tables(position_ids, cfg, torch.device("cpu"))  # [B*L, D/2] float32
        _, B, L = position_ids.shape
        return tuple(torch.cat([t, t], -1).reshape(B, L, head_dim).cpu() for t in (cos, sin))

    @staticmethod
    def _cpu(d: dict) -> dict:
        return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}

    def run(self, inputs, *, capture):
        _, captured = self.model.forward(self._inputs(inputs), capture=list(capture))
        return self._cpu(captured)

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        if not hasattr(self.model, "generate_from_inputs"):
            raise NotCovered("impl has no generate_from_inputs")
        return self.model.generate_from_inputs(self._inputs(inputs), max_new_tokens, eos_token_id).cpu()

    def run_stage(self, stage, feeds):
        """Teacher-forced stages through impl's own modules (vision blocks, decoder layers, norm, head)."""
        m, model = _impl(), self.model
        try:
            dev, dt = model.device_, model.dtype_
            hidden = feeds.get("hidden")
            hidden = hidden.to(device=dev, dtype=dt) if hidden is not None else None
            v = self.config.vision
            if stage.startswith("vision.block."):
                i = int(stage.rsplit(".", 1)[1])
                grid = torch.cat([feeds[k] for k in ("image_grid_thw", "video_grid_thw") if feeds.get(k) is not None])
                m2 = v.spatial_merge_size**2
                wi, cu_w, cu = m.window_partition(
                    grid, window_size=v.window_size, patch_size=v.patch_size, merge_size=v.spatial_merge_size
                )
                cos, sin = m.vision_rotary_cos_sin(
                    m.vision_rotary_positions(grid, v.spatial_merge_size),
                    v.head_dim,
                    m.VISION_ROPE_THETA,
                    dtype=torch.float32,
                )
                perm = (wi[:, None] * m2 + torch.arange(m2)).reshape(-1).to(dev)
                half = v.head_dim // 2
                cos, sin = (t[:, :half].to(dev).index_select(0, perm).contiguous() for t in (cos, sin))
                P = hidden.shape[0]
                plan = m.SegmentPlan(cu if i in v.fullatt_block_indexes else cu_w, P, dev, dt, self.attention)
                with torch.inference_mode():
                    out = model.visual.blocks[i](hidden.index_select(0, perm), cos, sin, plan)
                return out.index_select(0, torch.argsort(perm)).cpu()
            if stage == "vision.patch_embed":
                pixels = torch.cat(
                    [feeds[k] for k in ("pixel_values", "pixel_values_videos") if feeds.get(k) is not None]
                )
                with torch.inference_mode():
                    return model.visual.patch_embed(pixels.to(device=dev, dtype=dt)).cpu()
            if stage == "vision.merger":  # rows in pixel_values order already group each merge block
                vt = model.visual
                P = hidden.shape[0]
                with torch.inference_mode():
                    x = m.rms_norm(hidden, vt.ln_q, v.rms_norm_eps, use_triton=vt.use_triton)
                    x = x.view(P // v.spatial_merge_size**2, -1)
                    return vt.mlp2(torch.nn.functional.gelu(vt.mlp0(x))).cpu()
            if stage.startswith("text.layer."):
                i = int(stage.rsplit(".", 1)[1])
                cos, sin = m.mrope_half_tables(feeds["position_ids"], self.config, dev)
                mask = feeds.get("attention_mask")
                mask = torch.ones_like(feeds["input_ids"]) if mask is None else mask
                with torch.inference_mode():
                    return model.text.layers[i].prefill(hidden, cos, sin, m.prefill_mask(mask.to(dev)), None).cpu()
            if stage == "text.norm":
                with torch.inference_mode():
                    return model.text.final(hidden).cpu()
            if stage == "logits":
                with torch.inference_mode():
                    return model.text.lm_head(hidden).cpu()
        except (AttributeError, TypeError) as e:  # impl's internals moved: say so, do not guess
            raise NotCovered(f"teacher-forced {stage}: impl internals changed ({e})") from None
        raise NotCovered(f"teacher-forced {stage}")
