#!/usr/bin/env bash
# The OpenCL backend on an NVIDIA GPU machine (a bare Ubuntu with the CUDA toolkit and the
# driver, .gpu-deps/ from scripts/pack-gpu-deps.sh carried along), from the repository root:
#
#   1. environment: NVIDIA's OpenCL ICD registered through OCL_ICD_VENDORS (a driver container
#      often has libnvidia-opencl.so.1 but no /etc/OpenCL/vendors entry), the CUDA toolkit's
#      OpenCL headers and ICD loader, .gpu-deps for PCRE2 / utf8proc, the gguf wheel
#   2. build build-ocl-gpu (-DKESTREL_OPENCL=ON, no CUDA): kestrel and kestrel_tests
#   3. the conformance tests on OpenCL (KESTREL_GPU_BACKEND=opencl, KESTREL_OPS_REPORT=1), the
#      program cache tests and the end-to-end logits (-ngl 99)
#   4. unless --no-bench: llama2-7b Q4_0 (synthetic, ANCHORS.md scales) pp512 and the seed's case
#      (327 tokens, -c 512 -b 128 -ub 16 -ctk q4_0 -ctv q4_0), with the cold and warm setup time
#
#   bash scripts/check-opencl-gpu.sh [--no-bench] [--no-tests] [--profile (per-op times too)]
#                                    [--seed-only (of the benchmarks, only the seed's case: its
#                                     row, its sweep and with --profile its per-op times)]
#                                    [--bench-first (the benchmarks before the tests, for a call
#                                     whose time limit may cut the tests short)]
#
# Environment: OCL_GPU_WORK (models; default /tmp/kestrel-ocl-gpu), OCL_GPU_BUILD (build-ocl-gpu),
# NVIDIA_OPENCL_LIB (libnvidia-opencl.so.1 when not found by itself), OCL_SWEEP_PP and
# OCL_SWEEP_SEED (settings to measure beside the defaults, ';'-separated, each a space-separated
# list of VAR=VALUE: pp512, resp. the seed's case, once per setting, in rows "| sweep ..."),
# OCL_SAVE_BINARY=1 (the program cache's file to $OUT: on NVIDIA's driver it holds the PTX). Output goes to stdout and,
# when $OUT is set, $OUT/opencl-gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
BENCH=1 TESTS=1 PROFILE=0 BENCH_FIRST=0 SEED_ONLY=0
for a in "$@"; do
  case "$a" in
    --no-bench) BENCH=0 ;;
    --bench-first) BENCH_FIRST=1 ;;
    --no-tests) TESTS=0 ;;
    --profile) PROFILE=1 ;;
    --seed-only) SEED_ONLY=1 ;;
    *) echo "check-opencl-gpu: unknown option $a" >&2; exit 2 ;;
  esac
done
WORK=${OCL_GPU_WORK:-/tmp/kestrel-ocl-gpu}
BUILD=${OCL_GPU_BUILD:-build-ocl-gpu}
mkdir -p "$WORK/models"
LOG=${OUT:+$OUT/opencl-gpu.log}
LOG=${LOG:-$WORK/opencl-gpu.log}
exec > >(tee -a "$LOG") 2>&1

# --- 1. environment ------------------------------------------------------------------------------
[[ -d /usr/local/cuda/bin ]] && export PATH="/usr/local/cuda/bin:$PATH"
lib=${NVIDIA_OPENCL_LIB:-}
for c in /usr/local/nvidia/lib64/libnvidia-opencl.so.1 /usr/lib/x86_64-linux-gnu/libnvidia-opencl.so.1 \
  $(ldconfig -p 2>/dev/null | awk '/libnvidia-opencl.so.1/ {print $NF}'); do
  [[ -z "$lib" && -e "$c" ]] && lib=$c
done
if [[ -n "$lib" ]]; then
  mkdir -p /tmp/icd && echo "$lib" >/tmp/icd/nvidia.icd
  export OCL_ICD_VENDORS=/tmp/icd
  echo "icd: $lib (OCL_ICD_VENDORS=/tmp/icd)"
else
  echo "icd: libnvidia-opencl.so.1 not found (set NVIDIA_OPENCL_LIB)"
