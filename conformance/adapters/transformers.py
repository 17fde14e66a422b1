"""Hugging Face transformers (5.x) as a target: the most used implementation, judged like any port.

Every stage calls transformers' own code: `smart_resize` of the PIL image processor, the processor
(default backend, as users get it) for image preprocessing and prompts, `vision_utils` for the
vision positions and windows, `get_rope_index` for MRoPE positions, the rotary embedding module for
the text tables, and the model with forward hooks for the captured stages. The only glue written
here is what transformers does inline (un-permuting window order for the block captures, the
section pick of `apply_multimodal_rotary_pos_emb`), each marked. Known divergences are explained in
conformance/expectations/transformers.json.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import torch

from ...spec.forward import INPUT_KEYS
from .base import ChunkedGeneration, NotCovered
from .spec import torch_dtype

TINY = Path(__file__).resolve().parents[2] / "fixtures" / "checkpoints" / "tiny"  # its tokenizer and chat template


def _token_types(input_ids, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """mm_token_type_ids int32 [B, L]: 1 on image pads, 2 on video pads, 0 elsewhere."""
    t = torch.zeros_like(input_ids, dtype=torch.int32)
    t[input_ids == image_token_id] = 1
    t[input_ids == video_token_id] = 2
    return t


def open_image(path):
    """An image file as the in-memory PIL image a user holds after Image.open: decoded, turned upright by
    its EXIF orientation (as transformers' load_image does for files), its mode untouched (RGBA keeps alpha).

    This target hands images to the processor in memory, never as paths. transformers 5.24 turns a path
    or URL into an image with image_utils.load_image, which ends in convert("RGB") and so drops alpha
    (transparent pixels keep their hidden colour); a PIL image in memory instead goes through the image
    processor's convert_to_rgb, which composites transparency over white: the spec's colour rule
    (spec/image.py). expectations/transformers.json lists no image divergence because images are fed
    this way; tests/conformance/test_transformers_images.py fails if the feeding changes.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)  # a transposed copy, or a plain copy without EXIF orientation


