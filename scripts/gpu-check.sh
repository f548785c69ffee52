#!/usr/bin/env bash
# One-command GPU verification, run from the repository root on the GPU machine (a bare
# Ubuntu with the CUDA toolkit; .gpu-deps/ from scripts/pack-gpu-deps.sh carried along):
#
#   1. environment: nvidia-smi, nvcc, the gguf wheel into a temporary site dir (PYTHONPATH),
#      PKG_CONFIG_PATH=.gpu-deps/lib/pkgconfig (scripts/pkg-config-lite.py without pkg-config)
#   2. in the background: the ANCHORS.md test models llama2-7b and llama3-8b Q4_0 (random
#      quants, scales uniform in [0.002, 0.02]) into $GPU_CHECK_WORK/models (kept when present)
#   3. configure and build build-gpu (-DKESTREL_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a, Release,
#      Ninja, all cores): kestrel and kestrel_tests
#   4. the GPU op tests: kestrel_tests --gtest_filter='*Gpu*'
#   5. the end-to-end logits test on the GPU: all layers (--backend cuda -ngl 99), then split
#      across CPU and GPU (--backend cuda -ngl 1: the last layer on the GPU, the rest and the
#      head on the CPU); every weight and KV type, within a time budget
#   6. the benchmarks (bench/gpu_bench.py): the table against llama.cpp's H100 figures and the
#      targets, printed last
#   7. the OpenCL backend through NVIDIA's OpenCL driver (scripts/check-opencl-gpu.sh, its own
#      build): the op tests on OpenCL and its benchmarks, printed after the CUDA table
#
# With --peer, llama.cpp's llama-bench is built with CUDA in the background from the sources in
# .gpu-deps/llama.cpp-src.tar.gz (scripts/pack-gpu-deps.sh) while the rest runs, and the
# benchmarks race it in the same run (columns "llama.cpp same run": the ANCHORS figures are an
# H100's, and the machine may hold another card). It adds 40 s to the default budget (580 s, under
# the GPU machine's 10-minute command limit); the build gets at most the time that leaves the
# benchmarks their share, and they run without the peer if it is not built by then. --peer implies
# --quick (no e2e) and wants --no-opencl (the OpenCL stage has its own build): run those in a
# second call, `gpu-check.sh --no-bench`.
#
# Every stage runs under `timeout`, sized so that the whole stays under $GPU_CHECK_BUDGET
# seconds (default 540); a failed stage is reported and the run goes on. Output: the PASS/FAIL
# summary with each stage's time, then the benchmark table. Files (under $OUT when set, else
# build-gpu/gpu-check/): gpu-check.log (everything), gpu-check.json (stages), gtest-gpu.xml,
# bench-gpu.json; under $OUT the per-stage files (gtest XML, ncu reports) in stage-files.tar.gz.
#
#   bash scripts/gpu-check.sh [--quick (no e2e)] [--bench-only] [--no-bench] [--no-opencl] [--peer]
#
# Environment: GPU_BENCH_ARGS (more options for bench/gpu_bench.py, e.g. --ab VAR=VALUE:CASES),
# GPU_CHECK_BUDGET (seconds, 540), GPU_CHECK_WORK (models, e2e cache; default
# /tmp/kestrel-gpu-check), GPU_CHECK_BUILD (build folder, build-gpu), GPU_CHECK_E2E_JOBS
# (kestrel processes at once in the e2e test; 8 on 16 cores), GPU_CHECK_CUDA (ON; OFF only to
# try the script on a machine without CUDA), GPU_CHECK_SKIP (names of test and e2e stages to
# leave out, space-separated, when device time is short), GPU_MATMUL_VARIANTS (the matmul
# micro-benchmark's settings, ';'-separated), GPU_CHECK_NCU=1 (ncu on one 16-token matmul launch;
# GPU_CHECK_NCU_KERNEL: a regex of kernel names, frag; GPU_CHECK_NCU_ENV: VAR=VALUE settings for
# that run; GPU_CHECK_NCU_SKIP: launches of it skipped first, 3), GPU_CHECK_SEED_PROFILE=1 (the
# seed's b128 ub16 and 64 decode steps with --profile), GPU_CHECK_NCU_MODEL=REGEX (ncu on one launch of the kernels
# matching REGEX in the seed's b128 ub16, e.g. attention_rows; GPU_CHECK_NCU_MODEL_SKIP, 480).
#
# Exit status: 0 all passed; 1 a test stage failed (build, GPU tests, e2e, setup); 2 the tests
# passed but a benchmark case failed to run (targets not met are not failures). A variant test
# stage that the budget's end cut below its own limit with no test failed is PART (the verdict
# counts them), not a failure; the main GPU test stage must finish.
set -uo pipefail   # no -e: a failing stage is recorded and the run goes on

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

QUICK=0 TESTS=1 BENCH=1 OPENCL=1 PEER=0
while (($#)); do
  case "$1" in
    --quick) QUICK=1 ;;
    --peer) PEER=1 ;;
    --no-opencl) OPENCL=0 ;;
    --bench-only) TESTS=0 ;;
    --no-bench) BENCH=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# The race and the end-to-end tests do not both fit in one 10-minute call: --peer skips e2e (run
# it in a call of its own: --no-bench).
((PEER)) && QUICK=1
if ((TESTS == 0 && BENCH == 0)); then
  echo "gpu-check: --bench-only and --no-bench leave nothing to do" >&2
  exit 2
fi

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
BUDGET=${GPU_CHECK_BUDGET:-$((540 + 40 * PEER))}
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
NPROC=$(nproc)
WORK=${GPU_CHECK_WORK:-/tmp/kestrel-gpu-check}
MODELS=$WORK/models
BUILD=${GPU_CHECK_BUILD:-$ROOT/build-gpu}
CUDA=${GPU_CHECK_CUDA:-ON}   # OFF only to try this script on a machine without CUDA
E2E_JOBS=${GPU_CHECK_E2E_JOBS:-$((NPROC >= 16 ? 8 : NPROC / 2 + 1))}   # kestrel processes at once
OUTDIR=${OUT:-$BUILD/gpu-check}
mkdir -p "$OUTDIR" "$WORK" "$MODELS"
LOG=$OUTDIR/gpu-check.log
: >"$LOG"

now() { date +%s; }
elapsed() { echo $(($(now) - T0)); }
say() { printf '%s\n' "$*" | tee -a "$LOG"; }
# ncu_exports REP: the commands that write REP.ncu-rep's details (REP.txt), raw metrics
# (REP-raw.csv: stall samples are smsp__pcsamp_*) and SASS with samples (REP-sass.csv).
ncu_exports() {
  printf "ncu -i '%s.ncu-rep' --page details >'%s.txt' 2>&1; " "$1" "$1"
  printf "ncu -i '%s.ncu-rep' --page raw --csv >'%s-raw.csv' 2>&1; " "$1" "$1"
  printf "ncu -i '%s.ncu-rep' --page source --csv --print-source sass >'%s-sass.csv' 2>&1" "$1" "$1"
}

# limit MAX RESERVE: seconds for a stage: at most MAX, leaving RESERVE seconds of the budget
# for the stages after it, at least 15.
limit() {
  local l=$((DEADLINE - $(now) - $2))
  ((l > $1)) && l=$1
  ((l < 15)) && l=15
  echo "$l"
}

# Stage records, for the summary and gpu-check.json.
NAMES=() STATUS=() SECS=() DETAIL=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); DETAIL+=("$4"); }
# skipped NAME: whether GPU_CHECK_SKIP names the stage (recorded as SKIP).
skipped() {
  [[ " ${GPU_CHECK_SKIP:-} " == *" $1 "* ]] || return 1
  record "$1" SKIP 0 "GPU_CHECK_SKIP"
}

