#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build, bring up a local
# cluster (router, one prefill and one decode worker) on the bundled test model
# (../shared/models/stories260K.gguf), and stream a completion from it.
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
cmake --build build -j"$(nproc)" --target pdctl pd-router pd-prefill pd-decode > /dev/null
out="$(mktemp)"
# port 0: the router takes a free port and pdctl up prints it
./build/bin/pdctl up --model "$model" --prefill 1 --decode 1 --port 0 > "$out" &
up=$!
trap 'kill -INT $up 2>/dev/null || true; wait $up 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 1 600); do
  grep -q "ready" "$out" && break
  kill -0 $up 2>/dev/null || { echo "pdserve demo: pdctl up failed" >&2; exit 1; }
  sleep 0.1
done
cat "$out"
endpoint="$(sed -n 's/.*client endpoint \(tcp:[^ ]*\).*/\1/p' "$out" | head -1)"
[ -n "$endpoint" ] || { echo "pdserve demo: the cluster did not come up" >&2; exit 1; }
echo "\$ pdctl complete --router $endpoint --prompt \"$prompt\" --max-tokens 256 ..."
printf '%s' "$prompt"
./build/bin/pdctl complete --router "$endpoint" --prompt "$prompt" --max-tokens 256 \
    --temperature 0.8 --top-p 0.95 --seed 42