class TransformersAdapter(ChunkedGeneration):
    name = "transformers"

    def __init__(self, dtype: str = "float32", device: str = "cpu"):
        import transformers

        self.tf = transformers
        self.dtype, self.device = str(dtype), device
        self.model = None
        self._processors: dict = {}

    def describe(self) -> dict:
        return {
            "name": "transformers",
            "version": self.tf.__version__,
            "dtype": self.dtype,
            "device": self.device,
            "attention": "eager",
        }

    def processor(self, folder: str):
        """The Qwen2.5-VL processor on the PIL image path. AutoProcessor also builds the video processor,
        which needs torchvision (not installed here): the processor is assembled from its PIL image
        processor and tokenizer instead, and video preprocessing is not covered."""
        if folder not in self._processors:
            import json

            from transformers import AutoTokenizer, Qwen2_5_VLProcessor
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            tok = AutoTokenizer.from_pretrained(folder)
            tok.padding_side = "left"
            proc = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
            proc.image_processor, proc.tokenizer, proc.video_processor = (
                Qwen2VLImageProcessorPil.from_pretrained(folder),
                tok,
                None,
            )
            proc.chat_template = json.loads((Path(folder) / "chat_template.json").read_text())["chat_template"]
            proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
            proc.image_token_id = tok.convert_tokens_to_ids(proc.image_token)
            proc.video_token_id = tok.convert_tokens_to_ids(proc.video_token)
            self._processors[folder] = proc
        return self._processors[folder]

    # ---- exact-stage functions
    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)

    def resize_bicubic(self, image, size):
        from PIL import Image  # the PIL processor path: Image.resize with BICUBIC

        return np.asarray(Image.fromarray(np.asarray(image)).resize((size[1], size[0]), Image.Resampling.BICUBIC))

    def patchify(self, frames, *, patch_size, temporal_patch_size, merge_size):
        """The image processor's patchify: one still image (T = 1). Frame stacks go through the video
        processor, which needs torchvision (not installed): those items are not covered."""
        if frames.shape[0] != 1:
            raise NotCovered("patchify of several frames is in transformers' video processor (needs torchvision)")
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        pv, gh, gw = Qwen2VLImageProcessorPil.patchify(
            None,
            frames[0].numpy(),
            patch_size=patch_size,
            merge_size=merge_size,
            temporal_patch_size=temporal_patch_size,
        )
        return torch.from_numpy(np.array(pv)), torch.tensor([[1, gh, gw]])

    def preprocess_image(self, image, *, min_pixels, max_pixels):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        key = ("image", min_pixels, max_pixels)
        if key not in self._processors:
            self._processors[key] = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
        out = self._processors[key](images=[np.asarray(image)], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def vision_rotary_positions(self, grid_thw, *, merge_size):
        from transformers.vision_utils import get_vision_position_ids

        return get_vision_position_ids(torch.as_tensor(grid_thw), merge_size)

    def window_partition(self, grid_thw, *, window_size, patch_size, merge_size):
        from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

        grid = torch.as_tensor(grid_thw)
        wi, cw = get_vision_window_index(
            grid, spatial_merge_size=merge_size, window_size=window_size, patch_size=patch_size
        )
        return wi, cw.long(), get_vision_cu_seqlens(grid).long()

    def render_chat(self, messages, *, add_generation_prompt, add_vision_id):
        proc = self.processor(str(TINY))
        return proc.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id
        )

    def expand_vision_tokens(self, texts, image_grid_thw, video_grid_thw, *, merge_size):
        """The processor's own placeholder expansion (replace_*_token + get_text_with_replacements)."""
        proc = self.processor(str(TINY))
        imgs = (
            []
            if image_grid_thw is None
            else [proc.replace_image_token({"image_grid_thw": image_grid_thw}, i) for i in range(len(image_grid_thw))]
        )
        saved = proc.video_processor
        proc.video_processor = types.SimpleNamespace(merge_size=merge_size)  # replace_video_token reads only this
        try:
            vids = (
                []
                if video_grid_thw is None
                else [
                    proc.replace_video_token({"video_grid_thw": video_grid_thw}, i) for i in range(len(video_grid_thw))
                ]
            )
        finally:
            proc.video_processor = saved
        return proc.get_text_with_replacements(list(texts), imgs, vids)[0]

    def tokenize(self, text, *, tokenizer_dir):
        return self.processor(tokenizer_dir).tokenizer.encode(text, add_special_tokens=False)

    def rope_index(self, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, *, config):
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        cfg = Qwen2_5_VLConfig(**{k: v for k, v in config.items() if k not in ("architectures",)})
        host = types.SimpleNamespace(config=cfg)  # get_rope_index reads only self.config and this helper
        host.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, host)
        types_ = _token_types(input_ids, config["image_token_id"], config["video_token_id"])
        pos, deltas = Qwen2_5_VLModel.get_rope_index(
            host,
            input_ids,
            types_,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            attention_mask=attention_mask,
        )
        return pos, self._canonical_deltas(deltas, attention_mask, input_ids.shape[1])

    @staticmethod
    def _canonical_deltas(deltas, attention_mask, L):
        """transformers counts decode positions from the number of real tokens (attention_mask.cumsum)
        and its delta is relative to that; the canonical delta (docs/INTERFACES.md) is relative to the
        padded length L. Same decode positions: subtract each row's left padding."""
        deltas = deltas.reshape(-1, 1).cpu()
        if attention_mask is None:
            return deltas
        pads = (L - attention_mask.sum(-1)).reshape(-1, 1).to(deltas.dtype).cpu()
        return deltas - pads

    def mrope_cos_sin(self, position_ids, *, head_dim, theta, mrope_section):
        from transformers import Qwen2_5_VLTextConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

        N = 2
        cfg = Qwen2_5_VLTextConfig(
            hidden_size=head_dim * N,
            num_attention_heads=N,
            num_key_value_heads=N,
            rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(mrope_section)},
        )
        emb = Qwen2_5_VLRotaryEmbedding(cfg)
        return emb(torch.zeros(1, dtype=torch.float32), position_ids)  # sectioned [B, L, D] float32 since 5.x

    # ---- the model
    def prepare(self, checkpoint, *, dtype, device):
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.model = (
            Qwen2_5_VLForConditionalGeneration.from_pretrained(
                checkpoint, dtype=torch_dtype(self.dtype), attn_implementation="eager"
            )
            .to(self.device)
            .eval()
        )
        self.checkpoint = checkpoint

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        from PIL import Image

        if videos:
            raise NotCovered("transformers' video processor needs torchvision, which is not installed")
        proc = self.processor(tokenizer_dir)
        texts = [proc.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        imgs = [open_image(p) for p in images] or None  # in memory, alpha kept: see open_image
        vids = [[np.asarray(Image.open(f).convert("RGB")) for f in v["frames"]] for v in videos] or None
        kwargs = {}
        if options.get("min_pixels"):
            kwargs["min_pixels"] = options["min_pixels"]
        if options.get("max_pixels"):
            kwargs["max_pixels"] = options["max_pixels"]
        if vids:
            vo = options.get("video_options", {})
            kwargs["videos_kwargs"] = {
                k: v
                for k, v in {
                    "fps": videos[0].get("fps"),
                    "do_sample_frames": False,
                    "min_pixels": vo.get("min_pixels"),
                    "max_pixels": vo.get("max_pixels"),
                }.items()
                if v is not None
            }
        out = proc(text=texts, images=imgs, videos=vids, padding=True, return_tensors="pt", **kwargs)
        res = {k: out[k] for k in INPUT_KEYS if k in out}
        if "second_per_grid_ts" in res:
            res["second_per_grid_ts"] = torch.as_tensor(res["second_per_grid_ts"], dtype=torch.float64)
        return res

    def run(self, inputs, *, capture):
        m = self.model
        vis, lm = m.model.visual, m.model.language_model
        got: dict = {}
        hooks = []
        grids = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]
        calls: dict = {}  # vision stage -> its output of each tower call, in window order for the blocks
        merged: list = []

        def keep(name):
            def hook(mod, args, out):
                got[name] = (out[0] if isinstance(out, tuple) else out).detach().float().cpu()

            return hook

        def keep_call(name):
            def hook(mod, args, out):
                calls.setdefault(name, []).append((out[0] if isinstance(out, tuple) else out).detach().float().cpu())

            return hook

        hooks.append(vis.patch_embed.register_forward_hook(keep_call("vision.patch_embed")))
        for i, blk in enumerate(vis.blocks):
            hooks.append(blk.register_forward_hook(keep_call(f"vision.block.{i}")))
        hooks.append(vis.register_forward_hook(lambda mod, a, out: merged.append(out.pooler_output.detach().float())))

        def pre(mod, args, kwargs):
            got["text.inputs_embeds"] = kwargs["inputs_embeds"].detach().float().cpu()
            if kwargs.get("position_ids") is not None:
                got["text.position_ids"] = kwargs["position_ids"].detach().cpu()

        hooks.append(lm.register_forward_pre_hook(pre, with_kwargs=True))
        for i, layer in enumerate(lm.layers):
            hooks.append(layer.register_forward_hook(keep(f"text.layer.{i}")))
        hooks.append(lm.norm.register_forward_hook(keep("text.norm")))
        model_inputs = self._model_inputs(inputs)
        try:
            m.model.rope_deltas = None
            with torch.no_grad():
                out = m(**model_inputs, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        got["logits"] = out.logits.detach().float().cpu()
        got.update(self._vision_rows(calls, grids))
        if merged:
            got["vision.merger"] = torch.cat(merged).cpu()
        if m.model.rope_deltas is not None:
            got["text.rope_deltas"] = self._canonical_deltas(
                m.model.rope_deltas.detach(), inputs.get("attention_mask"), inputs["input_ids"].shape[1]
            )
        if (
            "text.position_ids" in got
            and got["text.position_ids"].dim() == 3
            and got["text.position_ids"].shape[0] == 4
        ):
            got["text.position_ids"] = got["text.position_ids"][1:]  # v5 prepends the text positions row
        return {k: v for k, v in got.items() if k in capture}

    def _vision_rows(self, calls: dict, grids: list) -> dict:
        """The vision stages in pixel_values row order, from the tower's calls: transformers encodes the images
        in one call and the videos in another (one grid each), and runs the blocks in window order."""
        from transformers.vision_utils import get_vision_window_index

        from ...spec.windows import window_row_order

        v = self.model.config.vision_config
        n_calls = len(calls.get("vision.patch_embed", []))
        if n_calls == len(grids):
            per_call = grids  # one call per kind (transformers 5.x), or no vision at all
        elif n_calls == 1:
            per_call = [torch.cat(grids)]  # one call over every item
        else:
            return {}  # tower calls this adapter cannot pair with grids: the vision stages are not captured
        out = {}
        for name, outs in calls.items():
            if name.startswith("vision.block."):
                restored = []
                for rows, grid in zip(outs, per_call):
                    wi, _ = get_vision_window_index(
                        grid,
                        spatial_merge_size=v.spatial_merge_size,
                        window_size=v.window_size,
                        patch_size=v.patch_size,
                    )
                    restored.append(rows[torch.argsort(window_row_order(wi, v.spatial_merge_size))])
                outs = restored
            out[name] = torch.cat(outs)
        return out

    def _model_inputs(self, inputs: dict) -> dict:
        """The model-inputs dict as transformers' forward and generate take it: seconds per grid as a list,
        and the mm_token_type_ids it reads instead of scanning for pad ids."""
        model_inputs = {k: v for k, v in inputs.items() if v is not None}
        if "second_per_grid_ts" in model_inputs:
            model_inputs["second_per_grid_ts"] = model_inputs["second_per_grid_ts"].tolist()
        cfg = self.model.config
        model_inputs["mm_token_type_ids"] = _token_types(inputs["input_ids"], cfg.image_token_id, cfg.video_token_id)
        return model_inputs

    def _pad_token_id(self) -> int:
        """generation_config.json's pad id (the published config.json has none), as the spec pads."""
        for cfg in (self.model.generation_config, self.model.config):
            if getattr(cfg, "pad_token_id", None) is not None:
                return int(cfg.pad_token_id)
        return 151643

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):
        """generate with transformers' own `prefill_chunk_size`. Its chunked prefill refuses raw pixels
        (it cannot split them), so the vision tower runs first and its outputs go in as
        `mm_encoder_outputs`, which generate hands to each chunk for the placeholders it holds."""
        model_inputs = self._model_inputs(inputs)
        self.model.model.rope_deltas = None
        if prefill_chunk is not None:
            model_inputs["prefill_chunk_size"] = prefill_chunk
            encoded = {}
            with torch.no_grad():
                for kind, pixels, grid in (
                    ("image", "pixel_values", "image_grid_thw"),
                    ("video", "pixel_values_videos", "video_grid_thw"),
                ):
                    if model_inputs.get(pixels) is not None:
                        features = getattr(self.model.model, f"get_{kind}_features")
                        encoded[kind] = features(model_inputs.pop(pixels), model_inputs[grid], return_dict=True)
            if encoded:
                model_inputs["mm_encoder_outputs"] = encoded
        with torch.no_grad():
            out = self.model.generate(
                **model_inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                repetition_penalty=1.0,
                eos_token_id=eos_token_id,
                pad_token_id=self._pad_token_id(),
                output_scores=True,
                return_dict_in_generate=True,
            )
        L = inputs["input_ids"].shape[1]
        tokens = out.sequences[:, L:].cpu()
        topk = torch.stack([s.topk(5, dim=-1).indices for s in out.scores], dim=1).cpu()
        return tokens, topk
