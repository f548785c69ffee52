#!/usr/bin/env bash
# Session 21 call: decode weight stream (matvec_stream.cu) -- bench A/B, matmul bench, op tests.
set -uo pipefail
out=${OUT:-/tmp/mvs-out}
work=/tmp/gcout
mkdir -p "$out" "$work"
MM_TOKENS=1 GPU_MATMUL_VARIANTS="${MM_VARIANTS:--;KESTREL_CUDA_MATVEC_STREAM=0}" \
GPU_CHECK_BUDGET=300 GPU_CHECK_SKIP="decode-timing" \
  GPU_BENCH_ARGS="--only tg128 --no-variants ${EXTRA_AB:-}" OUT=$work \
  bash scripts/gpu-check.sh --bench-only --no-opencl >"$work/gpu-check.out" 2>&1
grep -E '^\| |^## |PASS|FAIL' "$work/gpu-check.log" | tail -n 40
model=/tmp/kestrel-gpu-check/models/llama2-7b-q4_0.gguf
[[ -n "${NO_DK:-}" ]] || timeout 120 bash bench/lab/decode_kernels.sh build-gpu/bin/kestrel "$model" "$work" 2>&1 | head -12
timeout 200 cmake --build build-gpu -j 16 --target kestrel_tests >"$work/tests-build.log" 2>&1 || tail -n 20 "$work/tests-build.log"
timeout 200 build-gpu/bin/kestrel_tests --gtest_filter="${TEST_FILTER:-*GpuOpsMatmul*:*GpuOpsChain*:*GpuOpsDecode*}" >"$work/tests.log" 2>&1
echo "tests rc=$?"; grep -E '^\[  (PASSED|FAILED) |^\[==|FAILED' "$work/tests.log" | head -30
if [[ -n "${TEST_ENV2:-}" ]]; then
  env $TEST_ENV2 timeout 150 build-gpu/bin/kestrel_tests --gtest_filter="${TEST_FILTER:-*GpuOpsMatmul*:*GpuOpsChain*}" >"$work/tests2.log" 2>&1
  echo "tests ($TEST_ENV2) rc=$?"; grep -E '^\[  (PASSED|FAILED) |^\[==|FAILED' "$work/tests2.log" | head -20
fi
# Greedy generation on the 7B under each setting (GEN_VARIANTS, ';'-separated): same tokens expected.
if [[ -n "${GEN_VARIANTS:-}" ]]; then
  IFS=';' read -r -a gv <<<"$GEN_VARIANTS"
  for v in "${gv[@]}"; do
    vars=(); [[ $v == - ]] || read -r -a vars <<<"$v"
    env "${vars[@]}" timeout 60 build-gpu/bin/kestrel run -m "$model" --tokens 1,450,4996,310,278 -n 48 \
      --temp 0 --ignore-eos 2>/dev/null >"$work/gen.txt"; echo "gen [$v]: $(tr '\n' ' ' <"$work/gen.txt" | cut -c1-300)"
  done
fi
tar -czf "$out/mvs.tar.gz" -C "$work" . 2>/dev/null
