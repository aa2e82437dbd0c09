#!/usr/bin/env bash
# `make demo`: the main job end to end on the built-in demo checkpoint (no download).
#   demo-checkpoint -> inspect -> expand --every 4 (8 -> 10 layers) -> verify-identity -> freeze-map
#   -> verify-frozen (the expanded folder audited against its own digests)
#   -> a few training steps (scripts/demo_train.py) -> verify-frozen --report
# LLAMAPRO=/path/to/llamapro runs another installation (default: .venv/bin/llamapro); PYTHON the
# interpreter of the training steps (default: the python beside llamapro, else python3).
set -euo pipefail
dir="${1:-demo-out}"
llamapro="${LLAMAPRO:-.venv/bin/llamapro}"
python="${PYTHON:-$(dirname "$llamapro")/python}"
[[ -n "${PYTHON:-}" || ( "$llamapro" == */* && -x "$python" ) ]] || python=python3
rm -rf "$dir"
mkdir -p "$dir"
step() { printf '\n== %s\n' "$*" >&2; }

step "llamapro demo-checkpoint $dir/llama-demo"
"$llamapro" demo-checkpoint "$dir/llama-demo"

step "llamapro inspect $dir/llama-demo"
"$llamapro" inspect "$dir/llama-demo"

step "llamapro expand --every 4 --in $dir/llama-demo --out $dir/llama-demo-pro --digests"
"$llamapro" expand --every 4 --in "$dir/llama-demo" --out "$dir/llama-demo-pro" --digests

step "llamapro inspect $dir/llama-demo-pro"
"$llamapro" inspect "$dir/llama-demo-pro"

step "llamapro verify-identity --out $dir/llama-demo-pro"
"$llamapro" verify-identity --out "$dir/llama-demo-pro"

step "llamapro freeze-map $dir/llama-demo-pro"
"$llamapro" freeze-map "$dir/llama-demo-pro"

step "llamapro freeze-map $dir/llama-demo-pro --format axolotl"
"$llamapro" freeze-map "$dir/llama-demo-pro" --format axolotl

step "llamapro verify-frozen --map $dir/llama-demo-pro --trained $dir/llama-demo-pro"
"$llamapro" verify-frozen --map "$dir/llama-demo-pro" --trained "$dir/llama-demo-pro"

step "python scripts/demo_train.py $dir/llama-demo-pro $dir/llama-demo-trained --layers 4   (3 SGD steps on new layer 4 only)"
"$python" scripts/demo_train.py "$dir/llama-demo-pro" "$dir/llama-demo-trained" --layers 4

step "llamapro verify-frozen --map $dir/llama-demo-pro --trained $dir/llama-demo-trained --report"
"$llamapro" verify-frozen --map "$dir/llama-demo-pro" --trained "$dir/llama-demo-trained" --report

printf '\ndemo finished: %s/llama-demo-pro is an exact 10-layer expansion of %s/llama-demo\n' "$dir" "$dir" >&2
