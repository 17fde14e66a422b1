"""The spec as a target: every stage, teacher-forced stages included. It must pass its own fixtures
(in float32 against the float64 goldens, within its own float32 control), and it is the base class
the planted-bug adapters of tests/conformance/planted/ break one thing at a time.

Hooks a subclass may override to change one behaviour everywhere it is used (the function stage
and the model run alike): `rope_rule` (position ids), `model_config` (what the model runs with),
and every protocol method.
"""

from __future__ import annotations

import torch

from ...spec import mrope, text, tokens, vision, windows
from ...spec.checkpoint import load_checkpoint
from ...spec.config import Qwen25VLConfig
from ...spec.forward import forward
from ...spec.generate import generate_greedy
from .. import stages
from .base import ChunkedGeneration

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)}") from None


class SpecAdapter(ChunkedGeneration):
    name = "spec"

    def __init__(self, dtype: str = "float32", device: str = "cpu"):
        torch_dtype(dtype)
        self.dtype, self.device = str(dtype), device
        self.config: Qwen25VLConfig | None = None
        self.params: dict | None = None
        self._tokenizers: dict = {}

    def describe(self) -> dict:
        return {"name": self.name, "version": "qwen25vl.spec", "dtype": self.dtype, "device": self.device}

    # ---- the hooks
    def model_config(self, config: Qwen25VLConfig) -> Qwen25VLConfig:
        return config

    def rope_rule(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        return mrope.rope_index(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=config
        )

    def tokenizer(self, folder: str):
        if folder not in self._tokenizers:
            self._tokenizers[folder] = tokens.load_tokenizer(folder)
        return self._tokenizers[folder]

    # ---- exact-stage functions: the rows marked `direct` call their spec function (made below);
    # these three adapt the protocol's arguments
    def tokenize(self, text_, *, tokenizer_dir):
        return self.tokenizer(tokenizer_dir).encode(text_, add_special_tokens=False).ids

    def rope_index(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        cfg = Qwen25VLConfig.from_dict(config) if isinstance(config, dict) else config
        return self.rope_rule(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, config=cfg)

    def mrope_cos_sin(self, position_ids, *, head_dim, theta, mrope_section):
        return mrope.mrope_cos_sin(
            position_ids, head_dim=head_dim, theta=theta, mrope_section=mrope_section, dtype=torch.float64
        )

    # ---- the model
    def prepare(self, checkpoint, *, dtype, device):
        self.use_weights(*load_checkpoint(checkpoint, dtype=torch_dtype(self.dtype)))

    def use_weights(self, config: Qwen25VLConfig, params: dict) -> None:
        """Run on these (already loaded) weights, under this adapter's `model_config` hook."""
        self.config, self.params = self.model_config(config), params

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        # a frame list is used as given; a file is decoded and sampled (spec.video.sample_video)
        frames = [list(v["frames"]) if "frames" in v else v["file"] for v in videos] or None
        vopts = dict(options.get("video_options", {}))
        if videos and "fps" in videos[0]:
            vopts.setdefault("fps", videos[0]["fps"])
        return tokens.build_inputs(
            conversations,
            images or None,
            frames,
            self.tokenizer(tokenizer_dir),
            min_pixels=options.get("min_pixels"),
            max_pixels=options.get("max_pixels"),
            video_options=vopts,
        )

    def _inputs(self, inputs: dict) -> dict:
        return {k: v for k, v in inputs.items() if v is not None}

    def run(self, inputs, *, capture):
        _, captured = forward(
            self.params, self.config, self._inputs(inputs), capture=list(capture), rope_rule=self.rope_rule
        )
        return captured

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):
        """Tokens, and the top-5 ids and log-probs of the logits the decode loop picked each from (so a
        mistake in the decode steps, positions or cache, shows in the log-probs where the tokens hold);
        the prompt prefilled `prefill_chunk` tokens at a time (None: at once, what generate asks)."""
        new, logits = generate_greedy(
            self.params,
            self.config,
            self._inputs(inputs),
            max_new_tokens,
            eos_token_id=eos_token_id,
            rope_rule=self.rope_rule,
            return_logits=True,
            prefill_chunk=prefill_chunk,
        )
        top = logits.double().log_softmax(-1).topk(5, dim=-1)
        return {"tokens": new, "topk": top.indices, "topk_logprobs": top.values}

    def step_logits(self, inputs: dict, new: torch.Tensor) -> torch.Tensor:
        """Logits [B, n, V] each new token was picked from: one forward over prompt + new tokens (text
        after the prompt takes the decode positions, so this equals the cached decode up to rounding)."""
        B, L = inputs["input_ids"].shape
        ids = torch.cat([inputs["input_ids"], new], dim=1)
        mask = torch.cat(
            [inputs.get("attention_mask", torch.ones(B, L, dtype=torch.int64)), torch.ones_like(new)], dim=1
        )
        logits, _ = forward(
            self.params, self.config, {**inputs, "input_ids": ids, "attention_mask": mask}, rope_rule=self.rope_rule
        )
        return logits[:, L - 1 : L - 1 + new.shape[1]]

    def run_stage(self, stage, feeds):
        cfg, params = self.config, self.params
        dtype = params["model.embed_tokens.weight"].dtype
        v = cfg.vision
        hidden = feeds.get("hidden")
        hidden = hidden.to(dtype) if hidden is not None else None
        grids = [feeds[k] for k in ("image_grid_thw", "video_grid_thw") if feeds.get(k) is not None]
        if stage == "vision.patch_embed":
            pixels = torch.cat([feeds[k] for k in ("pixel_values", "pixel_values_videos") if feeds.get(k) is not None])
            return vision.patch_embed(params, cfg, pixels.to(dtype))
        if stage.startswith("vision.block."):
            i = int(stage.rsplit(".", 1)[1])
            grid = torch.cat(grids)
            positions = windows.vision_rotary_positions(grid, v.spatial_merge_size)
            # through spec.vision's own name, so a subclass that patches the model's rotary patches this too
            cos, sin = vision.vision_rotary_cos_sin(
                positions, v.head_dim, vision.VISION_ROPE_THETA, dtype=vision._work_dtype(dtype)
            )
            wi, cu_w, cu = windows.window_partition(
                grid, window_size=v.window_size, patch_size=v.patch_size, merge_size=v.spatial_merge_size
            )
            order = windows.window_row_order(wi, v.spatial_merge_size)
            seg = cu if i in v.fullatt_block_indexes else cu_w
            out = vision.vision_block(params, cfg, i, hidden[order], cos[order], sin[order], seg)
            return out[torch.argsort(order)]
        if stage == "vision.merger":  # row order groups each merge block already: no permutation needed
            return vision.patch_merger(params, cfg, hidden)
        if stage == "text.inputs_embeds":
            ids = feeds["input_ids"]
            n_img = (
                0
                if feeds.get("image_grid_thw") is None
                else int(feeds["image_grid_thw"].prod(-1).sum()) // v.spatial_merge_size**2
            )
            img = hidden[:n_img] if feeds.get("image_grid_thw") is not None else None
            vid = hidden[n_img:] if feeds.get("video_grid_thw") is not None else None
            return text.scatter_vision_features(text.embed(params, ids), ids, img, vid, cfg)
        if stage.startswith("text.layer."):
            i = int(stage.rsplit(".", 1)[1])
            cos, sin = mrope.mrope_cos_sin(
                feeds["position_ids"],
                head_dim=cfg.head_dim,
                theta=cfg.rope_theta,
                mrope_section=cfg.mrope_section,
                dtype=torch.float64,
            )
            mask = feeds.get("attention_mask")
            mask = torch.ones_like(feeds["input_ids"]) if mask is None else mask
            return text.decoder_layer(params, cfg, i, hidden, cos.to(dtype), sin.to(dtype), mask)[0]
        if stage == "text.norm":
            return text.final_norm(params, cfg, hidden)
        if stage == "logits":
            return text.lm_head(params, hidden)
        return super().run_stage(stage, feeds)


def _forward_to_spec(row):
    spec_fn = row.spec[0]

    def method(self, *args, **kwargs):
        return spec_fn(*args, **kwargs)

    method.__name__ = method.__qualname__ = row.method
    method.__doc__ = f"{row.read}"
    return method


def _attach(row) -> None:
    if row.direct and row.method not in vars(SpecAdapter):
        setattr(SpecAdapter, row.method, _forward_to_spec(row))


stages.on_register(_attach)  # each direct fn.* row: the protocol method is the spec function itself
