#!/usr/bin/env bash
# Build kestrel_gpu_matmul_bench (build-gpu, sm_90a) and run bench/lab/matmul_sweep.sh over the
# given settings (MM_TOKENS, default 1). For quick A/B calls on a warm GPU machine.
set -uo pipefail
export PKG_CONFIG_PATH=$PWD/.gpu-deps/lib/pkgconfig
command -v pkg-config >/dev/null || export PKG_CONFIG=$PWD/scripts/pkg-config-lite.py
if [[ ! -f build-gpu/build.ninja ]]; then
  cmake -S . -B build-gpu -G Ninja -DKESTREL_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" >/tmp/mm-cfg.log 2>&1 ||
    { tail -n 20 /tmp/mm-cfg.log; exit 1; }
fi
cmake --build build-gpu -j "$(nproc)" --target kestrel_gpu_matmul_bench >/tmp/mm-build.log 2>&1 ||
  { grep -E 'error|FAILED' /tmp/mm-build.log | head -20; exit 1; }
MM_TOKENS=${MM_TOKENS:-1} bash bench/lab/matmul_sweep.sh build-gpu/bin/kestrel_gpu_matmul_bench "$@" |
  grep -E '^## |^\| (attn|ffn|qkv|gate)'
