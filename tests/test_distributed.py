"""Scoring under torchrun: 2 CPU processes (gloo) give the scores of one process (1e-9)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from layerprobe.distributed import Dist, init_distributed
from layerprobe.results import load_results
from tests.model_fixtures import save_native_from_hf, tiny_hf_model


def test_single_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist_info, device = init_distributed("cpu")
    assert dist_info == Dist() and device.type == "cpu"
    assert dist_info.main and not dist_info.enabled
    assert dist_info.all_gather_object(3) == [3] and dist_info.gather_object("x") == ["x"]


def test_torchrun_with_one_process_joins_the_group(monkeypatch):
    """``torchrun --nproc_per_node 1`` runs the collective path (DDP, NCCL on a GPU) too."""
    import socket

    import torch.distributed as dist

    from layerprobe.distributed import destroy_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "1", "RANK": "0",
                       "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    dist_info, device = init_distributed("cpu")
    try:
        assert dist_info.launched and dist_info.enabled and dist.is_initialized()
        assert dist.get_world_size() == 1 and device.type == "cpu"
        assert dist_info.all_gather_object({"a": 1}) == [{"a": 1}]
    finally:
        destroy_distributed(dist_info)
    assert not dist.is_initialized()


def _run(cmd: list[str], cwd, retry_dir=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    if done.returncode != 0 and any(s in done.stderr.lower() for s in
                                    ("address already in use", "rendezvous", "eaddrinuse")):
        # another process on the machine took the free port torchrun picked: try once more
        if retry_dir is not None:
            shutil.rmtree(retry_dir, ignore_errors=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    return done


@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one_process(tmp_path):
    spec = save_native_from_hf(tiny_hf_model("hubert", seed=0), tmp_path / "m" / "ckpt.pt")
    args = ["--probe", "fbank", "--probe", "phone", "--probe", "word", "--metric", "pwcca",
            "--metric", "mi", "--max-utterances", "15", "--device", "cpu", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--standalone", "-m", "layerprobe"]
    plain = tmp_path / "plain.toml"
    plain.write_text("[cca]\nexact_sums = false\n")
    runs = {
        "one": [sys.executable, "-m", "layerprobe", "score", str(spec), str(spec)],
        "whole": [*torchrun, "score", str(spec), str(spec)],  # a checkpoint per rank
        "sharded": [*torchrun, "score", str(spec)],  # one checkpoint: utterances shared out
        # plain float64 sums, summed over the ranks in rank order
        "sharded_plain": [*torchrun, "score", str(spec), "--config", str(plain)],
    }
    results = {}
    for name, cmd in runs.items():
        n_models = cmd.count(str(spec))
        labels = ",".join("ab"[:n_models])
        done = _run([*cmd, *args, "--labels", labels, "--out", str(tmp_path / f"{name}.json")],
                    tmp_path)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        results[name] = load_results(tmp_path / f"{name}.json")
    one, whole, sharded = results["one"], results["whole"], results["sharded"]
    sharded_plain = results["sharded_plain"]
    assert {r.metric for r in one} == {"pwcca", "mi"}
    assert [(r.label, r.probe, r.metric) for r in one] == \
        [(r.label, r.probe, r.metric) for r in whole]
    for a, b in zip(one, whole, strict=True):  # the same computation on another rank
        np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=1e-9)
        assert b.meta["world_size"] == 1 and b.meta["n_utterances"] == a.meta["n_utterances"]
    first = [r for r in one if r.label == "a"]
    assert [(r.probe, r.metric) for r in first] == [(r.probe, r.metric) for r in sharded]
    for a, b in zip(first, sharded, strict=True):
        assert b.meta["world_size"] == 2 and b.meta["n_utterances"] == a.meta["n_utterances"]
        assert b.meta["audio_seconds"] == pytest.approx(a.meta["audio_seconds"])
        assert a.details.get("n_items") == b.details.get("n_items")
        # MI: items gathered back into utterance order, the same k-means; CCA: blocks of
        # utterances batched and folded in whole on either rank, added with compensated sums
        # (exact_sums): the moments are the single process's bits, so even the word probe
        # (0.9 train items per dimension: a warned, nearly under-determined fit, which turned
        # 1e-16 differences in plain float64 sums into 1e-7) scores the same
        tol = 1e-9
        print(f"{a.probe}/{a.metric}: max |sharded - one| = "
              f"{np.max(np.abs(np.subtract(b.scores, a.scores))):.3g}")
        np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=tol,
                                   err_msg=f"{a.probe}/{a.metric}")
        if a.std is not None:
            np.testing.assert_allclose(b.std, a.std, rtol=0, atol=tol)
    for a, b in zip(first, sharded_plain, strict=True):  # rounding apart (1e-7 on words)
        assert b.meta["config"]["exact_sums"] is False
        np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=1e-6,
                                   err_msg=f"{a.probe}/{a.metric}")
