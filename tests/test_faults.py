"""Pretraining survives its own faults: non-finite steps, out-of-memory batches, unreadable
files, and a kill (SIGKILL) or Ctrl-C (SIGINT) in any phase, resumed to the same bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pretraining import _states_equal, _tiny_config, _write_corpus, _write_toml

import pretraining.model as model_module
from layerprobe.results import load_results
from pretraining.faults import StepGuard, TrainingStopped
from pretraining.model import load_checkpoint
from pretraining.run import run_pretraining

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("faults") / "corpus", 10, seed=3)


def profiled_config(corpus: Path):
    return _tiny_config(corpus, num_threads=1).with_changes(
        schedule={"total_steps": 16}, train={"save_every": 3},
        profile={"enabled": True, "corpus": str(corpus), "probes": ["fbank", "phone"],
                 "metrics": ["pwcca-centred"], "every_steps": 4})


def pretrain(config_path: Path, out: Path, *extra: str, fault: str | None = None
             ) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAYERPROBE_FAULT": fault} if fault else \
        {k: v for k, v in os.environ.items() if k != "LAYERPROBE_FAULT"}
    return subprocess.run([sys.executable, "-m", "layerprobe", "pretrain", "--config",
                           str(config_path), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(config file, run folder) of the run every interrupted one must end equal to."""
    root = tmp_path_factory.mktemp("uninterrupted")
    config_path = _write_toml(profiled_config(corpus), root / "cfg.toml")
    done = pretrain(config_path, root / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    return config_path, root / "run"


def scores(run: Path) -> list:
    return [(r.label, r.probe, r.metric, r.scores, r.std) for r in load_results(run)]


def assert_same_run(a: Path, b: Path) -> None:
    for i in (1, 2):
        m_a, _, _ = load_checkpoint(a / f"it{i}" / "ckpt.pt")
        m_b, _, _ = load_checkpoint(b / f"it{i}" / "ckpt.pt")
        assert _states_equal(m_a.state_dict(), m_b.state_dict())
        for name in ("labels.pt",):
            la, lb = torch.load(a / f"it{i}" / name), torch.load(b / f"it{i}" / name)
            assert la["labels"].keys() == lb["labels"].keys()
            assert all(torch.equal(la["labels"][k], lb["labels"][k]) for k in la["labels"])
    assert scores(a / "profile.json") == scores(b / "profile.json")
    assert scores(a / "curve.json") == scores(b / "curve.json")


# the phase, and what the run folder holds when a kill lands there (proving where it landed)
PHASES = {
    "labels-features": lambda run: not (run / "it1" / "labels.pt").exists(),
    "labels-kmeans": lambda run: not (run / "it1" / "labels.pt").exists(),
    "labels-assign": lambda run: not (run / "it1" / "labels.pt").exists(),
    "train-step@5": lambda run: (run / "it1" / "labels.pt").is_file()
    and (run / "state.pt").is_file() and not (run / "it1" / "ckpt.pt").exists(),
    "write:ckpt.pt": lambda run: not (run / "it1" / "ckpt.pt").exists()
    and any((run / "it1").glob(".ckpt.pt.*.tmp")),
    "profile": lambda run: (run / "it1" / "ckpt.pt").is_file()
    and not (run / "it1" / "probe.json").exists(),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_kill_in_any_phase_resumes_to_the_same_bits(uninterrupted, tmp_path, phase):
    config_path, reference = uninterrupted
    run = tmp_path / "run"
    killed = pretrain(config_path, run, fault=phase)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert f"fault injection: SIGKILL at {phase.split('@')[0]}" in killed.stderr
    assert PHASES[phase](run), f"the kill did not land in {phase}"
    resumed = pretrain(config_path, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list(run.rglob(".*.tmp"))  # interrupted writes were cleaned up
    assert_same_run(reference, run)


def test_ctrl_c_exits_130_and_resumes_to_the_same_bits(uninterrupted, tmp_path):
    config_path, reference = uninterrupted
    run = tmp_path / "run"
    stopped = pretrain(config_path, run, fault="train-step@7:sigint")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "interrupted" in stopped.stderr and "Traceback" not in stopped.stderr
    resumed = pretrain(config_path, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, run)


def test_a_diverging_run_stops_with_one_error_line_and_resumes_after_lowering_lr(corpus,
                                                                                  tmp_path):
    cfg = _tiny_config(corpus, num_threads=1).with_changes(
        train={"lr": 1e4, "max_bad_steps": 3, "log_every": 1})
    config_path = _write_toml(cfg, tmp_path / "cfg.toml")
    failed = pretrain(config_path, tmp_path / "run")
    assert failed.returncode == 1
    errors = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in failed.stderr
    message = errors[0]
    assert message.startswith("layerprobe pretrain: error: iteration 1, steps ")
    assert "3 steps in a row had a non-finite loss or gradient" in message
    assert "lower [train] lr" in message and "--resume" in message
    assert "the last saved state is" in message or "no state of iteration 1" in message
    sane = _write_toml(cfg.with_changes(train={"lr": 2e-3}), tmp_path / "sane.toml")
    resumed = pretrain(sane, tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming with [train] lr: 10000.0 → 0.002" in resumed.stderr
    history = json.loads((tmp_path / "run" / "config.json").read_text())["resumed_with"]
    assert history[0]["changes"] == ["[train] lr: 10000.0 → 0.002"]


def _inject(monkeypatch, fail_calls: set[int], error: Exception) -> None:
    """PretrainStep.forward raises ``error`` on the given calls (counted from 0)."""
    real = model_module.PretrainStep.forward
    calls: list[int] = []

    def forward(self, *args, **kwargs):
        calls.append(len(calls))
        if calls[-1] in fail_calls:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(model_module.PretrainStep, "forward", forward)


def test_a_non_finite_step_is_skipped_and_counted(corpus, tmp_path, monkeypatch):
    cfg = _tiny_config(corpus).with_changes(schedule={"total_steps": 8},
                                            train={"log_every": 8})
    real = model_module.PretrainStep.forward
    calls: list[int] = []

    def forward(self, *args, **kwargs):
        calls.append(len(calls))
        loss, ce, acc, pen = real(self, *args, **kwargs)
        return (loss * float("nan"), ce, acc, pen) if calls[-1] == 1 else (loss, ce, acc, pen)

    monkeypatch.setattr(model_module.PretrainStep, "forward", forward)
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient; their updates"):
        run_pretraining(cfg, tmp_path / "run", **QUIET)
    _, _, meta = load_checkpoint(tmp_path / "run" / "it1" / "ckpt.pt")
    assert meta["train_stats"]["bad_steps_total"] == 1
    assert meta["train_stats"]["loss"] == meta["train_stats"]["loss"]  # the NaN left the mean


def test_step_guard_leaves_parameters_and_optimizer_state_untouched():
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    guard = StepGuard(opt, torch.device("cpu"), iteration=1, state_path=Path("state.pt"),
                      max_bad_steps=2, max_oom_batches=2)
    layer(torch.ones(1, 3)).sum().backward()
    assert bool(guard.check(torch.tensor(1.0), torch.ones(4)))
    opt.step()
    before = [p.detach().clone() for p in layer.parameters()]
    state = {k: v.clone() for k, v in opt.state[layer.weight].items()}
    assert not bool(guard.check(torch.tensor(float("inf")), torch.ones(4)))
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))
    assert all(torch.equal(v, opt.state[layer.weight][k]) for k, v in state.items())
    assert not bool(guard.check(torch.tensor(1.0), torch.tensor([float("nan")])))
    with pytest.raises(TrainingStopped, match="2 steps in a row"):
        guard.review(step=3)


def test_out_of_memory_batches_are_skipped_then_stop_the_run(corpus, tmp_path, monkeypatch):
    cfg = _tiny_config(corpus).with_changes(schedule={"total_steps": 8},
                                            train={"max_oom_batches": 2})
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
    _inject(monkeypatch, {2}, oom)
    with pytest.warns(RuntimeWarning, match="out of memory; batch skipped"):
        run_pretraining(cfg, tmp_path / "one", **QUIET)
    _, _, meta = load_checkpoint(tmp_path / "one" / "it2" / "ckpt.pt")
    assert meta["step"] == 5  # the skipped batch did not count as a step
    monkeypatch.undo()
    _inject(monkeypatch, set(range(3, 100)), oom)
    with pytest.raises(TrainingStopped, match="out of memory on 2 batches in a row") as err:
        run_pretraining(cfg, tmp_path / "many", **QUIET)
    assert "batch_seconds" in str(err.value) and "--resume" in str(err.value)


@pytest.mark.parametrize(("name", "remedy"), [
    ("state.pt", "delete it to restart the unfinished iteration"),
    ("it2/labels.pt", "redo the label stage"),
    ("plan.json", "delete the run folder"),
    ("config.json", "delete the run folder")])
def test_an_unreadable_run_file_is_named_with_what_to_do(corpus, tmp_path, capsys, name, remedy):
    from layerprobe.cli import main

    cfg = _tiny_config(corpus).with_changes(schedule={"total_steps": 8})
    run_pretraining(cfg, tmp_path / "run", stop_at=(2, 1), **QUIET)
    target = tmp_path / "run" / name
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk or a cut copy
    config_path = _write_toml(cfg, tmp_path / "cfg.toml")
    code = main(["pretrain", "--config", str(config_path), "--out", str(tmp_path / "run"),
                 "--resume"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"layerprobe pretrain: error: {target}: unreadable" in err and remedy in err
