#!/usr/bin/env bash
# GPU time of each kernel of a decode step (or of a micro-batch), with ncu (clocks and caches left
# alone), beside the step's wall time: how much of a token is kernels and how much is gaps.
#   bash bench/lab/decode_kernels.sh KESTREL MODEL OUTDIR [VAR=VALUE...]
# PASS_ARGS replaces the profiled run's `kestrel bench` flags (default: -p 0 -n 6, decode steps;
# e.g. "-p 64 -n 0 -b 16 -ub 16 -ctk q4_0 -ctv q4_0" for the seed's micro-batches, each pass then
# one "token" of the table). Writes OUTDIR/ncu-decode.csv and prints bench/lab/ncu_tokens.py's table.
set -uo pipefail
kestrel=$1 model=$2 out=$3
shift 3
here=$(dirname "$0")
tps=0
if [[ -z "${PASS_ARGS:-}" ]]; then
  tps=$(env "$@" "$kestrel" bench -m "$model" -p 0 -n 32 -r 3 -o json 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["avg_ts"])' 2>/dev/null)
fi
# shellcheck disable=SC2086
env "$@" ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
  --page raw --print-kernel-base function "$kestrel" bench -m "$model" ${PASS_ARGS:--p 0 -n 6} \
  -r 1 --no-warmup >"$out/ncu-decode.csv" 2>"$out/ncu-decode.err" || tail -n 5 "$out/ncu-decode.err"
python3 "$here/ncu_tokens.py" "$out/ncu-decode.csv" --tokens 2 --wall-tps "${tps:-0}"
