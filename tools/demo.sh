#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build, and generate a
# story from the bundled test model (../shared/models/stories260K.gguf).
# Usage: bash tools/demo.sh [MODEL] [PROMPT]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
model="${1:-$root/../shared/models/stories260K.gguf}"
prompt="${2:-Once upon a time}"
if [ ! -f "$model" ]; then
  echo "pdserve demo: no model at $model" >&2
  echo "Put a GGUF model there (the project expects ../shared/models/stories260K.gguf" >&2
  echo "beside the checkout), or pass one: bash tools/demo.sh path/to/model.gguf" >&2
  exit 1
fi
bash tools/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j"$(nproc)" --target pdctl > /dev/null
./build/bin/pdctl generate --model "$model" --prompt "$prompt" --max-tokens 256 \
    --temperature 0.8 --top-p 0.95 --seed 42
