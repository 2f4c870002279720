"""scripts/cpu_experiments.py's ordering: ``--longest-first`` starts the runs in order of their estimated wall time,
estimated from committed runs (a run's other seeds first, then its experiment, then every committed run)."""
from __future__ import annotations

import json

import pytest

from _slice import load_script


@pytest.fixture
def ce():
    return load_script("scripts/cpu_experiments.py", "cpu_experiments_under_test")  # fresh: the tests set its RESULTS


def _commit(results, run: str, experiment: str, wall: float) -> None:
    (results / run).mkdir(parents=True)
    (results / run / "results.json").write_text(json.dumps({"experiment": experiment, "status": "complete", "wall_time_s": wall}))


def test_cost_reads_the_other_seeds_then_the_experiment_then_every_run(ce, tmp_path):
    ce.RESULTS = tmp_path
    assert ce.cost(("vit_s0", "cifar10_frac10_cpulong_vit", 0, [])) == 0.0  # nothing committed yet
    _commit(tmp_path, "vit_s0", "cifar10_frac10_cpulong_vit", 100.0)
    _commit(tmp_path, "vit_e25_s0", "cifar10_frac10_cpulong_vit", 30.0)
    _commit(tmp_path, "convmixer_s0", "cifar10_frac10_cpulong_convmixer", 200.0)
    _commit(tmp_path, "convmixer_s1", "cifar10_frac10_cpulong_convmixer", 300.0)
    assert ce.cost(("convmixer_s2", "cifar10_frac10_cpulong_convmixer", 2, [])) == 250.0  # its seeds
    assert ce.cost(("vit_s1", "cifar10_frac10_cpulong_vit", 1, [])) == 100.0  # not vit_e25's 30 s
    assert ce.cost(("vit_lr5e-4_s0", "cifar10_frac10_cpulong_vit", 0, ["lr=5e-4"])) == 65.0  # its experiment
    assert ce.cost(("mixer_s0", "cifar10_frac10_cpulong_mixer", 0, [])) == 157.5  # every committed run


@pytest.mark.parametrize("protocol", ["16", "long"])
def test_longest_first_lists_the_plan_in_order_of_estimated_wall_time(ce, capsys, protocol):
    assert ce.main(["--protocol", protocol, "--longest-first", "--list"]) == 0
    names = [line[7:].split()[0] for line in capsys.readouterr().out.splitlines()]  # 'done   run …' / 'to do  run …'
    items = {item[0]: item for item in ce.plan(None, protocol)}
    assert sorted(names) == sorted(items)  # every run of the plan, once
    costs = [ce.cost(items[n]) for n in names]
    assert costs == sorted(costs, reverse=True)


def test_the_20_percent_protocol_is_the_10_percent_one_on_the_20_percent_split(ce):
    """--protocol long20: the chosen V-HMN and the ViT, seed 0, with the converged protocol's experiments but for the
    split (the committed stratified 20 %: 10,000 images); their results go to results/cpu20long."""
    from vhmn.experiments import load_experiment

    items = ce.plan(None, "long20")
    assert [(run, seed) for run, _, seed, _ in items] == [(f"{ce.CHOSEN}_s0", 0), ("vit_s0", 0)]
    assert items[0][3] == ce.CANDIDATES[ce.CHOSEN] and items[1][3] == []
    for run, experiment, _, _ in items:
        twenty, ten = load_experiment(experiment), load_experiment(experiment.replace("frac20", "frac10"))
        assert twenty["subset"] == "cifar10_frac20" and ten["subset"] == "cifar10_frac10"
        assert {k: v for k, v in twenty.items() if k not in ("subset", "description", "name")} == \
               {k: v for k, v in ten.items() if k not in ("subset", "description", "name")}
