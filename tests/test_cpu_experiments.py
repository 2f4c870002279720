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


@pytest.mark.parametrize("protocol, split, subset", [("long20", "frac20", "cifar10_frac20"), ("longlt", "lt100", "cifar10_lt100")])
def test_the_split_protocols_are_the_10_percent_one_on_another_split(ce, protocol, split, subset):
    """--protocol long20 / longlt: the chosen V-HMN and the ViT, seeds 0, 1, 2 in that order, with the converged
    protocol's experiments but for the split (the stratified 20 %: 10,000 images; the long-tailed: 12,408)."""
    from vhmn.experiments import load_experiment

    items = ce.plan(None, protocol)
    assert [(run, seed) for run, _, seed, _ in items] == [(name, s) for s in range(3) for name in (f"{ce.CHOSEN}_s{s}", f"vit_s{s}")]
    assert all(ov == (ce.CANDIDATES[ce.CHOSEN] if run.startswith(ce.CHOSEN) else []) for run, _, _, ov in items)
    assert ce.PROTOCOLS[protocol][1] == split
    for run, experiment, _, _ in items:
        other, ten = load_experiment(experiment), load_experiment(experiment.replace(split, "frac10"))
        assert other["subset"] == subset and ten["subset"] == "cifar10_frac10"
        assert {k: v for k, v in other.items() if k not in ("subset", "description", "name")} == \
               {k: v for k, v in ten.items() if k not in ("subset", "description", "name")}


def test_a_deadline_earlier_in_the_day_is_the_next_days(ce, monkeypatch, capsys):
    """--deadline 01:30 given at 23:40 means 01:30 of the next day: the runs start; one just passed stops them."""
    import datetime as dt

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2026, 12, 7, 23, 40, tzinfo=dt.timezone.utc)

    monkeypatch.setattr(ce.dt, "datetime", Clock)
    started = []
    monkeypatch.setattr(ce, "execute", lambda run, *a: started.append(run) or f"{run}: ran")
    monkeypatch.setattr(ce, "done", lambda run: False)
    first = ce.plan(None, "longlt")[0][0]
    assert ce.main(["--protocol", "longlt", "--runs", first, "--deadline", "01:30"]) == 0 and started == [first]
    assert ce.main(["--protocol", "longlt", "--runs", first, "--deadline", "23:30"]) == 0 and started == [first]
    assert "not started (deadline 23:30 UTC passed)" in capsys.readouterr().out


def test_keep_outputs_copies_the_checkpoint_and_evaluates_fresh_runs_and_backfills_old_ones(ce, tmp_path, monkeypatch):
    """A run that has just trained leaves its fp16 weights (the checkpoint run) and its evaluation (EVALUATED) in
    results/, replacing older ones; a run completed earlier gets only what is missing."""
    ce.RESULTS, ce.RUNS = tmp_path / "results", tmp_path / "runs"
    ce.CHECKPOINT_RUN, ce.EVALUATED = "a_s0", ("a_s0", "b_s0")
    evaluated = []
    monkeypatch.setattr(ce, "evaluate", lambda run: evaluated.append(run) or (ce.RESULTS / run / "eval-cifar10.json").write_text("{}"))
    for run in ("a_s0", "b_s0", "c_s0"):
        (ce.RUNS / run).mkdir(parents=True)
        (ce.RUNS / run / "model-fp16.safetensors").write_bytes(b"new")
        (ce.RESULTS / run).mkdir(parents=True)
    (ce.RESULTS / "a_s0" / "model-fp16.safetensors").write_bytes(b"old")
    for run in ("a_s0", "b_s0", "c_s0"):
        ce.keep_outputs(run)  # backfill: a's weights and both evaluations exist afterwards, nothing replaced
    assert (ce.RESULTS / "a_s0" / "model-fp16.safetensors").read_bytes() == b"old" and evaluated == ["a_s0", "b_s0"]
    assert not (ce.RESULTS / "b_s0" / "model-fp16.safetensors").exists() and not (ce.RESULTS / "c_s0" / "eval-cifar10.json").exists()
    ce.keep_outputs("a_s0")
    assert evaluated == ["a_s0", "b_s0"]  # already there: not again
    ce.keep_outputs("a_s0", fresh=True)
    assert (ce.RESULTS / "a_s0" / "model-fp16.safetensors").read_bytes() == b"new" and evaluated == ["a_s0", "b_s0", "a_s0"]
