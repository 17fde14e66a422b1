"""Serving engines as targets: vLLM (`--target vllm`) and SGLang (`--target sglang`), on a GPU.

A serving engine exposes no intermediate tensor, so these targets are judged on what a server returns:
the greedy continuation of each fixture request and the top-5 log-probs of every step
(`generate.tokens`, whose tokens rule uses the log-probs too: docs/conformance.md). That is still a
verdict on the engine's own code from end to end: its chat template, its image and video processor,
its vision encoder, MRoPE, attention kernels and sampler all sit between the request and the tokens.
A divergence is then located by a target that taps (transformers, llama.cpp, mlx-vlm, or the port's
own adapter).

The request comes from the fixture case (`request.json` and its media), not from the golden model
inputs: the engine builds its own prompt and pixels, as it does for its users. Each conversation is
one request; rows that stop early are filled with the checkpoint's pad id after their eos, as the
spec's batch is (fixtures/FORMAT.md).

Neither engine installs on the CPU-only CI machine. tests/conformance/test_serving.py runs these
adapters against stand-in modules with the engines' call signatures, so what is tested in CI is the
glue: requests built per row, eos list, padding, and log-prob tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import Adapter, NotCovered
from .transformers import open_image

TOP_K = 5  # generate.json keeps the golden top-5 of every step


def row_media(conversations: list, images: list, videos: list) -> list[tuple[list, list]]:
    """Split the request's flat media lists by conversation: the i-th {"type": "image"} entry of the whole
    request is images[i], in the order the conversations and their turns are written."""
    out, next_image, next_video = [], 0, 0
    for conversation in conversations:
        kinds = [
            part.get("type")
            for turn in conversation
            if isinstance(turn.get("content"), list)
            for part in turn["content"]
            if isinstance(part, dict)
        ]
        n_img, n_vid = kinds.count("image"), kinds.count("video")
        out.append((images[next_image : next_image + n_img], videos[next_video : next_video + n_vid]))
        next_image, next_video = next_image + n_img, next_video + n_vid
    if next_image != len(images) or next_video != len(videos):
        raise ValueError(
            f"request.json: the conversations name {next_image} images and {next_video} videos, "
            f"the request lists {len(images)} and {len(videos)}"
        )
    return out


def pad_rows(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Token rows of different lengths (each ends at its eos or at max_new_tokens) -> int64 [B, n],
    filled with pad_id after a row's end, as the spec's batched generation is."""
    n = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [pad_id] * (n - len(r)) for r in rows], dtype=torch.int64).reshape(len(rows), n)


def pad_tables(tables: list[list[list]], n: int, fill) -> torch.Tensor:
    """Per-row [n_i, TOP_K] tables -> [B, n, TOP_K], rows past their end filled with `fill`."""
    return torch.tensor([t + [[fill] * TOP_K] * (n - len(t)) for t in tables])


class ServingAdapter(Adapter):
    """What vLLM and SGLang share: one request per conversation, greedy, top-5 log-probs per step."""

    engine = "serving"
    device = "cuda"

    def __init__(self, dtype: str = "bfloat16", device: str = "cuda"):
        self.dtype, self.device = str(dtype), device
        self._engine = None
        self._checkpoint: str | None = None
        self._pad_id = 151643
        self._seen: list = []  # (golden input_ids, case) of every model case begun, newest last

    def describe(self) -> dict:
        return {"name": self.engine, "version": self.version(), "dtype": self.dtype, "device": self.device}

    def prepare(self, checkpoint, *, dtype, device):
        if self._checkpoint != str(checkpoint):
            self._engine = self.load(str(checkpoint), str(dtype))
            self._checkpoint = str(checkpoint)
            config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
            self._pad_id = int(config.get("pad_token_id", self._pad_id))

    def begin_case(self, case) -> None:
        if case.kind == "model":
            ids = case.tensors(case.manifest["inputs"])["input_ids"]
            self._seen.append((ids, case))

    def _case_for(self, input_ids) -> object:
        """The fixture case whose golden prompt these are (state.repeat replays an earlier case's inputs)."""
        for ids, case in reversed(self._seen):
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids.to(ids.dtype)):
                return case
        raise NotCovered(f"{self.engine} builds its own prompt from a fixture request; these inputs match none")

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        case = self._case_for(inputs["input_ids"])
        request = case.json(case.manifest["request"])
        images, videos = case.media()
        eos = [eos_token_id] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
        options = request.get("options", {})
        rows = []
        for conversation, (row_images, row_videos) in zip(
            request["conversations"], row_media(request["conversations"], images, videos)
        ):
            rows.append(
                self.complete(
                    conversation,
                    [open_image(p) for p in row_images],
                    [video_frames(v) for v in row_videos],
                    options,
                    max_new_tokens=int(max_new_tokens),
                    eos=eos,
                )
            )
        tokens = pad_rows([r[0] for r in rows], self._pad_id)
        n = tokens.shape[1]
        return {
            "tokens": tokens,
            "topk": pad_tables([r[1] for r in rows], n, self._pad_id).to(torch.int64),
            "topk_logprobs": pad_tables([r[2] for r in rows], n, 0.0).to(torch.float64),
        }

    # what each engine provides
    def version(self) -> str:
        raise NotImplementedError

    def load(self, checkpoint: str, dtype: str):
        raise NotImplementedError

    def complete(self, conversation, images, videos, options, *, max_new_tokens, eos):
        """One conversation -> (token ids, top-5 ids per step, their log-probs per step)."""
        raise NotImplementedError


