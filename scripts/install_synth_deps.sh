#!/usr/bin/env bash
# Debian/Ubuntu packages needed by `layerprobe synth` and its tests (festival voices, flite, sox).
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends \
    festival festvox-us-slt-hts festvox-kallpc16k festvox-kdlpc16k festlex-cmu flite sox
