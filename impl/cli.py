"""`qwen25vl generate`: chat with a checkpoint from the command line, tokens streamed to stdout.

    qwen25vl generate --checkpoint DIR [--image PATH ...] [--video PATH ...] --prompt TEXT
                      [--max-new-tokens 128] [--dtype D] [--device D] [--attention auto] [--quantize int4]

Loading progress and a timing line go to stderr; the answer alone goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen25vl generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file (repeatable)")
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
    p.add_argument("--quantize", default=None, choices=("int4",), help="int4 weight-only text decoder")
    p.add_argument("--max-pixels", type=int, default=None, help="image pixel budget (default: the checkpoint's)")
    p.add_argument("--fps", type=float, default=None, help="video sampling rate (default 2.0)")
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_new_tokens < 1:
        print(f"error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    import torch

    from .model import Qwen25VL

    try:
        t0 = time.perf_counter()
        model = Qwen25VL.from_pretrained(
            args.checkpoint,
            dtype=args.dtype,
            device=args.device,
            attention=args.attention,
            quantize=args.quantize,
            progress=True,
        )
        t1 = time.perf_counter()
        print(
            f"loaded in {t1 - t0:.1f} s ({model.device_.type}, {str(model.dtype_).removeprefix('torch.')}"
            f"{', int4' if args.quantize else ''})",
            file=sys.stderr,
            flush=True,
        )
        if model.tokenizer is None:
            raise ValueError(
                f"checkpoint folder {args.checkpoint!r} holds no tokenizer (vocab.json + merges.txt or tokenizer.json)"
            )
        content = (
            [{"type": "image", "image": p} for p in args.image]
            + [{"type": "video", "video": p} for p in args.video]
            + [{"type": "text", "text": args.prompt}]
        )
        messages = [{"role": "user", "content": content}]
        cfg = model.config
        stop = [cfg.eos_token_id, cfg.pad_token_id]
        streamer = _Streamer(model.tokenizer, stop)
        video_options = {"fps": args.fps} if args.fps is not None else None
        with torch.inference_mode():
            model.generate(
                messages,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=stop,
                on_token=streamer,
                max_pixels=args.max_pixels,
                video_options=video_options,
            )
        s = model.last_stats
        print(file=sys.stdout, flush=True)
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
