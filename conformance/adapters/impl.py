"""The fast path (qwen25vl.impl) as a target: the default of `qwen25vl conform`.

impl takes preprocessing, the chat template, window partition, rotary positions and MRoPE indices
from spec by design (impl/model.py docstring), so those fn.* stages call the very functions impl
imports; what impl computes itself is judged on its own code: the rotary tables it builds
(`mrope_half_tables`, fn.mrope_cos_sin), every model stage end to end, teacher-forced vision
blocks and decoder layers (its public one-stage methods fed the golden input), and its cached greedy
decode. A stage impl has no method for is reported as not covered, never as passed; an error inside
impl is an error.

tp_group: a torch.distributed group; the model is then this rank's shard over it (impl.tp.load_shard,
as `qwen25vl generate --tp` loads it). Every rank runs the same calls in the same order
(`qwen25vl conform --tp N` under torchrun; tests/impl/test_tp.py runs the harness so under 2 gloo
processes).
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

    def __init__(self, dtype: str | None = None, device: str | None = None, attention: str = "auto", tp_group=None):
        cuda = torch.cuda.is_available()
        device = device or ("cuda" if cuda else "cpu")
        dtype = dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
        super().__init__(dtype, device)
        self.attention, self.tp_group = attention, tp_group
        self.model = None

    @classmethod
    def under_torchrun(cls, tp: int, *, dtype: str | None = None, device: str | None = None):
        """(this rank's adapter over the group torchrun made for `tp` ranks, the rank): impl.tp.init_tp."""
        from ...impl.tp import init_tp

        group, rank, rank_device = init_tp(tp, device)
        return cls(dtype=dtype, device=str(rank_device), tp_group=group), rank

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
            **({"tp": torch.distributed.get_world_size(self.tp_group)} if self.tp_group is not None else {}),
        }

    def prepare(self, checkpoint, *, dtype, device):
        m = _impl()
        if not hasattr(m, "Qwen25VL") or not hasattr(m.Qwen25VL, "from_pretrained"):
            raise NotCovered("qwen25vl.impl has no Qwen25VL.from_pretrained")
        if self.tp_group is None:
            self.model = m.Qwen25VL.from_pretrained(
                checkpoint, dtype=torch_dtype(self.dtype), device=self.device, attention=self.attention
            )
        else:
            from ...impl.tp import load_shard

            self.model = load_shard(
                checkpoint, self.tp_group, self.device, dtype=torch_dtype(self.dtype), attention=self.attention
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

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):
        if not hasattr(self.model, "generate_from_inputs"):
            raise NotCovered("impl has no generate_from_inputs")
        return self.model.generate_from_inputs(
            self._inputs(inputs), max_new_tokens, eos_token_id, prefill_chunk=prefill_chunk
        ).cpu()

    def run_stage(self, stage, feeds):
        """Teacher-forced stages through impl's public one-stage methods (vision blocks and merger,
        decoder layers, final norm, LM head)."""
        model = self.model
        dev, dt = model.device_, model.dtype_
        hidden = feeds.get("hidden")
        hidden = hidden.to(device=dev, dtype=dt) if hidden is not None else None
        with torch.inference_mode():
            if stage == "vision.patch_embed":
                pixels = torch.cat(
                    [feeds[k] for k in ("pixel_values", "pixel_values_videos") if feeds.get(k) is not None]
                )
                return model.visual.patch_embed(pixels.to(device=dev, dtype=dt)).cpu()
            if stage.startswith("vision.block."):
                grid = torch.cat([feeds[k] for k in ("image_grid_thw", "video_grid_thw") if feeds.get(k) is not None])
                return model.visual.block(int(stage.rsplit(".", 1)[1]), hidden, grid, self.attention).cpu()
            if stage == "vision.merger":  # rows in pixel_values order already group each merge block
                return model.visual.merge(hidden).cpu()
            if stage.startswith("text.layer."):
                i = int(stage.rsplit(".", 1)[1])
                return model.text_layer(i, hidden, feeds["position_ids"], feeds.get("attention_mask")).cpu()
            if stage == "text.norm":
                return model.text.final(hidden).cpu()
            if stage == "logits":
                return model.text.lm_head(hidden).cpu()
        raise NotCovered(f"teacher-forced {stage}")
