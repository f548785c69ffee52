#!/usr/bin/env bash
# Synthesizes llama2-7b Q4_0 (random weights, real shapes) into $MODELS (default
# /tmp/kestrel-models) unless it is there, with the gguf wheel .gpu-deps carries. Source it: it
# sets `model`; the synthesis runs in the background (`wait` before the first use).
models=${MODELS:-/tmp/kestrel-models}
model=$models/llama2-7b-q4_0.gguf
mkdir -p "$models"
if ! python3 -c 'import gguf' 2>/dev/null; then  # as gpu-check.sh: the carried wheel
  python3 -m zipfile -e "$(find .gpu-deps/wheels -name 'gguf-*.whl' | head -n 1)" /tmp/gguf-site
  export PYTHONPATH=/tmp/gguf-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ ! -s $model ]]; then
  (python3 scripts/synth_gguf.py --out "$model.tmp" --shape llama2-7b --type q4_0 \
    --scale-range 0.002,0.02 >/tmp/synth.log 2>&1 && mv "$model.tmp" "$model") &
fi