# run_stage NAME LIMIT FILTER CMD...: runs CMD under `timeout LIMIT`, its output appended to the
# log; prints the last 30 lines that match FILTER (ERE), or with an empty FILTER the last 40
# lines when CMD fails (the console keeps only the essentials; the log has everything). Sets RC
# (124: timed out) and STAGE_SECS.
RC=0 STAGE_SECS=0
run_stage() {
  local name=$1 lim=$2 filter=$3
  shift 3
  say ""
  say "== $name (limit ${lim}s, at +$(elapsed)s)"
  printf '$ %s\n' "$*" >>"$LOG"
  local from start
  from=$(($(stat -c %s "$LOG") + 1))
  start=$(now)
  timeout --kill-after=15 "$lim" "$@" >>"$LOG" 2>&1
  RC=$?
  STAGE_SECS=$(($(now) - start))
  if [[ -n "$filter" ]]; then
    local n
    n=$(tail -c +"$from" "$LOG" | grep -cE -- "$filter")
    ((n > 30)) && echo "   ($((n - 30)) more matching lines in $LOG)"
    tail -c +"$from" "$LOG" | grep -E -- "$filter" | tail -n 30
  elif ((RC != 0)); then
    tail -c +"$from" "$LOG" | tail -n 40
  fi
  ((RC == 124 || RC == 137)) && say "-- $name: timed out after ${lim}s"
  say "-- $name: exit $RC in ${STAGE_SECS}s"
}

SYNTH_PIDS=() PEER_PID=""
# shellcheck disable=SC2317  # called by the trap
cleanup() {
  local p
  for p in "${SYNTH_PIDS[@]}" $PEER_PID; do kill "$p" 2>/dev/null; done
}
trap cleanup EXIT

say "gpu-check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $NPROC cores, budget ${BUDGET}s;" \
    "tests $([[ $TESTS == 1 ]] && echo on || echo off), e2e $([[ $TESTS == 1 && $QUICK == 0 ]] && echo on || echo off)," \
    "bench $([[ $BENCH == 1 ]] && echo on || echo off); log $LOG"

# --- 1. environment ------------------------------------------------------------------------------
t=$(now)
setup_ok=1 setup_detail=""
[[ -d /usr/local/cuda/bin ]] && export PATH="/usr/local/cuda/bin:$PATH"
{
  echo "== environment"
  git log -1 --oneline 2>/dev/null || true
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  cmake --version | head -n 1
  python3 --version
} >>"$LOG" 2>&1
gpu_name=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
say "gpu: ${gpu_name:-none found by nvidia-smi}; nvcc: $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')"

DEPS=$ROOT/.gpu-deps
if [[ -d "$DEPS/lib/pkgconfig" ]]; then
  export PKG_CONFIG_PATH="$DEPS/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
else
  setup_ok=0 setup_detail="no .gpu-deps (run scripts/pack-gpu-deps.sh and carry .gpu-deps); "
fi
if ! command -v pkg-config >/dev/null && ! command -v pkgconf >/dev/null; then
  export PKG_CONFIG="$ROOT/scripts/pkg-config-lite.py"
  say "setup: no pkg-config here: CMake uses scripts/pkg-config-lite.py"
fi
SITE=$WORK/site
if ! python3 -c 'import gguf' 2>/dev/null; then
  wheel=$(find "$DEPS/wheels" -name 'gguf-*.whl' 2>/dev/null | head -n 1)
  if [[ -n "$wheel" && ! -d "$SITE/gguf" ]]; then
    python3 -m pip install --quiet --no-index --no-deps --target "$SITE" "$wheel" >>"$LOG" 2>&1 \
      || python3 -m zipfile -e "$wheel" "$SITE" >>"$LOG" 2>&1
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -c 'import gguf, numpy' >>"$LOG" 2>&1; then
  setup_ok=0 setup_detail+="python3 cannot import gguf and numpy; "
fi
if ((setup_ok)); then
  record setup PASS $(($(now) - t)) "gguf $(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))' 2>/dev/null), PKG_CONFIG_PATH=.gpu-deps"
else
  record setup FAIL $(($(now) - t)) "$setup_detail"
  say "setup: FAIL: $setup_detail"
fi

# --- 2. models, in the background ------------------------------------------------------------
synth() {   # synth SHAPE: the ANCHORS.md model, kept when present (written atomically)
  local out=$MODELS/$1-q4_0.gguf vocab=() v
  if [[ -s "$out" ]]; then
    echo "synth: $out exists"
    return 0
  fi
  # The model's real vocabulary (.gpu-deps/vocab), so that llama.cpp loads it too (--peer).
  v=$DEPS/vocab/ggml-vocab-llama-$([[ $1 == llama2-* ]] && echo spm || echo bpe).gguf
  [[ -f "$v" ]] && vocab=(--vocab-from "$v")
  timeout 240 python3 "$ROOT/scripts/synth_gguf.py" --out "$out" --shape "$1" --type q4_0 \
    --scale-range 0.002,0.02 "${vocab[@]}"
}
if ((BENCH)); then
  rm -f "$WORK"/synth-*.rc
  for shape in llama2-7b llama3-8b; do
    (synth "$shape" >"$WORK/synth-$shape.log" 2>&1; echo $? >"$WORK/synth-$shape.rc") &
    SYNTH_PIDS+=($!)
  done
  say "models: synthesizing llama2-7b and llama3-8b Q4_0 into $MODELS in the background"
fi

# Seconds the benchmarks need: Kestrel's runs, and llama-bench's beside them with --peer.
BENCH_SECS=$((120 + 90 * PEER))
# What the chosen stages take on the H200 (2026-12-03): build ~40 s, GPU op tests ~110 s, e2e and
# the overlap check ~100 s, benchmarks BENCH_SECS, OpenCL ~150 s. A smaller budget starves the
# later stages (a 165 s budget gave the op tests 16 s and the benchmarks 14 s): say so up front.
need=$((60 + 110 * TESTS + 100 * (TESTS && !QUICK) + BENCH_SECS * BENCH + 150 * OPENCL))
if ((BUDGET < need)); then
  say "gpu-check: warning: a budget of ${BUDGET}s is below the ~${need}s these stages take; the" \
    "later ones will be cut short (fewer stages: --no-opencl, --quick, --no-bench, --bench-only)"
fi

# --- 2b. the peer: llama.cpp's llama-bench with CUDA, built in the background --------------------
PEER_DIR=$WORK/llama.cpp
PEER_BENCH=$PEER_DIR/build/bin/llama-bench
peer_build() {
  if [[ ! -f "$PEER_DIR/CMakeLists.txt" ]]; then
    mkdir -p "$WORK" && tar -xzf "$DEPS/llama.cpp-src.tar.gz" -C "$WORK" || return 1
  fi
  local cuda_arg=()
  command -v nvcc >/dev/null && cuda_arg=("-DCMAKE_CUDA_COMPILER=$(command -v nvcc)")
  cmake -S "$PEER_DIR" -B "$PEER_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 "${cuda_arg[@]}" -DGGML_CUDA_NCCL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF &&
    cmake --build "$PEER_DIR/build" -j "$NPROC" --target llama-bench
}
if ((PEER && BENCH)); then
  if [[ -f "$DEPS/llama.cpp-src.tar.gz" ]]; then
    peer_limit=$(limit 420 "$BENCH_SECS")
    (t=$(now); nice -n 5 timeout "$peer_limit" bash -c "$(declare -f now peer_build); \
       DEPS='$DEPS' WORK='$WORK' PEER_DIR='$PEER_DIR' NPROC='$NPROC' peer_build" \
       >"$WORK/peer-build.log" 2>&1
     echo "$? $(($(now) - t))" >"$WORK/peer-build.rc") &
    PEER_PID=$!
    say "peer: building llama.cpp's llama-bench (CUDA) into $PEER_DIR/build in the background"
  else
    record peer-build FAIL 0 "no .gpu-deps/llama.cpp-src.tar.gz (scripts/pack-gpu-deps.sh)"
  fi