fi
cl_flags=()
for inc in /usr/local/cuda/include /usr/local/cuda/targets/x86_64-linux/include; do
  [[ -e $inc/CL/cl.h ]] && cl_flags+=("-DOpenCL_INCLUDE_DIR=$inc") && break
done
for l in /usr/local/cuda/lib64/libOpenCL.so /usr/local/cuda/targets/x86_64-linux/lib/libOpenCL.so \
  /usr/local/cuda/lib64/libOpenCL.so.1; do
  [[ -e $l ]] && cl_flags+=("-DOpenCL_LIBRARY=$l") && break
done
echo "opencl: ${cl_flags[*]:-system headers and loader}"
DEPS=$ROOT/.gpu-deps
[[ -d $DEPS/lib/pkgconfig ]] && export PKG_CONFIG_PATH="$DEPS/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
command -v pkg-config >/dev/null || command -v pkgconf >/dev/null ||
  export PKG_CONFIG="$ROOT/scripts/pkg-config-lite.py"
if ! python3 -c 'import gguf' 2>/dev/null; then
  wheel=$(find "$DEPS/wheels" -name 'gguf-*.whl' 2>/dev/null | head -n 1)
  [[ -n "$wheel" && ! -d "$WORK/site/gguf" ]] && python3 -m zipfile -e "$wheel" "$WORK/site"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1
# The devices' OpenCL versions and extensions (no clinfo there): which of cl_khr_command_buffer,
# the subgroup and fp16 extensions the driver has decides what the backend can use next.
cat >"$WORK/cl_ext.c" <<'C'
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <stdio.h>
int main(void) {
  cl_platform_id p[8];
  cl_uint np = 0;
  if (clGetPlatformIDs(8, p, &np) != CL_SUCCESS) return 1;
  for (cl_uint i = 0; i < np; ++i) {
    cl_device_id d[8];
    cl_uint nd = 0;
    if (clGetDeviceIDs(p[i], CL_DEVICE_TYPE_ALL, 8, d, &nd) != CL_SUCCESS) continue;
    for (cl_uint j = 0; j < nd; ++j) {
      char name[256] = "", version[256] = "", ext[16384] = "";
      clGetDeviceInfo(d[j], CL_DEVICE_NAME, sizeof name, name, NULL);
      clGetDeviceInfo(d[j], CL_DEVICE_VERSION, sizeof version, version, NULL);
      clGetDeviceInfo(d[j], CL_DEVICE_EXTENSIONS, sizeof ext, ext, NULL);
      printf("cl device %u.%u: %s (%s)\n  extensions: %s\n", i, j, name, version, ext);
    }
  }
  return 0;
}
C
inc=$(printf '%s\n' "${cl_flags[@]}" | sed -n 's/^-DOpenCL_INCLUDE_DIR=//p')
libcl=$(printf '%s\n' "${cl_flags[@]}" | sed -n 's/^-DOpenCL_LIBRARY=//p')
cc -I"${inc:-/usr/include}" "$WORK/cl_ext.c" ${libcl:+"$libcl"} ${libcl:+-Wl,-rpath,"$(dirname "$libcl")"} \
  $([[ -z $libcl ]] && echo -lOpenCL) -o "$WORK/cl_ext" 2>"$WORK/cl_ext.log" && "$WORK/cl_ext" ||
  echo "cl devices: could not list ($(head -c 200 "$WORK/cl_ext.log"))"

MODEL=$WORK/models/llama2-7b-q4_0.gguf
if ((BENCH)) && [[ ! -s $MODEL ]]; then
  (timeout 300 python3 scripts/synth_gguf.py --out "$MODEL.tmp" --shape llama2-7b --type q4_0 \
    --scale-range 0.002,0.02 >"$WORK/synth.log" 2>&1 && mv "$MODEL.tmp" "$MODEL") &
  SYNTH=$!
fi

# --- 2. build ------------------------------------------------------------------------------------
t=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKESTREL_OPENCL=ON -DKESTREL_CUDA=OFF \
  "${cl_flags[@]}" >"$WORK/configure.log" 2>&1 || { tail -n 30 "$WORK/configure.log"; exit 1; }
