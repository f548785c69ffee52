#!/usr/bin/env bash
# The opt-in switches written but not yet run on a GPU, checked and raced in one call on a bare
# H100 (carry .gpu-deps): ~6-8 minutes with a cold build. Written in the thirty-third session
# (bench/NOTES.md), whose every start was refused.
#   bash bench/lab/pending_checks.sh
# Switches: E the decode attention's early first pass, O a recording's slots copied in one node,
# T only Q/K/V launches trigger their dependents, D replays staged from the named inputs.
set -uo pipefail
source bench/lab/synth_model.sh  # sets model; synthesizes it in the background
bash bench/lab/build_gpu.sh kestrel kestrel_tests || exit 1
wait
E=KESTREL_CUDA_ATT_DECODE_EARLY=1 O=KESTREL_CUDA_GRAPH_ONE_COPY=1 T=KESTREL_CUDA_KSPLIT_TRIGGER=3
D=KESTREL_CUDA_GRAPH_DIRECT_STAGE=1
TEST_FILTER='*GpuOpsAttention*:*GpuOpsChain*:*GpuOpsRecorded*' bash bench/lab/tests_only.sh \
  "$E $O $D" "$E KESTREL_CUDA_ATT_DECODE_KEYS=128" "$T"
ROWS=tg128 bash bench/lab/env_rows.sh - $E $O $D $E,$O,$T $T - $E $O $D $E,$O,$T,$D
ROWS=seed bash bench/lab/env_rows.sh - $E $O $D - $E $O $D
for v in 0 1; do
  env KESTREL_CUDA_GRAPH_DIRECT_STAGE=$v KESTREL_CUDA_GRAPH_TIMING=1 build-gpu/bin/kestrel bench \
    -m "$model" -p 0 -n 128 -r 3 2>&1 | grep -E "graph timing" | cut -c1-400
done
env $E $O $D timeout 100 python3 tests/e2e/test_e2e.py --kestrel build-gpu/bin/kestrel \
  --workdir /tmp/e2e --kestrel-args "--backend cuda -ngl 99" 2>&1 | tail -n 3