fi

# --- 3. configure and build ----------------------------------------------------------------------
# Seconds kept for the stages after the build (they take more when the build leaves more).
reserve=10
((TESTS)) && reserve=$((reserve + 75))   # the GPU op tests, then the trial kernel's
((TESTS && !QUICK)) && reserve=$((reserve + 100))
((BENCH)) && reserve=$((reserve + BENCH_SECS))

cuda_flags=()
if command -v nvcc >/dev/null; then cuda_flags+=("-DCMAKE_CUDA_COMPILER=$(command -v nvcc)"); fi
run_stage configure "$(limit 120 "$reserve")" '' \
  cmake -S "$ROOT" -B "$BUILD" -G Ninja "-DKESTREL_CUDA=$CUDA" -DCMAKE_CUDA_ARCHITECTURES=90a \
  -DCMAKE_BUILD_TYPE=Release "${cuda_flags[@]}"
configure_rc=$RC
if ((RC == 0)); then record configure PASS "$STAGE_SECS" ""; else record configure FAIL "$STAGE_SECS" "exit $RC"; fi

targets=(kestrel)
((TESTS)) && targets+=(kestrel_tests)
((BENCH)) && targets+=(kestrel_gpu_matmul_bench)
# built TARGET: after a failed build (-k 0 built what it could), whether TARGET itself is up to
# date: ninja retries only its failed edges, so this is quick when TARGET does not depend on them.
built() { timeout 300 cmake --build "$BUILD" -j "$NPROC" --target "$1" >>"$LOG" 2>&1 && [[ -x "$BUILD/bin/$1" ]]; }
KESTREL_OK=0 TESTS_BIN_OK=0
if ((configure_rc == 0)); then
  # -k 0: keep going, so that kestrel is built even when a test source fails to compile. At least
  # 90 s whatever the budget keeps for later stages (a fresh build takes ~30 s on 16 cores): a
  # small GPU_CHECK_BUDGET once left it 15 s, and without a build no later stage runs at all.
  build_lim=$(limit 420 "$reserve")
  ((build_lim < 90)) && build_lim=90
  run_stage build "$build_lim" '^FAILED|error' \
    cmake --build "$BUILD" -j "$NPROC" --target "${targets[@]}" -- -k 0
  build_rc=$RC
  if ((build_rc == 0)); then
    [[ -x "$BUILD/bin/kestrel" ]] && KESTREL_OK=1
    ((TESTS)) && [[ -x "$BUILD/bin/kestrel_tests" ]] && TESTS_BIN_OK=1
  elif ((build_rc != 124 && build_rc != 137)); then
    built kestrel && KESTREL_OK=1
    ((TESTS)) && built kestrel_tests && TESTS_BIN_OK=1
  fi
  detail="kestrel $([[ $KESTREL_OK == 1 ]] && echo built || echo FAILED)"
  ((TESTS)) && detail+=", kestrel_tests $([[ $TESTS_BIN_OK == 1 ]] && echo built || echo FAILED)"
  ((build_rc == 124 || build_rc == 137)) && detail+=" (timed out)"
  if ((build_rc == 0 && KESTREL_OK && (TESTS_BIN_OK || !TESTS))); then
    record build PASS "$STAGE_SECS" "$detail"
  else
    record build FAIL "$STAGE_SECS" "$detail"
  fi
else
  record build SKIP 0 "configure failed"
fi

