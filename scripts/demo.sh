#!/usr/bin/env bash
# The main job: set up, pretrain a tiny HuBERT for 3 progressive iterations on the bundled corpus,
# profile every checkpoint, and draw the layerwise curves across iterations.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT="${1:-runs/demo}"
.venv/bin/layerprobe pretrain --config demo --out "$OUT" --resume
echo "layerwise curves across iterations: $OUT/profile.png (autoencoder index: $OUT/autoencoder.json)"
