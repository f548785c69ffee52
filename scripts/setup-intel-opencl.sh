#!/usr/bin/env bash
# Installs Intel's OpenCL runtime for CPUs from PyPI (intel-opencl-rt: no Debian package, no
# root needed) into .opencl-intel/ and writes an ICD directory for it, .opencl-intel/icd, so that
# OCL_ICD_VENDORS=$PWD/.opencl-intel/icd makes it the only OpenCL platform a program sees.
#
# Why a second OpenCL implementation: it has cl_khr_fp16 (PoCL 3.1 has not, nor does NVIDIA's
# driver), so the OpenCL backend's half-arithmetic kernels run somewhere we can test them, and
# its compiler is not PoCL's, so the kernels are checked for portability on two. Runs on any
# x86-64 CPU. Prints the ICD directory; exits non-zero (with a reason) when it cannot install.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.opencl-intel
version=2026.2.0
if [ ! -f "$dir/venv/lib/libintelocl.so" ]; then
  rm -rf "$dir"
  python3 -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install -q "intel-opencl-rt==$version" "intel-cmplr-lib-rt==$version" >&2
fi
lib=$(cd "$dir/venv/lib" && pwd)/libintelocl.so
[ -f "$lib" ] || { echo "setup-intel-opencl: $lib missing after the install" >&2; exit 1; }
mkdir -p "$dir/icd"
echo "$lib" >"$dir/icd/intel-cpu.icd"
cd "$dir/icd" && pwd