# --- 4. GPU op tests -----------------------------------------------------------------------------
# gpu_test_stage NAME FILTER XML [VAR=VALUE...]: kestrel_tests --gtest_filter=FILTER on the GPU
# with the environment VAR=VALUE, recorded as stage NAME.
gpu_test_stage() {
  local name=$1 filter=$2 xml=$3 from lim
  shift 3
  if skipped "$name"; then return; fi
  from=$(($(stat -c %s "$LOG") + 1))
  lim=$(limit 120 $((rest + 10)))
  run_stage "$name" "$lim" '^\[==========\]|^\[  (PASSED|FAILED|SKIPPED) |Failure|error' \
    env "$@" "$BUILD/bin/kestrel_tests" --gtest_filter="$filter" --gtest_output="xml:$OUTDIR/$xml"
  local tail_log n_tests n_passed n_skipped n_failed counts
  tail_log=$(tail -n 400 "$LOG")
  n_tests=$(sed -n 's/^\[==========\] \([0-9]*\) tests\{0,1\} from .* ran\..*/\1/p' <<<"$tail_log" | tail -n 1)
  n_passed=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) tests\{0,1\}\..*/\1/p' <<<"$tail_log" | tail -n 1)
  n_skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) tests\{0,1\}, listed below.*/\1/p' <<<"$tail_log" | tail -n 1)
  n_failed=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) tests\{0,1\}, listed below.*/\1/p' <<<"$tail_log" | tail -n 1)
  counts="${n_passed:-0} passed, ${n_failed:-0} failed, ${n_skipped:-0} skipped of ${n_tests:-?}"
  (($#)) && counts+=" ($*)"
  if ((RC == 124 || RC == 137)); then
    # A variant stage whose limit the budget's end cut below its own 120 s (a slow host), with no
    # test failed so far, is PART, not a failure: the tests it ran passed, the rest did not run
    # (the one running is named: a hang at the full limit stays a failure). The main stage must
    # end.
    local ok bad running
    ok=$(tail -c +"$from" "$LOG" | grep -c '^\[       OK \]')
    bad=$(tail -c +"$from" "$LOG" | grep -c '^\[  FAILED  \] [A-Za-z]')
    running=$(tail -c +"$from" "$LOG" | sed -n 's/^\[ RUN      \] //p' | tail -n 1)
    if [[ "$name" != gpu-tests ]] && ((lim < 120 && bad == 0 && ok > 0)); then
      record "$name" PART "$STAGE_SECS" \
        "the budget's end cut it at ${lim}s: $ok tests passed, 0 failed, $running was running ($*)"
    else
      record "$name" FAIL "$STAGE_SECS" "timed out; $counts"
    fi
  elif ((RC != 0)); then
    record "$name" FAIL "$STAGE_SECS" "exit $RC; $counts"
  elif [[ -z "$n_tests" || "$n_tests" == 0 ]]; then
    record "$name" FAIL "$STAGE_SECS" "no test matched $filter"
  elif [[ "${n_passed:-0}" == 0 ]]; then
    record "$name" FAIL "$STAGE_SECS" "no GPU test ran on a GPU: $counts"
  else
    record "$name" PASS "$STAGE_SECS" "$counts"
  fi
}
if ((TESTS)); then
  if ((TESTS_BIN_OK)); then
    rest=0
    ((!QUICK)) && rest=$((rest + 100))
    ((BENCH)) && rest=$((rest + BENCH_SECS))
    gpu_test_stage gpu-tests '*Gpu*' gtest-gpu.xml
    # A failing GPU test is run once more under compute-sanitizer (memcheck, then racecheck for
    # shared memory), so that the log says where it went wrong; recorded as DIAG, not a verdict.
    if [[ "${STATUS[-1]}" == FAIL ]] && command -v compute-sanitizer >/dev/null; then
      for tool in memcheck racecheck; do
        run_stage "sanitize-$tool" "$(limit 90 $((rest + 10)))" 'ERROR SUMMARY|Invalid|Race|hazard' \
          compute-sanitizer --tool "$tool" --print-limit 20 \
          "$BUILD/bin/kestrel_tests" --gtest_filter='*GpuOpsMatmul.Q4_0/*:*GpuOpsChain*'
        record "sanitize-$tool" DIAG "$STAGE_SECS" \
          "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOG" | tail -n 1)"
      done
    fi
    # The path switched off by KESTREL_CUDA_NO_FUSED_INPUTS=1 (each matmul converts its own
    # input): the matmul and chain tests again, so that the A/B rows compare two tested paths.
    gpu_test_stage gpu-tests-unfused '*GpuOpsMatmul*.Q4_0/*:*GpuOpsMatmul*.Q8_0/*:*GpuOpsChain*' \
      gtest-gpu-unfused.xml KESTREL_CUDA_NO_FUSED_INPUTS=1
    # The paths switched off by the A/B variables of the former trials, tested like the default
    # so that their bench rows compare two tested paths: two RoPE launches, the warp-per-row
    # decode matvec, and the 5-16-token kernel's older split choice.
    gpu_test_stage gpu-tests-no-rope-qk '*GpuOpsElementwise*Rope*' gtest-gpu-no-rope-qk.xml \
      KESTREL_CUDA_NO_ROPE_QK=1
    gpu_test_stage gpu-tests-no-ksplit '*GpuOpsMatmul*.Q4_0/*:*GpuOpsMatmul*.Q8_0/*:*GpuOpsChain*' \
      gtest-gpu-no-ksplit.xml KESTREL_CUDA_NO_MATVEC_KSPLIT=1 KESTREL_CUDA_NO_FRAG_ONE_WAVE=1 \
      KESTREL_CUDA_STREAM16=0
    # The fused f32 attention for prompt chunks forced for every cache type and length
    # (KESTREL_CUDA_FLASH=1; by default only quantized caches up to 512 keys take it).
    gpu_test_stage gpu-tests-flash '*GpuOpsAttention*:*GpuOpsChain*' gtest-gpu-flash.xml \
      KESTREL_CUDA_FLASH=1
    # Attention without the tensor-core kernel of attention_mma.cu (KESTREL_CUDA_FLASH_MMA=0: the
    # cuBLAS path, and the f32 fused kernel for quantized caches up to 512 keys).
    gpu_test_stage gpu-tests-no-flash-mma '*GpuOpsAttention*:*GpuOpsChain*' \
      gtest-gpu-no-flash-mma.xml KESTREL_CUDA_FLASH_MMA=0
    # The 5-16-token fragment kernel (KESTREL_CUDA_STREAM16=0: Q4_0 too) with K split 16 ways
    # wherever it can be (the most partial sums per output that its last-arriving block adds up),
    # alone and grouped.
    gpu_test_stage gpu-tests-frag-splits '*GpuOpsMatmul*.Q4_0/*:*GpuOpsMatmul*.Q8_0/*:*GpuOpsChain*' \
      gtest-gpu-frag-splits.xml KESTREL_CUDA_FRAG_SPLITS=16 KESTREL_CUDA_STREAM16=0
    # The decode matvec as a plain launch (KESTREL_CUDA_PDL=0; by default a programmatic
    # dependent launch whose weights are asked of L2 while the kernel before it runs).
    gpu_test_stage gpu-tests-no-pdl '*GpuOpsMatmul*.Q4_0/*:*GpuOpsMatmul*.Q8_0/*:*GpuOpsChain*' \
      gtest-gpu-no-pdl.xml KESTREL_CUDA_PDL=0
    # Decode's products on the K-split kernel alone (KESTREL_CUDA_MATVEC_PIPE=0; by default rows
    # wider than 4096 go on its pipelined version, matvec_pipe_kernel), and all on the pipelined
    # one (=1).
    gpu_test_stage gpu-tests-matvec-no-pipe '*GpuOpsMatmul*.Q4_0/*:*GpuOpsMatmul*.Q8_0/*:*GpuOpsChain*' \
      gtest-gpu-matvec-no-pipe.xml KESTREL_CUDA_MATVEC_PIPE=0
    gpu_test_stage gpu-tests-matvec-pipe-all '*GpuOpsMatmul*.Q4_0/*:*GpuOpsMatmul*.Q8_0/*:*GpuOpsChain*' \
      gtest-gpu-matvec-pipe-all.xml KESTREL_CUDA_MATVEC_PIPE=1
    # Decode's rows of 256-512 blocks (ffn down) streamed through matvec_stream.cu (opt-in
    # KESTREL_CUDA_MATVEC_STREAM=1; by default all on matvec_int8.cu's kernels).
    gpu_test_stage gpu-tests-matvec-stream '*GpuOpsMatmul*.Q4_0/*:*GpuOpsMatmul*.Q8_0/*:*GpuOpsChain*:*GpuOpsFusedNorm*' \
      gtest-gpu-matvec-stream.xml KESTREL_CUDA_MATVEC_STREAM=1
    # Decode's SwiGLU inside that stream's launch (opt-in KESTREL_CUDA_FUSED_SWIGLU=1 with the
    # stream on; the matmul suite's SwigluMatmulIsTheTwoOps sets the first for its own backend).
    gpu_test_stage gpu-tests-fused-swiglu '*GpuOpsMatmulLarge*:*GpuOpsChain*' \
      gtest-gpu-fused-swiglu.xml KESTREL_CUDA_MATVEC_STREAM=1 KESTREL_CUDA_FUSED_SWIGLU=1
    # Decode's SwiGLU in the gate/up matvec's epilogue (opt-in KESTREL_CUDA_MATMUL_SWIGLU=1, slower
    # so far; the matmul suite's MatmulSwigluIsTheTwoOps sets it for its own backend either way).
    gpu_test_stage gpu-tests-matmul-swiglu '*GpuOpsMatmul*:*GpuOpsChain*' \
      gtest-gpu-matmul-swiglu.xml KESTREL_CUDA_MATMUL_SWIGLU=1
    # Decode's residual add and norm in the output and down projections' epilogues (opt-in
    # KESTREL_CUDA_MATMUL_ADD_NORM=1; GpuOpsFusedNorm sets it for its own backend either way).
    gpu_test_stage gpu-tests-matmul-add-norm '*GpuOpsMatmul*:*GpuOpsChain*:*GpuOpsFusedNorm*' \
      gtest-gpu-matmul-add-norm.xml KESTREL_CUDA_MATMUL_ADD_NORM=1
    # Decode steps' attention on tc16 with RoPE and the KV store a launch of their own
    # (KESTREL_CUDA_ATT_DECODE=0; by default attention_decode.cu with both in its launch, which
    # RopeKvAttentionIsTheOps compares with the two ops bit for bit), and the decode kernel with
    # a split every 128 keys (more of them merged; by default 256).
    gpu_test_stage gpu-tests-no-att-decode '*GpuOpsAttention*:*GpuOpsChain*' \
      gtest-gpu-no-att-decode.xml KESTREL_CUDA_ATT_DECODE=0
    gpu_test_stage gpu-tests-att-decode-128 '*GpuOpsAttention*' \
      gtest-gpu-att-decode-128.xml KESTREL_CUDA_ATT_DECODE_KEYS=128
    # The decode kernel's first pass asked for before its dependency wait, the token's own K and V
    # rows through shared memory (opt-in KESTREL_CUDA_ATT_DECODE_EARLY=1; bit for bit the default),
    # with one split a head and with a split every 128 keys.
    gpu_test_stage gpu-tests-att-decode-early '*GpuOpsAttention*:*GpuOpsChain*' \
      gtest-gpu-att-decode-early.xml KESTREL_CUDA_ATT_DECODE_EARLY=1
    gpu_test_stage gpu-tests-att-decode-early-128 '*GpuOpsAttention*' \
      gtest-gpu-att-decode-early-128.xml KESTREL_CUDA_ATT_DECODE_EARLY=1 \
      KESTREL_CUDA_ATT_DECODE_KEYS=128
    # Recorded passes refilled from the forward pass's named inputs without walking the body
    # (opt-in KESTREL_CUDA_GRAPH_DIRECT_STAGE=1) and copying their slots in one node at the start
    # (opt-in KESTREL_CUDA_GRAPH_ONE_COPY=1); only Q/K/V launches letting attention start early
    # (lab KESTREL_CUDA_KSPLIT_TRIGGER=3).
    gpu_test_stage gpu-tests-graph-direct '*GpuOpsRecorded*:*GpuOpsChain*' \
      gtest-gpu-graph-direct.xml KESTREL_CUDA_GRAPH_DIRECT_STAGE=1 KESTREL_CUDA_GRAPH_ONE_COPY=1
    gpu_test_stage gpu-tests-ksplit-trigger-3 '*GpuOpsAttention*:*GpuOpsChain*' \
      gtest-gpu-ksplit-trigger-3.xml KESTREL_CUDA_KSPLIT_TRIGGER=3
    # tc16 with a 16-key sub-tile a warp before another split (more merges; by default 8).
    gpu_test_stage gpu-tests-tc16-subs-1 '*GpuOpsAttention*:*GpuOpsChain*' \
      gtest-gpu-tc16-subs-1.xml KESTREL_CUDA_TC16_WARP_SUBS=1
    # Q4_0 prompt chunks on the GEMM path instead of the wgmma kernel (the default since the
    # twelfth session, matmul_wgmma.cu; KESTREL_CUDA_WGMMA=0, which also turns stream16 off): the
    # suites whose ops take or write matmul inputs (the others never look at the matmul path).
    gpu_test_stage gpu-tests-no-wgmma '*GpuOpsMatmul*:*GpuOpsChain*:*GpuOpsElementwise*' \
      gtest-gpu-no-wgmma.xml KESTREL_CUDA_WGMMA=0
    # The 5-16-token kernel's K splits summed through global partials instead of a thread block
    # cluster (KESTREL_CUDA_FRAG_CLUSTER=0), and in clusters with 8 splits forced.
    gpu_test_stage gpu-tests-no-frag-cluster '*GpuOpsMatmul*.Q4_0/*:*GpuOpsMatmul*.Q8_0/*:*GpuOpsChain*' \
      gtest-gpu-no-frag-cluster.xml KESTREL_CUDA_FRAG_CLUSTER=0 KESTREL_CUDA_STREAM16=0
    gpu_test_stage gpu-tests-frag-cluster8 '*GpuOpsMatmul*.Q4_0/*:*GpuOpsMatmul*.Q8_0/*:*GpuOpsChain*' \
      gtest-gpu-frag-cluster8.xml KESTREL_CUDA_FRAG_SPLITS=8 KESTREL_CUDA_STREAM16=0
    # 5-16-token Q4_0 matmuls on the fragment kernel (matmul_frag_v2.cu) instead of the
    # copy-engine-fed wgmma kernel (matmul_stream16.cu, the default on sm_90a since the
    # fifteenth session; KESTREL_CUDA_STREAM16=0), and stream16's other variants: one K split
    # forced, one code box a stage (the first version), four boxes with two accumulator sets
    # (shapes they do not fit run on the fragment kernel).
    gpu_test_stage gpu-tests-no-stream16 '*GpuOpsMatmul*.Q4_0/*:*GpuOpsMatmul*.Q8_0/*:*GpuOpsChain*' \
      gtest-gpu-no-stream16.xml KESTREL_CUDA_STREAM16=0
    gpu_test_stage gpu-tests-stream16-s1 '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-stream16-s1.xml KESTREL_CUDA_STREAM16_SPLITS=1
    gpu_test_stage gpu-tests-stream16-b1 '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-stream16-b1.xml KESTREL_CUDA_STREAM16_BOXES=1
    gpu_test_stage gpu-tests-stream16-b4 '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-stream16-b4.xml KESTREL_CUDA_STREAM16_BOXES=4 KESTREL_CUDA_STREAM16_ACCS=2
    # One barrier for all of a block's activations (KESTREL_CUDA_STREAM16_ACT_STEPS=0; a barrier
    # for each step's by default since the nineteenth session), the unpermuted variant with every
    # step of K in one block; the cluster's last barrier relaxed (opt-in), 4 blocks a cluster.
    gpu_test_stage gpu-tests-stream16-no-act-steps '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-stream16-no-act-steps.xml KESTREL_CUDA_STREAM16_ACT_STEPS=0
    gpu_test_stage gpu-tests-stream16-b1-s1 '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-stream16-b1-s1.xml KESTREL_CUDA_STREAM16_BOXES=1 KESTREL_CUDA_STREAM16_SPLITS=1
    gpu_test_stage gpu-tests-stream16-relaxed-exit '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-stream16-relaxed-exit.xml KESTREL_CUDA_STREAM16_RELAXED_EXIT=1 \
      KESTREL_CUDA_STREAM16_SPLITS=4
    # The warpgroups taking turns at every row group's steps (KESTREL_CUDA_STREAM16_OWN=0; whole
    # groups each by default since the twenty-ninth session); the cluster's sum by remote loads
    # (KESTREL_CUDA_STREAM16_PUSH=0: float4 loads; with SUM_VEC=0 one at a time) instead of each
    # block pushing its results into the slices' owners (the default since the thirtieth
    # session), and the push with 3 (uneven slices) and 8 blocks a cluster.
    gpu_test_stage gpu-tests-stream16-no-own '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-stream16-no-own.xml KESTREL_CUDA_STREAM16_OWN=0
    gpu_test_stage gpu-tests-stream16-sum-vec '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-stream16-sum-vec.xml KESTREL_CUDA_STREAM16_PUSH=0
    gpu_test_stage gpu-tests-stream16-sum-plain '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-stream16-sum-plain.xml KESTREL_CUDA_STREAM16_PUSH=0 KESTREL_CUDA_STREAM16_SUM_VEC=0
    gpu_test_stage gpu-tests-stream16-push-s3 '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-stream16-push-s3.xml KESTREL_CUDA_STREAM16_SPLITS=3
    gpu_test_stage gpu-tests-stream16-push-s8 '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*:*GpuOpsFusedRope*' \
      gtest-gpu-stream16-push-s8.xml KESTREL_CUDA_STREAM16_SPLITS=8
    # Attention of 1-16 tokens with the keys split among blocks (attention_split.cu, opt-in:
    # KESTREL_CUDA_ATT_SPLIT_MIN=N from N tokens; 1 here, decode steps included).
    gpu_test_stage gpu-tests-att-split '*GpuOpsAttention*:*GpuOpsChain*' gtest-gpu-att-split.xml \
      KESTREL_CUDA_ATT_SPLIT_MIN=1
    # Attention of 1-16 tokens on the rows kernel (KESTREL_CUDA_ATT_TC16_MIN=17) instead of the
    # tensor cores straight from the cache (attention_tc16.cu, the default from 1 token).
    gpu_test_stage gpu-tests-no-att-tc16 '*GpuOpsAttention*:*GpuOpsChain*' \
      gtest-gpu-no-att-tc16.xml KESTREL_CUDA_ATT_TC16_MIN=17
    # Prompt chunks' wgmma tiles all of 192 tokens and all of 128 (KESTREL_CUDA_WGMMA_BN; by
    # default the launch picks), and Q, K, V / gate, up as a launch each on the wgmma path
    # (KESTREL_CUDA_WGMMA_NO_GROUP=1).
    gpu_test_stage gpu-tests-wgmma-bn192 '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-wgmma-bn192.xml KESTREL_CUDA_WGMMA_BN=192
    gpu_test_stage gpu-tests-wgmma-bn128 '*GpuOpsMatmul*.Q4_0/*:*GpuOpsChain*' \
      gtest-gpu-wgmma-bn128.xml KESTREL_CUDA_WGMMA_BN=128
    gpu_test_stage gpu-tests-wgmma-no-group '*GpuOpsChain*' gtest-gpu-wgmma-no-group.xml \
      KESTREL_CUDA_WGMMA_NO_GROUP=1
    # Decode steps as one persistent kernel a layer (decode_layer.cu, opt-in:
    # KESTREL_CUDA_FUSED_DECODE=1): its own suite against the op sequence, and the ops it replaces.
    gpu_test_stage gpu-tests-fused-decode '*GpuOpsDecodeLayer*:*GpuOpsChain*:*GpuOpsAttention*' \
      gtest-gpu-fused-decode.xml KESTREL_CUDA_FUSED_DECODE=1
    # Its ring filled by cp.async from the threads instead of bulk copies (decode_ring.cuh).
    gpu_test_stage gpu-tests-fused-decode-cp-async '*GpuOpsDecodeLayer*' \
      gtest-gpu-fused-decode-cp-async.xml KESTREL_CUDA_FUSED_DECODE=1 KESTREL_CUDA_DECODE_CP_ASYNC=1
    # RoPE and the KV store as two launches (KESTREL_CUDA_NO_FUSED_ROPE_KV=1; by default one).
    gpu_test_stage gpu-tests-no-fused-rope-kv '*GpuOpsAttention*:*GpuOpsChain*:*GpuOpsElementwise*Rope*' \
      gtest-gpu-no-fused-rope-kv.xml KESTREL_CUDA_NO_FUSED_ROPE_KV=1
  else
    record gpu-tests SKIP 0 "kestrel_tests not built"
  fi
