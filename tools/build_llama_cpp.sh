#!/usr/bin/env bash
# Builds libllama + libmtmd (CPU only) and the conformance tap (conformance/llama_cpp_tap) and prints the tap's path.
# usage: tools/build_llama_cpp.sh [LLAMA_CPP_SRC [BUILD_DIR]]
#   LLAMA_CPP_SRC: a llama.cpp source tree; none: llama-cpp-python 0.3.36's sdist is downloaded with pip into
#                  .ci-cache (git-ignored) and its vendor/llama.cpp is used (the tree the harness was written for)
#   BUILD_DIR:     where libllama/libmtmd are built (default: LLAMA_CPP_SRC/build-conformance); an existing build
#                  with bin/libllama.so and bin/libmtmd.so is reused as it is
# Idempotent: with the build there, a second run only relinks the tap (seconds).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
src="${1:-}"
if [ -z "$src" ]; then
  cache="$repo/.ci-cache"
  src="$cache/llama_cpp_python-0.3.36/vendor/llama.cpp"
  if [ ! -f "$src/CMakeLists.txt" ]; then
    mkdir -p "$cache"
    pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$cache" >&2
    tar xzf "$cache/llama_cpp_python-0.3.36.tar.gz" -C "$cache"
  fi
fi
if [ ! -f "$src/CMakeLists.txt" ] || [ ! -f "$src/tools/mtmd/mtmd.h" ]; then
  echo "build_llama_cpp.sh: $src is not a llama.cpp source tree (no CMakeLists.txt or tools/mtmd/mtmd.h)" >&2
  exit 2
fi
src="$(cd "$src" && pwd)"
build="${2:-$src/build-conformance}"
if [ ! -f "$build/bin/libllama.so" ] || [ ! -f "$build/bin/libmtmd.so" ]; then
  # AMX CPUs: the native build dies with SIGILL in prompt processing of quantized models; keep AMX out
  amx=""
  if echo 'int main(){return 0;}' | ${CXX:-c++} -x c++ -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -o /dev/null - 2>/dev/null; then
    amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  fi
  cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DCMAKE_C_FLAGS="$amx" -DCMAKE_CXX_FLAGS="$amx" >&2
  cmake --build "$build" -j2 --target llama mtmd >&2
fi
tap_build="$build/conformance-tap"
# a tap configured from another checkout of this repo: cmake refuses to reuse its cache, so start it afresh
if [ -f "$tap_build/CMakeCache.txt" ] &&
  ! grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$repo/conformance/llama_cpp_tap" "$tap_build/CMakeCache.txt"; then
  rm -rf "$tap_build"
fi
cmake -S "$repo/conformance/llama_cpp_tap" -B "$tap_build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_CPP_SRC="$src" -DLLAMA_CPP_BUILD="$build" >&2
cmake --build "$tap_build" -j2 >&2
echo "$tap_build/llama-conformance-tap"