targets=(kestrel)
((TESTS)) && targets+=(kestrel_tests)
((BENCH)) && targets+=(kestrel_gpu_matmul_bench)
cmake --build "$BUILD" -j "$(nproc)" --target "${targets[@]}" >"$WORK/build.log" 2>&1 ||
  { grep -E -A5 'error|FAILED' "$WORK/build.log" | head -n 60; exit 1; }
echo "build: $(($(date +%s) - t)) s"
export KESTREL_CL_CACHE_DIR=$WORK/cl-cache
rm -rf "$KESTREL_CL_CACHE_DIR"

# --- 3. tests ------------------------------------------------------------------------------------
rc=0
run_tests() {
  t=$(date +%s)
  KESTREL_GPU_BACKEND=opencl KESTREL_OPS_REPORT=1 timeout 420 "$BUILD/bin/kestrel_tests" \
    --gtest_filter='*Gpu*:OpenclCache*' --gtest_brief=1 || rc=1
  # The former defaults, the template's local tiles (KESTREL_CL_NV_FRAG=0) with a matmul_reduce
  # launch for split-K sums (KESTREL_CL_NV_REDUCE=launch): the matmul and chain suites again.
  KESTREL_CL_NV_REDUCE=launch KESTREL_CL_NV_FRAG=0 KESTREL_GPU_BACKEND=opencl timeout 180 \
    "$BUILD/bin/kestrel_tests" --gtest_filter='*GpuOpsMatmul*Q4_0*:*GpuOpsMatmul*Q8_0*:*GpuOpsChain*' \
    --gtest_brief=1 || rc=1
  echo "tests: rc $rc, $(($(date +%s) - t)) s"
  # End to end through NVIDIA's driver (its default kernels: the tensor-core matmuls where the
  # probe passes), every weight and KV type with uneven chunkings, within a time budget.
  t=$(date +%s)
  timeout 240 python3 tests/e2e/test_e2e.py --kestrel "$BUILD/bin/kestrel" --workdir "$WORK/e2e" \
    --kestrel-args "--backend opencl -ngl 99" --jobs 8 --budget 150 --timeout 60 2>&1 |
    grep -E '^  FAIL|  FAIL  |^e2e: [0-9]|reproduce' || rc=1
  # Passes replayed from command buffers (KESTREL_CL_RECORD=1, where the driver has them: the
  # device list above says; else the backend says why not and runs them eagerly).
  KESTREL_CL_RECORD=1 timeout 150 python3 tests/e2e/test_e2e.py --kestrel "$BUILD/bin/kestrel" \
    --workdir "$WORK/e2e-recorded" --kestrel-args "--backend opencl -ngl 99" --jobs 8 --budget 90 \
    --timeout 60 2>&1 | grep -E '^  FAIL|  FAIL  |^e2e: [0-9]|reproduce|not recording' || rc=1
  echo "e2e: rc $rc, $(($(date +%s) - t)) s"
}