fi

# --- 5. end to end on the GPU --------------------------------------------------------------------
e2e() {   # e2e NAME KESTREL_ARGS MAX RESERVE [VAR=VALUE...]; E2E_ONLY=SUBSTR: those cases only
  local name=$1 args=$2 lim budget summary only=()
  local vars=("${@:5}")
  [[ -n "${E2E_ONLY:-}" ]] && only=(--only "$E2E_ONLY")
  if skipped "$name"; then return; fi
  lim=$(limit "$3" "$4")
  budget=$((lim - 40))   # a run started just before the budget ends still fits (--timeout 30)
  ((budget < 10)) && budget=10
  run_stage "$name" "$lim" '^  FAIL|  FAIL  |^e2e: [0-9]|reproduce' \
    env "${vars[@]}" python3 "$ROOT/tests/e2e/test_e2e.py" --kestrel "$BUILD/bin/kestrel" --workdir "$WORK/e2e" \
    --kestrel-args "$args" --jobs "$E2E_JOBS" --budget "$budget" --timeout 30 "${only[@]}"
  summary=$(tail -n 30 "$LOG" | sed -n 's/^e2e: \([0-9]*\/[0-9]* passed.*\)/\1/p' | tail -n 1)
  if ((RC == 0)); then
    record "$name" PASS "$STAGE_SECS" "$args ${vars[*]}: $summary"
  else
    record "$name" FAIL "$STAGE_SECS" "$args ${vars[*]}: ${summary:-exit $RC}"
  fi
}
if ((TESTS && !QUICK)); then
  if ((KESTREL_OK)); then
    bench_reserve=0
    ((BENCH)) && bench_reserve=$BENCH_SECS
    e2e e2e-gpu "--backend cuda -ngl 99" 150 $((bench_reserve + 60))
    e2e e2e-split "--backend cuda -ngl 1" 120 $((bench_reserve + 10))
    # Recorded passes that copy their positions before every layer (the default copies them
    # once: KESTREL_CUDA_GRAPH_UPLOAD_ONCE=0), and RoPE and the KV store in the Q/K/V launch's
    # epilogue (opt-in, KESTREL_CUDA_MATMUL_ROPE_KV=1).
    e2e e2e-graph-upload-every "--backend cuda -ngl 99" 150 $((bench_reserve + 10)) \
      KESTREL_CUDA_GRAPH_UPLOAD_ONCE=0
    e2e e2e-matmul-rope-kv "--backend cuda -ngl 99" 150 $((bench_reserve + 10)) \
      KESTREL_CUDA_MATMUL_ROPE_KV=1
    # The opt-in fused decode layer on the runs whose every token is a decode step.
    E2E_ONLY=b1-ub1 e2e e2e-fused-decode "--backend cuda -ngl 99" 60 $((bench_reserve + 10)) \
      KESTREL_CUDA_FUSED_DECODE=1
    # Decode steps' attention on tc16 (KESTREL_CUDA_ATT_DECODE=0), the same runs.
    E2E_ONLY=b1-ub1 e2e e2e-no-att-decode "--backend cuda -ngl 99" 60 $((bench_reserve + 10)) \
      KESTREL_CUDA_ATT_DECODE=0
    # The decode kernel's opt-in early first pass (KESTREL_CUDA_ATT_DECODE_EARLY=1), the same runs.
    E2E_ONLY=b1-ub1 e2e e2e-att-decode-early "--backend cuda -ngl 99" 60 $((bench_reserve + 10)) \
      KESTREL_CUDA_ATT_DECODE_EARLY=1
    # Replays staged from the named inputs, their slots copied in one node (both opt-in).
    e2e e2e-graph-direct "--backend cuda -ngl 99" 150 $((bench_reserve + 10)) \
      KESTREL_CUDA_GRAPH_DIRECT_STAGE=1 KESTREL_CUDA_GRAPH_ONE_COPY=1
    # ... and leaving it for tc16 past 40 keys, mid-run (recorded steps keyed by the kernel).
    E2E_ONLY=b1-ub1 e2e e2e-att-decode-40 "--backend cuda -ngl 99" 60 $((bench_reserve + 10)) \
      KESTREL_CUDA_ATT_DECODE_MAX_KEYS=40
    # The opt-in SwiGLU in the gate/up matvec's epilogue, the same runs.
    E2E_ONLY=b1-ub1 e2e e2e-matmul-swiglu "--backend cuda -ngl 99" 60 $((bench_reserve + 10)) \
      KESTREL_CUDA_MATMUL_SWIGLU=1
    # The opt-in add and norm in the projections' epilogues, the same runs.
    E2E_ONLY=b1-ub1 e2e e2e-matmul-add-norm "--backend cuda -ngl 99" 60 $((bench_reserve + 10)) \
      KESTREL_CUDA_MATMUL_ADD_NORM=1
    e2e e2e-no-stream16 "--backend cuda -ngl 99" 90 $((bench_reserve + 10)) KESTREL_CUDA_STREAM16=0
    e2e e2e-wgmma-bn128 "--backend cuda -ngl 99" 90 $((bench_reserve + 10)) KESTREL_CUDA_WGMMA_BN=128
    e2e e2e-att-split "--backend cuda -ngl 99" 90 $((bench_reserve + 10)) KESTREL_CUDA_ATT_SPLIT_MIN=1
    e2e e2e-no-att-tc16 "--backend cuda -ngl 99" 90 $((bench_reserve + 10)) KESTREL_CUDA_ATT_TC16_MIN=17
    # The warm-up pass and, split (-ngl 1), micro-batches overlapping across CPU and GPU: the
    # same last logits as run one after the other (bit-identical), near the CPU's.
    if ! skipped overlap-cuda; then
      run_stage overlap-cuda "$(limit 60 $((bench_reserve + 5)))" '^ok|^FAIL|^skip|failures' \
        python3 "$ROOT/tests/profile/test_profile_cli.py" --kestrel "$BUILD/bin/kestrel" \
        --workdir "$WORK/profile" --gpu-backend cuda
      record overlap-cuda "$( ((RC == 0)) && echo PASS || echo FAIL)" "$STAGE_SECS" \
        "$(tail -n 40 "$LOG" | grep -E '^[0-9]+ failures' | tail -n 1)"
    fi
  else
    record e2e-gpu SKIP 0 "kestrel not built"
    record e2e-split SKIP 0 "kestrel not built"
  fi
