"""The adapter protocol: how the harness reaches an implementation under test.

An adapter is a small class. Every method is optional: the base raises `NotCovered`, and a stage
whose method raises it is reported "not covered", never "failed". Subclass `Adapter` and implement
what your port exposes:

  describe()                    -> {"name", "version", "dtype", "device"}: what is being judged
  prepare(checkpoint, dtype=, device=)   load the weights of a Hugging Face checkpoint folder
  begin_case(case)              hook, called before each fixture case (the file exchange uses it)

  exact-stage functions, one per `fn.*` row of the stage registry (conformance/stages.py), with
  the row's signature; tensors are torch int64/float, and a port may return numpy arrays or lists.
  `python -m qwen25vl.conformance.stages` prints them, e.g.
    smart_resize(height, width, *, factor, min_pixels, max_pixels) -> (h, w)  (ValueError when refused)
    window_partition(grid_thw, *, window_size, patch_size, merge_size) -> (window_index, cu_window_seqlens, cu_seqlens)

  the model (after prepare):
    build_inputs(conversations, images, videos, *, tokenizer_dir, options) -> model-inputs dict
        (docs/INTERFACES.md: input_ids, attention_mask, pixel_values, image_grid_thw, ...); images are
        file paths, a video is {"frames": [paths], "fps": rate} (a frame list, used as given) or
        {"file": path} (a video file to decode and sample at options["video_options"]["fps"]; raise
        NotCovered if the port takes frame lists only)
    run(inputs, *, capture: list[str]) -> {stage name: tensor}   free-running, end to end; a stage
        missing from the dict is not covered
    run_stage(stage, feeds) -> tensor   one stage teacher-forced: feeds = model inputs plus "hidden",
        the golden output of the previous stage (float32), and "position_ids" for text layers
    generate(inputs, *, max_new_tokens, eos_token_id) -> tokens int [B, n], or (tokens, topk int [B, n, k]),
        or {"tokens", "topk", "topk_logprobs" float [B, n, k]}: log-probs are judged at every step
    generate_chunked(inputs, *, prefill_chunk, max_new_tokens, eos_token_id) -> as generate, with the
        prompt prefilled `prefill_chunk` tokens at a time (state.chunked; the harness picks a chunk
        whose boundary falls inside a vision span). Subclass `ChunkedGeneration` instead of `Adapter`
        and write generate_chunked alone: its generate is generate_chunked(prefill_chunk=None).

Stage outputs are in the canonical order of docs/INTERFACES.md ("Stage names"): vision stages in
pixel_values row order, text stages [B, L, C] including padded positions (they are masked out).
"""

from __future__ import annotations

from .. import stages
from ..drivers import MalformedResult, PortRefusal


class NotCovered(Exception):
    """The port does not expose this stage (reported as 'not covered', never as a failure)."""


class Adapter:
    name = "adapter"
    dtype = "float32"
    device = "cpu"

    def describe(self) -> dict:
        return {"name": self.name, "version": "", "dtype": self.dtype, "device": self.device}

    def prepare(self, checkpoint: str, *, dtype: str, device: str) -> None:
        raise NotCovered("prepare: this adapter does not load checkpoints")

    def begin_case(self, case) -> None:
        pass

    # exact-stage functions: one method per fn.* row of conformance/stages.py, made below from the rows

    # the model
    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        raise NotCovered("build_inputs")

    def run(self, inputs, *, capture):
        raise NotCovered("run")

    def run_stage(self, stage, feeds):
        raise NotCovered(f"run_stage {stage}")

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        raise NotCovered("generate")

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):
        raise NotCovered("generate_chunked: the port does not say how to prefill in chunks")

    # the item table of an exact stage; the file exchange overrides this to read a port's files
    def run_items(self, stage: str, items: list[dict], *, tokenizer_dir=None) -> list:
        """Call the function of `stage` once per item; returns one plain result per item.
        A ValueError/TypeError raised by the port is a result ({"error": "ValueError"}), since some
        items expect a refusal; NotCovered on some items leaves those out of the comparison, on every
        item makes the whole stage not covered."""
        call = stages.info(stage).driver
        out, uncovered = [], None
        for item in items:
            try:
                out.append(call(self, item, tokenizer_dir))
            except NotCovered as e:  # this item only (a port may cover still images but not videos)
                out.append({"not_covered": str(e)})
                uncovered = e
            except PortRefusal as e:
                out.append({"error": e.kind})
            except MalformedResult as e:  # the port answered, in the wrong layout: never a refusal
                out.append({"error": "malformed", "malformed": str(e)})
            except Exception as e:  # a crash on one item is that item's result; the table goes on
                out.append({"error": type(e).__name__, "crash": str(e)[:200]})
        if uncovered is not None and all(isinstance(o, dict) and "not_covered" in o for o in out):
            raise uncovered
        return out


class ChunkedGeneration(Adapter):
    """An adapter with one generation routine that takes the chunk: generate is generate_chunked with
    prefill_chunk None (the prompt at once)."""

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        return self.generate_chunked(
            inputs, prefill_chunk=None, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id
        )


def _not_covered(row: stages.Stage):
    def method(self, *args, **kwargs):
        raise NotCovered(row.method)

    method.__name__ = method.__qualname__ = row.method
    method.__doc__ = f"{row.call}\n\n{row.meaning}. Not covered unless the port overrides it."
    return method


def _attach(row: stages.Stage) -> None:
    if row.method not in vars(Adapter):
        setattr(Adapter, row.method, _not_covered(row))


stages.on_register(_attach)  # the protocol's fn.* methods, from the registry rows
