"""Mistakes of the input half: resize, resampling, frame sampling, patchify, prompt, tokenizer, batch.

Each adapter breaks one protocol method (a fn.* stage) or build_inputs (a preprocess.* stage). A broken
method that build_inputs also runs (_base.INPUT_SITES) is broken there too, as in a port: a Patched variant
routes those calls to it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tokenizers import Regex, normalizers, pre_tokenizers

from ...spec import chat, image, patches, resize, video
from ..adapters.spec import SpecAdapter
from ._base import Mistake, Patched

# ---------------------------------------------------------------------------------------------- resize


def _resize_ties_up(height, width, *, factor=28, **budget):
    """spec.resize.smart_resize, but a side of factor * (k + 1/2) rounds up (C's std::round), not to even."""

    def up(x):  # nudge a tie by one pixel so Python's round() goes up
        return x + 1 if (2 * x) % factor == 0 and (2 * x // factor) % 2 == 1 else x

    return resize.smart_resize(up(height), up(width), factor=factor, **budget)


class ResizeTiesAwayFromZero(Patched):
    """smart_resize rounds ties up (C's std::round) instead of Python's half-to-even: 70 px -> 84, not 56."""

    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        return _resize_ties_up(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


class ResizeFloat32(Patched):
    """smart_resize computed in float32 (the ratio, the square root and the scaled sides)."""

    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        resize._check_resize_args(height, width, factor, min_pixels, max_pixels)
        f32 = np.float32
        h = round(float(f32(height) / f32(factor))) * factor
        w = round(float(f32(width) / f32(factor))) * factor
        if h * w > max_pixels:
            beta = np.sqrt(f32(height) * f32(width) / f32(max_pixels))
            h = max(factor, math.floor(float(f32(height) / beta / f32(factor))) * factor)
            w = max(factor, math.floor(float(f32(width) / beta / f32(factor))) * factor)
        elif h * w < min_pixels:
            beta = np.sqrt(f32(min_pixels) / (f32(height) * f32(width)))
            h = math.ceil(float(f32(height) * beta / f32(factor))) * factor
            w = math.ceil(float(f32(width) * beta / f32(factor))) * factor
        return h, w


class ResizeRefusesSmallSides(Patched):
    """Older transformers: a side under the factor (28) raises instead of being scaled up."""

    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        if height < factor or width < factor:
            raise ValueError(f"height:{height} or width:{width} must be larger than factor:{factor}")
        return super().smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


class ResizeQwenVlUtilsRule(Patched):
    """qwen-vl-utils' smart_resize: first rounding clamped to the factor, floor branch unclamped."""

    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        return resize.smart_resize_qwen_vl_utils(
            height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
        )


def _torch_bicubic(img, size):
    """Antialiased bicubic on float values, rounded back to uint8 (the fast, torchvision processor)."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].to(torch.float32)  # [1, 3, H, W]
    y = torch.nn.functional.interpolate(x, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()


class ResizeTorchBicubic(Patched):
    """Resampling with torch's antialiased bicubic (the fast processor) instead of Pillow's."""

    def resize_bicubic(self, image_, size):
        return _torch_bicubic(image_, size)


# ---------------------------------------------------------------------------------------------- frames


class FramesFloorSampling(Patched):
    """Frame indices floor(k * T / n) (transformers' sample_frames) instead of round(linspace(0, T-1, n))."""

    def sample_frame_indices(self, total_frames, video_fps, **kwargs):
        n = len(super().sample_frame_indices(total_frames, video_fps, **kwargs))
        return [k * total_frames // n for k in range(n)]


class FramesLinspaceFloat64(Patched):
    """round(linspace(0, T-1, n)) in float64 (numpy's default) instead of float32 (torch's, qwen-vl-utils')."""

    def sample_frame_indices(self, total_frames, video_fps, **kwargs):
        n = len(super().sample_frame_indices(total_frames, video_fps, **kwargs))
        return np.rint(np.linspace(0, total_frames - 1, n)).astype(int).tolist()


class NframesRounded(Patched):
    """qwen-vl-utils 0.0.8's frame count: round(clamp(T / video_fps * fps) / 2) * 2, where >= 0.0.10 floors."""

    def sample_frame_indices(self, total_frames, video_fps, **kwargs):
        if any(kwargs.get(k) is not None for k in ("nframes", "video_start", "video_end")):
            return super().sample_frame_indices(total_frames, video_fps, **kwargs)
        fps = video.DEFAULT_FPS if kwargs.get("fps") is None else kwargs["fps"]
        lo = math.ceil(kwargs["min_frames"] / video.FRAME_FACTOR) * video.FRAME_FACTOR
        hi = math.floor(min(kwargs["max_frames"], total_frames) / video.FRAME_FACTOR) * video.FRAME_FACTOR
        n = round(min(max(total_frames / video_fps * fps, lo), hi) / video.FRAME_FACTOR) * video.FRAME_FACTOR
        if not video.FRAME_FACTOR <= n <= total_frames:
            raise ValueError(f"nframes should in interval [{video.FRAME_FACTOR}, {total_frames}], but got {n}.")
        return torch.linspace(0, total_frames - 1, n).round().long().tolist()


class OddFramesDropped(Patched):
    """An odd frame count is floored to whole temporal pairs (last frame dropped), not padded by repeating it."""

    def patchify(self, frames, *, patch_size, temporal_patch_size, merge_size):
        frames = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
        keep = max(temporal_patch_size, frames.shape[0] // temporal_patch_size * temporal_patch_size)
        return super().patchify(
            frames[:keep], patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size
        )


class PatchOrderRaster(Patched):
    """Patches in plain raster order instead of 2x2 merge blocks."""

    def patchify(self, frames, *, patch_size, temporal_patch_size, merge_size):
        pv, grid = patches.patchify(
            frames, patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size
        )
        gt, gh, gw = grid[0].tolist()
        m = merge_size
        # undo the block order: rows are (t, block row, block col, row in block, col in block)
        raster = pv.view(gt, gh // m, gw // m, m, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(pv.shape)
        return raster, grid


# ---------------------------------------------------------------------------------------------- images


def _letterbox(img, size):
    """Scale to fit inside size (h, w) keeping the aspect ratio, centre, pad with black."""
    (H, W), (h, w) = img.shape[:2], size
    s = min(h / H, w / W)
    nh, nw = min(h, max(1, round(H * s))), min(w, max(1, round(W * s)))
    out = np.zeros((h, w, img.shape[2]), dtype=np.uint8)
    y0, x0 = (h - nh) // 2, (w - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = resize.resize_bicubic(img, (nh, nw))
    return out


def _swapped(img, size):
    return resize.resize_bicubic(img, (size[1], size[0]))


class _ImagePixels(Patched):
    """preprocess_image made under the same input_patches as build_inputs: the fn.preprocess_image stage and
    the model cases' pixels see one mistake."""

    def preprocess_image(self, image_, **kwargs):
        with self._patched(self.input_patches(None, None)):
            return image.preprocess_image(image_, **kwargs)


class _ImageResample(_ImagePixels):
    """preprocess_image (and build_inputs) with image.resize_bicubic replaced by `resample`."""

    resample = None

    def input_patches(self, images, options):
        return [(image, "resize_bicubic", type(self).resample)]


class _Normalization(_ImagePixels):
    """Pixels (images and video frames) normalised with another model family's mean and std, whatever the
    caller passes: the constants of the processor the port was written from, not preprocessor_config.json's."""

    mean = std = None

    def input_patches(self, images, options):
        real, mean, std = image.normalize, self.mean, self.std

        def normalize(frames, **_caller_stats):
            return real(frames, image_mean=mean, image_std=std)

        return [(image, "normalize", normalize), (video, "normalize", normalize)]


class NormalizationHalf(_Normalization):
    """Mean and std 0.5 (Qwen3-VL's and SigLIP's preprocessor_config.json) instead of the OpenAI CLIP values."""

    mean = std = (0.5, 0.5, 0.5)


class NormalizationImagenet(_Normalization):
    """ImageNet's mean and std (torchvision's, InternVL's processor) instead of the OpenAI CLIP values."""

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Letterbox(_ImageResample):
    """The image is letterboxed (fit, centred, black bars) into the target size instead of stretched."""

    resample = staticmethod(_letterbox)


class ResizeHeightWidthSwapped(_ImageResample):
    """The resize is called with (h, w) where it takes (w, h): a non-square image comes out transposed in size."""

    resample = staticmethod(_swapped)


class ImagesResizedToLargest(Patched):
    """Every image of a request is resized to the largest target (h, w) among them, not each to its own."""

    def input_patches(self, images, options):
        sizes = []
        for path in images or []:
            H, W = image.load_image(path).shape[:2]
            budget = {k: options[k] for k in ("min_pixels", "max_pixels") if options.get(k) is not None}
            sizes.append(resize.smart_resize(H, W, **budget))
        if len(sizes) < 2:
            return []
        h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        real = image.preprocess_image

        def preprocess(image_, **kwargs):
            return real(image_, **{**kwargs, "resized_height": h, "resized_width": w})

        from ...spec import tokens

        return [(tokens, "preprocess_image", preprocess)]


class RightPadding(SpecAdapter):
    """The batch is padded on the right."""

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        out = super().build_inputs(conversations, images, videos, tokenizer_dir=tokenizer_dir, options=options)
        ids, mask = out["input_ids"].clone(), out["attention_mask"].clone()
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            row = out["input_ids"][b][out["attention_mask"][b].bool()]
            ids[b] = 151643
            ids[b, :n], mask[b] = row, 0
            mask[b, :n] = 1
        return {**out, "input_ids": ids, "attention_mask": mask}


class VideoFpsDropped(SpecAdapter):
    """Video fps metadata lost before the processor: second_per_grid_ts from a default 24 fps (2/24)."""

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        out = super().build_inputs(conversations, images, videos, tokenizer_dir=tokenizer_dir, options=options)
        if out.get("second_per_grid_ts") is not None:
            out["second_per_grid_ts"] = torch.full_like(out["second_per_grid_ts"], 2 / 24)
        return out


def _whole_clip_size(height, width, nframes, *, factor=28, min_pixels, max_pixels, **rest):
    """Qwen3-VL's video resize: the clip's t*h*w (t padded to the temporal pair) against one budget."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = math.ceil(nframes / video.FRAME_FACTOR) * video.FRAME_FACTOR
    if t * h * w > max_pixels:
        beta = math.sqrt(nframes * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (nframes * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


class VideoBudgetWholeClip(Patched):
    """Video frames sized by Qwen3-VL's rule (the whole clip's pixels within one budget: the request's, else
    the image budget), not by Qwen2.5-VL's per-frame video budget (128 to 768 tokens a frame)."""

    def input_patches(self, images, options):
        """A budget the request sets is the budget (a user of such a port writes it into the processor's
        config); with none, the image budget of preprocessor_config.json, not the per-frame video budget."""
        if any(options.get("video_options", {}).get(k) for k in ("min_pixels", "max_pixels")):
            return [(video, "video_frame_size", _whole_clip_size)]

        def in_image_budget(height, width, nframes, *, factor=28, **video_budget):
            return _whole_clip_size(height, width, nframes, factor=factor, min_pixels=3136, max_pixels=12845056)

        return [(video, "video_frame_size", in_image_budget)]


class VideoSecondsFromRequestedFps(SpecAdapter):
    """second_per_grid_ts from the fps the request asked for (2 / fps) instead of the rate actually sampled
    (2 / (n / T * video_fps)); the two agree only when the file's length gives exactly that rate."""

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        out = super().build_inputs(conversations, images, videos, tokenizer_dir=tokenizer_dir, options=options)
        if out.get("second_per_grid_ts") is not None:
            asked = options.get("video_options", {}).get("fps", video.DEFAULT_FPS)
            out["second_per_grid_ts"] = torch.full_like(out["second_per_grid_ts"], video.FRAME_FACTOR / asked)
        return out


# ---------------------------------------------------------------------------------------------- prompt


class NoDefaultSystemPrompt(Patched):
    """A hand-written template without the default system block."""

    def render_chat(self, messages, *, add_generation_prompt, add_vision_id):
        text = super().render_chat(messages, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
        return text.replace(f"<|im_start|>system\n{chat.DEFAULT_SYSTEM}<|im_end|>\n", "", 1)


class TextModelSystemPrompt(Patched):
    """The Qwen2.5 text model's default system prompt ("You are Qwen, created by Alibaba Cloud. ...")."""

    def render_chat(self, messages, *, add_generation_prompt, add_vision_id):
        text = super().render_chat(messages, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
        qwen = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        return text.replace(
            f"<|im_start|>system\n{chat.DEFAULT_SYSTEM}<|im_end|>\n", f"<|im_start|>system\n{qwen}<|im_end|>\n", 1
        )


class VisionBeforeText(Patched):
    """Every image/video of a message placed before its text (the tool-calling template's order)."""

    def render_chat(self, messages, *, add_generation_prompt, add_vision_id):
        def reorder(m):
            if isinstance(m.get("content"), str):
                return m
            parts = list(m["content"])
            vision = [p for p in parts if chat.part_kind(p) != "text"]
            return {**m, "content": vision + [p for p in parts if chat.part_kind(p) == "text"]}

        chat.check_messages(messages)
        return super().render_chat(
            [reorder(m) for m in messages], add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id
        )


class WrongImageMarker(Patched):
    """The image is marked `<image>` instead of <|vision_start|><|image_pad|><|vision_end|>."""

    def render_chat(self, messages, *, add_generation_prompt, add_vision_id):
        text = super().render_chat(messages, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
        return text.replace(chat.IMAGE_PLACEHOLDER, "<image>")


class ImageTokenCountUnmerged(Patched):
    """Each pad expanded to t*h*w tokens, forgetting the 2x2 merge."""

    def expand_vision_tokens(self, texts, image_grid_thw, video_grid_thw, *, merge_size):
        return super().expand_vision_tokens(texts, image_grid_thw, video_grid_thw, merge_size=1)


class VideoTokensPerFrame(Patched):
    """Video pads counted per frame (2*t*h*w/4), as if the temporal pair were not merged."""

    def expand_vision_tokens(self, texts, image_grid_thw, video_grid_thw, *, merge_size):
        if video_grid_thw is not None:
            video_grid_thw = torch.as_tensor(video_grid_thw) * torch.tensor([2, 1, 1])
        return super().expand_vision_tokens(texts, image_grid_thw, video_grid_thw, merge_size=merge_size)


# ---------------------------------------------------------------------------------------------- tokenizer

# GPT-2's split (what ByteLevel(use_regex=True) applies): digit runs kept whole, letters after one space
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class Gpt2PreTokenizer(SpecAdapter):
    """GPT-2's pre-tokenizer regex on the Qwen2 vocabulary (digit runs whole, no single digits)."""

    def tokenizer(self, folder):
        if folder not in self._tokenizers:
            tok = super().tokenizer(folder)
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(GPT2_REGEX), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
                ]
            )
        return self._tokenizers[folder]


class NoNfc(SpecAdapter):
    """The tokenizer's NFC normalizer left out."""

    def tokenizer(self, folder):
        if folder not in self._tokenizers:
            super().tokenizer(folder).normalizer = normalizers.Sequence([])
        return self._tokenizers[folder]


ENTRIES = [
    Mistake(
        "resize_ties_away_from_zero",
        "fn.smart_resize",
        "smart_resize rounds ties away from zero (C std::round) instead of to even: 70 px -> 84, not 56",
        "kekzl/imp#1166; llama.cpp calc_size_preserved_ratio (ports.md §2.3)",
        ResizeTiesAwayFromZero,
        model_case="model_resize_tie",
    ),
    Mistake(
        "resize_float32",
        "fn.smart_resize",
        "smart_resize computed in float32 (ratio, square root and scaled sides)",
        "llama.cpp calc_size_preserved_ratio (ports.md §2.3)",
        ResizeFloat32,
        model_case="model_thin",
    ),
    Mistake(
        "resize_refuses_small_sides",
        "fn.smart_resize",
        "a side under 28 px raises instead of being scaled up (transformers <= 4.51)",
        "QwenLM/Qwen3-VL#1111; vllm-project/vllm#15080",
        ResizeRefusesSmallSides,
        model_case="model_thin",
    ),
    Mistake(
        "resize_qwen_vl_utils_rule",
        "fn.smart_resize",
        "qwen-vl-utils' smart_resize (first rounding clamped to 28, floor branch unclamped) instead of transformers'",
        "2U1/Qwen-VL-Series-Finetune#113; QwenLM/Qwen3-VL#2121",
        ResizeQwenVlUtilsRule,
        model_case="model_thin",
    ),
    Mistake(
        "resize_torch_bicubic",
        "fn.resize_bicubic",
        "torch/torchvision antialiased bicubic (the fast processor) instead of Pillow's bicubic",
        "vllm-project/vllm#19789; kaiko-ai/eva#971",
        ResizeTorchBicubic,
        model_case="model_resize_tie",
    ),
    Mistake(
        "frames_floor_sampling",
        "fn.sample_frame_indices",
        "frame indices floor(k*T/n) (transformers' sample_frames) instead of round(linspace(0, T-1, n))",
        "hf_reference.md §9.10",
        FramesFloorSampling,
        model_case="model_video_file",
    ),
    Mistake(
        "nframes_rounded",
        "fn.sample_frame_indices",
        "frame count round(T / video_fps * fps / 2) * 2 (qwen-vl-utils 0.0.8) instead of floored to an even count",
        "hf_reference.md §3.1 (smart_nframes, 0.0.8 vs >= 0.0.10)",
        NframesRounded,
        model_case="model_video_file",
    ),
    Mistake(
        "frames_linspace_float64",
        "fn.sample_frame_indices",
        "frame indices round(linspace(0, T-1, n)) computed in float64 instead of float32 (one frame off from 12342 frames)",
        "hf_reference.md §9.10 (qwen-vl-utils: torch.linspace, float32)",
        FramesLinspaceFloat64,
        model_blind_spot="float32 and float64 linspace round apart first at 12342 frames, far past any model case",
    ),
    Mistake(
        "odd_frames_dropped",
        "fn.patchify",
        "an odd frame count floored to whole temporal pairs (last frame dropped) instead of padded",
        "vllm-project/vllm#13148",
        OddFramesDropped,
        model_case="model_video",
    ),
    Mistake(
        "patch_order_raster",
        "fn.patchify",
        "pixel_values rows in raster order instead of 2x2 merge blocks",
        "ports.md §1.3",
        PatchOrderRaster,
        model_case="model_image",
    ),
    Mistake(
        "letterbox",
        "fn.preprocess_image",
        "image letterboxed (fit, centred, black bars) into the target size instead of stretched",
        "llama.cpp img_tool::resize (ports.md §2.3); ggml-org/llama.cpp#16334",
        Letterbox,
        model_case="model_resize_tie",
    ),
    Mistake(
        "normalize_mean_std_half",
        "fn.preprocess_image",
        "pixels normalised with mean = std = 0.5 (Qwen3-VL's preprocessor config) instead of the OpenAI CLIP values",
        "apple/coreai-models#82 (CLIP and 0.5 stats mixed up between Qwen VL generations)",
        NormalizationHalf,
        model_case="model_image",
    ),
    Mistake(
        "normalize_mean_std_imagenet",
        "fn.preprocess_image",
        "pixels normalised with ImageNet's mean and std (a parent processor's constants) instead of the CLIP values",
        "vllm-project/vllm#37978 (ImageNet stats inherited from a parent processor)",
        NormalizationImagenet,
        model_case="model_image",
    ),
    Mistake(
        "resize_hw_swapped",
        "fn.preprocess_image",
        "the resize called with (height, width) where it takes (width, height)",
        "EricLBuehler/mistral.rs#1950",
        ResizeHeightWidthSwapped,
        model_case="model_image",
    ),
    Mistake(
        "images_resized_to_largest",
        "preprocess.image_grid_thw",
        "every image of a request resized to the largest image's size instead of its own",
        "EricLBuehler/mistral.rs#1950",
        ImagesResizedToLargest,
        cases="model_batch",
        also=("preprocess.pixel_values", "preprocess.input_ids", "preprocess.attention_mask"),
    ),
    Mistake(
        "right_padding",
        "preprocess.input_ids",
        "the batch padded on the right instead of the left",
        "huggingface/transformers#36100",
        RightPadding,
        cases="model_batch",
    ),
    Mistake(
        "video_fps_dropped",
        "preprocess.second_per_grid_ts",
        "video fps lost before the processor: second_per_grid_ts from a default 24 fps",
        "vllm-project/vllm#47736; EvolvingLMMs-Lab/lmms-eval#1269",
        VideoFpsDropped,
        cases="model_video",
    ),
    Mistake(
        "video_budget_whole_clip",
        "preprocess.video_grid_thw",
        "video frames sized by Qwen3-VL's rule (the whole clip's t*h*w in one budget), not by the per-frame budget",
        "mlx-vlm 0.7.10, found here (docs/ports.md); QwenLM/Qwen3-VL#1924 asks which of the two a budget means",
        VideoBudgetWholeClip,
        cases="model_video_budget",
        also=("preprocess.pixel_values_videos", "preprocess.input_ids", "preprocess.attention_mask"),
        alike="the image budget per frame (min 3136 px, no video minimum of 128 tokens a frame) gives the same "
        "112x140 frames on model_video_budget's clip",
    ),
    Mistake(
        "video_seconds_from_requested_fps",
        "preprocess.second_per_grid_ts",
        "second_per_grid_ts from the fps the request asked for instead of the rate the frame sampling gave",
        "hiyouga/LlamaFactory#6868; modelscope/ms-swift#5110; QwenLM/Qwen3-VL#798",
        VideoSecondsFromRequestedFps,
        cases="model_video_file",
    ),
    Mistake(
        "no_default_system_prompt",
        "fn.render_chat",
        "hand-written template without the default system block",
        "ports.md §3.6",
        NoDefaultSystemPrompt,
        model_case="model_image",
    ),
    Mistake(
        "text_model_system_prompt",
        "fn.render_chat",
        'the Qwen2.5 text system prompt "You are Qwen, created by Alibaba Cloud. ..."',
        "InternLM/lmdeploy#3475",
        TextModelSystemPrompt,
        model_case="model_image",
    ),
    Mistake(
        "vision_before_text",
        "fn.render_chat",
        "images and videos placed before the message text (tokenizer_config.json's template)",
        "vllm-project/vllm#15125",
        VisionBeforeText,
        model_case="model_image",
    ),
    Mistake(
        "wrong_image_marker",
        "fn.render_chat",
        "image marked <image> instead of <|vision_start|><|image_pad|><|vision_end|>",
        "abetlen/llama-cpp-python#2040; ollama/ollama#11164",
        WrongImageMarker,
        model_case="model_image",
    ),
    Mistake(
        "image_tokens_unmerged",
        "fn.expand_vision_tokens",
        "each pad expanded to t*h*w tokens, forgetting the 2x2 merge",
        "ggml-org/llama.cpp#16842; kekzl/imp#1173",
        ImageTokenCountUnmerged,
        model_case="model_image",
    ),
    Mistake(
        "video_tokens_per_frame",
        "fn.expand_vision_tokens",
        "video pads counted per frame instead of per temporal pair (twice the tokens)",
        "ggml-org/llama.cpp#13754; LostRuins/koboldcpp#2359",
        VideoTokensPerFrame,
        model_case="model_video",
    ),
    Mistake(
        "gpt2_pretokenizer",
        "fn.tokenize",
        "GPT-2 pre-tokenizer regex on the Qwen2 vocabulary (digit runs kept whole)",
        "kekzl/imp#660",
        Gpt2PreTokenizer,
        model_case="model_text",
    ),
    Mistake(
        "tokenizer_without_nfc",
        "fn.tokenize",
        "tokenizer without the NFC normalizer",
        "hf_reference.md §4.4",
        NoNfc,
        model_case="model_batch",
    ),
]