fi

# --- 6. benchmarks -------------------------------------------------------------------------------
TABLE=$WORK/bench-table.md
rm -f "$TABLE"
if ((BENCH)); then
  t=$(now)
  for p in "${SYNTH_PIDS[@]}"; do wait "$p"; done
  SYNTH_PIDS=()
  synth_detail=""
  synth_fail=0
  for shape in llama2-7b llama3-8b; do
    cat "$WORK/synth-$shape.log" >>"$LOG" 2>/dev/null
    rc=$(cat "$WORK/synth-$shape.rc" 2>/dev/null || echo 1)
    secs=$(sed -n 's/.*MiB, \([0-9.]*\) s$/\1/p' "$WORK/synth-$shape.log" 2>/dev/null)
    if [[ "$rc" == 0 ]]; then
      synth_detail+="$shape $([[ -n "$secs" ]] && echo "synthesized in ${secs}s" || echo kept); "
    else
      synth_fail=1
      synth_detail+="$shape FAILED (exit $rc); "
    fi
  done
  say "models: $synth_detail(waited $(($(now) - t))s)"
  if ((synth_fail)); then record models FAIL 0 "$synth_detail"; else record models PASS 0 "$synth_detail"; fi

  peer_args=()
  if [[ -n "$PEER_PID" ]]; then
    t=$(now)
    wait "$PEER_PID"
    read -r prc psecs <"$WORK/peer-build.rc" 2>/dev/null || prc=1
    cat "$WORK/peer-build.log" >>"$LOG" 2>/dev/null
    if [[ "$prc" == 0 && -x "$PEER_BENCH" ]]; then
      peer_args=(--llama-bench "$PEER_BENCH")
      record peer-build PASS "${psecs:-0}" "llama-bench built (waited $(($(now) - t))s for it)"
    else
      record peer-build FAIL "${psecs:-0}" "exit ${prc}: $(grep -m1 -E 'error|Error' "$WORK/peer-build.log" | cut -c1-200)"
    fi
  fi
  # The matmul kernels alone (bench/gpu_matmul_bench.cpp): one llama2-7b layer's shapes against
  # 1, 16 and 512 tokens, under each setting of $GPU_MATMUL_VARIANTS (';'-separated env
  # assignments, "-" for the defaults): how far each kernel is from the bandwidth floor.
  MM_BIN=$BUILD/bin/kestrel_gpu_matmul_bench
  if [[ -x "$MM_BIN" ]] && ! skipped matmul-bench; then
    IFS=';' read -r -a mm_variants <<<"${GPU_MATMUL_VARIANTS:--}"
    run_stage matmul-bench "$(limit 90 $((BENCH_SECS + 5)))" '^## |^\| [a-z]|failed' \
      env OUTDIR="$OUTDIR" bash "$ROOT/bench/lab/matmul_sweep.sh" "$MM_BIN" "${mm_variants[@]}"
    record matmul-bench "$( ((RC == 0)) && echo PASS || echo FAIL)" "$STAGE_SECS" \
      "${#mm_variants[@]} settings; table in gpu-check.log"
    # GPU_CHECK_NCU=1: Nsight Compute's full section set on one grouped 16-token launch (its
    # report goes to ncu-frag.txt): where the 5-16-token kernel's time goes.
    if [[ "${GPU_CHECK_NCU:-0}" == 1 ]] && command -v ncu >/dev/null; then
      ncu_rep=$OUTDIR/ncu-frag
      run_stage ncu-frag "$(limit 120 $((BENCH_SECS + 5)))" '^  [A-Z].*(Throughput|Busy|Occupancy|Warp Cycles|Issue)' \
        env ${GPU_CHECK_NCU_ENV:-} bash -c "ncu --clock-control none --set full --import-source yes \
          -k regex:${GPU_CHECK_NCU_KERNEL:-frag} --launch-skip ${GPU_CHECK_NCU_SKIP:-3} --launch-count 2 \
          -o '$ncu_rep' -f '$MM_BIN' --tokens 16 --ms 1 >'$ncu_rep.log' 2>&1; rc=\$?
          $(ncu_exports "$ncu_rep")
          cat '$ncu_rep.log' '$ncu_rep.txt'; exit \$rc"
      record ncu-frag "$( ((RC == 0)) && echo PASS || echo FAIL)" "$STAGE_SECS" "report in ncu-frag.txt"
    fi
  fi
  # The opt-in fused decode layer's phases (decode_layer.cu): 64 decode steps of llama2-7b with
  # KESTREL_CUDA_DECODE_TIMING=1, which prints each phase's wall time and blocks' busy time.
  if ((KESTREL_OK)) && [[ -s "$MODELS/llama2-7b-q4_0.gguf" ]] && ! skipped decode-timing; then
    run_stage decode-timing "$(limit 90 $((BENCH_SECS)))" '^decode_layer timing|^[A-F][0-9+A-F]* |^phase|^\| llama' \
      env KESTREL_CUDA_FUSED_DECODE=1 KESTREL_CUDA_DECODE_TIMING=1 "$BUILD/bin/kestrel" bench \
      -m "$MODELS/llama2-7b-q4_0.gguf" -p 0 -n 64 -r 1
    record decode-timing "$( ((RC == 0)) && echo PASS || echo FAIL)" "$STAGE_SECS" \
      "KESTREL_CUDA_FUSED_DECODE=1 tg64 phase times in gpu-check.log"
  fi
  # GPU_CHECK_SEED_PROFILE=1: the seed's b128 ub16 with --profile (per-op times);
  # GPU_CHECK_NCU_MODEL=REGEX: ncu's full set on one launch of the kernels matching REGEX inside
  # that run (after GPU_CHECK_NCU_MODEL_SKIP of them, 480: with 32 a micro-batch, one of the
  # 16th, ~250 keys), its report, raw metrics and SASS with stall samples as ncu-model.*.
  seed_args=(-m "$MODELS/llama2-7b-q4_0.gguf" -p 327 -n 0 -b 128 -ub 16 -ctk q4_0 -ctv q4_0)
  if ((KESTREL_OK)) && [[ -s "$MODELS/llama2-7b-q4_0.gguf" ]] && [[ "${GPU_CHECK_SEED_PROFILE:-0}" == 1 ]]; then
    run_stage seed-profile "$(limit 60 $((BENCH_SECS)))" '^\| |^Measured' \
      "$BUILD/bin/kestrel" bench "${seed_args[@]}" -r 2 --profile
    record seed-profile "$( ((RC == 0)) && echo PASS || echo FAIL)" "$STAGE_SECS" "per-op table in gpu-check.log"
  fi
  # With it, 64 decode steps of llama2-7b with --profile (eager launches, no graph: each op's own
  # time where tg128 replays graphs).
  if ((KESTREL_OK)) && [[ -s "$MODELS/llama2-7b-q4_0.gguf" ]] && [[ "${GPU_CHECK_SEED_PROFILE:-0}" == 1 ]]; then
    run_stage decode-profile "$(limit 60 $((BENCH_SECS)))" '^\| |^Measured' \
      "$BUILD/bin/kestrel" bench -m "$MODELS/llama2-7b-q4_0.gguf" -p 0 -n 64 -r 1 --profile
    record decode-profile "$( ((RC == 0)) && echo PASS || echo FAIL)" "$STAGE_SECS" "per-op table in gpu-check.log"
  fi
  if ((KESTREL_OK)) && [[ -s "$MODELS/llama2-7b-q4_0.gguf" ]] && [[ -n "${GPU_CHECK_NCU_MODEL:-}" ]] &&
    command -v ncu >/dev/null; then
    ncu_rep=$OUTDIR/ncu-model
    run_stage ncu-model "$(limit 150 $((BENCH_SECS + 5)))" '^  [A-Z].*(Throughput|Busy|Occupancy|Warp Cycles|Issue|Duration)' \
      bash -c "ncu --clock-control none --set full --import-source yes -k regex:'$GPU_CHECK_NCU_MODEL' \
        --launch-skip ${GPU_CHECK_NCU_MODEL_SKIP:-480} --launch-count 1 -o '$ncu_rep' -f \
        '$BUILD/bin/kestrel' bench ${seed_args[*]} -r 1 >'$ncu_rep.log' 2>&1; rc=\$?
        $(ncu_exports "$ncu_rep")
        tail -n 5 '$ncu_rep.log'; cat '$ncu_rep.txt'; exit \$rc"
    record ncu-model "$( ((RC == 0)) && echo PASS || echo FAIL)" "$STAGE_SECS" "report in ncu-model.txt"
  fi
  if ((KESTREL_OK)); then
    lim=$(limit 600 5)
    run_stage bench "$lim" '^gpu_bench: (probe|l[23]-|[0-9])' \
      python3 "$ROOT/bench/gpu_bench.py" --kestrel "$BUILD/bin/kestrel" --models "$MODELS" -r 3 \
      --budget $((lim - 20)) --timeout 150 --json "$OUTDIR/bench-gpu.json" --md "$TABLE" \
      "${peer_args[@]}" ${GPU_BENCH_ARGS:-}
    summary=$(sed -n 's/^gpu_bench: \([0-9]*\/[0-9]* cases measured.*\)/\1/p' "$TABLE" 2>/dev/null)
    if ((RC == 0)); then record bench PASS "$STAGE_SECS" "$summary"; else record bench FAIL "$STAGE_SECS" "${summary:-exit $RC}"; fi
  else
    record bench SKIP 0 "kestrel not built"
  fi
