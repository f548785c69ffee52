#!/usr/bin/env bash
# What each kind of op costs inside the recorded graph (KESTREL_CUDA_LAB_SKIP, cuda_common.cuh):
# tg128 and the seed's b128 ub16 with all ops, then with each kind skipped (it launches nothing;
# the results are wrong, the time is what the rest takes). Run on the GPU machine after
# bench/lab/fused_decode.sh (or anything that built build-gpu/bin/kestrel and synthesized the model).
set -uo pipefail
model=${MODELS:-/tmp/kestrel-models}/llama2-7b-q4_0.gguf
skips=(none norm rope attention swiglu matmul norm+rope+attention+swiglu)
row() {  # row NAME SKIP ARGS...: one bench, its mean t/s and the ms a token
  local name=$1 skip=$2
  shift 2
  env KESTREL_CUDA_LAB_SKIP="$skip" timeout 120 build-gpu/bin/kestrel bench -m "$model" "$@" -r 3 \
    -o json >/tmp/skip.json 2>/tmp/skip.err
  local rc=$?
  echo "$name skip=$skip rc=$rc: $(python3 -c 'import json; r=json.load(open("/tmp/skip.json"))[-1]; t=r["avg_ts"]; print(f"{t:.1f} t/s +- {r.get("stddev_ts",0):.1f}, {1000/t:.3f} ms a token")' 2>&1 | tail -n 1)"
  grep -iE 'error|kestrel:' /tmp/skip.err | head -3
}
for s in "${skips[@]}"; do row tg128 "$s" -p 0 -n 128; done
for s in "${skips[@]}"; do row seed-b128-ub16 "$s" -p 327 -n 0 -b 128 -ub 16 -ctk q4_0 -ctv q4_0; done
