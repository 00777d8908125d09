"""The schedule study's smoke mode end to end, killed mid-way and resumed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

needs_festival = pytest.mark.skipif(shutil.which("festival") is None or
                                    shutil.which("flite") is None,
                                    reason="festival/flite not installed "
                                    "(scripts/install_synth_deps.sh)")


def study(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LAYERPROBE_FAULT"}
    if fault:
        env["LAYERPROBE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "layerprobe", "study", "--smoke", "--seeds", "2",
                           "--schedules", "original", "progressive", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=900,
                          env=env)


@needs_festival
def test_smoke_study_killed_mid_way_resumes_and_summarises(tmp_path):
    out = tmp_path / "study"
    killed = study(out, fault="train-step@40")  # in the second or third of the four runs
    assert killed.returncode == -9, killed.stderr[-3000:]
    finished = [p.parent for p in out.glob("*/seed*/time.json")]
    assert finished and not (out / "summary.json").exists()
    first_times = {p: json.loads((p / "time.json").read_text()) for p in finished}
    resumed = study(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run, record in first_times.items():  # finished runs were kept, not trained again
        assert json.loads((run / "time.json").read_text()) == record
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "layerprobe-study-v1"
    assert list(summary["schedules"]) == ["original", "progressive"]
    assert list(summary["schedules"]["progressive"])[:3] == ["it1", "it2", "it3"]
    it2 = summary["schedules"]["original"]["it2"]
    for measure in ("word_drop", "fbank_rise", "phone_proxy_best", "target_pnmi", "acc_masked"):
        assert it2[measure]["n"] == 2 and it2[measure]["std"] is not None
    base = summary["baselines"]
    assert 0 < base["log_mel"]["phone_proxy"] <= 1 and base["random_init"]["phone_proxy_best"]
    assert {"proxy_gain_over_log_mel", "pnmi_it2_over_it1"} <= set(summary["targets"])
    assert all({"a", "b", "measure", "seed_std_ratio", "finding"} <= set(c)
               for c in summary["comparisons"])
    for name in ("layerwise_final.png", "learning_curves.png", "iterations.png"):
        assert (out / "figures" / name).stat().st_size > 10_000
    assert "schedule differences beyond 3 seed stds" in resumed.stdout
