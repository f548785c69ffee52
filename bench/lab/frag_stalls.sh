#!/usr/bin/env bash
# Why the 5-16-token kernel runs below bandwidth: ncu's warp-state (stall reasons), scheduler,
# memory and occupancy sections for a few launches of matmul_frag_v2 in the seed's micro-batches.
#   bash bench/lab/frag_stalls.sh KESTREL MODEL OUTDIR [VAR=VALUE...]
set -uo pipefail
kestrel=$1 model=$2 out=$3
shift 3
env "$@" ncu --clock-control none -k regex:matmul_frag --launch-skip 40 --launch-count 3 \
  --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section MemoryWorkloadAnalysis --section SpeedOfLight --section LaunchStats \
  --metrics smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_drain_per_issue_active.ratio,smsp__average_warps_issue_stalled_membar_per_issue_active.ratio,smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio,smsp__average_warps_issue_stalled_imc_miss_per_issue_active.ratio \
  "$kestrel" bench -m "$model" -p 64 -n 0 -b 16 -ub 16 -ctk q4_0 -ctv q4_0 -r 1 --no-warmup \
  >"$out/frag-stalls.txt" 2>"$out/frag-stalls.err" || tail -n 5 "$out/frag-stalls.err"
# The first profiled launch in full (sections and ncu's rule notes, which name the top stalls).
awk '/matmul_frag/ {n++} n == 1' "$out/frag-stalls.txt" | grep -v '^ *-*$' | head -150
