#!/usr/bin/env bash
# One GPU call for the fused decode layer (decode_layer.cu, KESTREL_CUDA_FUSED_DECODE=1): build
# kestrel and the tests (build-gpu, sm_90a) while llama2-7b Q4_0 is synthesized, the fused layer's
# op tests (and TEST_FILTER's, with each of the VAR=VALUE arguments), then tg128 with and without
# the fused layer and its phase clock (KESTREL_CUDA_DECODE_TIMING=1), and e2e b1-ub1 with it. Run
# from the repository root on the GPU machine with .gpu-deps carried. FD_ENV: settings for the
# fused layer's tests, clock and e2e; BENCH_VARIANTS: more tg128 rows (VAR=VALUE[,VAR=VALUE]).
set -uo pipefail
source bench/lab/synth_model.sh  # sets model; synthesizes it in the background
bash bench/lab/build_gpu.sh kestrel_tests || exit 1
bash bench/lab/build_gpu.sh kestrel || exit 1
# FD_ENV: more settings for the fused layer's tests, phase clock and e2e (e.g. its variant).
read -r -a fd_env <<<"${FD_ENV:-}"
env KESTREL_CUDA_FUSED_DECODE=1 "${fd_env[@]}" build-gpu/bin/kestrel_tests \
  --gtest_filter='*GpuOpsDecodeLayer*' >/tmp/fd-tests.log 2>&1
echo "fused decode tests [${FD_ENV:-}] rc=$?: $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' /tmp/fd-tests.log | tr '\n' ' ')"
grep -E 'Failure|error|expected|Which is|row |worst' /tmp/fd-tests.log | head -20
if grep -q '^\[  FAILED  \]' /tmp/fd-tests.log; then  # where: the memory checker's first reports
  env KESTREL_CUDA_FUSED_DECODE=1 "${fd_env[@]}" timeout 45 compute-sanitizer --tool memcheck --print-limit 5 \
    build-gpu/bin/kestrel_tests --gtest_filter='*GpuOpsDecodeLayer*' 2>&1 | grep -vE '^\[ ' | head -40
fi
[[ $# -gt 0 ]] && TEST_FILTER=${TEST_FILTER:-*GpuOpsMatmul*:*GpuOpsChain*} bash bench/lab/tests_only.sh "$@"
wait
[[ -s $model ]] || { echo "no model: $(tail -n 3 /tmp/synth.log)"; exit 1; }
variants=(KESTREL_AB_BASELINE=1)
grep -q '^\[  FAILED  \]' /tmp/fd-tests.log || variants+=(KESTREL_CUDA_FUSED_DECODE=1 ${BENCH_VARIANTS:-})
for v in "${variants[@]}"; do
  IFS=, read -r -a vars <<<"$v"  # VAR=VALUE[,VAR=VALUE...]
  env "${vars[@]}" timeout 120 build-gpu/bin/kestrel bench -m "$model" -p 0 -n 128 -r 3 -o json \
    >/tmp/fd-bench.json 2>/tmp/fd-bench.err
  echo "tg128 [$v] rc=$?: $(python3 -c 'import json,sys; r=json.load(open("/tmp/fd-bench.json"))[-1]; print(round(r["avg_ts"],1), "+-", round(r.get("stddev_ts",0),1))' 2>&1 | tail -n 1)"
  grep -iE 'error|fail|kestrel:' /tmp/fd-bench.err | head -5
done
# The phase clock with the defaults, then with FD_ENV when it is set.
clocks=("")
[[ -n ${FD_ENV:-} ]] && clocks+=("${FD_ENV}")
for c in "${clocks[@]}"; do
  ((${#variants[@]} > 1)) || break
  read -r -a c_env <<<"$c"
  echo "phase clock [$c]:"
  env KESTREL_CUDA_FUSED_DECODE=1 "${c_env[@]}" KESTREL_CUDA_DECODE_TIMING=1 timeout 120 build-gpu/bin/kestrel bench \
    -m "$model" -p 0 -n 64 -r 1 2>&1 | grep -E '^decode_layer timing|^[A-F][0-9+A-F]* |^phase|^ring'
done
# End to end: the runs whose every token is a decode step, against the numpy reference.
((${#variants[@]} > 1)) && env KESTREL_CUDA_FUSED_DECODE=1 "${fd_env[@]}" timeout 110 python3 tests/e2e/test_e2e.py \
  --kestrel build-gpu/bin/kestrel --workdir /tmp/fd-e2e --kestrel-args "--backend cuda -ngl 99" \
  --jobs 8 --budget 70 --timeout 30 --only b1-ub1 2>&1 | grep -E '^  FAIL|  FAIL  |^e2e: [0-9]' | tail -n 8
true
