#!/usr/bin/env bash
# CI (no GPU): the CUDA backend must keep compiling with warnings as errors, and a CUDA build on
# a machine without a GPU must say so: --backend cuda fails with a message naming CUDA, while the
# default placement falls back to the CPU with a note and gives the CPU build's result.
# The GPU itself is exercised by scripts/gpu-check.sh on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DKESTREL_CUDA=ON -DKESTREL_WERROR=ON \
  >/dev/null
cmake --build build-cuda -j "$(nproc)"
# The GPU conformance tests skip without a device; every CPU test runs again in this build.
build-cuda/bin/kestrel_tests --gtest_brief=1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 scripts/synth_gguf.py --out "$work/tiny.gguf" --shape tiny --type q4_0 >/dev/null
tokens=1,5,9,200,17,3,77,42
if build-cuda/bin/kestrel run -m "$work/tiny.gguf" --tokens "$tokens" -n 0 --backend cuda \
  2>"$work/forced.err"; then
  echo "check-cuda: --backend cuda succeeded without a GPU" >&2
  exit 1
fi
grep -qi "cuda" "$work/forced.err" || {
  echo "check-cuda: the --backend cuda error does not name CUDA:" >&2
  cat "$work/forced.err" >&2
  exit 1
}
build-cuda/bin/kestrel run -m "$work/tiny.gguf" --tokens "$tokens" -n 0 \
  --dump-logits "$work/auto.bin" 2>"$work/auto.err"
grep -q "running on the CPU" "$work/auto.err" || {
  echo "check-cuda: the CPU fallback was not announced:" >&2
  cat "$work/auto.err" >&2
  exit 1
}
build/bin/kestrel run -m "$work/tiny.gguf" --tokens "$tokens" -n 0 --dump-logits "$work/cpu.bin" \
  2>/dev/null
cmp "$work/auto.bin" "$work/cpu.bin"
echo "check-cuda: CUDA build ok; without a GPU it refuses --backend cuda and falls back to the CPU"
