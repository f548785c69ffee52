#!/usr/bin/env bash
# A/B rows of tg128 and the seed's b128 ub16 (llama2-7b Q4_0) for settings given as arguments
# (VAR=VALUE[,VAR=VALUE...]; "-" is the defaults), all in one run on the GPU machine: builds
# kestrel (build-gpu) and synthesizes the model when missing (carry .gpu-deps).
#   ROWS="tg128 seed" bash bench/lab/env_rows.sh - KESTREL_CUDA_LAB_SKIP=norm ...
set -uo pipefail
source bench/lab/synth_model.sh  # sets model; synthesizes it in the background
bash bench/lab/build_gpu.sh kestrel || exit 1
wait
[[ -s $model ]] || { echo "no model: $(tail -n 3 /tmp/synth.log)"; exit 1; }
row() {  # row NAME SETTINGS BENCH-ARGS...: its mean t/s and the ms a token
  local name=$1 setting=$2 vars=()
  shift 2
  [[ $setting == - ]] || IFS=, read -r -a vars <<<"$setting"
  env "${vars[@]}" timeout 120 build-gpu/bin/kestrel bench -m "$model" "$@" -r 3 -o json \
    >/tmp/row.json 2>/tmp/row.err
  local rc=$?
  echo "$name [$setting] rc=$rc: $(python3 -c 'import json; r=json.load(open("/tmp/row.json"))[-1]; t=r["avg_ts"]; print(f"{t:.1f} t/s +- {r.get("stddev_ts",0):.1f}, {1000/t:.4f} ms a token")' 2>&1 | tail -n 1)"
  grep -iE 'error|kestrel:' /tmp/row.err | head -3
}
for r in ${ROWS:-tg128 seed}; do
  for s in "$@"; do
    case $r in
      tg128) row tg128 "$s" -p 0 -n 128 ;;
      seed) row seed-b128-ub16 "$s" -p 327 -n 0 -b 128 -ub 16 -ctk q4_0 -ctv q4_0 ;;
    esac
  done
done
