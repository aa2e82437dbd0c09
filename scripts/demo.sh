#!/usr/bin/env bash
# `make demo`: the main job end to end on the built-in demo checkpoint (no download).
#   demo-checkpoint -> inspect -> expand --every 4 (8 -> 10 layers) -> verify-identity -> freeze-map
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
