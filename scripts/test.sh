#!/usr/bin/env bash
# The test command: set up, install the synthesizer (Debian packages) when possible, lint, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v festival >/dev/null 2>&1 || ! command -v flite >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        bash scripts/install_synth_deps.sh
    else
        echo "festival/flite missing and not root: synth tests will be skipped" >&2
    fi
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
