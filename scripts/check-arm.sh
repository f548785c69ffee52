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
for f in $(git ls-files 'src/*.cpp'); do
  aarch64-linux-gnu-g++ -std=c++20 -O2 -Wall -Wextra -Werror -Isrc -Iinclude -idirafter /usr/include \
    -DKESTREL_VERSION='"arm-check"' -DKESTREL_GIT_VERSION='"arm-check"' -c "$f" -o "$out/obj.o"
done
rm -rf "$out"
echo "aarch64: every library source compiles"
