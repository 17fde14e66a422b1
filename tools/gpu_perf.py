"""A/B of impl's performance variants in one process, checked against the baseline variant.

    python -m qwen25vl.tools.gpu_perf --out DIR [--device cuda] [--size 3b] [--parts decode,profile,vision,b8]
    python -m qwen25vl.tools.gpu_perf --device cpu --size tiny --out /tmp/p     (the CPU dry run)

Parts, most important first (each under its own alarm; a failure is recorded and the next part runs):
  decode   greedy decode at batch 1, N tokens after the 1346-token prompt, for each variant of
           a layer variant of impl.variants with generate_tokens(decode_attention=...); tokens compared
           with the baseline (sdpa, eager layers, CUDA graph); decode attention of each backend vs
           float64; the fused matrix-vector kernels vs F.linear + unfused ops (time, error)
  profile  torch.profiler over decode steps of the baseline (eager and graph replay) and of fused+split
           (graph replay): top-15 CUDA kernels, kernel time vs wall time per step
  vision   the vision tower on one 1008x1008 image with each attention backend / SDPA kernel; output
           compared with the baseline (auto); a profile of it (top-15 kernels, CUDA total vs wall); then
           the MLP width padded to a multiple of 64 (VisionTower.pad_mlp, in place, exact)
  b8       decode at batch 8, baseline vs split
  compile  the compiled decode variants (slow to build, so after the cheap parts)
  int4     (size 7b) bf16 vs int4 decode, sdpa, split and fused+split
Every record is one JSON line in DIR/perf.jsonl, flushed when measured; DIR/summary.md at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import statistics
import sys
import time
import traceback

import torch


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int):
    """Raise PartTimeout in the main thread after `seconds` (checked between Python bytecodes)."""

    def fire(signum, frame):
        raise PartTimeout(f"part ran past {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Recorder:
    def __init__(self, out_dir: str, device: torch.device):
        os.makedirs(out_dir, exist_ok=True)
        self.dir, self.device = out_dir, device
        self.f = open(os.path.join(out_dir, "perf.jsonl"), "a")
        self.records = []
        self.t0 = time.perf_counter()

    def emit(self, **rec):
        rec = {"t": round(time.perf_counter() - self.t0, 1), **rec}
        self.records.append(rec)
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()

    def text(self, name: str, body: str):
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(body)

    def profile_text(self, name: str, prof):
        """prof's top-25 table by self time (CUDA on a GPU) into DIR/name; a convenience, the JSON is the record."""
        try:
            sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            body = prof.key_averages().table(sort_by=sort, row_limit=25)
        except Exception as e:
            body = f"table failed: {e}"
        self.text(name, body)

    def part(self, name: str, seconds: int, fn):
        t = time.perf_counter()
        try:
            with alarm(seconds):
                fn()
            self.emit(part=name, ok=True, seconds=round(time.perf_counter() - t, 1))
        except BaseException as e:  # noqa: BLE001 - a part must never stop the others (KeyboardInterrupt aside)
            if isinstance(e, KeyboardInterrupt):
                raise
            traceback.print_exc()
            self.emit(
                part=name,
                ok=False,
                error=f"{type(e).__name__}: {str(e)[:400]}",
                seconds=round(time.perf_counter() - t, 1),
            )


def kernel_table(prof, top: int = 15) -> list[dict]:
    """The `top` CUDA kernels (and memcpy/memset) by total device time: [{name, us, calls}]."""
    from torch.autograd import DeviceType

    agg = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        a = agg.setdefault(e.name, [0.0, 0])
        a[0] += us
        a[1] += 1
    rows = sorted(
        ({"name": k[:160], "us": round(v[0], 1), "calls": v[1]} for k, v in agg.items()), key=lambda r: -r["us"]
    )
    return rows[:top], round(sum(v[0] for v in agg.values()), 1)


DECODE_VARIANTS = {  # name -> (impl.variants layer variant, generate_tokens keyword arguments); first = baseline
    "sdpa": ("eager", {"decode_attention": "sdpa"}),
    "split": ("eager", {"decode_attention": "split"}),
    "math": ("eager", {"decode_attention": "math"}),
    "fused": ("fused", {"decode_attention": "sdpa"}),
    "fused+split": ("fused", {"decode_attention": "split"}),
    "compile+split": ("compiled:default", {"decode_attention": "split"}),
    "compile+sdpa": ("compiled:default", {"decode_attention": "sdpa"}),
    "autotune+split": ("compiled:max-autotune-no-cudagraphs", {"decode_attention": "split"}),
}


