"""Hostile ports: adapters that misbehave the way native ports do (abort, hang with signals blocked,
exit, print without end, eat memory, return garbage or NaN). Each is the spec with ONE method turned
hostile, so everything else passes and the test can check that exactly the right stage is blamed.
tests/conformance/test_hostile.py runs each through the real command line with --jobs 1 and 2.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import torch
from qwen25vl.conformance.adapters.base import Adapter
from qwen25vl.conformance.adapters.spec import SpecAdapter


class AbortInWindows(SpecAdapter):
    """A C library that aborts (a segfaulting C or Rust library ends the process the same way)."""

    def window_partition(self, grid_thw, *, window_size, patch_size, merge_size):
        os.abort()


class NativeHangInWindows(SpecAdapter):
    """Native code that waits forever with every catchable signal blocked: SIGALRM never interrupts it."""

    def window_partition(self, grid_thw, *, window_size, patch_size, merge_size):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        ctypes.CDLL(None).pause()  # in libc: no Python bytecode runs, no handler can fire


class ExitInResize(SpecAdapter):
    """A native library that calls exit(3): the interpreter is gone, no exception is raised."""

    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        os._exit(3)


class SysExitInResize(SpecAdapter):
    """Python code that calls sys.exit(4)."""

    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        sys.exit(4)


class ZerosFromResize(SpecAdapter):
    """Garbage of the wrong layout: (0, 0, 0) for every input, where (h, w) is expected."""

    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        return (0, 0, 0)


class LambdaFromBuildInputs(SpecAdapter):
    """Garbage that cannot even be sent back to the harness: a function where a tensor belongs."""

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        return {"input_ids": lambda: 0}


class ChattyTokenizer(SpecAdapter):
    """A port that prints 64 MB to stdout (and some to stderr, through the C file descriptors) and
    still answers correctly: its output must not reach the report."""

    def tokenize(self, text, *, tokenizer_dir):
        line = b"port log line that nobody asked for " * 30 + b"\n"
        for _ in range(64 * 1024 * 1024 // len(line)):
            os.write(1, line)
        os.write(2, b"warning from the port\n")
        print("one more print", flush=True)
        return super().tokenize(text, tokenizer_dir=tokenizer_dir)


class MemoryHogInWindows(SpecAdapter):
    """A port that keeps allocating (3 GiB, touched) and then waits: the memory limit must stop it."""

    def window_partition(self, grid_thw, *, window_size, patch_size, merge_size):
        hog = b"x" * (3 << 30)
        time.sleep(60)
        return hog


class ChildMemoryHogInWindows(SpecAdapter):
    """A port whose helper process (a serving engine, a native runner) takes the memory: it counts too."""

    def window_partition(self, grid_thw, *, window_size, patch_size, merge_size):
        code = "import time; hog = b'x' * (3 << 30); time.sleep(60)"
        subprocess.run([sys.executable, "-c", code], check=False)
        return super().window_partition(grid_thw, window_size=window_size, patch_size=patch_size, merge_size=merge_size)


class NaNVision(SpecAdapter):
    """A port whose first vision block returns NaN (an overflow in a native kernel)."""

    def run(self, inputs, *, capture):
        out = super().run(inputs, capture=capture)
        out["vision.block.0"] = torch.full_like(out["vision.block.0"], float("nan"))
        return out


class OddTensorsNoDescription(SpecAdapter):
    """A port whose describe() answers None and whose text.norm is a tensor without values (meta device) and
    whose final norm is sparse: torch raises deep inside on .item() or .shape of such tensors."""

    def describe(self):
        return None

    def run(self, inputs, *, capture):
        out = super().run(inputs, capture=capture)
        out["text.norm"] = torch.empty(out["text.norm"].shape, device="meta")
        out["vision.merger"] = out["vision.merger"].to_sparse()
        return out


class ScribblesOverItsInputs(SpecAdapter):
    """A right port that, once done, writes over every tensor it was handed (its inputs, the stage feeds)."""

    @staticmethod
    def _scribble(values):
        for v in values:
            if isinstance(v, torch.Tensor):
                v.add_(7) if not v.is_floating_point() else v.mul_(3.0)

    def run(self, inputs, *, capture):
        out = {k: v.clone() for k, v in super().run(inputs, capture=capture).items()}
        self._scribble(inputs.values())
        return out

    def run_stage(self, stage, feeds):
        out = super().run_stage(stage, feeds).clone()
        self._scribble(feeds.values())
        return out


class MisspeltKeys(SpecAdapter):
    """A right port that hands back vision.block.0 as 'vision.blocks.0', plus keys of other types and names."""

    def run(self, inputs, *, capture):
        out = super().run(inputs, capture=capture)
        out["vision.blocks.0"] = out.pop("vision.block.0")
        out[42], out["debug.scratch"] = torch.zeros(1), "not a tensor"
        return out


class AbortOnLoad(SpecAdapter):
    """A port that aborts as soon as it is built: every stage errors, the report is still written."""

    def __init__(self, *args, **kwargs):
        os.abort()


class OnlyResize(Adapter):
    """A partial port: it exposes smart_resize and nothing else, and its constructor takes no arguments."""

    def __init__(self):
        pass

    def smart_resize(self, height, width, *, factor, min_pixels, max_pixels):
        from qwen25vl.spec.resize import smart_resize

        return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
