#!/usr/bin/env bash
# One-shot GPU check of qwen25vl.impl (run by the lead on the H100, ~8 minutes at most).
#   bash tools/gpu_check.sh            (from the repository root; results under $OUT, default ./gpu_out)
# Order: environment -> CUDA smoke check (impl vs spec on the tiny model, CUDA graph, int4 kernel)
#        -> bench 3B vs transformers -> bench 7B bf16 + int4 -> impl test suite on CUDA
#        -> optional extras. Every step has its own timeout and the script goes on after a failure;
# each step writes its log (and JSON lines) to $OUT as it runs.
set -u
set -x
source "$(dirname "$0")/gpu_env.sh"  # REPO, OUT, PY; the package linked in, PYTHONPATH
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "[$(elapsed)s] $*" | tee -a "$OUT/steps.txt"; }

export HYPOTHESIS_PROFILE=dev

step() {  # step NAME TIMEOUT_S CMD... : log to $OUT/NAME.log, record rc
  local name=$1 limit=$2; shift 2
  note "start $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  note "end $name rc=$rc"
  tail -n 25 "$OUT/$name.log"
  return 0
}

# 0. environment (seconds)
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
step env 60 "$PY" - <<'PYEOF'
import importlib, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
for m in ('triton', 'transformers', 'safetensors', 'tokenizers', 'hypothesis', 'pytest', 'xdist', 'flash_attn', 'av', 'PIL'):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, '__version__', 'ok'))
    except Exception as e:
        print(m, 'MISSING', type(e).__name__)
import qwen25vl.impl.model, qwen25vl.impl.attention as a
print('impl importable; varlen_attn', a.varlen_attn is not None, 'flash_attn', a.flash_attn_varlen_func is not None)
PYEOF

# 1. CUDA smoke check (independent of pytest/hypothesis): JSON lines in $OUT/smoke.jsonl
step smoke 90 "$PY" - "$OUT/smoke.jsonl" <<'PYEOF'
import json, os, sys, time, traceback
import torch
out = open(sys.argv[1], "w")
def emit(**r):
    print(json.dumps(r), flush=True); out.write(json.dumps(r) + "\n"); out.flush()
def check(name, fn):
    t = time.perf_counter()
    try:
        emit(check=name, ok=True, **(fn() or {}), s=round(time.perf_counter() - t, 2))
    except Exception as e:
        traceback.print_exc(); emit(check=name, ok=False, error=f"{type(e).__name__}: {e}")
from qwen25vl.tools.make_tiny_checkpoint import make_random_params, tiny_config
from qwen25vl.spec import forward as sf
from qwen25vl.spec.generate import generate_greedy
from qwen25vl.impl.model import Qwen25VL
from qwen25vl.impl.quant import Int4Linear, quantize_int4, dequantize_int4
from qwen25vl.impl.kernels import rmsnorm, rotary, swiglu
dev = torch.device(os.environ.get("SMOKE_DEVICE", "cuda"))
def kernels():
    r = {}
    for dt in (torch.float32, torch.bfloat16):
        x, w = torch.randn(37, 1280, device=dev, dtype=dt), torch.randn(1280, device=dev, dtype=dt)
        r[f"rmsnorm_{dt}"] = (rmsnorm.rms_norm_triton(x, w, 1e-6).float() - rmsnorm.rms_norm_torch(x, w, 1e-6).float()).abs().max().item()
        qkv = torch.randn(50, 48, 80, device=dev, dtype=dt); c, s = torch.randn(50, 40, device=dev), torch.randn(50, 40, device=dev)
        r[f"rotary_{dt}"] = (rotary.rotary_triton(qkv.clone(), c, s, 32).float() - rotary.rotary_torch(qkv.clone(), c, s, 32).float()).abs().max().item()
        gu = torch.randn(9, 2 * 3420, device=dev, dtype=dt)
        r[f"swiglu_{dt}"] = (swiglu.swiglu_triton(gu).float() - swiglu.swiglu_torch(gu).float()).abs().max().item()
    return r
check("kernels_vs_fallback_maxabs", kernels)
def int4():
    w = torch.randn(512, 1024, device=dev); x = torch.randn(3, 1024, device=dev, dtype=torch.bfloat16)
    lin = Int4Linear(w, None, dtype=torch.bfloat16)
    q, s, z = quantize_int4(w, 128, torch.bfloat16)
    ref = x.double() @ dequantize_int4(q, s, z).double().T
    err = ((lin(x).double() - ref).abs().max() / ref.abs().max()).item()
    assert lin.kernel == "cuda" and err < 2e-2, (lin.kernel, err)
    return {"rel_err": err}
