#!/usr/bin/env bash
# `make demo`: the main job end to end on the built-in demo checkpoint (no download).
#   demo-checkpoint -> inspect -> expand --every 4 (8 -> 10 layers) -> verify-identity -> freeze-map
#   -> a few training steps (scripts/demo_train.py) -> verify-frozen --report
set -euo pipefail
dir="${1:-demo-out}"
bin=".venv/bin"
rm -rf "$dir"
mkdir -p "$dir"
step() { printf '\n== %s\n' "$*" >&2; }

step "llamapro demo-checkpoint $dir/llama-demo"
"$bin/llamapro" demo-checkpoint "$dir/llama-demo"

step "llamapro inspect $dir/llama-demo"
"$bin/llamapro" inspect "$dir/llama-demo"

step "llamapro expand --every 4 --in $dir/llama-demo --out $dir/llama-demo-pro --digests"
"$bin/llamapro" expand --every 4 --in "$dir/llama-demo" --out "$dir/llama-demo-pro" --digests

step "llamapro inspect $dir/llama-demo-pro"
"$bin/llamapro" inspect "$dir/llama-demo-pro"

step "llamapro verify-identity --out $dir/llama-demo-pro"
"$bin/llamapro" verify-identity --out "$dir/llama-demo-pro"

step "llamapro freeze-map $dir/llama-demo-pro"
"$bin/llamapro" freeze-map "$dir/llama-demo-pro"

step "llamapro freeze-map $dir/llama-demo-pro --format axolotl"
"$bin/llamapro" freeze-map "$dir/llama-demo-pro" --format axolotl

step "python scripts/demo_train.py $dir/llama-demo-pro $dir/llama-demo-trained --layers 4   (3 SGD steps on new layer 4 only)"
"$bin/python" scripts/demo_train.py "$dir/llama-demo-pro" "$dir/llama-demo-trained" --layers 4

step "llamapro verify-frozen --map $dir/llama-demo-pro --trained $dir/llama-demo-trained --report"
"$bin/llamapro" verify-frozen --map "$dir/llama-demo-pro" --trained "$dir/llama-demo-trained" --report

printf '\ndemo finished: %s/llama-demo-pro is an exact 10-layer expansion of %s/llama-demo\n' "$dir" "$dir" >&2
