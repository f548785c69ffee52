#!/usr/bin/env bash
# Build kestrel_tests (build-gpu, sm_90a) and run the GPU op tests of TEST_FILTER
# (default: the matmul and chain suites), then each VAR=VALUE setting given as an argument.
set -uo pipefail
bash bench/lab/build_gpu.sh kestrel_tests || exit 1
filter=${TEST_FILTER:-*GpuOpsMatmul*:*GpuOpsChain*}
for v in - "$@"; do
  vars=(); [[ $v == - ]] || read -r -a vars <<<"$v"
  env "${vars[@]}" build-gpu/bin/kestrel_tests --gtest_filter="$filter" >/tmp/t.log 2>&1
  echo "tests [$v] rc=$?: $(grep -E '^\[  (PASSED|FAILED) ' /tmp/t.log | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]' /tmp/t.log | head -10
done
