#!/usr/bin/env bash
# Where the time goes, per op kind, for the benchmark cases of issues 5 and 6 on one backend:
# pp512 (f16 and, on CUDA, q4_0 KV), the seed's case with the defaults (CUDA) and with b128 ub16.
#   bench-*.txt: `kestrel bench --profile` (after its warm-up run: the steady state);
#   run-*.txt:   `kestrel run --profile --report` as a user runs it, with the warm-up pass, and
#                run-*-nowarm.txt with --no-warmup (the first pass's costs inside the first chunk).
#   [RUNS=0] bash bench/lab/op_profiles.sh KESTREL MODEL OUTDIR BACKEND (cuda or opencl: gpu-check builds
#   them apart, build-gpu/bin/kestrel and build-ocl-gpu/bin/kestrel)
set -uo pipefail
kestrel=$1 model=$2 out=$3 b=$4
mkdir -p "$out"
# Prompt token ids: random ids of the Llama 2 vocabulary (speed does not depend on them).
ids() { python3 -c "import random; random.seed($1); N = ${VOCAB:-32000}; print(','.join(str(random.randrange(3, N)) for _ in range($1)))"; }
p512=$(ids 512) p327=$(ids 327)
run_case() {  # NAME TOKENS ARGS... (skipped with RUNS=0)
  local name=$1 tokens=$2
  shift 2
  [[ ${RUNS:-1} == 0 ]] && return 0
  for warm in "" --no-warmup; do
    timeout 120 "$kestrel" run -m "$model" --backend "$b" -ngl 99 --tokens "$tokens" -n 16 \
      --temp 0 --ignore-eos --profile --report $warm "$@" \
      >"$out/run-$b-$name${warm:+-nowarm}.txt" 2>&1 ||
      echo "op_profiles: $name $warm exited $?" >>"$out/run-$b-$name${warm:+-nowarm}.txt"
  done
}
bench_case() {  # NAME PROMPT_TOKENS ARGS...
  local name=$1 n=$2
  shift 2
  timeout 120 "$kestrel" bench -m "$model" --backend "$b" -ngl 99 -p "$n" -r 3 --profile \
    "$@" >"$out/bench-$b-$name.txt" 2>&1 || echo "op_profiles: bench $name exited $?" \
    >>"$out/bench-$b-$name.txt"
}
run_case pp512 "$p512" -c 1024
run_case seed-b128-ub16 "$p327" -c 512 -b 128 -ub 16 -ctk q4_0 -ctv q4_0
bench_case pp512 512 -n 0
bench_case seed-b128-ub16 327 -n 0 -b 128 -ub 16 -ctk q4_0 -ctv q4_0
if [[ $b == cuda ]]; then
  run_case seed-defaults "$p327" -c 512 -ctk q4_0 -ctv q4_0
  bench_case pp512-q4_0 512 -n 0 -ctk q4_0 -ctv q4_0
  bench_case seed-defaults 327 -n 0 -ctk q4_0 -ctv q4_0
  bench_case tg128 0 -n 128
fi