def video_frames(video: dict):
    """A request video (frame files + fps) -> uint8 numpy [T, H, W, 3], the frames as the engine takes them."""
    import numpy as np

    if "file" in video:  # decoding and sampling it are the engine's, through its own loader
        raise NotCovered(f"a video file ({Path(video['file']).name}): this adapter hands engines frame lists only")

    return np.stack([np.asarray(open_image(f).convert("RGB")) for f in video["frames"]])


def processor_options(options: dict) -> dict:
    """The request's options (request.json: min_pixels / max_pixels for images, video_options for
    videos) as the keyword arguments of a Hugging Face style processor, which both engines pass on."""
    out = {k: options[k] for k in ("min_pixels", "max_pixels") if options.get(k)}
    video = {k: v for k, v in options.get("video_options", {}).items() if k in ("fps", "min_pixels", "max_pixels")}
    if video:
        out["videos_kwargs"] = video
    return out


def top_table(step: dict, k: int = TOP_K) -> tuple[list[int], list[float]]:
    """{token id: log-prob} of one step (it may hold the picked token besides the top k) -> the k most
    likely ids and their log-probs, most likely first."""
    best = sorted(step.items(), key=lambda kv: -kv[1])[:k]
    if len(best) < k:
        raise ValueError(f"the engine returned {len(best)} log-probs for a step, {k} were asked for")
    return [int(t) for t, _ in best], [float(p) for _, p in best]


class VllmAdapter(ServingAdapter):
    """vLLM's offline engine: `LLM(...).generate` with the prompt rendered by its own tokenizer's chat
    template and the raw images/frames as multi_modal_data, so vLLM's processor does the rest."""

    engine = "vllm"

    def version(self) -> str:
        import vllm

        return getattr(vllm, "__version__", "")

    def load(self, checkpoint, dtype):
        try:
            import vllm
        except ImportError as e:
            raise ValueError(f"--target vllm needs vLLM installed on a GPU machine (pip install vllm): {e}") from None
        self._vllm = vllm
        return vllm.LLM(model=checkpoint, dtype=dtype, limit_mm_per_prompt={"image": 8, "video": 2}, seed=0)

    def complete(self, conversation, images, videos, options, *, max_new_tokens, eos):
        prompt = self._engine.get_tokenizer().apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        request = {"prompt": prompt, "multi_modal_data": {}, "mm_processor_kwargs": processor_options(options)}
        if images:
            request["multi_modal_data"]["image"] = images
        if videos:
            request["multi_modal_data"]["video"] = videos
        params = self._vllm.SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            logprobs=TOP_K,
            stop_token_ids=eos,
            ignore_eos=False,
            repetition_penalty=1.0,  # explicit: generation_config.json's 1.05 must not leak into the greedy reference
        )
        (out,) = self._engine.generate([request], params, use_tqdm=False)
        completion = out.outputs[0]
        tables = [top_table({t: lp.logprob for t, lp in step.items()}) for step in completion.logprobs]
        return list(completion.token_ids), [t[0] for t in tables], [t[1] for t in tables]


class SglangAdapter(ServingAdapter):
    """SGLang's offline engine: `Engine(...).generate` with the prompt rendered by its tokenizer's chat
    template and the images as image_data, so SGLang's processor does the rest."""

    engine = "sglang"

    def version(self) -> str:
        import sglang

        return getattr(sglang, "__version__", "")

    def load(self, checkpoint, dtype):
        try:
            import sglang
        except ImportError as e:
            raise ValueError(
                f"--target sglang needs SGLang installed on a GPU machine (pip install sglang): {e}"
            ) from None
        self._tokenizer_dir = checkpoint
        return sglang.Engine(model_path=checkpoint, dtype=dtype, random_seed=0)

    def complete(self, conversation, images, videos, options, *, max_new_tokens, eos):
        if videos:
            raise NotCovered("sglang target: video requests are not wired (its video input takes file paths)")
        from transformers import AutoTokenizer

        prompt = AutoTokenizer.from_pretrained(self._tokenizer_dir).apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        out = self._engine.generate(
            prompt=prompt,
            image_data=images or None,
            sampling_params={
                "temperature": 0.0,
                "max_new_tokens": max_new_tokens,
                "stop_token_ids": eos,
                "repetition_penalty": 1.0,  # explicit: generation_config.json's 1.05 must not apply
            },
            return_logprob=True,
            top_logprobs_num=TOP_K,
        )
        meta = out["meta_info"]
        tokens = [int(t) for _, t, *_ in meta["output_token_logprobs"]]
        tables = [top_table({int(t): float(lp) for lp, t, *_ in step}) for step in meta["output_top_logprobs"]]
        return tokens, [t[0] for t in tables], [t[1] for t in tables]
