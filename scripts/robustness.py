"""Robustness vs refinement steps: V-HMN under CIFAR-10-C-style corruptions and occlusion.

    python scripts/robustness.py                      # after scripts/cpu_experiments.py
    python scripts/robustness.py --images 500 --out results/robustness/cpu10.json
    python scripts/robustness.py --protocol long      # the converged protocol's chosen V-HMN → results/robustness/cpu10long.json

Two questions, as in the paper's ablation over refinement steps (fact F5 of the book's decisions page):

* models **trained** with T = 0, 1, 2, 3 refinement steps (runs vhmn_T0, vhmn_T1, vhmn_s0, vhmn_T3 of
  scripts/cpu_experiments.py; their fp16 weights are read from runs/cpu10/<run>/, or from results/cpu10/<run>/);
* **one** model (vhmn_s0, trained with T = 2) **evaluated** with T = 0, 1, 2, 3 (``refine_steps`` is a
  config field and the weights do not depend on it).

Each is evaluated on a fixed, class-balanced slice of the real CIFAR-10 test set (the first ``images / 10``
test images of every class), clean, under the 15 corruption types of :mod:`vhmn.corruptions` at severities 1-5
(regenerated with fixed seeds), and under occlusion at severities 1-5. The JSON holds the accuracy of every
(model, condition) and, for the committed checkpoint, the predictions on a few conditions, so that the book
can re-evaluate them; with provenance (git commit, device, library versions, date, wall time).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vhmn.checkpoint import load_pretrained
from vhmn.corruptions import CORRUPTIONS, corrupt, occlude
from vhmn.data import load_arrays
from vhmn.evaluate import predict_arrays
from vhmn.provenance import collect

ROOT = Path(__file__).resolve().parent.parent
# --protocol → the runs of the models trained with T = 0..3 (seed 0, the same config but for refine_steps), the
# committed checkpoint (trained with T = 2, also evaluated with the other T), and their results group.
# 16: the 16-epoch default V-HMN; long: the converged protocol's chosen V-HMN (scripts/cpu_experiments.py CHOSEN,
# the readout m(s_T)).
PROTOCOLS = {
    "16": {"trained": {0: "vhmn_T0", 1: "vhmn_T1", 2: "vhmn_s0", 3: "vhmn_T3"}, "reference": "vhmn_s0", "group": "cpu10"},
    "long": {"trained": {0: "vhmn_window5rpin_wrlv_pe_desc_pred_T0_s0", 1: "vhmn_window5rpin_wrlv_pe_desc_pred_T1_s0",
                         2: "vhmn_window5rpin_wrlv_pe_desc_pred_s0", 3: "vhmn_window5rpin_wrlv_pe_desc_pred_T3_s0"},
             "reference": "vhmn_window5rpin_wrlv_pe_desc_pred_s0", "group": "cpu10long"},
}
RECHECK = [("clean", 0), ("gaussian_noise", 3), ("occlusion", 3)]  # conditions whose predictions are stored


def eval_slice(images: int, labels: np.ndarray) -> np.ndarray:
    """The first images/10 test images of every class, in test-set order."""
    per = images // 10
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per] for c in range(10)]))


def weights(run: str, group: str) -> Path:
    """The run's fp16 weights: committed under results/<group>/, or left by training in runs/<group>/."""
    for folder in (ROOT / "results" / group / run, ROOT / "runs" / group / run):
        if (folder / "model-fp16.safetensors").is_file():
            return folder / "model-fp16.safetensors"
    protocol = next(k for k, v in PROTOCOLS.items() if v["group"] == group)
    raise FileNotFoundError(f"no fp16 weights for {run} in results/{group}/ or runs/{group}/: run scripts/cpu_experiments.py"
                            f"{'' if protocol == '16' else ' --protocol ' + protocol} first")


def conditions(x: np.ndarray):
    """(name, severity, corrupted uint8 images), clean first."""
    yield "clean", 0, x
    for name in CORRUPTIONS:
        for s in range(1, 6):
            yield name, s, corrupt(x, name, s, seed=0)
    for s in range(1, 6):
        yield "occlusion", s, occlude(x, s, seed=0)


def with_steps(model, steps: int):
    for m in model.modules():
        if hasattr(m, "cfg") and hasattr(m.cfg, "refine_steps"):
            m.cfg.refine_steps = steps
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500, help="test images (a multiple of 10: class-balanced)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--protocol", choices=("16", "long"), default="16",
                    help="16: the 16-epoch default V-HMN (results/cpu10); long: the converged protocol's chosen V-HMN")
    ap.add_argument("--out", default=None, help="default results/robustness/cpu10.json (cpu10long.json with --protocol long)")
    args = ap.parse_args(argv)
    proto = PROTOCOLS[args.protocol]
    trained, reference, group = proto["trained"], proto["reference"], proto["group"]
    args.out = args.out or str(ROOT / "results" / "robustness" / f"{group}.json")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    test_x, test_y = load_arrays("cifar10", "test")
    idx = eval_slice(args.images, test_y)
    x, y = test_x[idx], test_y[idx]

    settings = {f"trained_T{t}": (run, None) for t, run in trained.items()}
    settings.update({f"evaluated_T{t}": (reference, t) for t in range(4) if t != 2})  # T = 2 is trained_T2
    models = {}
    for key, (run, steps) in settings.items():
        m = load_pretrained(weights(run, group))
        models[key] = with_steps(m, steps) if steps is not None else m
    acc: dict[str, dict[str, list[float]]] = {k: {} for k in models}
    stored: dict[str, list[int]] = {}
    for name, sev, xc in conditions(x):
        for key, m in models.items():
            pred = predict_arrays(m, xc)
            acc[key].setdefault(name, [None] * 6)[sev] = float((pred == y).mean())
            if key == "trained_T2" and (name, sev) in RECHECK:
                stored[f"{name}/{sev}"] = pred.tolist()
        print(f"{name:<18} s{sev}  " + "  ".join(f"{k} {acc[k][name][sev]:.3f}" for k in models), flush=True)
    result = {
        "schema": "vhmn-robustness/1",
        "images": {"n": len(idx), "rule": "first n/10 test images of every class", "indices": idx.tolist()},
        "conditions": {"corruptions": list(CORRUPTIONS), "severities": [1, 2, 3, 4, 5], "occlusion": "vhmn.corruptions.occlude",
                       "seed": 0, "note": "CIFAR-10-C-style corruptions regenerated locally (vhmn.corruptions), not the released files"},
        "models": {k: {"run": run, "weights": str(weights(run, group).relative_to(ROOT)), "refine_steps": models[k].cfg.refine_steps,
                       "trained_refine_steps": json.loads((ROOT / "results" / group / run / "results.json").read_text())["model"]["config"]["refine_steps"]}
                   for k, (run, _) in settings.items()},
        "accuracy": acc,  # setting → condition → [clean at index 0 for "clean"; severities 1..5 at 1..5]
        "reference_predictions": {"setting": "trained_T2", "run": reference, "predictions": stored},
        "provenance": {**collect(torch.device("cpu")), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "wall_time_s": round(time.time() - t0, 1), "command": "python scripts/robustness.py " + " ".join(argv or sys.argv[1:])},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['provenance']['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
