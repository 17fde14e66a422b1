"""`qwen25vl generate`: chat with a checkpoint from the command line, tokens streamed to stdout.

    qwen25vl generate --checkpoint DIR [--image SRC ...] [--video SRC ...] --prompt TEXT
                      [--max-new-tokens 128] [--dtype D] [--device D] [--attention auto] [--quantize int4|w4a8]
                      [--quantize-lm-head int4|int8|w8a8|w4a8]
                      [--min-pixels N] [--max-pixels N] [--fps F | --nframes N] [--allow-large-images]
                      [--max-video-bytes N] [--fetch-timeout S]
    torchrun --nproc-per-node N -m qwen25vl generate --tp N ...     (tensor parallel: docs/tensor-parallel.md)

SRC is a path, an http(s):// or file:// URL, or a data: URL. Every image and video is loaded and checked
(existence, fetch, decoding, decompression-bomb limit, video memory budget) BEFORE the checkpoint is read, so a
bad input fails in seconds with exit status 2. Loading progress and a timing line go to stderr (one line per
update when stderr is not a terminal); the answer alone goes to stdout, followed by a newline.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen25vl generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer)")
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video path or URL (repeatable)")
    p.add_argument("--prompt", required=True, help="the user's text, placed after the images and videos")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--attention", default="auto", help="vision attention backend (auto, dense, varlen, flash_attn, blockmask)"
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=("int4", "w4a8"),
        help="int4 text decoder: weight-only, or w4a8 (the same weights, int8 activations at decode; CPU)",
    )
    p.add_argument(
        "--quantize-lm-head",
        default=None,
        choices=("int4", "int8", "w8a8", "w4a8"),
        help="also quantize the lm_head (int4 needs hidden_size %% 128 == 0; int8 per channel takes any width; "
        "w8a8: int8 weights and activations (x86 CPU); w4a8: int4 weights, int8 activations, the fastest on a CPU)",
    )
    p.add_argument("--min-pixels", type=int, default=None, help="image minimum pixels (default 3136)")
    p.add_argument("--max-pixels", type=int, default=None, help="image pixel budget (default 12845056)")
    p.add_argument("--fps", type=float, default=None, help="video sampling rate (default 2.0)")
    p.add_argument("--nframes", type=int, default=None, help="sample this many video frames instead of --fps")
    p.add_argument(
        "--allow-large-images",
        action="store_true",
        help="decode images over 89,478,485 pixels (refused by default as possible decompression bombs)",
    )
    p.add_argument(
        "--max-video-bytes",
        type=int,
        default=None,
        help="memory budget for a video's sampled uint8 frames (default 4 GiB)",
    )
    p.add_argument(
        "--tp", type=int, default=1, help="tensor parallel ranks; run under torchrun --nproc-per-node N (default 1)"
    )
    p.add_argument("--fetch-timeout", type=float, default=None, help="seconds allowed per URL fetch (default 30)")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prefill the prompt this many tokens at a time (bounds a long prompt's activations; default: at once)",
    )
    return p


class _Lines:
    """A stderr stand-in for logs and pipes: a carriage-return progress update becomes its own line."""

    def __init__(self, stream):
        self.stream, self.at_start = stream, True

    def write(self, text):
        out = []
        for i, piece in enumerate(text.split("\r")):
            if i > 0 and not self.at_start:
                out.append("\n")
                self.at_start = True
            if piece:
                out.append(piece)
                self.at_start = piece.endswith("\n")
        return self.stream.write("".join(out))

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return False


def _stderr_for_progress():
    """sys.stderr as it is on a terminal, else wrapped so that progress stays readable in a log."""
    err = sys.stderr
    isatty = getattr(err, "isatty", None)
    return err if (isatty is not None and isatty()) else _Lines(err)


class _Streamer:
    """Prints the text of a growing token list as it becomes valid UTF-8 (one row)."""

    def __init__(self, tokenizer, stop_ids, out=None):
        from ..spec.tokens import decode

        self.decode, self.tokenizer, self.stop, self.out = decode, tokenizer, set(stop_ids), out
        self.ids, self.printed, self.done = [], 0, False

    def __call__(self, step_ids):
        tok = step_ids[0]
        if self.done or tok in self.stop:
            self.done = True
            return
        self.ids.append(tok)
        text = self.decode(self.tokenizer, self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # a multi-byte character is still incomplete
        out = self.out or sys.stdout  # looked up late: tests and callers may swap sys.stdout
        out.write(text[self.printed :])
        out.flush()
        self.printed = len(text)


def _media_args(args) -> tuple[list, dict]:
    """The one-message conversation and the media options of the command line."""
    from ..spec.media import FetchLimits

    content = (
        [{"type": "image", "image": p} for p in args.image]
        + [{"type": "video", "video": p} for p in args.video]
        + [{"type": "text", "text": args.prompt}]
    )
    video_options = {} if args.max_video_bytes is None else {"max_video_bytes": args.max_video_bytes}
    options = dict(
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        fps=args.fps,
        nframes=args.nframes,
        video_options=video_options,
        max_decoded_pixels=None if args.allow_large_images else _default_max_decoded_pixels(),
        fetch=FetchLimits() if args.fetch_timeout is None else FetchLimits(timeout=args.fetch_timeout),
    )
    return [{"role": "user", "content": content}], options


def _default_max_decoded_pixels():
    from ..spec.image import MAX_DECODED_PIXELS

    return MAX_DECODED_PIXELS


def _load(args, **kwargs):
    """The model: Qwen25VL.from_pretrained, or this rank's tensor-parallel shard (--tp N; only rank 0 prints the answer)."""
    if args.tp == 1:
        from .model import Qwen25VL

        return Qwen25VL.from_pretrained(args.checkpoint, **kwargs)
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    import os

    from .tp import from_pretrained_tp

    model = from_pretrained_tp(args.checkpoint, args.tp, **kwargs)
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - every rank computes the same tokens; one prints them
    return model


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        print(f"error: --prefill-chunk must be >= 1, got {args.prefill_chunk}", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1:
        print(f"error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    if args.fps is not None and args.nframes is not None:
        print(f"error: give --fps ({args.fps}) or --nframes ({args.nframes}), not both", file=sys.stderr)
        return 2
    import torch

    from ..spec.tokens import build_inputs, prepare_media

    try:
        # Media first: a missing file, a failed fetch or a bomb must not wait for the weights.
        t0 = time.perf_counter()
        messages, options = _media_args(args)
        media = prepare_media(messages, **options)
        if args.image or args.video:
            print(f"media ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(_stderr_for_progress()):
            model = _load(
                args,
                dtype=args.dtype,
                device=args.device,
                attention=args.attention,
                quantize=args.quantize,
                progress=True,
            )
            if args.quantize_lm_head:
                from .quant import apply_lm_head_quant

                apply_lm_head_quant(model, args.quantize_lm_head)
        t1 = time.perf_counter()
        head = f", lm_head {args.quantize_lm_head}" if args.quantize_lm_head else ""
        print(
            f"loaded in {t1 - t0:.1f} s ({model.device_.type}, {str(model.dtype_).removeprefix('torch.')}"
            f"{f', {args.quantize}' if args.quantize else ''}{head})",
            file=sys.stderr,
            flush=True,
        )
        if model.tokenizer is None:
            raise ValueError(
                f"checkpoint folder {args.checkpoint!r} holds no tokenizer (vocab.json + merges.txt or tokenizer.json)"
            )
        inputs = build_inputs(messages, tokenizer=model.tokenizer, media=media)
        cfg = model.config
        stop = [cfg.eos_token_id, cfg.pad_token_id]
        streamer = _Streamer(model.tokenizer, stop)
        with torch.inference_mode():
            model.generate_from_inputs(
                inputs, args.max_new_tokens, stop, on_token=streamer, prefill_chunk=args.prefill_chunk
            )
        s = model.last_stats
        print(file=sys.stdout, flush=True)  # the answer ends with a newline, whatever it was
        rate = f", {s['decode_tok_per_s']:.1f} tok/s" if s.get("decode_tok_per_s") else ""
        print(
            f"[{s.get('prompt_tokens')} prompt tokens, prefill {s.get('prefill_s', 0):.2f} s, "
            f"{s.get('new_tokens')} new tokens{rate}; vision attention {s.get('vision_attention', '-')}]",
            file=sys.stderr,
        )
        return 0
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
