"""CIFAR-10 with 10% of the training data at CPU scale: the data-efficiency table and the V-HMN ablations.

    python scripts/cpu_experiments.py --list              # the runs, in the order they are run
    python scripts/cpu_experiments.py --workers 2         # run what is missing (two runs at a time, one thread each)
    python scripts/cpu_experiments.py --only main         # just the table: 4 models × 3 seeds
    python scripts/cpu_experiments.py --only curve        # 20/50/100%, the long-tailed set, and the 80-epoch control
    python scripts/cpu_experiments.py --deadline 02:15     # start no run after this UTC time
    python scripts/cpu_experiments.py --longest-first      # start the longest runs first (shortest sitting)
    python scripts/cpu_experiments.py --protocol long      # the converged protocol (width 64, 100 epochs) into
                                                         # results/cpu10long: the ViT's budget curve and the
                                                         # memory-mixer candidates (CANDIDATES below)
    python scripts/cpu_experiments.py --protocol long20    # ... on the 20% split (results/cpu20long)
    python scripts/cpu_experiments.py --protocol longlt    # ... on the long-tailed split (results/cpult100long)

Every run is ``python -m vhmn.train <experiment> seed=S [model overrides] --out runs/cpu10/<run>`` with the
experiment configs ``cifar10_frac10_cpu_*`` (recipe ``_cpu10``: the committed stratified 10% split, the full
test set, 16 epochs, batch 128, the shared recipe otherwise). When a run completes, its ``results.json`` is
copied to ``results/cpu10/<run>/``; the main V-HMN run of seed 0 also
leaves its fp16 weights there, evaluated on the full test set by ``python -m vhmn.evaluate`` into
``eval-cifar10.json``; the two long-tailed runs are evaluated the same way (for their per-class accuracy).
A run whose results are already committed is skipped, so the script can be run again to finish what an
earlier sitting did not. The runs are ordered by importance: seed 0 of every model first,
then the ablations that the robustness chapter needs (refine_steps), then the other seeds, then the rest of
the ablations, then the data curve (the same recipe on the committed 20% and 50% splits and on the long-tailed
split ``cifar10_lt100``, V-HMN and ViT, seed 0; 100% is listed but costs about 75 (V-HMN) and 45 (ViT)
minutes of one thread), then its control: the 10% split for 80 epochs, the optimiser steps of the 50% run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "cpu10"
RUNS = ROOT / "runs" / "cpu10"
MODELS = ("vhmn", "vit", "mixer", "convmixer")
CHECKPOINT_RUN = "vhmn_s0"  # its fp16 weights are committed and re-evaluated by the book
EVALUATED = (CHECKPOINT_RUN, "vhmn_lt100_s0", "vit_lt100_s0")  # eval-cifar10.json (per-class accuracy) committed

# V-HMN ablations at seed 0: run name → overrides of cifar10_frac10_cpu_vhmn (decision numbers of the book's
# decisions page in the comments). The default of each decision is the main run vhmn_s0.
ABLATIONS: dict[str, list[str]] = {
    "vhmn_T0": ["model.refine_steps=0"],  # 5: refinement steps (default T = 2)
    "vhmn_T1": ["model.refine_steps=1"],
    "vhmn_T3": ["model.refine_steps=3"],
    "vhmn_invtemp1": ["model.inv_temp=1.0"],  # inv_temp β_H (default 1/√32 ≈ 0.18)
    "vhmn_window": ["model.local_mode=window"],  # 2: the neighbours themselves as the memory
    "vhmn_learned": ["model.memory=learned"],  # 1: learned slots instead of the episodic ring buffer
    "vhmn_local_only": ["model.global_memory=false"],  # 2/3: one memory path only
    "vhmn_global_only": ["model.local_memory=false"],
    "vhmn_slots1024": ["model.local_slots=1024", "model.global_slots=512"],  # 1: memory size (default 256 / 128)
    "vhmn_slots64": ["model.local_slots=64", "model.global_slots=32"],
    "vhmn_film": ["model.global_mod=film"],  # 3: scale-and-shift modulation instead of additive
    "vhmn_k5": ["model.kernel_size=5"],  # 2: neighbourhood k (default 3)
    "vhmn_rate1": ["model.refine_rate=1.0"],  # 5: refine_rate β (default 0.5)
    "vhmn_concat": ["model.fusion=concat"],  # 4: concat + linear fusion instead of the sum
    "vhmn_rate025": ["model.refine_rate=0.25"],
    "vhmn_staged": ["model.patch_size=2", "model.dims=[64,128]", "model.depths=[2,2]"],  # 7: staged layout
    "vhmn_attnpool": ["model.pool=attn"],  # 8: attention pooling head
    "vhmn_change": ["model.mixer_output=change"],  # 5, control: T = 2, the mixer adds s_T − u (−0.75 u for the +0.25 u)
    "vhmn_retrieval": ["model.mixer_output=retrieval"],  # 5, the clean control: T = 2 without the (1 − β)^T u of s_T
}

# The data curve and the long-tailed setting (deliverable 1 of the experiments issue): V-HMN vs ViT, seed 0,
# the same recipe on another committed split (subset=null is the whole training set).
SUBSETS = {"frac20": "cifar10_frac20", "frac50": "cifar10_frac50", "lt100": "cifar10_lt100", "frac100": "null"}
CURVE: list[tuple[str, str, int, list[str]]] = [
    (f"{m}_{name}_s0", f"cifar10_frac10_cpu_{m}", 0, [f"subset={subset}"])
    for name, subset in SUBSETS.items() for m in ("vhmn", "vit")
]

# A control for the curve: with a fixed number of epochs, more images also means more optimiser steps. The 10 %
# split trained for 80 epochs (warmup scaled with them) takes the steps of the 50 % run on the 10 % images.
LONG = ["epochs=80", "warmup_epochs=10", "eval_every=20", "ckpt_every=20"]
CONTROL: list[tuple[str, str, int, list[str]]] = [(f"{m}_frac10_e80_s0", f"cifar10_frac10_cpu_{m}", 0, LONG) for m in ("vhmn", "vit")]

# The converged protocol (--protocol long; issue 11): the 10% split for 100 epochs at width 64
# (cifar10_frac10_cpulong_*), into results/cpu10long/. The ViT's budget curve (25 / 50 / 100 / 200 epochs, warmup
# 5% of them) shows where it plateaus; the local-memory candidates are run against it at 100 epochs.
WINDOW = ["model.local_mode=window", "model.rel_pos=true", "model.window_stored=input"]
EPISODIC = ["model.write_after_read=true", "model.global_label_values=true"]
CANDIDATES: dict[str, list[str]] = {
    "vhmn": [],  # the current default: local bank of patch descriptors, T = 2
    "vhmn_window": ["model.local_mode=window"],  # the k×k neighbours as the stored patterns
    "vhmn_windowrp": ["model.local_mode=window", "model.rel_pos=true"],  # ... with a learned bias per neighbour offset
    "vhmn_windowrpin": WINDOW,  # ... and the neighbours of the block input stored, fixed during refinement
    "vhmn_hybridrpin": ["model.local_mode=hybrid", "model.rel_pos=true", "model.window_stored=input"],  # + bank, one softmax
    "vhmn_wrlv": EPISODIC,  # the default, writing after reading, with the stored labels in the global values
    "vhmn_windowrpin_wrlv": WINDOW + EPISODIC,
    "vhmn_qkn": ["model.qk_norm=true"],  # the default with cosine retrieval and a learned β_H per head
    # the window without the token itself (its prediction from its context alone), cosine retrieval with a learned
    # β_H, and the episodic global memory with labels: every change the diagnosis suggests at once
    "vhmn_windowctx_qkn_wrlv": WINDOW + ["model.window_self=false", "model.qk_norm=true"] + EPISODIC,
    "vhmn_window5ctx_qkn_wrlv": WINDOW + ["model.kernel_size=5", "model.window_self=false", "model.qk_norm=true"] + EPISODIC,
    # ... and each neighbour's value read through a learned gain per offset and channel (a depthwise-conv readout)
    "vhmn_windowctxg_qkn_wrlv": WINDOW + ["model.window_self=false", "model.offset_gain=true", "model.qk_norm=true"] + EPISODIC,
}
# The controls of the best fast candidate (BEST): what its gap to the ViT comes from. k = 15 makes the window the
# whole 8×8 grid (global retrieval, as the ViT's attention, without the token itself): locality or not; T = 0 and
# T = 1 are fewer refinement steps (T = 0: one retrieval, m(u)); 'retrieval' adds s_T − (1 − β)^T u to the residual
# stream instead of s_T: T = 2 without the input pass-through (the confound of the refinement ablation). 'hybrid' is the candidate with
# explicit stored patterns kept: each token retrieves, in one softmax, from its 5×5 context and a bank of 256 patch
# prototypes with provenance (what chapter 11 shows), instead of from its context alone.
BEST = "vhmn_window5ctx_qkn_wrlv"
CONTROLS: dict[str, list[str]] = {
    "vhmn_window15ctx_qkn_wrlv": WINDOW + ["model.kernel_size=15", "model.window_self=false", "model.qk_norm=true"] + EPISODIC,
    f"{BEST}_T0": CANDIDATES[BEST] + ["model.refine_steps=0"],
    "vhmn_hybrid5ctx_qkn_wrlv": [o.replace("=window", "=hybrid") for o in CANDIDATES[BEST]],
    f"{BEST}_T1": CANDIDATES[BEST] + ["model.refine_steps=1"],
    f"{BEST}_retrieval": CANDIDATES[BEST] + ["model.mixer_output=retrieval"],
    # the V-HMN code reduced to a ViT block (what is left when every memory feature is off): one retrieval (T = 0)
    # from the k×k window with the token itself, no global memory, dot-product retrieval at 1/√e, a learned bias per
    # offset (the ViT's position embedding's stand-in). k = 15: global attention, as the ViT's; k = 5: local
    # attention. The ladder from them to BEST says which of its memory features cost, and which help.
    "vhmn_vitlike15": ["model.local_mode=window", "model.rel_pos=true", "model.kernel_size=15", "model.refine_steps=0", "model.global_memory=false"],
    "vhmn_vitlike5": ["model.local_mode=window", "model.rel_pos=true", "model.kernel_size=5", "model.refine_steps=0", "model.global_memory=false"],
}
# With the ViT's learned absolute position embedding (model.pos_embed), and run after V-HMN's position biases and
# learned inverse temperatures were taken out of the weight decay (VHMN.no_weight_decay; the ViT's position embedding
# never was in it): the two differences between the ViT recipe and V-HMN's that are not memory.
CONTROLS.update({f"{name}_pe": CONTROLS.get(name, CANDIDATES.get(name)) + ["model.pos_embed=true"] for name in ("vhmn_vitlike5", BEST)})
# From the ViT-like local attention with the position embedding, one memory feature at a time, then both: the
# refinement (T = 2, the block input's neighbours stored), the episodic scene memory (written after reading, with its
# labels in the values), and the two together: the plainest V-HMN of the stated facts (local and global Hopfield
# retrieval, refined by predictive coding), with dot-product retrieval and the token in its own window.
VITLIKE5 = ["model.local_mode=window", "model.rel_pos=true", "model.kernel_size=5", "model.pos_embed=true"]
CONTROLS.update({
    "vhmn_vitlike5_pe_T2": VITLIKE5 + ["model.global_memory=false", "model.window_stored=input"],
    "vhmn_vitlike5_pe_scene": VITLIKE5 + ["model.refine_steps=0"] + EPISODIC,
    "vhmn_window5rpin_wrlv_pe": VITLIKE5 + ["model.window_stored=input"] + EPISODIC,
})
CANDIDATES.update(CONTROLS)
# The plainest V-HMN of the ladder (ch9, "Where the gap comes from"): local attention with the position embedding,
# refined (T = 2), with the episodic scene memory. The runs below change it one field at a time.
PLAIN = "vhmn_window5rpin_wrlv_pe"
# Its next steps, toward the locality prior a CNN has: a more local window (k = 3: 9 of the 64 tokens instead of
# 25, and cheaper); each neighbour's value read through a learned gain per offset and channel (offset_gain: with a
# uniform association the local retrieval is a depthwise k×k convolution, the ConvMixer's spatial mixing).
CANDIDATES.update({
    f"{PLAIN}_k3": [o.replace("kernel_size=5", "kernel_size=3") for o in CANDIDATES[PLAIN]],
    f"{PLAIN}_gain": CANDIDATES[PLAIN] + ["model.offset_gain=true"],
    # the stored patterns are the neighbours' 5×5 descriptors (decision 2's local descriptor, a depthwise conv of the
    # block input, the identity at first), not the tokens themselves: the query stays the token's state
    f"{PLAIN}_desc": CANDIDATES[PLAIN] + ["model.window_descriptor=true"],
    # one refinement step instead of two: one retrieval less per block, the speed issue's candidate
    f"{PLAIN}_T1": CANDIDATES[PLAIN] + ["model.refine_steps=1"],
})
CANDIDATES[f"{PLAIN}_desc_T1"] = CANDIDATES[f"{PLAIN}_desc"] + ["model.refine_steps=1"]  # the descriptors at the speed candidate's T
# the control: the descriptors in V-HMN taken down to local attention (T = 0, no scene memory), a transformer block
# with convolutional keys and values (as CvT's): is a gain of the descriptors V-HMN's, or the convolution's alone?
CANDIDATES["vhmn_vitlike5_pe_desc"] = CONTROLS["vhmn_vitlike5_pe"] + ["model.window_descriptor=true"]
# decision 2's local query: the query is the state's 5×5 descriptor too (the same depthwise conv), not the state
CANDIDATES[f"{PLAIN}_descq"] = CANDIDATES[f"{PLAIN}_desc"] + ["model.query_descriptor=true"]
# ... and from that control one memory feature at a time again, with the descriptors: the refinement alone (T = 2,
# no scene memory) and the scene memory alone (T = 0): which of the two costs on top of the descriptors
CANDIDATES["vhmn_vitlike5_pe_desc_T2"] = CONTROLS["vhmn_vitlike5_pe_T2"] + ["model.window_descriptor=true"]
CANDIDATES["vhmn_vitlike5_pe_desc_scene"] = CONTROLS["vhmn_vitlike5_pe_scene"] + ["model.window_descriptor=true"]
# Each cost about half a point on seed 0. Two ways to keep both and not pay for them: the refined
# state without the block input's share (1 − β)^T u in what the mixer adds to the residual stream ('retrieval': at
# T = 2 a quarter of the LayerNormed input goes back into the stream, which the control, T = 0, does not do); and
# the scene retrieval entering through FiLM, whose scale and shift start at zero, so that the model starts as the
# refinement without scene memory and takes from the scene only what helps.
CANDIDATES[f"{PLAIN}_desc_retrieval"] = CANDIDATES[f"{PLAIN}_desc"] + ["model.mixer_output=retrieval"]
CANDIDATES[f"{PLAIN}_desc_film"] = CANDIDATES[f"{PLAIN}_desc"] + ["model.global_mod=film"]
# The factorial says the refinement is what costs (−0.5 on the control; T = 1, with half of u passed through, costs
# most). A third reading of "refine, then predict": the mixer adds the memory's prediction at the refined state,
# m(s_T), instead of s_T: no share of u goes back into the stream (as at T = 0, which adds m(u)), and the query is
# refined T times before it is read out (T + 1 retrievals; T = 1: two, the cost of the candidate's T = 2).
CANDIDATES[f"{PLAIN}_desc_pred"] = CANDIDATES[f"{PLAIN}_desc"] + ["model.mixer_output=prediction"]
CANDIDATES[f"{PLAIN}_desc_pred_T1"] = CANDIDATES[f"{PLAIN}_desc_pred"] + ["model.refine_steps=1"]
# ... and T = 3, for the robustness chapter's models trained with T = 0..3 (T = 0 below)
CANDIDATES[f"{PLAIN}_desc_pred_T3"] = CANDIDATES[f"{PLAIN}_desc_pred"] + ["model.refine_steps=3"]
# T = 0 of the same config, trained again because the committed vhmn_vitlike5_pe_desc_scene_s0 left no weights in
# this checkout: the robustness chapter evaluates the weights (and it is a fourth T = 0 sample of seed 0)
CANDIDATES[f"{PLAIN}_desc_pred_T0"] = CANDIDATES[f"{PLAIN}_desc_pred"] + ["model.refine_steps=0"]
# The candidate the GPU script trains at the paper-scale width and recipe (scripts/gpu_reproduce.py, call 2): the
# converged protocol's best V-HMN so far (ch9, "After the choice" and "The readout"): the plainest one with the neighbours' 5×5
# descriptors as its stored patterns, adding the memory's prediction at the refined state to the stream.
CHOSEN = f"{PLAIN}_desc_pred"  # the readout m(s_T): 66.78 ± 0.31 % against the state s_T's 66.40 ± 0.21 (three seeds each), one retrieval more
VIT_BUDGETS = {25: ["epochs=25", "warmup_epochs=1.25", "eval_every=5"], 50: ["epochs=50", "warmup_epochs=2.5", "eval_every=5"],
               200: ["epochs=200", "warmup_epochs=10", "eval_every=20", "ckpt_every=20"]}


def committed_runs() -> dict[str, dict]:
    """Run name → results of every complete run committed under RESULTS."""
    found = {p.parent.name: json.loads(p.read_text()) for p in RESULTS.glob("*/results.json")}
    return {run: r for run, r in found.items() if r.get("status") == "complete"}


def cost(item: tuple[str, str, int, list[str]], committed: dict[str, dict] | None = None) -> float:
    """Estimated seconds of a run for --longest-first: the mean wall time of its committed seeds (same name up
    to the seed), else of the committed runs of its experiment, else of every committed run."""
    run, experiment, _, _ = item
    committed = committed_runs() if committed is None else committed
    for same in (lambda name, r: name.rsplit("_s", 1)[0] == run.rsplit("_s", 1)[0],
                 lambda name, r: r["experiment"] == experiment, lambda name, r: True):
        walls = [r["wall_time_s"] for name, r in committed.items() if same(name, r)]
        if walls:
            return sum(walls) / len(walls)
    return 0.0


def plan_long() -> list[tuple[str, str, int, list[str]]]:
    """The converged protocol's runs, most important first."""
    vhmn = lambda name, seed: (f"{name}_s{seed}", "cifar10_frac10_cpulong_vhmn", seed, CANDIDATES[name])  # noqa: E731
    vit = {e: (f"vit_e{e}_s0", "cifar10_frac10_cpulong_vit", 0, ov) for e, ov in VIT_BUDGETS.items()}
    vit_seed = lambda seed: (f"vit_s{seed}", "cifar10_frac10_cpulong_vit", seed, [])  # noqa: E731
    # the 10% table's other two yardsticks, at the V-HMN candidates' parameter count (0.27–0.28 M)
    base = lambda m, seed: (f"{m}_s{seed}", f"cifar10_frac10_cpulong_{m}", seed, [])  # noqa: E731
    vit_lr = {lr: (f"vit_lr{lr}_s0", "cifar10_frac10_cpulong_vit", 0, [f"lr={lr}"]) for lr in ("5e-4", "2e-3")}  # the recipe's lr, for the ViT
    return [vit_seed(0), vhmn("vhmn_windowrp", 0), vhmn("vhmn", 0), vhmn("vhmn_windowctx_qkn_wrlv", 0),
            vhmn("vhmn_windowctxg_qkn_wrlv", 0), vhmn(BEST, 0), vit[50], vit[200], vit_lr["2e-3"],
            # the noise band of the best fast candidate and the ViT, and the candidate's controls
            vit_seed(1), vhmn(BEST, 1), vhmn("vhmn_window15ctx_qkn_wrlv", 0), vhmn("vhmn_hybrid5ctx_qkn_wrlv", 0),
            vhmn(f"{BEST}_T0", 0), vit_seed(2),
            vhmn("vhmn_vitlike5", 0), vhmn("vhmn_vitlike5_pe", 0), vhmn(f"{BEST}_pe", 0), vhmn("vhmn_vitlike5_pe_T2", 0), vhmn(f"{BEST}_pe", 1),
            vhmn("vhmn_vitlike5_pe_scene", 0), vhmn("vhmn_window5rpin_wrlv_pe", 0), vhmn("vhmn_window5rpin_wrlv_pe", 1), vhmn("vhmn_vitlike15", 0),
            vhmn(PLAIN, 2), vhmn(f"{PLAIN}_desc", 0), vhmn(f"{PLAIN}_k3", 0),
            vhmn(f"{PLAIN}_desc", 1), vhmn(f"{PLAIN}_desc", 2), vhmn("vhmn_vitlike5_pe_desc", 0), vhmn(f"{PLAIN}_desc_T1", 0), base("convmixer", 0),
            vhmn("vhmn_vitlike5_pe_desc", 1), vhmn("vhmn_vitlike5_pe_desc", 2), vhmn("vhmn_vitlike5_pe_desc_T2", 0),
            vhmn("vhmn_vitlike5_pe_desc_scene", 0), vhmn(f"{PLAIN}_descq", 0), base("mixer", 0), vhmn(f"{PLAIN}_T1", 0),
            vhmn(BEST, 2), vhmn(f"{BEST}_retrieval", 0), vhmn(f"{BEST}_T1", 0),
            base("convmixer", 1), base("mixer", 1), base("convmixer", 2), base("mixer", 2),
            vhmn(f"{PLAIN}_desc_retrieval", 0), vhmn(f"{PLAIN}_desc_film", 0),
            vhmn("vhmn_vitlike5_pe_desc_T2", 1), vhmn("vhmn_vitlike5_pe_desc_scene", 1),  # the factorial's second seed
            vhmn("vhmn_vitlike5_pe_desc_scene", 2),  # local and global memory without refinement: +3.1 over two seeds
            vhmn(f"{PLAIN}_desc_pred", 0), vhmn(f"{PLAIN}_desc_pred_T1", 0),  # the readout m(s_T) instead of s_T
            vhmn(f"{PLAIN}_desc_pred", 1), vhmn(f"{PLAIN}_desc_pred", 2), vhmn(f"{PLAIN}_desc_pred_T3", 0), vhmn(f"{PLAIN}_desc_pred_T0", 0),
            vhmn(f"{PLAIN}_desc_pred_T1", 1), vhmn(f"{PLAIN}_desc_pred_T1", 2),
            vhmn(f"{PLAIN}_gain", 0),  # the offset gains take the reference path: the slowest of the candidates
            vit_lr["5e-4"], vhmn("vhmn_windowrpin_wrlv", 0), vhmn("vhmn_wrlv", 0),
            vhmn("vhmn_qkn", 0), vhmn("vhmn_windowrpin", 0), vit[25], vhmn("vhmn_hybridrpin", 0), vhmn("vhmn_window", 0)]


