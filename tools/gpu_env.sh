# Sourced by tools/gpu_check.sh and tools/gpu_perf.sh: the repository root, $OUT, $PY, and the package
# without installing it. Sets REPO, OUT (default $REPO/gpu_out, created), PY (default python); cds to REPO.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"
mkdir -p "$OUT"
cd "$REPO"
PY="${PYTHON:-python}"

# a shim folder mapping qwen25vl.* onto the repo folders: the repo's own qwen25vl/ folder shadows any
# shim once the repo root is on sys.path (python -m, pytest), so the subpackages are linked into it
# (on the device's throwaway copy of the tree only)
for sub in spec impl conformance tools; do [ -e "qwen25vl/$sub" ] || ln -s "../$sub" "qwen25vl/$sub"; done
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
