#!/usr/bin/env bash
# Where the time goes, per op kind (`kestrel run --profile --report`), for the benchmark cases
# of issues 5 and 6 on one GPU machine: CUDA pp512 (f16 and q4_0 KV), the seed's case with the
# defaults and with b128 ub16, decode; OpenCL pp512 and the seed's b128 ub16. One file per case.
#   bash bench/lab/op_profiles.sh KESTREL MODEL OUTDIR BACKEND (cuda or opencl: gpu-check builds
#   them apart, build-gpu/bin/kestrel and build-ocl-gpu/bin/kestrel)
set -uo pipefail
kestrel=$1 model=$2 out=$3 b=$4
mkdir -p "$out"
# Prompt token ids: random ids of the Llama 2 vocabulary (speed does not depend on them).
ids() { python3 -c "import random; random.seed($1); N = ${VOCAB:-32000}; print(','.join(str(random.randrange(3, N)) for _ in range($1)))"; }
p512=$(ids 512) p327=$(ids 327)
run_case() {  # NAME BACKEND TOKENS ARGS...
  local name=$1 backend=$2 tokens=$3
  shift 3
  timeout 120 "$kestrel" run -m "$model" --backend "$backend" -ngl 99 --tokens "$tokens" -n 16 \
    --temp 0 --ignore-eos --profile --report "$@" >"$out/profile-$name.txt" 2>&1 ||
    echo "op_profiles: $name exited $?" >>"$out/profile-$name.txt"
}
run_case "$b-pp512" "$b" "$p512" -c 1024
run_case "$b-seed-b128-ub16" "$b" "$p327" -c 512 -b 128 -ub 16 -ctk q4_0 -ctv q4_0
if [[ $b == cuda ]]; then
  run_case cuda-pp512-q4_0 cuda "$p512" -c 1024 -ctk q4_0 -ctv q4_0
  run_case cuda-seed-defaults cuda "$p327" -c 512 -ctk q4_0 -ctv q4_0
fi