# --- 4. bench ------------------------------------------------------------------------------------
run_bench() {
  # sweep NAME FLAGS...: the case once per setting of OCL_SWEEP_<NAME>, its rows relabelled.
  sweep() {
    local list=$1 setting settings
    shift
    IFS=';' read -ra settings <<<"$list"
    for setting in "${settings[@]}"; do
      [[ -z "${setting// /}" ]] && continue
      # shellcheck disable=SC2086  # the setting is a list of words
      env $setting timeout 120 $b -r 2 "$@" 2>&1 | sed "/^| llama/s/^| /| sweep [$setting] /" || true
    done
  }
  # The matmuls alone and the launch floor (bench/gpu_matmul_bench.cpp): the defaults, the former
  # defaults and the fragment kernel loading 8 blocks at once. First:
  # they need no model (it is still being written) and the floor decides the next step.
  local mm_settings=("" "KESTREL_CL_NV_FRAG=0 KESTREL_CL_NV_REDUCE=launch" "KESTREL_CL_NV_FRAG_NB=8")
  ((SEED_ONLY)) && mm_settings=()
  for setting in "${mm_settings[@]}"; do
    echo "matmul bench ${setting:-defaults}:"
    # shellcheck disable=SC2086  # the setting is a list of words
    env $setting timeout 90 "$BUILD/bin/kestrel_gpu_matmul_bench" --backend opencl --tokens 1,16 \
      --ms 20 || true
  done
  [[ -n ${SYNTH:-} ]] && wait "$SYNTH"
  if [[ ! -s $MODEL ]]; then
    echo "bench: no model ($(tail -n 3 "$WORK/synth.log"))"
    rc=1
    return
  fi
  rm -rf "$KESTREL_CL_CACHE_DIR"
  b="$BUILD/bin/kestrel bench -m $MODEL --backend opencl -ngl 99"
  seed=(-p 327 -n 0 -b 128 -ub 16 -ctk q4_0 -ctv q4_0)
  # The seed's 327 tokens chunk by chunk (the report's table): llama.cpp's fixed 128+128+71,
  # whose 71-token tail the seed found slow, and Kestrel's balanced 109 x 3. (After the cold
  # start below: these runs fill the program cache.)
  chunk_tables() {
    local chunking
    for chunking in fixed balanced; do
      timeout 120 "$BUILD/bin/kestrel" run -m "$MODEL" --tokens "$(seq -s, 100 426)" -n 0 -c 512 \
        -b 128 -ub 16 -ctk q4_0 -ctv q4_0 --backend opencl -ngl 99 --chunking "$chunking" \
        --report 2>&1 | grep -E '^\| [0-9] \||^prompt:' | sed "s/^/chunks $chunking: /"
    done
  }
  if ((SEED_ONLY)); then
    chunk_tables
    timeout 240 $b -r 3 "${seed[@]}" || rc=1
    sweep "${OCL_SWEEP_SEED-KESTREL_CL_NV_FRAG_NB=4}" "${seed[@]}"
    ((PROFILE)) && { timeout 200 $b -r 1 "${seed[@]}" --profile || true; }
    return
  fi
  for start in cold warm; do
    "$BUILD/bin/kestrel" run -m "$MODEL" --tokens 1,2,3,4,5,6,7,8 -n 0 --backend opencl -ngl 99 \
      --report 2>&1 | grep -E 'backend|load|prompt:' | sed "s/^/$start: /"
  done
  chunk_tables
  timeout 240 $b -r 3 -p 512 -n 0 || rc=1
  # (Earlier A/B rows, now defaults: float4 local reads, KESTREL_CL_TILED_SCALAR=1, the key
  # split of attention_block, KESTREL_CL_ATT_SPLITS=0, the tiled kernel's step-ahead loads,
  # KESTREL_CL_TILED_PREFETCH=0, mid-sized batches on the tiled template,
  # KESTREL_CL_MID_KERNEL=mid, and their split-K target, KESTREL_CL_MID_GROUPS_PER_CU=4
  # KESTREL_CL_MID_MAX_SPLITS=8; src/backend/opencl/NOTES.md.)
  timeout 240 $b -r 3 "${seed[@]}" || rc=1
  timeout 120 $b -r 3 -p 0 -n 32 || rc=1
  KESTREL_CL_RECORD=1 timeout 120 $b -r 3 -p 0 -n 32 2>&1 |
    sed "/^| llama/s/^| /| KESTREL_CL_RECORD=1 /" || true
  # Unless given, the seed's case is also measured with the former defaults (the template's local
  # tiles, a reduce launch), the opt-in command buffers, and the fragment kernel loading 4 blocks
  # at once (src/backend/opencl/NOTES.md).
  sweep "${OCL_SWEEP_PP:-}" -p 512 -n 0
  sweep "${OCL_SWEEP_SEED-KESTREL_CL_NV_FRAG=0 KESTREL_CL_NV_REDUCE=launch;KESTREL_CL_RECORD=1;KESTREL_CL_NV_FRAG_NB=4}" "${seed[@]}"
  if ((PROFILE)); then
    timeout 200 $b -r 1 -p 512 -n 0 --profile || true
    timeout 200 $b -r 1 "${seed[@]}" --profile || true
  fi
}
((TESTS && !BENCH_FIRST)) && run_tests
((BENCH)) && run_bench
((TESTS && BENCH_FIRST)) && run_tests
if [[ ${OCL_SAVE_BINARY:-0} == 1 && -n ${OUT:-} ]]; then
  cp "$KESTREL_CL_CACHE_DIR"/*.bin "$OUT/" 2>/dev/null || echo "no program binary to save"
fi
exit $rc
