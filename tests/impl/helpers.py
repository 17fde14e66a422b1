"""Shared pieces of the impl tests: the device, THE tolerance rule, the interpreted kernels, inputs.

Device: QWEN25VL_TEST_DEVICE (default "cpu"; tools/gpu_check.sh sets "cuda"). On the CPU the Triton
kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before the kernel modules are
imported, in a private copy of each module so the model's own kernels stay untouched); on CUDA they
are compiled for real.

Tolerance rule (the one place it is stated): a result `actual` of impl computed in dtype `dt` is
compared with the float64 oracle `expected` (spec, or a formula written in the test) by
    rel = max|actual - expected| / max(max|expected|, 1e-30)   <=   TOL[kind][dt]
kind "kernel": one fused op or attention call:      float32 4e-6 (~32 ulps: softmax and sums over up
              to a few hundred terms), bfloat16 1.6e-2 (two bf16 ulps).
kind "stage" : a model stage after several layers:   float32 5e-5, bfloat16 6e-2.
Text stages are compared on real tokens only (attention_mask 1).
Over random inputs a bfloat16 stage may also pass within STAGE_CONTROL_FACTOR times the error of the spec's
own bfloat16 run on the same inputs (`control`): one token whose hidden state has a small norm can turn a
single rounding into a large relative error, and impl rounds at other points than the spec (fused ops).
Measured over 24 random draws, impl's error over the spec's at text.norm had median 0.90 and max 1.34; one
CI draw (5 text tokens and a 2x2 image, under ATEN_CPU_CAPABILITY=avx2) gave 0.083 against the spec's
0.020 (4.2x), from one token whose layer-0 output had rms 0.28. A real bug moves a stage by 0.3 or more.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEVICE = torch.device(os.environ.get("QWEN25VL_TEST_DEVICE", "cpu"))


def _needs_c():
    import pytest
    from qwen25vl.impl.kernels import cpu_c

    ok, why = cpu_c.available()
    return pytest.mark.skipif(not ok, reason=f"needs the C kernels of impl.kernels.cpu_c, which did not build: {why}")


# tests of the C kernels: CI has a compiler (llama.cpp is built there), so they never skip in CI
NEEDS_C = _needs_c()
TOL = {
    "kernel": {torch.float32: 4e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3},
    "stage": {torch.float32: 5e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2},
}
KERNEL_DIR = Path(__file__).resolve().parents[2] / "impl" / "kernels"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.isfinite(a).all(), "non-finite values in the result"
    if a.numel() == 0:
        return 0.0
    return (a - e).abs().max().item() / max(e.abs().max().item(), 1e-30)


STAGE_CONTROL_FACTOR = 5


def assert_close(actual, expected, dtype, kind="kernel", what="", control=None):
    """rel_err(actual, expected) <= TOL[kind][dtype], or, given the spec's own run in dtype (`control`),
    <= STAGE_CONTROL_FACTOR x its error (module doc)."""
    err = rel_err(actual, expected)
    tol, why = TOL[kind][dtype], f"{kind}, {dtype}"
    if control is not None:
        own = rel_err(control, expected)
        if STAGE_CONTROL_FACTOR * own > tol:
            tol, why = STAGE_CONTROL_FACTOR * own, f"{STAGE_CONTROL_FACTOR}x the spec's own {dtype} error {own:.3g}"
    assert err <= tol, f"{what}: rel error {err:.3g} > {tol:.3g} ({why})"


def kernel_module(name: str):
    """impl/kernels/<name>.py, interpreted by Triton on the CPU, the installed module on CUDA."""
    if DEVICE.type == "cuda":
        return importlib.import_module(f"qwen25vl.impl.kernels.{name}")
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is decorated (and by triton's lazy imports)
    spec = importlib.util.spec_from_file_location(
        f"qwen25vl.impl.kernels._interpreted_{name}", KERNEL_DIR / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def left_padded(rows: list[list[int]], pad: int = 151643) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids int64 [B, L], attention_mask int64 [B, L]) left padded."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.int64)
    mask = torch.zeros(len(rows), L, dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, L - len(r) :] = torch.tensor(r, dtype=torch.int64)
        mask[b, L - len(r) :] = 1
    return ids, mask


def vision_inputs(config, rows_text: list[list[int]], image_grids, video_grids, seed: int = 0, spgt=None) -> dict:
    """Model inputs: row b = rows_text[b] prefix + its vision spans (items given as (row, kind, grid)).

    image_grids / video_grids: lists of (row, (t, h, w)). Each span is vision_start + pads + vision_end,
    appended to its row in the order given; random pixel values.
    """
    g = torch.Generator().manual_seed(seed)
    rows = [list(r) for r in rows_text]
    m2 = config.vision.spatial_merge_size**2
    items = [(r, "image", gr) for r, gr in image_grids] + [(r, "video", gr) for r, gr in video_grids]
    for r, kind, (t, h, w) in items:
        pad = config.image_token_id if kind == "image" else config.video_token_id
        rows[r] += [config.vision_start_token_id] + [pad] * (t * h * w // m2) + [config.vision_end_token_id, 13]
    ids, mask = left_padded(rows, config.pad_token_id)
    # pad runs are consumed in flattened (row, position) order: sort each kind's grids by row
    imgs = sorted(image_grids, key=lambda x: x[0])
    vids = sorted(video_grids, key=lambda x: x[0])
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": None,
        "image_grid_thw": None,
        "pixel_values_videos": None,
        "video_grid_thw": None,
        "second_per_grid_ts": None,
    }
    pd = config.vision.patch_dim
    if imgs:
        grid = torch.tensor([gr for _, gr in imgs], dtype=torch.int64)
        inputs["image_grid_thw"] = grid
        inputs["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), pd, generator=g)
    if vids:
        grid = torch.tensor([gr for _, gr in vids], dtype=torch.int64)
        inputs["video_grid_thw"] = grid
        inputs["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), pd, generator=g)
        inputs["second_per_grid_ts"] = torch.tensor(spgt or [1.0] * len(vids), dtype=torch.float64)
    return inputs


def wide_config(tied: bool = False):
    """The tiny config widened so every text linear can take the int4 kernels (widths % 128 == 0: hidden
    128, intermediate 256, 4 heads of 32); tied=True ties the embedding, as 3B does."""
    import dataclasses

    from qwen25vl.tools.make_tiny_checkpoint import tiny_config

    c = tiny_config(tied=tied)
    return dataclasses.replace(
        c,
        hidden_size=128,
        intermediate_size=256,
        mrope_section=(4, 6, 6),
        vision=dataclasses.replace(c.vision, out_hidden_size=128),
    )