def plan_split(split: str, seeds: tuple[int, ...] = (0, 1, 2)) -> list[tuple[str, str, int, list[str]]]:
    """The converged protocol on another committed split (cifar10_<split>_cpulong_*): the chosen V-HMN and the ViT,
    seed by seed. frac20 (10,000 images, twice the 10 % split's steps) is the data curve's next point; lt100 (12,408
    images, imbalance 100) the long-tailed setting."""
    return [item for seed in seeds for item in ((f"{CHOSEN}_s{seed}", f"cifar10_{split}_cpulong_vhmn", seed, CANDIDATES[CHOSEN]),
                                                (f"vit_s{seed}", f"cifar10_{split}_cpulong_vit", seed, []))]


# --protocol → (results/ and runs/ folder, the converged protocol's split or None for the 16-epoch one, the run whose
# fp16 weights are committed, the runs evaluated after training into eval-cifar10.json)
PROTOCOLS = {
    "16": ("cpu10", None, CHECKPOINT_RUN, EVALUATED),
    # the converged protocol's checkpoint: the chosen V-HMN, seed 0 (cpu10long/vhmn_s0, the old default's, stays)
    "long": ("cpu10long", "frac10", f"{CHOSEN}_s0", (f"{CHOSEN}_s0",)),
    "long20": ("cpu20long", "frac20", None, ()),
    "longlt": ("cpult100long", "lt100", None, (f"{CHOSEN}_s0", "vit_s0")),  # the long-tailed runs' per-class accuracy
}


