#!/usr/bin/env bash
# Why a kernel runs below its floor: ncu's warp-state (stall reasons), scheduler, memory and
# occupancy sections for a few launches of the kernels matching KERNEL (a regex) in a kestrel
# bench run with BENCH_ARGS (default: the seed's micro-batches, which run matmul_frag_v2).
#   [KERNEL=regex] [BENCH_ARGS="..."] [SKIP=40] bash bench/lab/kernel_stalls.sh KESTREL MODEL OUTDIR [VAR=VALUE...]
# e.g. KERNEL=attention_flash BENCH_ARGS="-p 327 -n 0 -ctk q4_0 -ctv q4_0" SKIP=4
set -uo pipefail
kestrel=$1 model=$2 out=$3
shift 3
kernel=${KERNEL:-matmul_frag}
read -r -a bench_args <<<"${BENCH_ARGS:--p 64 -n 0 -b 16 -ub 16 -ctk q4_0 -ctv q4_0}"
env "$@" ncu --clock-control none -k "regex:$kernel" --launch-skip "${SKIP:-40}" --launch-count 3 \
  --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section MemoryWorkloadAnalysis --section SpeedOfLight --section LaunchStats \
  --metrics smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_drain_per_issue_active.ratio,smsp__average_warps_issue_stalled_membar_per_issue_active.ratio,smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio,smsp__average_warps_issue_stalled_imc_miss_per_issue_active.ratio \
  "$kestrel" bench -m "$model" "${bench_args[@]}" -r 1 --no-warmup \
  >"$out/stalls.txt" 2>"$out/stalls.err" || tail -n 5 "$out/stalls.err"
# The first profiled launch in full (sections and ncu's rule notes, which name the top stalls).
awk -v k="$kernel" '$0 ~ k {n++} n == 1' "$out/stalls.txt" | grep -v '^ *-*$' | head -150
