#!/usr/bin/env bash
# The schedule study (pretraining/study.py): all four schedules x 3 training seeds on 2 h of
# synthetic speech, profiled on a held-out voice; results in runs/study, summary and figures in
# figures/study. Resumable: run it again after an interruption. About 4 h on 2 CPU cores.
#   bash scripts/schedule_study.sh            # the study
#   bash scripts/schedule_study.sh --smoke    # the same machinery at toy scale, a few minutes
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v festival >/dev/null 2>&1 || ! command -v flite >/dev/null 2>&1; then
    bash scripts/install_synth_deps.sh
fi
if [ "${1:-}" = "--smoke" ]; then
    shift
    exec .venv/bin/layerprobe study --smoke --seeds 2 --out "${STUDY_OUT:-runs/study_smoke}" "$@"
fi
exec .venv/bin/layerprobe study --out "${STUDY_OUT:-runs/study}" --figures figures/study "$@"