def plan(only: str | None, protocol: str = "16") -> list[tuple[str, str, int, list[str]]]:
    """(run name, experiment, seed, overrides), most important first."""
    if protocol == "long":
        return plan_long()
    if protocol in ("long20", "longlt"):
        return plan_split(PROTOCOLS[protocol][1])
    main = {s: [(f"{m}_s{s}", f"cifar10_frac10_cpu_{m}", s, []) for m in MODELS] for s in range(3)}
    abl = [(name, "cifar10_frac10_cpu_vhmn", 0, ov) for name, ov in ABLATIONS.items()]
    if only == "main":
        return main[0] + main[1] + main[2]
    if only == "ablations":
        return abl
    if only == "curve":
        return CURVE + CONTROL
    return main[0] + abl[:3] + main[1] + main[2] + abl[3:] + CURVE + CONTROL


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


def done(run: str) -> bool:
    return _status(RESULTS / run / "results.json") == "complete"


def in_flight(run: str) -> bool:
    """A run that an earlier invocation of this script started and that is still training (its log was
    written in the last five minutes): wait for it instead of starting it again."""
    log = RUNS / f"{run}.log"
    if _status(RUNS / run / "results.json") != "running" or not log.is_file() or time.time() - log.stat().st_mtime > 300:
        return False
    while _status(RUNS / run / "results.json") == "running":
        time.sleep(20)
    return True


