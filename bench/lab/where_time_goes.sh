#!/usr/bin/env bash
# One GPU call for the two bandwidth-bound cases (tg128, the seed's b128 ub16): build, the matmul
# micro-benchmark (weights from memory, not L2), both cases' t/s, then ncu's per-kernel GPU time
# of a few decode steps and of 16-token micro-batches (bench/lab/decode_kernels.sh), so that the
# kernels' sum can be set against the wall time. Run from the repository root on the GPU machine
# with .gpu-deps carried; files under $OUT.
set -uo pipefail
out=${OUT:-/tmp/wtg-out}
work=/tmp/gcout
mkdir -p "$out" "$work"
GPU_CHECK_BUDGET=${GPU_CHECK_BUDGET:-330} GPU_CHECK_SKIP="decode-timing ${GPU_CHECK_SKIP:-}" \
  GPU_BENCH_ARGS="--only tg128 --only ub16 --no-variants ${GPU_BENCH_ARGS:-}" OUT=$work \
  bash scripts/gpu-check.sh --bench-only --no-opencl >/tmp/wtg-gpu-check.out 2>&1
# (gpu-check empties its OUT folder first: its own log holds the tables)
grep -E '^\| |^## |PASS|FAIL' "$work/gpu-check.log" | tail -n 60
model=/tmp/kestrel-gpu-check/models/llama2-7b-q4_0.gguf
bin=build-gpu/bin/kestrel
for v in ${WTG_VARIANTS:--}; do
  vars=()
  [[ $v == - ]] || IFS=, read -r -a vars <<<"$v"
  echo "### decode kernels ($v)"
  mkdir -p "$work/dk-$v"
  timeout 150 bash bench/lab/decode_kernels.sh "$bin" "$model" "$work/dk-$v" "${vars[@]}"
  echo "### 16-token micro-batch kernels ($v)"
  mkdir -p "$work/mb-$v"
  PASS_ARGS="-p 64 -n 0 -b 16 -ub 16 -ctk q4_0 -ctv q4_0" timeout 150 \
    bash bench/lab/decode_kernels.sh "$bin" "$model" "$work/mb-$v" "${vars[@]}"
done
tar -czf "$out/wtg.tar.gz" -C "$work" . 2>/dev/null
