#!/usr/bin/env bash
# Configure build-gpu once (CUDA, sm_90a, Release; .gpu-deps for pkg-config) and build TARGET;
# on failure print the errors and exit non-zero. For the lab's quick A/B scripts.
#   bash bench/lab/build_gpu.sh TARGET...
set -uo pipefail
export PKG_CONFIG_PATH=$PWD/.gpu-deps/lib/pkgconfig
command -v pkg-config >/dev/null || export PKG_CONFIG=$PWD/scripts/pkg-config-lite.py
if [[ ! -f build-gpu/build.ninja ]]; then
  cmake -S . -B build-gpu -G Ninja -DKESTREL_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" >/tmp/lab-cfg.log 2>&1 ||
    { tail -n 20 /tmp/lab-cfg.log; exit 1; }
fi
cmake --build build-gpu -j "$(nproc)" --target "$@" >/tmp/lab-build.log 2>&1 ||
  { grep -E 'error|FAILED' /tmp/lab-build.log | head -20; exit 1; }
