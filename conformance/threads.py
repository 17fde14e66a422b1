"""Start torch's intra-op threads before the harness computes anything with them.

Measured on a 2-vCPU Intel Xeon guest with AVX-512 and AMX (torch 2.13, any ATEN_CPU_CAPABILITY): in
about one fresh process of ten, the first parallel float32 `cos` of a [216, 16] table came out wrong
by up to 1.5e-4 in the half the newly started worker thread computed (1344 of 1728 values), and right
on the next call. The vision rotary table is such a first call, so a float32 port judged there failed
every vision block now and then, and the harness's own float32 runs were as wrong. After any parallel
op has run on every thread (the warm-up below), 0 of 40 processes showed it. The cause is below torch
(the same run on one thread never shows it); what the harness can do is never let a new thread's first
work be a number it judges.
"""

from __future__ import annotations

import threading

import torch

_warmed: set[tuple[int, int]] = set()  # (calling thread, thread count) pairs already warmed

# Elements per thread in the warm-up: above ATen's grain size (32768), so every thread takes a chunk.
_PER_THREAD = 1 << 16


def warm_threads() -> None:
    """Run one parallel elementwise op on every intra-op thread of the calling thread, once per thread
    count. Call it from the thread that computes: OpenMP gives each calling thread its own team, and
    torch.set_num_threads to more threads starts new ones."""
    key = (threading.get_ident(), torch.get_num_threads())
    if key in _warmed:
        return
    torch.ones(key[1] * _PER_THREAD).add_(1.0).cos_()
    _warmed.add(key)
