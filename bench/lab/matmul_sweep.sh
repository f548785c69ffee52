#!/usr/bin/env bash
# Runs kestrel_gpu_matmul_bench once per setting: each argument is a space-separated list of
# VAR=VALUE assignments ("-" for the defaults). JSON per setting into $OUTDIR (default .).
#
#   bash bench/lab/matmul_sweep.sh BUILD/bin/kestrel_gpu_matmul_bench "-" "KESTREL_CUDA_FRAG_DEPTH=2"
#
# Environment: MM_TOKENS (1,16,512), MM_MS (25 ms per case).
set -uo pipefail
bin=$1
shift
i=0 failed=0
for v in "$@"; do
  echo "## matmul variant: $v"
  vars=()
  [[ $v == - ]] || read -r -a vars <<<"$v"
  env "${vars[@]}" "$bin" --tokens "${MM_TOKENS:-1,16,512}" --ms "${MM_MS:-25}" \
    --json "${OUTDIR:-.}/matmul-bench-$i.json" || { echo "matmul variant failed: $v"; failed=1; }
  i=$((i + 1))
done
exit "$failed"
