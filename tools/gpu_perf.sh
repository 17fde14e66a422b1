#!/usr/bin/env bash
# A/B of impl's performance variants on one GPU (run by the lead; ~190 s wall at most, imports included).
#   bash tools/gpu_perf.sh                 (from the repository root; results under $OUT, default ./gpu_out)
#   bash tools/gpu_perf.sh --device cpu --tiny     (CPU dry run of the same steps, tiny shapes)
# Steps, most important first; each has its own timeout, the script goes on after a failure, and every
# measurement is one JSON line in $OUT/perf.jsonl the moment it is taken (see tools/gpu_perf.py):
#   1. 3B: decode b1 per eager variant (sdpa baseline, split, fused+split, fused, math), tokens vs
#      baseline; fused matrix-vector kernels vs F.linear (time, error); decode
#      attention ops vs float64; profile of baseline decode steps (top-15 kernels); vision 1008x1008
#      per backend / SDPA kernel + its profile; decode b8 sdpa vs split; compiled decode
#      (compile+split, compile+sdpa)                                                      (<= 120 s)
#   2. 7B: bf16 vs int4 decode b1, sdpa, split and fused+split                            (<= 55 s)
#   3. 3B: compile mode max-autotune-no-cudagraphs + split, if time is left                (rest)
# Then $OUT/summary.md (all steps' tables) is printed.
set -u
source "$(dirname "$0")/gpu_env.sh"  # REPO, OUT, PY; the package linked in, PYTHONPATH
DEVICE=cuda
BIG=3b
BIG7=7b
TOKENS=64
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --tiny) BIG=tiny; BIG7=tiny; TOKENS=8; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
START=$(date +%s)
BUDGET=${BUDGET:-190}
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
note() { echo "[$(elapsed)s] $*" | tee -a "$OUT/perf_steps.txt"; }

export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-16}"

step() {  # step NAME TIMEOUT_S CMD... : log to $OUT/NAME.log, record rc, never stop the script
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 15 ]; then note "skip $name (only ${limit}s left)"; return 0; fi
  note "start $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  note "end $name rc=$?"
  tail -n 5 "$OUT/$name.log"
  return 0
}
cap() { local want=$1 l; l=$(left); echo $(( want < l ? want : l )); }

nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/perf_gpu.txt" 2>&1 || true

step perf_3b "$(cap 120)" "$PY" -m qwen25vl.tools.gpu_perf --device "$DEVICE" --size "$BIG" --out "$OUT" \
    --decode-tokens "$TOKENS" --parts decode,profile,vision,b8,compile \
    --variants sdpa,split,fused+split,fused,math,compile+split,compile+sdpa --compile-limit 50 --variant-limit 20 --part-limit 25
cp "$OUT/summary.md" "$OUT/summary_3b.md" 2>/dev/null

step perf_7b_int4 "$(cap 55)" "$PY" -m qwen25vl.tools.gpu_perf --device "$DEVICE" --size "$BIG7" --out "$OUT" \
    --decode-tokens "$TOKENS" --parts int4 --variants sdpa --part-limit 50
cp "$OUT/summary.md" "$OUT/summary_7b.md" 2>/dev/null

step perf_autotune "$(cap 60)" "$PY" -m qwen25vl.tools.gpu_perf --device "$DEVICE" --size "$BIG" --out "$OUT" \
    --decode-tokens "$TOKENS" --parts compile --variants sdpa,autotune+split --compile-limit 50 --variant-limit 15
cp "$OUT/summary.md" "$OUT/summary_autotune.md" 2>/dev/null

cat "$OUT"/summary_3b.md "$OUT"/summary_7b.md "$OUT"/summary_autotune.md > "$OUT/summary.md" 2>/dev/null
note "done in $(elapsed)s; results in $OUT (perf.jsonl, summary.md, profile_*.txt)"
cat "$OUT/summary.md"
exit 0
