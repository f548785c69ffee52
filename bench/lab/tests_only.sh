#!/usr/bin/env bash
# Build kestrel_tests (build-gpu, sm_90a) and run the GPU op tests of TEST_FILTER
# (default: the matmul and chain suites), then each VAR=VALUE setting given as an argument.
set -uo pipefail
export PKG_CONFIG_PATH=$PWD/.gpu-deps/lib/pkgconfig
command -v pkg-config >/dev/null || export PKG_CONFIG=$PWD/scripts/pkg-config-lite.py
if [[ ! -f build-gpu/build.ninja ]]; then
  cmake -S . -B build-gpu -G Ninja -DKESTREL_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" >/tmp/t-cfg.log 2>&1 ||
    { tail -n 20 /tmp/t-cfg.log; exit 1; }
fi
cmake --build build-gpu -j "$(nproc)" --target kestrel_tests >/tmp/t-build.log 2>&1 ||
  { grep -E 'error|FAILED' /tmp/t-build.log | head -20; exit 1; }
filter=${TEST_FILTER:-*GpuOpsMatmul*:*GpuOpsChain*}
for v in - "$@"; do
  vars=(); [[ $v == - ]] || read -r -a vars <<<"$v"
  env "${vars[@]}" build-gpu/bin/kestrel_tests --gtest_filter="$filter" >/tmp/t.log 2>&1
  echo "tests [$v] rc=$?: $(grep -E '^\[  (PASSED|FAILED) ' /tmp/t.log | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]' /tmp/t.log | head -10
done