def _compiled(variant: str) -> bool:
    return DECODE_VARIANTS[variant][0].startswith("compiled")


def _apply_layers(model, layers: str) -> None:
    """Swap the model's decoder layers to the impl.variants variant named `layers` ("eager", "fused", "compiled:MODE")."""
    from ..impl import variants

    kind, _, mode = layers.partition(":")
    if kind == "compiled":
        variants.apply_compiled(model, mode)
    else:
        getattr(variants, f"apply_{kind}")(model)


class Perf:
    def __init__(self, a):
        from ..impl.model import Qwen25VL, default_dtype
        from .bench import IMAGE_SIDE, Timer, make_config, make_inputs
        from .make_tiny_checkpoint import make_random_params

        self.a, self.dev = a, torch.device(a.device)
        self.dt = default_dtype(self.dev)
        self.rec = Recorder(a.out, self.dev)
        self.timer = Timer(self.dev)
        t = time.perf_counter()
        self.config = make_config(a.size)
        self.params = make_random_params(self.config, 0, self.dt, device=self.dev)
        self.model = Qwen25VL.from_params(self.config, self.params, dtype=self.dt, device=self.dev)
        self.side = IMAGE_SIDE[a.size]
        self.inputs1 = make_inputs(self.config, self.side, 1)
        self.inputs8 = make_inputs(self.config, self.side, 8)
        self.rec.emit(
            what="setup",
            size=a.size,
            device=torch.cuda.get_device_name() if self.dev.type == "cuda" else "cpu",
            torch=torch.__version__,
            dtype=str(self.dt),
            seconds=round(time.perf_counter() - t, 1),
            prompt_tokens=self.inputs1["input_ids"].shape[1],
        )
        self.base_tokens = {}

    # -- decode ---------------------------------------------------------------------------------
    def decode_variant(self, name: str, variant: tuple, B: int = 1, reps: int = 3, model=None, tag: str = ""):
        model = model or self.model
        layers, kw = variant
        inputs = self.inputs1 if B == 1 else self.inputs8
        N = self.a.decode_tokens
        _apply_layers(model, layers)
        try:
            t = time.perf_counter()
            toks = model.generate_from_inputs(inputs, N + 1, [0], ignore_eos=True, **kw)  # warm-up (compiles)
            first_s = time.perf_counter() - t
            st0 = dict(model.last_stats)
            rates = []
            for _ in range(reps):
                toks = model.generate_from_inputs(inputs, N + 1, [0], ignore_eos=True, **kw)
                rates.append(model.last_stats["decode_tok_per_s"] * B)
        finally:
            _apply_layers(model, "eager")
        st = model.last_stats
        key = (tag, B)
        if key not in self.base_tokens:
            self.base_tokens[key] = toks
        base = self.base_tokens[key]
        agree = (toks == base).all(0).int()
        prefix = int(agree.argmin()) if not bool(agree.all()) else toks.shape[1]
        self.rec.emit(
            what=f"decode.b{B}",
            variant=name,
            tag=tag,
            tok_s=round(statistics.median(rates), 1),
            ms_per_step=round(1e3 * B / statistics.median(rates), 3),
            rates=[round(r, 1) for r in rates],
            tokens_equal_baseline=bool(torch.equal(toks, base)),
            agree_prefix=prefix,
            n=toks.shape[1],
            cuda_graph=st.get("cuda_graph"),
            graph_error=st.get("cuda_graph_error"),
            decode_attention=st.get("decode_attention"),
            decode_variant=st.get("decode_variant"),
            first_call_s=round(first_s, 1),
            graph_capture_s=round(st0.get("graph_capture_s", 0), 1),
        )

    def attention_check(self):
        """Each decode attention backend against float64 at the model's shapes, with a half-filled cache."""
        from ..impl.attention import decode_attention

        cfg = self.config
        B, N, K, D, T = 1, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 1488
        g = torch.Generator().manual_seed(3)
        q, kc, vc = (torch.randn(s, generator=g).to(self.dev, self.dt) for s in ((B, N, D), (B, K, T, D), (B, K, T, D)))
        filled = 1000
        bias = torch.full((B, T), float("-inf"), dtype=self.dt, device=self.dev)
        bias[:, 3:filled] = 0  # 3 left-padding keys
        split_reads_all = not (self.dev.type == "cuda" and self.model.text.use_triton)  # the fallback reads every key
        if not split_reads_all:
            kc[:, :, filled:] = float("nan")  # the split kernel must never read past n_valid
        vc[:, :, filled:] = 0
        ref = decode_attention(
            q.double(), kc[:, :, :filled].double(), vc[:, :, :filled].double(), bias[:, :filled].double(), "math"
        )
        nv = torch.tensor([filled], device=self.dev)
        for be in ("sdpa", "split", "math"):
            try:
                kk = kc if be == "split" else torch.nan_to_num(kc, nan=0.0)
                o = decode_attention(q, kk, vc, bias, be, nv)
                err = ((o.double() - ref).abs().max() / ref.abs().max()).item()
                us = 1e6 * self.timer.median(lambda: decode_attention(q, kk, vc, bias, be, nv), 20, warmup=0)
                self.rec.emit(
                    what="decode_attention.check", backend=be, rel_err=err, ok=err < 2e-2, eager_us=round(us, 1)
                )
            except Exception as e:
                self.rec.emit(what="decode_attention.check", backend=be, ok=False, error=f"{type(e).__name__}: {e}")

    def gemv_check(self):
        """impl.kernels.gemv (fused) against F.linear + the unfused ops, at the model's decode shapes."""
        from ..impl.kernels.gemv import gemv

        (a, mlp), text = (self.model.text.layers[0].attn, self.model.text.layers[0].mlp), self.model.text
        C = self.config.hidden_size
        g = torch.Generator().manual_seed(5)
        x = torch.randn(1, C, generator=g).to(self.dev, self.dt)
        h = torch.randn(1, self.config.intermediate_size, generator=g).to(self.dev, self.dt)
        o = torch.randn(1, a.N * a.D, generator=g).to(self.dev, self.dt)
        cases = {
            "qkv+norm+bias": (x, a.qkv.weight, a.qkv.bias, dict(norm_weight=a.norm, eps=a.eps)),
            "o_proj+residual": (o, a.o_proj.weight, None, dict(residual=x)),
            "gate_up+norm+swiglu": (
                x,
                mlp.gate_up.weight,
                None,
                dict(norm_weight=mlp.norm, eps=mlp.eps, swiglu=True),
            ),
            "down+residual": (h, mlp.down.weight, None, dict(residual=x)),
            "lm_head+norm": (x, text.lm_head.weight, None, dict(norm_weight=text.norm, eps=a.eps)),
        }
        for name, (inp, w, b, kw) in cases.items():
            try:
                ref = gemv(inp, w, b, use_triton=False, **kw)
                res = {}
                for tri in (False, True):
                    out = gemv(inp, w, b, use_triton=tri, **kw)
                    s = self.timer.median(lambda: gemv(inp, w, b, use_triton=tri, **kw), 20, warmup=0)
                    res["fused_us" if tri else "unfused_us"] = round(1e6 * s, 1)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                gbs = w.numel() * w.element_size() / (res["fused_us"] * 1e-6) / 1e9
                self.rec.emit(
                    what="gemv.check",
                    case=name,
                    rel_err=err,
                    ok=err < 3e-2,
                    weight_gb_s=round(gbs, 1),
                    shape=list(w.shape),
                    **res,
                )
            except Exception as e:
                self.rec.emit(what="gemv.check", case=name, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")

    def part_decode(self):
        """The eager-layer variants (the baseline first), then (part "compile") the compiled ones."""
        self.attention_check()
        self.gemv_check()
        self._variants([v for v in self.a.variants if v == self.a.variants[0] or not _compiled(v)])

    def part_compile(self):
        if not self.base_tokens:
            self._variants(self.a.variants[:1])  # the baseline's tokens, to compare with
        self._variants([v for v in self.a.variants if _compiled(v)])

    def _variants(self, names):
        for name in names:
            try:
                with alarm(self.a.compile_limit if _compiled(name) else self.a.variant_limit):
                    self.decode_variant(name, DECODE_VARIANTS[name])
            except BaseException as e:  # noqa: BLE001
                if isinstance(e, KeyboardInterrupt):
                    raise
                traceback.print_exc()
                self.rec.emit(what="decode.b1", variant=name, error=f"{type(e).__name__}: {str(e)[:400]}")

    def part_b8(self):
        for name in ("sdpa", "split"):
            self.decode_variant(name, DECODE_VARIANTS[name], B=8, reps=2)

    # -- profile --------------------------------------------------------------------------------
    def part_profile(self):
        from torch.profiler import ProfilerActivity, profile

        from ..impl.generate import DecodeState, _capture_graph, decode_step

        m, dev = self.model, self.dev
        inputs = self.inputs1
        L = inputs["input_ids"].shape[1]
        steps = 8
        T = -(-(L + steps + 2) // 16) * 16
        with torch.inference_mode():
            m.setup_caches(1, T)
            logits, rd = m.prefill(inputs)
            st = DecodeState(
                m, logits.argmax(-1), torch.ones_like(inputs["input_ids"]), rd, L, steps + 2, torch.tensor([-1])
            )
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            for mode in ("eager", "graph", "graph fused+split"):
                if mode.startswith("graph") and dev.type != "cuda":
                    continue
                if mode == "graph fused+split":
                    _apply_layers(m, "fused")
                    st.attn = "split"
                run = (lambda: decode_step(m, st)) if mode == "eager" else _capture_graph(m, st).replay
                run()
                st.step.zero_()
                self.timer.sync()
                with profile(activities=acts) as prof:
                    t = time.perf_counter()
                    for _ in range(3):
                        run()
                    self.timer.sync()
                    wall = (time.perf_counter() - t) / 3
                st.step.zero_()
                top, total = kernel_table(prof)
                self.rec.emit(
                    what="profile.decode",
                    mode=mode,
                    wall_ms_per_step=round(1e3 * wall, 3),
                    kernel_ms_per_step=round(total / 3e3, 3),
                    top=[dict(r, us=round(r["us"] / 3, 1)) for r in top],
                )
                self.rec.profile_text(f"profile_decode_{mode.replace(' ', '_').replace('+', '_')}.txt", prof)
        _apply_layers(m, "eager")

    # -- vision ---------------------------------------------------------------------------------
    def part_vision(self):
        m, dev = self.model, self.dev
        pv = self.inputs1["pixel_values"].to(dev)
        grid = self.inputs1["image_grid_thw"]
        variants = [("auto", "auto", None), ("auto+geometry_cache", "auto", "cache")]
        if dev.type == "cuda":
            from torch.nn.attention import SDPBackend

            variants += [
                ("dense+flash", "dense", SDPBackend.FLASH_ATTENTION),
                ("dense+efficient", "dense", SDPBackend.EFFICIENT_ATTENTION),
                ("dense+cudnn", "dense", SDPBackend.CUDNN_ATTENTION),
                ("varlen", "varlen", None),
            ]
        else:
            variants += [("dense", "dense", None), ("blockmask", "blockmask", None)]
        base = None
        for name, backend, kernel in variants:
            try:
                from torch.nn.attention import sdpa_kernel

                ctx = sdpa_kernel([kernel]) if kernel not in (None, "cache") else contextlib.nullcontext()
                m.visual.geometry_cache = {} if kernel == "cache" else None
                with torch.inference_mode(), ctx:
                    out, label = m.visual(pv, grid, backend)
                    ts = self.timer.times(lambda: m.visual(pv, grid, backend), self.a.vision_reps, warmup=0)
                if base is None:
                    base = out
                err = ((out.float() - base.float()).abs().max() / base.float().abs().max()).item()
                self.rec.emit(
                    what="vision",
                    variant=name,
                    ms=round(1e3 * statistics.median(ts), 2),
                    min_ms=round(1e3 * min(ts), 2),
                    backend=label,
                    rel_diff_vs_auto=err,
                    patches=int(grid.prod()),
                )
            except Exception as e:
                traceback.print_exc()
                self.rec.emit(what="vision", variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
        m.visual.geometry_cache = None
        # where the time goes (before pad_mlp, so the profile is the baseline's): kernels vs wall (host-bound if wall >> kernel total)
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch.inference_mode():
            with profile(activities=acts) as prof:
                t = time.perf_counter()
                m.visual(pv, grid, "auto")
                self.timer.sync()
                wall = time.perf_counter() - t
        top, total = kernel_table(prof)
        self.rec.emit(what="profile.vision", wall_ms=round(1e3 * wall, 2), kernel_ms=round(total / 1e3, 2), top=top)
        # last (it changes the model in place, exactly): the MLP width padded to a multiple of 64
        width = m.visual.pad_mlp(64)
        with torch.inference_mode():
            out, label = m.visual(pv, grid, "auto")
            ts = self.timer.times(lambda: m.visual(pv, grid, "auto"), self.a.vision_reps, warmup=0)
        err = ((out.float() - base.float()).abs().max() / base.float().abs().max()).item()
        self.rec.emit(
            what="vision",
            variant=f"auto+pad_mlp{width}",
            ms=round(1e3 * statistics.median(ts), 2),
            min_ms=round(1e3 * min(ts), 2),
            backend=label,
            rel_diff_vs_auto=err,
            patches=int(grid.prod()),
        )
        self.rec.profile_text("profile_vision.txt", prof)

    # -- int4 -------------------------------------------------------------------------------------
    def part_int4(self):
        from ..impl.model import Qwen25VL
        from ..impl.quant import linear_weight_bytes

        names = ("sdpa", "split", "fused+split")
        for name in names:
            self.decode_variant(name, DECODE_VARIANTS[name], reps=1, tag="bf16")
        bf_bytes = linear_weight_bytes(self.model)
        q = Qwen25VL.from_params(self.config, self.params, dtype=self.dt, device=self.dev, quantize="int4")
        self.rec.emit(
            what="int4.setup",
            linear_bytes_ratio=linear_weight_bytes(q) / bf_bytes,
            fallback_layers=len(q.quant_report["fallback"]),
        )
        for name in names:
            self.decode_variant(name, DECODE_VARIANTS[name], reps=1, model=q, tag="int4")

    def summary(self, quiet: bool = False):
        rows = ["| part | variant | result | check |", "|---|---|---|---|"]
        for r in self.rec.records:
            w = r.get("what", "")
            if "error" in r:
                rows.append(
                    f"| {w or r.get('part')} | {r.get('variant', r.get('backend', ''))} | ERROR | {r['error'][:120]} |"
                )
            elif w.startswith("decode.b"):
                chk = "tokens equal" if r["tokens_equal_baseline"] else f"agree {r['agree_prefix']}/{r['n']}"
                rows.append(
                    f"| {w} {r['tag']} | {r['variant']} | {r['tok_s']} tok/s ({r['ms_per_step']} ms/step) | {chk} |"
                )
            elif w == "decode_attention.check":
                rows.append(
                    f"| attention op | {r['backend']} | {r['eager_us']} us eager | rel err {r['rel_err']:.2e} |"
                )
            elif w == "gemv.check":
                rows.append(
                    f"| gemv op | {r['case']} | fused {r['fused_us']} us ({r['weight_gb_s']} GB/s), unfused {r['unfused_us']} us | rel err {r['rel_err']:.2e} |"
                )
            elif w == "vision":
                rows.append(f"| vision | {r['variant']} | {r['ms']} ms | rel diff {r['rel_diff_vs_auto']:.2e} |")
            elif w.startswith("profile."):
                k = r.get("kernel_ms_per_step", r.get("kernel_ms"))
                wall = r.get("wall_ms_per_step", r.get("wall_ms"))
                rows.append(
                    f"| {w} | {r.get('mode', '')} | kernels {k} ms, wall {wall} ms | top: {r['top'][0]['name'][:60] if r['top'] else '-'} |"
                )
        body = "\n".join(rows) + "\n"
        self.rec.text("summary.md", body)
        if not quiet:
            print(body, flush=True)


PARTS = ("decode", "profile", "vision", "compile", "b8", "int4")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen25vl.tools.gpu_perf", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="3b", choices=("3b", "7b", "cpu", "tiny"))
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="decode,profile,vision,b8,compile")
    p.add_argument(
        "--variants",
        default="sdpa,split,fused+split,fused,math,compile+split,compile+sdpa",
        help=f"decode variants, the first is the baseline; from {','.join(DECODE_VARIANTS)}",
    )
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--vision-reps", type=int, default=5)
    p.add_argument("--variant-limit", type=int, default=30, help="seconds per eager decode variant")
    p.add_argument("--compile-limit", type=int, default=75, help="seconds per compiled decode variant")
    p.add_argument("--part-limit", type=int, default=60, help="seconds per part other than decode")
    a = p.parse_args(argv)
    a.variants = [v for v in a.variants.split(",") if v]
    for v in a.variants:
        if v not in DECODE_VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(DECODE_VARIANTS)}")
    parts = [x for x in a.parts.split(",") if x]
    for x in parts:
        if x not in PARTS:
            p.error(f"unknown part {x!r}; choose from {', '.join(PARTS)}")
    perf = Perf(a)
    for x in parts:
        n_compiled = sum(map(_compiled, a.variants))
        limit = {
            "decode": a.variant_limit * (len(a.variants) - n_compiled + 1),
            "compile": a.variant_limit + a.compile_limit * max(n_compiled, 1),
        }.get(x, a.part_limit)
        perf.rec.part(x, limit, getattr(perf, f"part_{x}"))
        gc.collect()
        perf.summary(quiet=True)  # after every part: a step killed from outside still leaves its table
    perf.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
