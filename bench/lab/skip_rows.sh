#!/usr/bin/env bash
# What each kind of op costs inside the recorded graph (KESTREL_CUDA_LAB_SKIP, cuda_common.cuh):
# tg128 and the seed's b128 ub16 with all ops, then with each kind skipped (it launches nothing;
# the results are wrong, the time is what the rest takes). On the GPU machine, .gpu-deps carried.
exec bash bench/lab/env_rows.sh - KESTREL_CUDA_LAB_SKIP={norm,rope,attention,swiglu,matmul} \
  KESTREL_CUDA_LAB_SKIP=norm+rope+attention+swiglu