fi

# --- 7. OpenCL through NVIDIA's driver (scripts/check-opencl-gpu.sh: its own build without CUDA,
# the op tests on OpenCL, llama2-7b pp512 / the seed's case / tg32, cold and warm setup) ---------
OCL_TABLE=$WORK/opencl-table.txt
rm -f "$OCL_TABLE" "$WORK/opencl-gpu.log"
if ((OPENCL)); then
  ocl_args=()
  ((TESTS)) || ocl_args+=(--no-tests)
  ((BENCH)) || ocl_args+=(--no-bench)
  lim=$(limit 400 5)
  # Its log in $WORK (OUT emptied), where the table is taken from; gpu-check.log has it too.
  run_stage opencl "$lim" '^(build|tests|e2e|icd|cold|warm):|FAILED' \
    env OUT= OCL_GPU_WORK="$WORK" OCL_GPU_BUILD="$ROOT/build-ocl-gpu" \
    bash "$ROOT/scripts/check-opencl-gpu.sh" "${ocl_args[@]}"
  grep -E '^\| (llama|sweep)|^(cold|warm):' "$WORK/opencl-gpu.log" >"$OCL_TABLE" 2>/dev/null
  detail="$(grep -c '^| llama' "$OCL_TABLE") benchmark rows; $(grep -E '^(tests|e2e):' "$WORK/opencl-gpu.log" | tail -n 2 | tr '\n' ' ')"
  if ((RC == 0)); then record opencl PASS "$STAGE_SECS" "$detail"; else record opencl FAIL "$STAGE_SECS" "$detail"; fi
