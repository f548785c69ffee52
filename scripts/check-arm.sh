#!/usr/bin/env bash
# Compiles every library source for aarch64 (NEON is its baseline) with warnings as errors,
# so the portable kernels keep building off x86. Installs the cross compiler if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  SUDO=""
  [ "$(id -u)" != 0 ] && SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The OpenCL backend's kernels, embedded as the build embeds them (opencl.cmake), so that its
# sources compile too; skipped where the OpenCL headers are not installed.
opencl=0
if [ -f /usr/include/CL/cl.h ]; then
  opencl=1
  mkdir -p "$out/gen/backend/opencl/kernels"
  for cl in src/backend/opencl/kernels/*.cl; do
    stem=$(basename "$cl" .cl)
    cmake -DIN="$cl" -DOUT="$out/gen/backend/opencl/kernels/${stem}_cl.h" -DNAME="$stem" \
      -P src/backend/opencl/embed_cl.cmake
  done
fi
for f in $(git ls-files 'src/*.cpp'); do
  case "$f" in src/backend/opencl/*) ((opencl)) || continue ;; esac
  aarch64-linux-gnu-g++ -std=c++20 -O2 -Wall -Wextra -Werror -Isrc -Iinclude -I"$out/gen" \
    -idirafter /usr/include -DCL_TARGET_OPENCL_VERSION=120 \
    -DKESTREL_VERSION='"arm-check"' -DKESTREL_GIT_VERSION='"arm-check"' -c "$f" -o "$out/obj.o"
done
echo "aarch64: every library source compiles$( ((opencl)) || echo ' (OpenCL backend skipped: no CL headers)')"
