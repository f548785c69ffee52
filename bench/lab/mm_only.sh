#!/usr/bin/env bash
# Build kestrel_gpu_matmul_bench (build-gpu, sm_90a) and run bench/lab/matmul_sweep.sh over the
# given settings (MM_TOKENS, default 1). For quick A/B calls on a warm GPU machine.
set -uo pipefail
bash bench/lab/build_gpu.sh kestrel_gpu_matmul_bench || exit 1
MM_TOKENS=${MM_TOKENS:-1} bash bench/lab/matmul_sweep.sh build-gpu/bin/kestrel_gpu_matmul_bench "$@" |
  grep -E '^## |^\| (attn|ffn|qkv|gate)'