fi

# --- summary -------------------------------------------------------------------------------------
test_fail=0 bench_fail=0
for i in "${!NAMES[@]}"; do
  if [[ "${STATUS[$i]}" == FAIL ]]; then
    case "${NAMES[$i]}" in bench | matmul-bench | ncu-frag | ncu-model | decode-timing | seed-profile | decode-profile | models | peer-build) bench_fail=1 ;; *) test_fail=1 ;; esac
  fi
done
if ((test_fail)); then
  verdict=FAIL code=1
elif ((bench_fail)); then
  verdict="benchmark FAILED" code=2
  ((TESTS)) && verdict="PASS (tests), benchmark FAILED"
else
  verdict=PASS code=0
fi
n_part=$(printf '%s\n' "${STATUS[@]}" | grep -c '^PART$')
((n_part > 0)) && verdict+=" ($n_part test stages cut short by the budget: PART)"

{
  echo
  echo "================ gpu-check summary: $verdict ($(elapsed)s of ${BUDGET}s) ================"
  printf '%-10s  %-6s  %6s  %s\n' stage result time detail
  for i in "${!NAMES[@]}"; do
    printf '%-10s  %-6s  %5ss  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${DETAIL[$i]}"
  done
  echo "files: $OUTDIR/{gpu-check.log,gpu-check.json$( [[ -f $OUTDIR/gtest-gpu.xml ]] && echo ,gtest-gpu.xml)$( [[ -f $OUTDIR/bench-gpu.json ]] && echo ,bench-gpu.json)}"
} | tee -a "$LOG"

# gpu-check.json: the stages (a TSV piped into python3 for the escaping).
for i in "${!NAMES[@]}"; do
  printf '%s\t%s\t%s\t%s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${DETAIL[$i]//$'\t'/ }"
done | python3 -c '
import json, sys
stages = [dict(zip(("stage", "result", "seconds", "detail"), l.rstrip("\n").split("\t", 3)))
          for l in sys.stdin if l.strip()]
for s in stages:
    s["seconds"] = int(s["seconds"])
json.dump({"verdict": sys.argv[1], "exit_code": int(sys.argv[2]), "seconds": int(sys.argv[3]),
           "gpu": sys.argv[4], "stages": stages}, open(sys.argv[5], "w"), indent=2)
' "$verdict" "$code" "$(elapsed)" "${gpu_name:-}" "$OUTDIR/gpu-check.json" 2>>"$LOG"

# The GPU machine's tool brings back at most 8 files from $OUT: when it is set, the per-stage
# files (gtest XML, the matmul bench's JSON, ncu's reports) go into one archive there.
if [[ -n "${OUT:-}" ]]; then
  mapfile -t stage_files < <(cd "$OUTDIR" && ls -A | grep -v -x -E \
    'gpu-check\.log|gpu-check\.json|bench-gpu\.json|opencl-gpu\.log|stage-files\.tar\.gz')
  if ((${#stage_files[@]})) &&
    tar -C "$OUTDIR" -czf "$OUTDIR/stage-files.tar.gz" "${stage_files[@]}" 2>>"$LOG"; then
    (cd "$OUTDIR" && rm -rf -- "${stage_files[@]}")
    echo "per-stage files: $OUTDIR/stage-files.tar.gz (${#stage_files[@]})" | tee -a "$LOG"
  fi
fi

if [[ -f "$TABLE" ]]; then
  echo | tee -a "$LOG"
  echo "================ benchmarks ================" | tee -a "$LOG"
  tee -a "$LOG" <"$TABLE"
fi
if [[ -s "$OCL_TABLE" ]]; then
  echo "" | tee -a "$LOG"
  echo "================ OpenCL (NVIDIA's driver, same GPU; CUDA figures above) ================" |
    tee -a "$LOG"
  tee -a "$LOG" <"$OCL_TABLE"
fi
exit "$code"
