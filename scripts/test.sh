#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every test through CTest: unit tests, backend op
# conformance against the scalar references, and end-to-end logits against the numpy
# reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ctest --test-dir build --output-on-failure -j "$(nproc)"
