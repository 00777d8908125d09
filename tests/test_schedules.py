"""Plans of the four schedules: budgets, layers, clusters; configs."""

from __future__ import annotations

import math

import pytest

from pretraining.config import PretrainConfig, config_dir
from pretraining.schedules import Plan, build_plan, split_steps

KW = dict(first_layer=3, last_layer=9, first_clusters=100, last_clusters=500)


def _rounded_linear(a: float, b: float, n: int) -> list[int]:
    # independent reference: evenly spaced points, rounded half up
    return [int(math.floor(a + (b - a) * k / (n - 1) + 0.5)) for k in range(n)]


@pytest.mark.parametrize("schedule", ["uniform", "progressive", "progressive-cluster"])
@pytest.mark.parametrize("n,total", [(2, 1000), (5, 12345), (10, 400_000), (3, 3)])
def test_schedules_steps_sum_to_budget(schedule, n, total):
    plan = build_plan(schedule, n, total, **KW)
    steps = [it.steps for it in plan.iterations]
    assert sum(steps) == total
    assert len(steps) == n and min(steps) >= 1
    assert [it.index for it in plan.iterations] == list(range(1, n + 1))
    assert plan.iterations[0].source == "mfcc" and plan.iterations[0].layer is None
    assert all(it.source == "layer" for it in plan.iterations[1:])


def test_schedules_uniform_equal_steps_constant_targets():
    plan = build_plan("uniform", 4, 1002, **KW)
    steps = [it.steps for it in plan.iterations]
    assert max(steps) - min(steps) <= 1
    assert [it.layer for it in plan.iterations[1:]] == [3, 3, 3]
    assert [it.clusters for it in plan.iterations] == [100, 500, 500, 500]


def test_schedules_progressive_rises_linearly():
    n, total = 5, 150_000
    plan = build_plan("progressive", n, total, **KW)
    steps = [it.steps for it in plan.iterations]
    expected = [total * i / (n * (n + 1) / 2) for i in range(1, n + 1)]
    assert all(abs(s - e) <= 1 for s, e in zip(steps, expected, strict=True))
    assert steps == sorted(steps)
    assert [it.layer for it in plan.iterations[1:]] == _rounded_linear(3, 9, n - 1)
    assert [it.clusters for it in plan.iterations] == [100] + [500] * (n - 1)


def test_schedules_progressive_cluster_clusters_rise():
    n = 5
    plan = build_plan("progressive-cluster", n, 10_000, **KW)
    assert [it.clusters for it in plan.iterations] == _rounded_linear(100, 500, n)
    assert [it.layer for it in plan.iterations[1:]] == _rounded_linear(3, 9, n - 1)
    assert [it.steps for it in plan.iterations] == \
        [it.steps for it in build_plan("progressive", n, 10_000, **KW).iterations]


def test_schedules_original_is_hubert_base():
    plan = build_plan("original", 2, 650_000, first_layer=6, last_layer=6, first_clusters=100,
                      last_clusters=500)
    assert [(it.steps, it.source, it.layer, it.clusters) for it in plan.iterations] == \
        [(250_000, "mfcc", None, 100), (400_000, "layer", 6, 500)]
    small = build_plan("original", 2, 130, **KW)
    assert [it.steps for it in small.iterations] == [50, 80]


def test_schedules_errors_name_the_problem():
    with pytest.raises(ValueError, match="exactly 2 iterations"):
        build_plan("original", 3, 100, **KW)
    with pytest.raises(ValueError, match="unknown"):
        build_plan("cosine", 3, 100, **KW)
    with pytest.raises(ValueError, match="less than the 4 iterations"):
        build_plan("uniform", 4, 3, **KW)
    with pytest.raises(ValueError, match="cluster counts"):
        build_plan("uniform", 2, 10, first_layer=1, last_layer=2, first_clusters=1,
                   last_clusters=5)


def test_schedules_split_steps_largest_remainder():
    assert split_steps(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(split_steps(1_000_003, [1, 2, 3, 4, 5, 6, 7])) == 1_000_003


def test_schedules_plan_round_trip_and_table():
    plan = build_plan("progressive-cluster", 3, 900, **KW)
    assert Plan.from_dict(plan.to_dict()) == plan
    table = plan.format()
    assert "progressive-cluster" in table and "layer 9" in table and "MFCC" in table


def test_schedules_bundled_configs_load():
    for path in sorted(config_dir().glob("*.toml")):
        cfg = PretrainConfig.from_toml(path)
        assert PretrainConfig.from_dict(cfg.to_dict()) == cfg


def test_schedules_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[schedule]\nname = 'uniform'\nsteps = 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['steps'\] in \[schedule\]"):
        PretrainConfig.from_toml(bad)
    bad.write_text("[schedule]\nname = 'zigzag'\n")
    with pytest.raises(ValueError, match="zigzag"):
        PretrainConfig.from_toml(bad)


@pytest.mark.parametrize(("table", "message"), [
    ("[train]\ncompile = 'maybe'", r"\[train\]: compile = 'maybe' must be true or false"),
    ("[train]\ngrad_accum = 2.5", r"\[train\]: grad_accum = 2.5 must be an integer"),
    ("[kmeans]\ntol = 'low'", r"\[kmeans\]: tol = 'low' must be a number"),
    ("[train]\nbetas = 0.9", r"\[train\]: betas = 0.9 must be a list"),
])
def test_schedules_config_rejects_values_of_the_wrong_type(tmp_path, table, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(table + "\n")
    with pytest.raises(ValueError, match=message) as info:
        PretrainConfig.from_toml(bad)
    assert "bad.toml" in str(info.value)
    bad.write_text("[train]\nlr = 1\n")  # an integer where a float is expected is a number
    assert PretrainConfig.from_toml(bad).train.lr == 1