check("int4_cuda_vs_formula", int4)
cfg = tiny_config(); params = make_random_params(cfg, 0, torch.bfloat16)
p64 = {k: v.double() for k, v in params.items()}
sys.path.insert(0, ".")
from tests.impl.helpers import vision_inputs
inputs = vision_inputs(cfg, [[100, 101, 102, 103], [7], [9, 10]], [(0, (1, 6, 10)), (2, (1, 4, 4))], [(1, (2, 4, 8))], seed=11, spgt=[0.5])
ref_logits, ref = sf.forward(p64, cfg, inputs, capture="all")
real = inputs["attention_mask"].bool()
def stages(dt, attention):
    def run():
        m = Qwen25VL.from_params(cfg, params, dtype=dt, device=dev, attention=attention)
        _, got = m.forward(inputs, capture="all")
        worst = {}
        for k, e in ref.items():
            a = got[k].cpu()
            if k.startswith("text.") and a.dim() == 3 and a.shape[:2] == real.shape or k == "logits":
                a, e = a[real], e[real]
            worst[k] = ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30)).item()
        top = max(worst, key=worst.get)
        return {"worst_stage": top, "worst_rel": worst[top], "logits_rel": worst["logits"], "backend": m.last_stats.get("vision_attention")}
    return run
for dt in (torch.float32, torch.bfloat16):
    for att in ("auto", "dense", "varlen"):
        if att == "varlen" and dt == torch.float32:
            continue
        check(f"stages_{str(dt)[6:]}_{att}", stages(dt, att))
def greedy():
    m = Qwen25VL.from_params(cfg, params, dtype=torch.float32, device=dev)
    want = generate_greedy(p64, cfg, inputs, 12, eos_token_id=[151645])
    got = m.generate_from_inputs(inputs, 12, [151645])
    st = dict(m.last_stats)
    eager = m.generate_from_inputs(inputs, 12, [151645], cuda_graph=False)
    mb = Qwen25VL.from_params(cfg, params, dtype=torch.bfloat16, device=dev)
    gb = mb.generate_from_inputs(inputs, 12, [151645])
    eb = mb.generate_from_inputs(inputs, 12, [151645], cuda_graph=False)
    r = {"equal_spec_f64": bool(torch.equal(got, want)), "graph_equals_eager": bool(torch.equal(got, eager)),
         "bf16_graph_equals_eager": bool(torch.equal(gb, eb)), "cuda_graph": st["cuda_graph"],
         "graph_error": st.get("cuda_graph_error")}
    assert r["equal_spec_f64"] and r["graph_equals_eager"] and st["cuda_graph"], r
    return r
check("greedy_cuda_graph", greedy)
PYEOF

# 2. bench 3B against transformers (the headline numbers)
step bench_3b 200 "$PY" -m qwen25vl.tools.bench --size 3b --device cuda --out "$OUT/bench.jsonl" --vision-backends dense varlen

# 3. bench 7B: bf16 and int4 decode (transformers skipped for time)
step bench_7b 150 "$PY" -m qwen25vl.tools.bench --size 7b --device cuda --skip-hf 7b --int4 7b --out "$OUT/bench.jsonl"

# 4. the impl tests on CUDA (kernels compiled for real, impl vs spec, int4 CUDA kernel vs formula)
if [ "$(elapsed)" -lt 420 ] && "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
  step pytest_cuda 90 env QWEN25VL_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
      tests/impl/test_kernels.py tests/impl/test_attention.py tests/impl/test_quant.py tests/impl/test_model.py \
      --junitxml="$OUT/pytest_cuda.xml" -o addopts="" || true
else
  note "no time left, or pytest/hypothesis missing: step 4 skipped (the smoke check of step 1 covers the essentials)"
fi

# 5. extras while time remains: transformers' static-cache decode for 3B (compiles; slow)
if [ "$(elapsed)" -lt 380 ]; then
  step bench_3b_static 90 "$PY" -m qwen25vl.tools.bench --size 3b --device cuda --reps 3 --hf-static --out "$OUT/bench_static.jsonl"
fi
note "done in $(elapsed)s; results in $OUT"
"$PY" - "$OUT/bench.jsonl" <<'PYEOF' > "$OUT/table.md" 2>&1 || true
import json, sys
from qwen25vl.tools.bench import table
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(table(recs))
PYEOF
cat "$OUT/table.md"
exit 0
