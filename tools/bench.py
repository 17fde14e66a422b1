"""Benchmark impl against transformers in the same process, on the same random weights.

    python -m qwen25vl.tools.bench --size 3b [--size 7b] [--device cuda] [--out bench.jsonl]
    python -m qwen25vl.tools.bench --size cpu --device cpu          (small shapes for a laptop CPU)

Weights come from tools.make_random_params (real 3B/7B shapes on the GPU); transformers' model is
built from the same config and given the very same tensors (load_state_dict with assign=True), and
impl's model is built from that dict (fused copies where it fuses). Measured, each as the median of
several timed runs after a warm-up:
  vision   the vision encoder on one image (1008x1008 -> 5184 patches; smaller on "cpu")
  prefill  vision + the whole prompt (1346 tokens with that image), logits of the last position
  decode   greedy tokens per second at batch 1 and 8 after that prompt (transformers: time of
           generate(N+1) minus generate(1); impl: its decode loop, CUDA graph captured beforehand)
  int4     impl decode with int4 text linears, and the int4/bf16 ratio of linear-weight bytes; then
           decode side by side (runs interleaved): impl bf16, impl int4 with the lm_head in the model
           dtype, int8, w8a8, int4 and w4a8, impl w4a8 (int8 activations in the layers too; CPU) with
           the lm_head in the model dtype and in w4a8,
           impl bf16 without the CPU's float16 pack (where it applies), and llama.cpp when
           installed (below), each with the weight bytes one
           token reads and its share of the memory limit (measured copy bandwidth / bytes per token)
  peak     peak allocated memory of a prefill + decode run (weights included)
llama.cpp (optional column): --llama-cpp DIR or $QWEN25VL_LLAMA_CPP names a llama.cpp CMake build folder
holding bin/llama-bench (and bin/llama-quantize); its CMakeCache.txt names the source (convert_hf_to_gguf.py,
gguf-py). The size's config is written as a random checkpoint (the very weights impl runs), converted
to bf16 GGUF by llama.cpp's own converter, quantized to q4_0 (default: 6-bit tied embedding) and to
q4_0 with the embedding kept bf16 (impl int4's layout), and timed by llama-bench (prompt L, decode N
after a prompt of L, the bench's thread count). Absent: the records say "not installed", nothing fails.
Every record is appended to --out as one JSON line the moment it is measured (flushed), then a
table with impl/transformers ratios is printed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ..spec.checkpoint import to_v5_key
from ..spec.config import Qwen25VLConfig, VisionConfig

VISION_REAL = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=(7, 15, 23, 31)
)
SIZES = {
    "3b": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        vision=VISION_REAL,
    ),
    "7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        vision=VISION_REAL,
    ),
    # CPU: the real vocabulary, head dims and window geometry, narrower and shallower elsewhere
    "cpu": dict(
        vocab_size=151936,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        vision=dict(depth=8, hidden_size=320, intermediate_size=864, num_heads=4, fullatt_block_indexes=(3, 7)),
    ),
    # the tests' tiny config (tools.make_tiny_checkpoint.tiny_config): framework overhead dominates
    "tiny": dict(
        vocab_size=152064,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        mrope_section=(2, 3, 3),
        tie_word_embeddings=False,
        vision=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, fullatt_block_indexes=(1, 3)),
    ),
}
IMAGE_SIDE = {"3b": 1008, "7b": 1008, "cpu": 448, "tiny": 448}


def make_config(size: str) -> Qwen25VLConfig:
    s = dict(SIZES[size])
    vision = VisionConfig(**s.pop("vision"), out_hidden_size=s["hidden_size"])
    return Qwen25VLConfig(**s, vision=vision)


def make_inputs(config, side: int, batch: int = 1, text_tokens: int = 50, seed: int = 0) -> dict:
    """A prompt of `text_tokens` text tokens around one side x side image, repeated `batch` times."""
    g = torch.Generator().manual_seed(seed)
    gh = side // 14
    n_img = gh * gh // 4
    pre = torch.randint(0, 150000, (text_tokens // 2,), generator=g).tolist()
    post = torch.randint(0, 150000, (text_tokens - text_tokens // 2 - 2,), generator=g).tolist()
    row = pre + [config.vision_start_token_id] + [config.image_token_id] * n_img + [config.vision_end_token_id] + post
    ids = torch.tensor([row] * batch, dtype=torch.int64)
    pv = torch.randn(gh * gh, config.vision.patch_dim, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pv.repeat(batch, 1),
        "image_grid_thw": torch.tensor([[1, gh, gh]] * batch),
        "pixel_values_videos": None,
        "video_grid_thw": None,
        "second_per_grid_ts": None,
    }


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def interleaved(self, fns: dict, reps: int, warmup: int = 1, timed_by_fn: bool = False) -> dict:
        """Median seconds of each fn, runs alternating between them (fair under a varying machine load).
        timed_by_fn: each fn returns its own measured seconds instead of being timed here."""
        with torch.inference_mode():
            for _ in range(warmup):
                for fn in fns.values():
                    fn()
            times = {k: [] for k in fns}
            for _ in range(reps):
                for k, fn in fns.items():
                    self.sync()
                    t = time.perf_counter()
                    r = fn()
                    self.sync()
                    times[k].append(r if timed_by_fn else time.perf_counter() - t)
        return {k: statistics.median(v) for k, v in times.items()}

    def times(self, fn, reps: int, warmup: int = 1) -> list[float]:
        """Seconds of each of `reps` timed calls of fn, after `warmup` untimed ones."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return times

    def median(self, fn, reps: int, warmup: int = 1) -> float:
        return statistics.median(self.times(fn, reps, warmup))


