# Sourced by tools/gpu_check.sh and tools/gpu_perf.sh: the repository root, $OUT, $PY, and the package
# without installing it. Sets REPO, OUT (default $REPO/gpu_out, created), PY (default python); cds to REPO.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"
mkdir -p "$OUT"
cd "$REPO"
PY="${PYTHON:-python}"

# qwen25vl/__init__.py finds spec/, impl/, conformance/ and tools/ beside it: no install, no links
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
