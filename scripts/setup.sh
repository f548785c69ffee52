#!/usr/bin/env bash
# Installs the build and test dependencies (Debian packages, PyPI packages) and builds
# Kestrel into build/ with warnings as errors. Safe to run again. The CUDA backend is built
# when the CUDA compiler is installed and a GPU answers nvidia-smi (KESTREL_CUDA=ON or OFF
# overrides), so that the demo and the tests use the GPU on a GPU machine. The OpenCL backend
# is built when the OpenCL headers, ICD loader and PoCL (OpenCL on the CPU, so that its tests run
# anywhere) install (KESTREL_OPENCL=ON or OFF overrides; OFF installs nothing for it).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" != 0 ] && SUDO=sudo
need=()
for pkg in cmake ninja-build g++ libgtest-dev python3-venv libcli11-dev nlohmann-json3-dev libpcre2-dev libutf8proc-dev pkg-config python3 python3-pip; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if ! python3 -c "import numpy, gguf, tokenizers, sentencepiece, matplotlib, jinja2" 2>/dev/null; then
  python3 -m pip install -q -r requirements.txt 2>/dev/null ||
    python3 -m pip install -q --break-system-packages -r requirements.txt
fi
opencl=${KESTREL_OPENCL:-}
if [ "$opencl" != OFF ]; then
  ocl_pkgs=(ocl-icd-opencl-dev opencl-c-headers pocl-opencl-icd)
  ocl_need=()
  for pkg in "${ocl_pkgs[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || ocl_need+=("$pkg")
  done
  if [ ${#ocl_need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${ocl_need[@]}"; } ||
      echo "setup: the OpenCL packages did not install; building without the OpenCL backend" >&2
  fi
  if [ -z "$opencl" ]; then
    opencl=ON
    for pkg in "${ocl_pkgs[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || opencl=OFF; done
  fi
fi
# Oclgrind, an OpenCL simulator that checks every memory access of the kernels (the
# opencl_oclgrind test; skipped without it).
if [ "$opencl" = ON ] && ! dpkg -s oclgrind >/dev/null 2>&1; then
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
      --no-install-recommends oclgrind; } || echo "setup: oclgrind did not install" >&2
fi
# A second OpenCL implementation for the tests: Intel's CPU runtime from PyPI, which has
# cl_khr_fp16 (the half-arithmetic kernels) where PoCL has not (KESTREL_INTEL_OPENCL=OFF skips it).
intel_icd=""
if [ "$opencl" = ON ] && [ "${KESTREL_INTEL_OPENCL:-ON}" != OFF ] && [ "$(uname -m)" = x86_64 ]; then
  intel_icd=$(bash scripts/setup-intel-opencl.sh) ||
    { echo "setup: Intel's OpenCL runtime did not install; its OpenCL tests are left out" >&2; intel_icd=""; }
fi
cuda=${KESTREL_CUDA:-OFF}
if [ -z "${KESTREL_CUDA:-}" ] && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
  command -v nvcc >/dev/null && cuda=ON
fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DKESTREL_WERROR=ON -DKESTREL_CUDA="$cuda" \
  -DKESTREL_OPENCL="$opencl" -DKESTREL_CL_INTEL_ICD_DIR="$intel_icd" \
  >/dev/null
cmake --build build -j "$(nproc)"