def build_hf(config, params, device, dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    raw = config.to_dict()
    raw["vision_config"]["in_channels"] = config.vision.in_chans
    raw["vision_config"]["model_type"] = "qwen2_5_vl_vision"
    hfc = Qwen2_5_VLConfig(**raw)
    try:
        hfc._attn_implementation = "sdpa"
    except Exception:
        pass
    with torch.device(device):
        try:
            model = Qwen2_5_VLForConditionalGeneration._from_config(hfc, dtype=dtype, attn_implementation="sdpa")
        except TypeError:
            model = Qwen2_5_VLForConditionalGeneration._from_config(hfc, torch_dtype=dtype, attn_implementation="sdpa")
    state = {to_v5_key(k): v for k, v in params.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"transformers state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def hf_kwargs(model, inputs, device):
    kw = {k: v.to(device) for k, v in inputs.items() if v is not None}
    ids = kw["input_ids"]
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers >= 5.x wants it
        mm = torch.zeros_like(ids)
        mm[ids == model.config.image_token_id] = 1
        kw["mm_token_type_ids"] = mm
    kw["pixel_values"] = kw["pixel_values"].to(model.dtype)
    return kw


def param_bytes(module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen and t.device.type != "meta":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 15) -> float:
    """Memory bandwidth in bytes/s as STREAM's copy counts it (bytes read + bytes written per second),
    best of `reps` copies of a buffer far larger than the caches (STREAM's convention: on a shared
    machine the median was measured 19.5-26 GB/s from run to run)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = min(Timer(torch.device("cpu")).times(lambda: dst.copy_(src), reps))
    return 2 * nbytes / t


LLAMA_CPP_ENV = "QWEN25VL_LLAMA_CPP"


class LlamaCpp:
    """A llama.cpp CMake build folder (bin/llama-bench, bin/llama-quantize) and its source folder."""

    def __init__(self, build: str | os.PathLike):
        self.build = Path(build).resolve()
        self.bench_exe = self.build / "bin" / "llama-bench"
        self.quantize_exe = self.build / "bin" / "llama-quantize"
        self.source = self._source()

    @classmethod
    def find(cls, folder: str | None) -> tuple[LlamaCpp | None, str]:
        """(LlamaCpp, "") or (None, why not) for --llama-cpp / $QWEN25VL_LLAMA_CPP."""
        folder = folder or os.environ.get(LLAMA_CPP_ENV)
        if not folder:
            return None, f"not installed (give --llama-cpp DIR or set {LLAMA_CPP_ENV})"
        lc = cls(folder)
        if not lc.bench_exe.is_file():
            return None, f"not installed: {lc.bench_exe} is missing (cmake --build {lc.build} --target llama-bench)"
        if lc.source is None or not (lc.source / "convert_hf_to_gguf.py").is_file():
            return None, f"not installed: no llama.cpp source with convert_hf_to_gguf.py named by {lc.build}"
        return lc, ""

    def _source(self) -> Path | None:
        cache = self.build / "CMakeCache.txt"
        if cache.is_file():
            for line in cache.read_text(errors="replace").splitlines():
                if line.startswith("CMAKE_HOME_DIRECTORY:"):
                    return Path(line.split("=", 1)[1].strip())
        return None

    def _run(self, cmd: list, what: str) -> str:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama.cpp {what} failed (exit {r.returncode}): {r.stderr.strip()[-800:]}")
        return r.stdout

    def ggufs(self, size: str, config, work: Path) -> dict[str, Path]:
        """The size's random checkpoint as GGUF files {"bf16", "q4_0_bf16emb", "q4_0"} under work (cached
        by the config; each file written under a temporary name and renamed)."""
        from .make_tiny_checkpoint import make_tiny_checkpoint

        key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
        folder = work / f"{size}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        out = {name: folder / f"{name}.gguf" for name in ("bf16", "q4_0_bf16emb", "q4_0")}
        if all(f.is_file() for f in out.values()):
            return out
        ckpt = folder / "checkpoint"
        make_tiny_checkpoint(ckpt, config=config, tied=config.tie_word_embeddings, overwrite=True)
        env = {**os.environ, "PYTHONPATH": str(self.source / "gguf-py")}
        tmp = out["bf16"].with_suffix(".part")
        convert = [sys.executable, self.source / "convert_hf_to_gguf.py", ckpt, "--outtype", "bf16", "--outfile", tmp]
        r = subprocess.run([str(c) for c in convert], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"llama.cpp convert_hf_to_gguf.py failed (exit {r.returncode}): {r.stderr[-800:]}")
        os.replace(tmp, out["bf16"])
        shutil.rmtree(ckpt, ignore_errors=True)
        if self.quantize_exe.is_file():
            for name, extra in (("q4_0_bf16emb", ["--token-embedding-type", "bf16"]), ("q4_0", [])):
                tmp = out[name].with_suffix(".part")
                self._run([self.quantize_exe, *extra, out["bf16"], tmp, "q4_0"], f"llama-quantize {name}")
                os.replace(tmp, out[name])
        return {k: f for k, f in out.items() if f.is_file()}

    def bench(self, gguf: Path, *, prompt: int, gen: int, threads: int, reps: int = 1) -> dict:
        """llama-bench: gen 0 -> {"prompt_tok_s"} for `prompt` tokens; gen > 0 -> {"decode_tok_s"} for gen
        tokens after a prompt of `prompt` tokens (-d). model_size: the file's tensor bytes."""
        cmd = [self.bench_exe, "-m", gguf, "-t", threads, "-r", reps, "-o", "jsonl"]
        cmd += ["-p", prompt, "-n", 0] if gen == 0 else ["-p", 0, "-n", gen, "-d", prompt]
        rec = json.loads(self._run(cmd, "llama-bench").strip().splitlines()[-1])
        rate = "prompt_tok_s" if gen == 0 else "decode_tok_s"
        return {rate: rec["avg_ts"], "model_size": rec["model_size"]}


class Bench:
    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        from ..impl.model import default_dtype

        self.dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(self.device)
        self.timer = Timer(self.device)
        self.records = []
        self.out = open(args.out, "a") if args.out else None

    def emit(self, **rec):
        rec = {"device": self.device_name(), "dtype": str(self.dtype).removeprefix("torch."), **rec}
        self.records.append(rec)
        line = json.dumps(rec)
        print(line, flush=True)
        if self.out:
            self.out.write(line + "\n")
            self.out.flush()

    def device_name(self):
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu x{torch.get_num_threads()} threads"

    @staticmethod
    def versus(t: dict, a: str, b: str, unit: str, scale: float) -> dict:
        """transformers' number and the speed-up of impl (time_b / time_a), when b ran."""
        if b not in t:
            return {}
        return {f"transformers_{unit}": t[b] * scale, "ratio": t[b] / t[a]}

    def guarded(self, what, fn):
        try:
            return fn()
        except Exception as e:  # one failed measurement must not lose the others
            self.emit(size=self.size, what=what, error=f"{type(e).__name__}: {e}")
            traceback.print_exc()
            return None

    def peak(self, fn, weights: int):
        if self.device.type != "cuda":
            fn()
            return None
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base + weights) / 2**30

    def run_size(self, size: str):
        from ..impl.model import Qwen25VL
        from .make_tiny_checkpoint import make_random_params

        a, dev, dt, T = self.args, self.device, self.dtype, self.timer
        self.size = size
        config = make_config(size)
        side = IMAGE_SIDE[size]
        t0 = time.perf_counter()
        params = make_random_params(config, 0, dt, device=dev)
        self.emit(size=size, what="setup.params", seconds=time.perf_counter() - t0)
        inputs1 = make_inputs(config, side, 1)
        inputs8 = make_inputs(config, side, 8)
        P = int(inputs1["image_grid_thw"].prod())
        L = inputs1["input_ids"].shape[1]
        N = a.decode_tokens
        impl = Qwen25VL.from_params(config, params, dtype=dt, device=dev, attention=a.attention)
        hf = None
        if not a.no_transformers and size not in a.skip_hf:
            hf = self.guarded("setup.transformers", lambda: build_hf(config, params, dev, dt))
        reps = a.reps

        # 1. vision encoder; impl and transformers runs alternate so both see the same machine load
        pv, grid = inputs1["pixel_values"].to(dev), inputs1["image_grid_thw"]
        backend = impl.visual(pv, grid, a.attention)[1]
        fns = {"impl": lambda: impl.visual(pv, grid, a.attention)}
        if hf is not None:
            fns["transformers"] = lambda: hf.model.visual(pv.to(dt), grid.to(dev))
        t = self.guarded("vision", lambda: T.interleaved(fns, reps))
        if t:
            self.emit(
                size=size,
                what="vision",
                impl_ms=t["impl"] * 1e3,
                patches=P,
                backend=backend,
                **self.versus(t, "impl", "transformers", "ms", 1e3),
            )

        # 2. prefill (vision + prompt), last-position logits
        def impl_prefill():
            impl.setup_caches(1, L + 1)
            impl.prefill(inputs1)

        fns = {"impl": impl_prefill}
        if hf is not None:
            kw1 = hf_kwargs(hf, inputs1, dev)
            fns["transformers"] = lambda: hf(**kw1, use_cache=False, logits_to_keep=1)
        t = self.guarded("prefill", lambda: T.interleaved(fns, reps))
        if t:
            self.emit(
                size=size,
                what="prefill",
                impl_ms=t["impl"] * 1e3,
                tokens=L,
                **self.versus(t, "impl", "transformers", "ms", 1e3),
            )

        # 3. decode at batch 1 and 8 (tokens per second summed over the batch)
        for B, inputs in ((1, inputs1), (8, inputs8)):
            if B > 1 and size in ("cpu", "tiny") and not a.cpu_batch8:
                continue
            impl.generate_from_inputs(inputs, 3, [0], ignore_eos=True)  # warm-up (kernels, allocator)
            peak = self.peak(lambda: impl.generate_from_inputs(inputs, N + 1, [0], ignore_eos=True), param_bytes(impl))
            st = dict(impl.last_stats)

            def impl_decode():
                impl.generate_from_inputs(inputs, N + 1, [0], ignore_eos=True)
                return impl.last_stats["decode_s"] / N  # seconds per step, prefill and capture excluded

            fns = {"impl": impl_decode}
            peak_hf = None
            if hf is not None:
                kw = hf_kwargs(hf, inputs, dev)

                def gen(n):
                    hf.generate(
                        **kw,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        num_beams=1,
                        repetition_penalty=1.0,
                        pad_token_id=config.pad_token_id,
                    )

                def hf_decode():
                    t1 = time.perf_counter()
                    gen(1)
                    T.sync()
                    t2 = time.perf_counter()
                    gen(N + 1)
                    T.sync()
                    return ((time.perf_counter() - t2) - (t2 - t1)) / N

                fns["transformers"] = hf_decode
                self.guarded(f"decode.b{B}.transformers.warmup", lambda: gen(2))
                peak_hf = self.guarded(
                    f"decode.b{B}.transformers.peak", lambda: self.peak(lambda: gen(N + 1), param_bytes(hf))
                )
            t = self.guarded(f"decode.b{B}", lambda: T.interleaved(fns, max(1, reps // 2), timed_by_fn=True))
            if t:
                rates = {k: B / v for k, v in t.items()}
                rec = dict(
                    size=size,
                    what=f"decode.b{B}",
                    impl_tok_s=rates["impl"],
                    new_tokens=st["new_tokens"],
                    cuda_graph=st.get("cuda_graph"),
                    graph_error=st.get("cuda_graph_error"),
                    impl_peak_gib=peak,
                    prefill_ms=st["prefill_s"] * 1e3,
                )
                if "transformers" in rates:
                    rec.update(
                        transformers_tok_s=rates["transformers"],
                        transformers_peak_gib=peak_hf,
                        ratio=rates["impl"] / rates["transformers"],
                    )
                self.emit(**rec)

        # 4. vision attention backends on an image whose windows are not all full (varlen vs padded dense)
        if a.vision_backends:
            g = torch.Generator().manual_seed(1)
            grid_nu = torch.tensor([[1, 74, 50]])  # 37 x 25 merge units: partial windows on two sides
            pv_nu = torch.randn(74 * 50, config.vision.patch_dim, generator=g).to(dev)
            for backend in a.vision_backends:

                def one(backend=backend):
                    with torch.inference_mode():
                        return T.median(lambda: impl.visual(pv_nu, grid_nu, backend), reps)

                t = self.guarded(f"vision.backend.{backend}", one)
                if t:
                    self.emit(
                        size=size,
                        what=f"vision.backend.{backend}",
                        impl_ms=t * 1e3,
                        patches=74 * 50,
                        backend=impl.visual(pv_nu, grid_nu, backend)[1],
                    )

        # 5. int4
        if a.int4 and size in a.int4:
            hf = None
            hf = None
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            self.guarded("int4", lambda: self.run_int4(config, params, impl, inputs1, N))
        if hf is not None and a.hf_static:
            kw = hf_kwargs(hf, inputs1, dev)

            def static():
                def gen(n):
                    with torch.inference_mode():
                        hf.generate(
                            **kw,
                            max_new_tokens=n,
                            min_new_tokens=n,
                            do_sample=False,
                            num_beams=1,
                            repetition_penalty=1.0,
                            pad_token_id=config.pad_token_id,
                            cache_implementation="static",
                        )

                gen(N + 1)
                t1 = T.median(lambda: gen(1), 1, warmup=1)
                tn = T.median(lambda: gen(N + 1), 1, warmup=0)
                return N / (tn - t1)

            r = self.guarded("decode.b1.transformers_static", static)
            if r:
                self.emit(size=size, what="decode.b1", transformers_static_tok_s=r)
        impl = hf = params = None
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def run_int4(self, config, params, impl, inputs1, N):
        """int4 decode, then every decoder side by side (module doc): one interleaved timing run."""
        from ..impl.model import Qwen25VL
        from ..impl.quant import apply_lm_head_quant, decode_weight_bytes, fp16_pack_wanted, linear_weight_bytes

        a, dev, dt = self.args, self.device, self.dtype
        t0 = time.perf_counter()
        q = Qwen25VL.from_params(config, params, dtype=dt, device=dev, attention=a.attention, quantize="int4")
        setup = time.perf_counter() - t0
        base = f"impl {str(dt).removeprefix('torch.')}"  # the model dtype's decode: the reference row
        models = {base: impl, "impl int4": q}
        for head in ("int8", "w8a8", "int4", "w4a8"):
            # unpacked: its layers are replaced and its lm_head quantized, so packing them would be wasted
            m = Qwen25VL.from_params(config, params, dtype=dt, device=dev, attention=a.attention, cpu_fp16_pack=False)
            m.text.layers = q.text.layers  # the same int4 layers, shared; only the lm_head differs
            m.quant_report = dict(q.quant_report)
            try:
                apply_lm_head_quant(m, head)
            except ValueError as e:
                self.emit(size=self.size, what=f"int4.lm_head_{head}", skipped=str(e))
                continue
            models[f"impl int4, lm_head {head}"] = m
        if dev.type == "cpu":  # int8 activations in the layers too (impl.quant, "w4a8"), lm_head as is or w4a8
            try:
                w4 = Qwen25VL.from_params(config, params, dtype=dt, device=dev, attention=a.attention, quantize="w4a8")
                models["impl w4a8"] = w4
                m = Qwen25VL.from_params(
                    config, params, dtype=dt, device=dev, attention=a.attention, cpu_fp16_pack=False
                )
                m.text.layers = w4.text.layers  # the same w4a8 layers, shared; only the lm_head differs
                m.quant_report = dict(w4.quant_report)
                apply_lm_head_quant(m, "w4a8")
                models["impl w4a8, lm_head w4a8"] = m
            except ValueError as e:
                self.emit(size=self.size, what="w4a8", skipped=str(e))
        if fp16_pack_wanted(dev, dt):  # what the float16 pack (impl.quant) replaced: torch's bf16 GEMV
            models[f"{base}, unpacked"] = Qwen25VL.from_params(
                config, params, dtype=dt, device=dev, attention=a.attention, cpu_fp16_pack=False
            )
        if a.compiled_decode:
            from ..impl.variants import apply_compiled

            m = Qwen25VL.from_params(config, params, dtype=dt, device=dev, attention=a.attention, cpu_fp16_pack=False)
            apply_compiled(m)  # compiles at the warm-up below
            models[f"{base}, compiled decode"] = m
        for m in models.values():
            m.generate_from_inputs(inputs1, 3, [0], ignore_eos=True)  # warm-up
        peak = self.peak(lambda: q.generate_from_inputs(inputs1, N + 1, [0], ignore_eos=True), param_bytes(q))
        st = dict(q.last_stats)

        def impl_decode(m):
            m.generate_from_inputs(inputs1, N + 1, [0], ignore_eos=True)
            return m.last_stats["decode_s"] / N

        fns = {name: (lambda m=m: impl_decode(m)) for name, m in models.items()}
        bytes_per_token = {name: decode_weight_bytes(m) for name, m in models.items()}
        L = inputs1["input_ids"].shape[1]
        llama = self.llama_cpp_decoders(config, L, N)
        for name, (fn, nbytes) in llama.items():
            fns[name] = fn
            bytes_per_token[name] = nbytes
        t = self.timer.interleaved(fns, max(2, a.reps // 2), timed_by_fn=True)
        rates = {k: 1 / v for k, v in t.items()}
        self.emit(
            size=self.size,
            what="int4.decode.b1",
            int4_tok_s=rates["impl int4"],
            bf16_tok_s=rates[base],
            ratio=rates["impl int4"] / rates[base],
            linear_bytes_ratio=linear_weight_bytes(q) / linear_weight_bytes(impl),
            int4_prefill_ms=st["prefill_s"] * 1e3,
            int4_peak_gib=peak,
            quantize_s=setup,
            fallback_layers=len(q.quant_report["fallback"]),
            cuda_graph=st.get("cuda_graph"),
            graph_error=st.get("cuda_graph_error"),
        )
        bandwidth = copy_bandwidth() if dev.type == "cpu" else None
        for name, rate in rates.items():
            rec = dict(
                size=self.size,
                what="decode.side_by_side",
                system=name,
                tok_s=rate,
                bytes_per_token=bytes_per_token[name],
                vs_impl_model_dtype=rate / rates[base],
            )
            if bandwidth:
                rec.update(copy_gb_s=bandwidth / 1e9, share_of_limit=rate * bytes_per_token[name] / bandwidth)
            self.emit(**rec)

    def llama_cpp_decoders(self, config, L: int, N: int) -> dict:
        """{"llama.cpp <type>": (fn -> seconds per decoded token, bytes per token)} for the side-by-side
        run, after one llama-bench prompt measurement per file (emitted); {} when llama.cpp is absent."""
        if self.device.type != "cpu":
            return {}
        lc, why = LlamaCpp.find(self.args.llama_cpp)
        if lc is None:
            self.emit(size=self.size, what="llama_cpp", status=why)
            return {}
        work = Path(self.args.llama_cpp_work or Path(tempfile.gettempdir()) / "qwen25vl-bench-llama-cpp")
        t0 = time.perf_counter()
        files = self.guarded("llama_cpp.convert", lambda: lc.ggufs(self.size, config, work))
        if not files:
            return {}
        threads = torch.get_num_threads()
        out = {}
        for kind, path in files.items():
            r = self.guarded(f"llama_cpp.{kind}", lambda path=path: lc.bench(path, prompt=L, gen=0, threads=threads))
            if r is None:
                continue
            self.emit(
                size=self.size,
                what=f"llama_cpp.{kind}",
                file=str(path),
                prompt_tokens=L,
                prompt_tok_s=r["prompt_tok_s"],
                model_size=r["model_size"],
                setup_s=time.perf_counter() - t0,
            )

            def decode(path=path):
                r = lc.bench(path, prompt=L, gen=N, threads=threads)
                return 1 / r["decode_tok_s"]

            # tied embedding: the output matrix is the embedding table, so one token reads the whole file
            out[f"llama.cpp {kind}"] = (decode, r["model_size"])
        return out


def table(records) -> str:
    rows = ["| size | stage | impl | transformers | impl / transformers speed-up |", "|---|---|---|---|---|"]
    merged = {}
    for r in records:
        if "error" in r:
            continue
        merged.setdefault((r.get("size"), r["what"]), {}).update(r)
    for (size, what), r in merged.items():
        if what.startswith("setup"):
            continue
        if "impl_ms" in r:
            hf = f"{r['transformers_ms']:.1f} ms" if "transformers_ms" in r else "-"
            rows.append(f"| {size} | {what} | {r['impl_ms']:.1f} ms | {hf} | {r.get('ratio', float('nan')):.2f}x |")
        elif "impl_tok_s" in r:
            hf = f"{r['transformers_tok_s']:.1f} tok/s" if "transformers_tok_s" in r else "-"
            if "transformers_static_tok_s" in r:
                hf += f" (static cache {r['transformers_static_tok_s']:.1f})"
            rows.append(
                f"| {size} | {what} | {r['impl_tok_s']:.1f} tok/s | {hf} | {r.get('ratio', float('nan')):.2f}x |"
            )
        elif what == "llama_cpp" and "status" in r:
            rows.append(f"| {size} | llama.cpp | {r['status']} | - | - |")
        elif "int4_tok_s" in r:
            rows.append(
                f"| {size} | int4 decode b1 | {r['int4_tok_s']:.1f} tok/s (bf16 {r['bf16_tok_s']:.1f}) | - | "
                f"{r['ratio']:.2f}x vs bf16; linear bytes {r['linear_bytes_ratio']:.3f}x |"
            )
    side = [r for r in records if r["what"] == "decode.side_by_side"]
    if side:
        rows += [
            "",
            "| size | decode b1, side by side | weights read per token | tok/s | vs impl (model dtype) | share of the memory limit |",
            "|---|---|---|---|---|---|",
        ]
        for r in side:
            share = f"{r['share_of_limit']:.2f} (copy {r['copy_gb_s']:.1f} GB/s)" if "share_of_limit" in r else "-"
            rows.append(
                f"| {r['size']} | {r['system']} | {r['bytes_per_token'] / 1e6:.0f} MB | {r['tok_s']:.1f} | "
                f"{r['vs_impl_model_dtype']:.2f}x | {share} |"
            )
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen25vl.tools.bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", action="append", choices=sorted(SIZES), help="repeatable; default 3b on CUDA, cpu on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--attention", default="auto")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--int4", action="append", default=[], choices=sorted(SIZES), help="sizes to also run int4 decode on"
    )
    p.add_argument("--skip-hf", action="append", default=[], choices=sorted(SIZES), help="sizes without transformers")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--hf-static", action="store_true", help="also transformers' static-cache decode (slow to compile)")
    p.add_argument("--cpu-batch8", action="store_true", help="also batch-8 decode on the CPU preset")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--compiled-decode", action="store_true", help="also impl's torch.compile'd decode in the side-by-side run"
    )
    p.add_argument("--vision-backends", nargs="*", default=[], help="also time these vision backends on a ragged image")
    p.add_argument(
        "--llama-cpp", default=None, help=f"llama.cpp build folder for the side-by-side column (or ${LLAMA_CPP_ENV})"
    )
    p.add_argument("--llama-cpp-work", default=None, help="where the GGUF files are written and kept (default: tmp)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    a = p.parse_args(argv)
    if not a.device.startswith("cuda") and "GOMP_SPINCOUNT" not in os.environ:
        # Measured on the 2-vCPU VM this was written on: an idle OpenMP worker took ~4-8 ms to wake, so
        # every small parallel op cost a scheduler tick (50x slowdowns, varying run to run). Spinning
        # workers avoid it; libgomp reads the setting at start-up, hence the re-exec.
        os.environ["GOMP_SPINCOUNT"] = "100000000"
        os.execv(
            sys.executable, [sys.executable, "-m", "qwen25vl.tools.bench", *(sys.argv[1:] if argv is None else argv)]
        )
    if a.threads:
        torch.set_num_threads(a.threads)
    a.size = a.size or (["3b"] if a.device.startswith("cuda") else ["cpu"])
    b = Bench(a)
    for size in a.size:
        b.guarded_size = size
        b.size = size
        try:
            b.run_size(size)
        except Exception as e:
            b.emit(size=size, what="run", error=f"{type(e).__name__}: {e}")
            traceback.print_exc()
    print(table(b.records), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