def evaluate(run: str) -> None:
    """Evaluate the run's final fp16 weights on the full test set into results/cpu10/<run>/eval-cifar10.json
    (accuracy, loss, per-class accuracy, provenance)."""
    weights = RESULTS / run / "model-fp16.safetensors"
    if not weights.is_file():
        weights = RUNS / run / "model-fp16.safetensors"
    dest = RESULTS / run / "eval-cifar10.json"
    subprocess.check_call([sys.executable, "-m", "vhmn.evaluate", str(weights.relative_to(ROOT)), "--device", "cpu", "--out", str(dest.relative_to(ROOT))],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def keep_outputs(run: str, fresh: bool = False) -> None:
    """What a completed run leaves in results/ besides its results.json: the fp16 weights of the checkpoint run, and
    the evaluation of the runs in EVALUATED. fresh (the run has just trained): write both anew; otherwise (a run
    completed by an earlier sitting) only what is missing, as long as its weights are still in runs/."""
    weights = RUNS / run / "model-fp16.safetensors"
    if run == CHECKPOINT_RUN and weights.is_file() and (fresh or not (RESULTS / run / "model-fp16.safetensors").is_file()):
        shutil.copy2(weights, RESULTS / run / "model-fp16.safetensors")
    have = weights.is_file() or (RESULTS / run / "model-fp16.safetensors").is_file()
    if run in EVALUATED and have and (fresh or not (RESULTS / run / "eval-cifar10.json").is_file()):
        evaluate(run)


def execute(run: str, experiment: str, seed: int, overrides: list[str]) -> str:
    out = RUNS / run
    t0 = time.time()
    log = (RUNS / f"{run}.log")
    if not in_flight(run):
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "vhmn.train", experiment, f"seed={seed}", *overrides, "--out", str(out.relative_to(ROOT))]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if rc != 0:
            return f"{run}: FAILED (exit {rc}), see {log.relative_to(ROOT)}"
    if _status(out / "results.json") != "complete":
        return f"{run}: FAILED (status {_status(out / 'results.json')}), see {log.relative_to(ROOT)}"
    dest = RESULTS / run
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "results.json", dest / "results.json")
    keep_outputs(run, fresh=True)
    acc = json.loads((dest / "results.json").read_text())["final"]["test_acc"]
    return f"{run}: test accuracy {acc:.4f} ({time.time() - t0:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (each on one CPU thread)")
    ap.add_argument("--protocol", choices=tuple(PROTOCOLS), default="16",
                    help="16: the 16-epoch protocol (results/cpu10); long: the converged one (results/cpu10long); "
                         "long20: the converged one on the 20%% split (results/cpu20long); longlt: on the long-tailed "
                         "split (results/cpult100long)")
    ap.add_argument("--only", choices=("main", "ablations", "curve"), default=None)
    ap.add_argument("--skip", nargs="*", default=[], help="run names not to start (e.g. vhmn_frac100_s0)")
    ap.add_argument("--runs", nargs="*", default=None, help="run only these run names (in the plan's order)")
    ap.add_argument("--longest-first", action="store_true", help="start the most expensive runs first")
    ap.add_argument("--deadline", default=None, help="HH:MM (UTC): start no run after this time")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    global RESULTS, RUNS, CHECKPOINT_RUN, EVALUATED
    folder, _, CHECKPOINT_RUN, EVALUATED = PROTOCOLS[args.protocol]
    RESULTS, RUNS = ROOT / "results" / folder, ROOT / "runs" / folder
    todo = [item for item in plan(args.only, args.protocol) if item[0] not in args.skip]
    if args.runs is not None:
        unknown = set(args.runs) - {item[0] for item in todo}
        if unknown:
            ap.error(f"--runs: {sorted(unknown)} not in the plan; see --list")
        todo = [item for item in todo if item[0] in args.runs]
    if args.longest_first:
        committed = committed_runs()  # read once for the whole plan
        todo.sort(key=lambda item: cost(item, committed), reverse=True)
    if args.list:
        for run, exp, seed, ov in todo:
            print(f"{'done ' if done(run) else 'to do'}  {run:<18} {exp} seed={seed} {' '.join(ov)}")
        return 0
    deadline = None
    if args.deadline:
        h, m = map(int, args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        deadline = now.replace(hour=h, minute=m, second=0, microsecond=0)
        if deadline < now - dt.timedelta(hours=1):  # a time more than an hour ago is the next day's (23:40 → 01:30)
            deadline += dt.timedelta(days=1)

    def job(item):
        if done(item[0]):
            return f"{item[0]}: already in results/, skipped"
        if deadline and dt.datetime.now(dt.timezone.utc) > deadline:
            return f"{item[0]}: not started (deadline {args.deadline} UTC passed)"
        return execute(*item)

    with ThreadPoolExecutor(args.workers) as pool:
        for line in pool.map(job, todo):
            print(line, flush=True)
    for run in EVALUATED:  # completed by an earlier sitting that did not keep its weights or evaluate it
        if done(run):
            keep_outputs(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
