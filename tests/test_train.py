"""The trainer: configs and overrides, schedule, learning, results.json, NaN stop, exact resume.

Resumption is checked bitwise on CPU: a run stopped by SIGTERM in the middle of an epoch (in
process) and a run killed with SIGKILL after a checkpoint (a subprocess) both continue to the same
final weights and metrics as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from vhmn.checkpoint import read_weights
from vhmn.experiments import UnknownExperimentError, list_experiments, load_experiment
from vhmn.train import ConfigError, NonFiniteLossError, TrainConfig, Trainer, build_config, lr_factor, main

from _slice import REPO, session_slice, one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return session_slice(tmp_path_factory)


def tiny(root, out, **kw) -> TrainConfig:
    base = dict(name="tiny", model="vhmn_test", dataset="cifar10", data_root=str(root), train_limit=128, test_limit=64,
                epochs=3, batch_size=32, lr=2e-3, warmup_epochs=0.5, device="cpu", bf16=False, compile=False,
                ckpt_every=1, out_dir=str(out), export_fp16=False)
    base.update(kw)
    return TrainConfig(**base)


def final_state(out):
    pointer = json.loads((out / "checkpoint" / "latest.json").read_text())
    return read_weights(out / "checkpoint" / pointer["files"]["model"])[0]


def assert_same_run(a, b):
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    strip = lambda h: {k: v for k, v in h.items() if k not in ("images_per_s", "epoch_time_s")}  # noqa: E731
    assert [strip(h) for h in ra["epochs"]] == [strip(h) for h in rb["epochs"]]
    assert ra["final"] == rb["final"] and rb["status"] == "complete"


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """An uninterrupted tiny run: 3 epochs × 4 steps."""
    out = tmp_path_factory.mktemp("ref")
    Trainer(tiny(root, out)).fit()
    return out


# --------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------
def test_every_experiment_builds_a_config():
    names = list_experiments()
    for must in ("cifar10_vhmn", "cifar10_vit", "cifar10_frac10_vhmn", "cifar10_frac10_vit", "cifar10_lt100_vhmn",
                 "cifar100_vhmn", "svhn_vhmn", "imagenet_vhmn", "cifar10_swin", "cifar10_mixer", "cifar10_resnet18"):
        assert must in names
    recipe = {k: load_experiment("cifar10_vhmn")[k] for k in ("lr", "weight_decay", "label_smoothing", "batch_size", "warmup_epochs")}
    for n in names:
        cfg, smoke = build_config(n), build_config(n, smoke=True)
        assert cfg.description and smoke.device == "cpu" and not smoke.compile and not smoke.bf16
        if n.startswith("cifar10_") and "frac" not in n and "lt" not in n:  # one recipe for every model
            assert {k: getattr(cfg, k) for k in recipe} == recipe, n
        if cfg.subset:
            assert cfg.subset in n


def test_overrides_and_errors():
    cfg = build_config("cifar10_vhmn", ["epochs=5", "lr=5e-4", "model.refine_steps=0", "subset=null", "grad_clip=null"])
    assert (cfg.epochs, cfg.lr, cfg.model_kwargs, cfg.grad_clip) == (5, 5e-4, {"refine_steps": 0}, None)
    with pytest.raises(UnknownExperimentError, match="(?s)Did you mean cifar10_vhmn.*Known experiments: .*svhn_vit"):
        build_config("cifar10_vhmnn")
    with pytest.raises(ConfigError, match="(?s)unknown config key 'epoch'.*Did you mean epochs.*Valid keys: name"):
        build_config("cifar10_vhmn", ["epoch=5"])
    with pytest.raises(ConfigError, match="epochs must be int"):
        build_config("cifar10_vhmn", ["epochs=five"])
    with pytest.raises(ConfigError, match="key=value"):
        build_config("cifar10_vhmn", ["epochs"])
    with pytest.raises(ConfigError, match="augment must be one of"):
        build_config("cifar10_vhmn", ["augment=mixup"])


def test_cli_rejects_and_lists(capsys, tmp_path):
    assert main(["nope"]) == 2 and "Known experiments" in capsys.readouterr().err
    assert main(["cifar10_vhmn", "model.not_a_field=1", "--smoke", f"--out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "rejected the overrides" in err and "refine_steps" in err  # lists the valid fields
    assert main(["--list"]) == 0 and "cifar10_frac10_vhmn" in capsys.readouterr().out


def test_provenance_is_the_code_at_the_start_of_training(root, tmp_path, monkeypatch):
    # a commit made while a run trains must not be recorded as the run's code
    import vhmn.provenance as provenance

    trainer = Trainer(build_config(str(REPO / "tests" / "tiny_experiment.yaml"), [f"data_root={root}", "epochs=1"], out=str(tmp_path)))
    at_start = trainer.provenance["git_commit"]
    monkeypatch.setattr(provenance, "git_info", lambda *a, **k: {"commit": "0" * 40, "dirty": True})
    trainer.fit()
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["provenance"]["git_commit"] == at_start != "0" * 40


def test_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 110, 0.01) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.505) and f[-1] == pytest.approx(0.01, abs=1e-3)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
def test_learning_happens_and_results_json(root, reference):
    r = json.loads((reference / "results.json").read_text())
    assert set(r) >= {"schema", "experiment", "status", "config", "seed", "provenance", "model", "data", "epochs",
                      "final", "wall_time_s"}
    assert r["status"] == "complete" and len(r["epochs"]) == 3 and r["data"]["steps_per_epoch"] == 4
    assert set(r["provenance"]) >= {"git_commit", "git_dirty", "versions", "device", "world_size"}
    assert r["model"]["num_params"] == sum(p.numel() for p in __import__("vhmn").create_model("vhmn_test").parameters())
    h = r["epochs"]
    assert set(h[0]) >= {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s"}
    assert h[-1]["train_loss"] < h[0]["train_loss"]  # it learns
    assert r["final"]["test_acc"] == h[-1]["test_acc"]
    # the banks were written from training images, with provenance inside the training slice
    state = final_state(reference)
    src = state["stages.0.0.mixer.glob.memory.src_index"][:-1]
    assert (src >= 0).all() and (src < 128).all()


def test_vhmn_gets_index_and_labels_baselines_do_not(root, tmp_path):
    t = Trainer(tiny(root, tmp_path, epochs=1, train_limit=64))
    calls = []
    t.model.register_forward_pre_hook(lambda m, a, kw: calls.append(sorted(kw)), with_kwargs=True)
    t.fit()
    assert calls[0] == ["index", "labels"]
    b = Trainer(tiny(root, tmp_path / "b", epochs=1, train_limit=64, model="convmixer_cifar",
                     model_kwargs={"dim": 16, "depth": 1}))
    assert not b.is_vhmn
    b.fit()


def test_nan_stops_and_keeps_last_good_checkpoint(root, tmp_path):
    t = Trainer(tiny(root, tmp_path, nan_check_every=1))
    t.model.register_forward_hook(lambda m, i, o: o * float("nan") if t.step >= 5 else o)
    with pytest.raises(NonFiniteLossError, match="NaN/inf in epoch 1 .*latest checkpoint"):
        t.fit()
    pointer = json.loads((tmp_path / "checkpoint" / "latest.json").read_text())
    assert pointer["epoch"] == 1
    assert all(torch.isfinite(v.float()).all() for v in final_state(tmp_path).values())
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "diverged"


def test_sigterm_mid_epoch_then_resume_is_exact(root, reference, tmp_path):
    t = Trainer(tiny(root, tmp_path))
    t.model.register_forward_hook(lambda m, i, o: (setattr(t, "_stop_signal", signal.SIGTERM) if t.step == 5 else None))
    res = t.fit()
    assert res["status"] == "interrupted" and json.loads((tmp_path / "checkpoint" / "latest.json").read_text())["step"] == 6
    Trainer(tiny(root, tmp_path)).fit(resume=True)
    assert_same_run(reference, tmp_path)


def test_resume_rejects_a_different_config(root, reference, tmp_path):
    import shutil

    shutil.copytree(reference / "checkpoint", tmp_path / "checkpoint")
    with pytest.raises(ConfigError, match="lr: checkpoint 0.002, now 0.001"):
        Trainer(tiny(root, tmp_path, lr=1e-3)).fit(resume=True)


def test_sigkill_after_checkpoint_then_resume_is_exact(root, reference, tmp_path):
    """A subprocess is killed hard once a checkpoint exists; --resume reaches the same result."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "vhmn.train", str(REPO / "tests" / "tiny_experiment.yaml"), f"data_root={root}",
            "epochs=6", f"--out={out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # as in this process (one_thread)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = out / "checkpoint" / "latest.json"
    deadline = time.time() + 60
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert json.loads(pointer.read_text())["epoch"] < 6  # killed before the end
    # uninterrupted reference with the same config, in this process
    ref = tmp_path / "ref"
    Trainer(build_config(str(REPO / "tests" / "tiny_experiment.yaml"), [f"data_root={root}", "epochs=6"], out=str(ref))).fit()
    done = subprocess.run(args + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    assert_same_run(ref, out)


def test_evaluate_cli_reproduces_the_final_accuracy(root, reference, capsys):
    from vhmn.evaluate import main as evaluate_main

    out = reference / "eval.json"
    assert evaluate_main([str(reference), "--data-root", str(root), "--limit", "64", "--device", "cpu", "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    final = json.loads((reference / "results.json").read_text())["final"]
    assert ev["images"] == 64 and ev["accuracy"] == final["test_acc"]
    assert ev["loss"] == pytest.approx(final["test_loss"], rel=1e-6)
    assert "accuracy" in capsys.readouterr().out
    # per-class accuracy: weighted by the class counts of the evaluated images, it is the accuracy
    from vhmn.data import load_arrays

    counts = np.bincount(load_arrays("cifar10", "test", root)[1][:64], minlength=10)
    per_class = np.array(ev["per_class_accuracy"], dtype=float)
    assert len(per_class) == 10 and np.isnan(per_class[counts == 0]).all()
    assert np.nansum(per_class * counts) / counts.sum() == pytest.approx(ev["accuracy"], abs=1e-12)
    assert ev["provenance"]["command"].startswith("python -m vhmn.evaluate") and "git_commit" in ev["provenance"]
    assert evaluate_main([str(reference / "nothing-here")]) == 2
