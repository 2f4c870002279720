"""Training and inference throughput of V-HMN against timm ViTs, in one process.

    python benchmarks/throughput.py --quick            # CPU, a few minutes
    python benchmarks/throughput.py                    # full sweeps
    python benchmarks/throughput.py --out results/benchmarks/mine.json

What is measured, per model (same batch, same input, same process):

* training images/s: forward + backward + AdamW step (V-HMN in training mode writes its banks);
* inference images/s: eval-mode forward under ``torch.no_grad``;
* peak memory of one training step: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the growth
  of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the
  resident set before the step;
* parameters and FLOPs per image (:mod:`vhmn.flops`, at the benchmark batch size).

Comparisons: ``vhmn_tiny_cifar`` against ``vit_tiny_cifar`` (same width, depth and head size) and
``vit_cifar_params`` (same parameter count); the main comparison alternates the models over
several rounds and reports the median, so that load from other processes hits all of them alike.
Sweeps on ``vhmn_tiny_cifar``: bank size (local and global slots), refine_steps (0..3), the local
retrieval mode (bank; window through the dense fast path; window through the unfold reference path), and
image size with a matching patch size (against a ViT with the same patch).

CPU runs in float32. On CUDA every model runs under bf16 autocast and ``torch.compile``.
The JSON written to ``--out`` (default ``results/benchmarks/<device>.json``) carries the
provenance: git commit, device, library versions, date and wall time.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as dt
import gc
import json
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import vhmn
from vhmn import create_model
from vhmn.flops import count_per_image
from vhmn.model import VHMN
from vhmn.provenance import collect

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def peak_memory(fn, device: torch.device) -> float | None:
    """Peak memory (MiB) that ``fn()`` adds; None where it cannot be measured."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:  # Linux: reset the high-water mark, then read it back
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss()["VmRSS"]
        fn()
        return (_rss()["VmHWM"] - base) / 2**20
    except (OSError, KeyError):
        fn()
        return None


class Runner:
    """One model on one device: a training step and an inference step, timed."""

    def __init__(self, name: str, model: torch.nn.Module, batch: int, img_size: int, device: torch.device, compile: bool):
        self.name, self.device, self.batch = name, device, batch
        self.is_vhmn = isinstance(model, VHMN)
        self.eager = model.to(device)
        self.model = torch.compile(model) if compile else model
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
        num_classes = getattr(model, "num_classes", 10)
        self.y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
        self.idx = torch.arange(batch, device=device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def train_step(self) -> None:
        self.model.train()
        with self.amp:
            out = self.model(self.x, self.idx, self.y) if self.is_vhmn else self.model(self.x)
            loss = F.cross_entropy(out.float(), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step(self) -> None:
        self.model.eval()
        with self.amp:
            self.model(self.x)

    def rate(self, step, steps: int, warmup: int) -> float:
        """Images per second over ``steps`` calls of ``step`` after ``warmup`` calls."""
        for _ in range(warmup):
            step()
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(self.device)
        return self.batch * steps / (time.perf_counter() - t)


def flops_per_image(model: torch.nn.Module, batch: int, img_size: int) -> float:
    """MFLOPs per image at ``batch`` (V-HMN's bank projections are shared by the batch)."""
    m = copy.deepcopy(model).cpu().float()
    return count_per_image(m, batch, img_size=img_size)["total"]["flops"] / 1e6


def measure(
    name: str, build, args, device: torch.device, rounds: int = 1, img_size: int = 32, with_memory: bool = True
) -> dict:
    """Build and measure one model (``rounds`` alternating measurements are done by the caller)."""
    torch.manual_seed(0)
    model = build()
    runner = Runner(name, model, args.batch, img_size, device, args.compile)
    row = {
        "model": name,
        "img_size": img_size,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "MFLOPs_per_img": flops_per_image(runner.eager, args.batch, img_size),
        "train": [],
        "infer": [],
    }
    row["_runner"] = runner
    for _ in range(rounds):
        measure_round(row, args)
    if with_memory:
        row["train_peak_MiB"] = peak_memory(runner.train_step, device)
    return row


def measure_round(row: dict, args) -> None:
    r = row["_runner"]
    row["train"].append(r.rate(r.train_step, args.steps, args.warmup))
    row["infer"].append(r.rate(r.infer_step, args.steps, args.warmup))


def compare(builders: dict, args, device: torch.device, img_size: dict | None = None) -> list[dict]:
    """Measure several models in alternating rounds (median per model): load from other
    processes then hits every model alike."""
    img_size = img_size or {}
    rows = {n: measure(n, b, args, device, rounds=1, img_size=img_size.get(n, 32)) for n, b in builders.items()}
    for _ in range(args.rounds - 1):
        for n in builders:
            measure_round(rows[n], args)
    return [finish(r) for r in rows.values()]


def finish(row: dict) -> dict:
    row.pop("_runner", None)
    row["train_img_s"] = statistics.median(row["train"])
    row["infer_img_s"] = statistics.median(row["infer"])
    return row


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
SWEEPS = ("memory_slots", "refine_steps", "local_mode", "image_size", "candidates")


def long_protocol_candidates(only: list[str] | None = None) -> dict:
    """The memory-mixer candidates of the converged CPU protocol (scripts/cpu_experiments.py CANDIDATES, width 64)
    and its ViT, as model builders: one definition of each candidate, read from the script. only: these names."""
    import importlib.util

    from vhmn.experiments import load_experiment
    from vhmn.train import parse_override

    spec = importlib.util.spec_from_file_location("cpu_experiments", Path(__file__).resolve().parent.parent / "scripts" / "cpu_experiments.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    vhmn_kw = load_experiment("cifar10_frac10_cpulong_vhmn")["model_kwargs"]
    vit_kw = load_experiment("cifar10_frac10_cpulong_vit")["model_kwargs"]
    out = {"vit (width 64)": lambda: create_model("vit_tiny_cifar", **vit_kw)}
    unknown = set(only or ()) - set(mod.CANDIDATES)
    if unknown:
        raise SystemExit(f"--candidates: {sorted(unknown)} are not in scripts/cpu_experiments.py CANDIDATES; known: {', '.join(mod.CANDIDATES)}")
    for name, overrides in mod.CANDIDATES.items():
        if only and name not in only:
            continue
        kw = dict(vhmn_kw)
        for o in overrides:
            key, value = parse_override(o)
            kw[key.removeprefix("model.")] = value
        out[name] = lambda kw=kw: create_model("vhmn_tiny_cifar", **kw)
    return out


def unfold_window(model: VHMN) -> VHMN:
    """Window mode through the unfold reference path on every grid (what it was before the dense fast path)."""
    from vhmn.model import LocalHopfield

    for m in model.modules():
        if isinstance(m, LocalHopfield):
            m.DENSE_WINDOW_MAX_TOKENS = 0
    return model


def vit_like(img_size: int, patch_size: int, **kw):
    return lambda: create_model("vit_tiny_cifar", img_size=img_size, patch_size=patch_size, **kw)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps, rounds and sweep points (CPU: a few minutes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 32 quick / 64 CPU / 256 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each measurement")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds of the main comparison")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="CUDA: skip torch.compile")
    p.add_argument("--skip-sweeps", action="store_true")
    p.add_argument("--no-main", action="store_true", help="skip the main comparison (V-HMN-tiny against the two ViTs)")
    p.add_argument("--sweeps", nargs="+", choices=SWEEPS, default=list(SWEEPS), help="which sweeps to run (default: all)")
    p.add_argument("--candidates", nargs="+", default=None, metavar="NAME",
                   help="the candidates sweep: only these names of scripts/cpu_experiments.py CANDIDATES (default: all)")
    p.add_argument("--profile", action="store_true", help="profile one V-HMN training step (torch.profiler)")
    p.add_argument("--out", default=None, help="JSON path (default results/benchmarks/<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is available")
    args.compile = args.compile and cuda
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    args.batch = args.batch or (256 if cuda else 32 if q else 64)
    args.steps = args.steps or ((10 if q else 30) if cuda else (3 if q else 10))
    args.warmup = args.warmup or ((3 if q else 5) if cuda else 1 if q else 2)  # compile happens in warm-up
    args.rounds = args.rounds or (2 if q else 3)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    started = time.time()
    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"vhmn {vhmn.__version__} | torch {torch.__version__} | {collect(device)['device']}")
    print(f"batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{'bf16 autocast + torch.compile' if args.compile else 'bf16 autocast' if cuda else 'float32'}\n")

    # ---- main comparison: models alternate over rounds -------------------------------------
    contenders = {
        "vhmn_tiny_cifar": lambda: create_model("vhmn_tiny_cifar"),
        "vit_tiny_cifar": lambda: create_model("vit_tiny_cifar"),
        "vit_cifar_params": lambda: create_model("vit_cifar_params"),
    }
    if args.no_main:  # only the sweeps asked for (the main comparison trains width-192 models: minutes on a CPU)
        main_rows, ratios = [], {}
    else:
        main_rows = compare(contenders, args, device)
        v, vit_w, vit_p = main_rows
        ratios = {
            "train_vs_vit_same_width_depth": v["train_img_s"] / vit_w["train_img_s"],
            "train_vs_vit_same_params": v["train_img_s"] / vit_p["train_img_s"],
            "infer_vs_vit_same_width_depth": v["infer_img_s"] / vit_w["infer_img_s"],
            "infer_vs_vit_same_params": v["infer_img_s"] / vit_p["infer_img_s"],
        }
        print(table("V-HMN vs ViT (32×32, median of alternating rounds)", main_rows))
        print("\n" + "=" * 78)
        print(f"  V-HMN / ViT training throughput: {ratios['train_vs_vit_same_width_depth']:.2f}× (same width and depth), "
              f"{ratios['train_vs_vit_same_params']:.2f}× (same parameter count)")
        print(f"  V-HMN / ViT inference throughput: {ratios['infer_vs_vit_same_width_depth']:.2f}× (same width and depth), "
              f"{ratios['infer_vs_vit_same_params']:.2f}× (same parameter count)")
        print("=" * 78 + "\n")

    # ---- sweeps ---------------------------------------------------------------------------
    sweeps: dict[str, list[dict]] = {}
    wanted = set() if args.skip_sweeps else set(args.sweeps)
    if "memory_slots" in wanted:
        slots = [256, 5000] if q else [256, 512, 1024, 2048, 5000]
        sweeps["memory_slots"] = compare(
            {f"slots={n}": (lambda n=n: create_model("vhmn_tiny_cifar", local_slots=n, global_slots=n)) for n in slots},
            args, device,
        )
        for r, n in zip(sweeps["memory_slots"], slots):
            r["slots"] = n
        print(table("bank size (local = global slots), vhmn_tiny_cifar", sweeps["memory_slots"]) + "\n")
    if "refine_steps" in wanted:
        sweeps["refine_steps"] = compare(
            {f"refine_steps={t}": (lambda t=t: create_model("vhmn_tiny_cifar", refine_steps=t)) for t in range(4)},
            args, device,
        )
        for t, r in enumerate(sweeps["refine_steps"]):
            r["refine_steps"] = t
        print(table("refine_steps T, vhmn_tiny_cifar", sweeps["refine_steps"]) + "\n")
    if "local_mode" in wanted:
        sweeps["local_mode"] = compare(
            {"bank (default)": lambda: create_model("vhmn_tiny_cifar"),
             "window, dense fast path": lambda: create_model("vhmn_tiny_cifar", local_mode="window"),
             "window, unfold reference": lambda: unfold_window(create_model("vhmn_tiny_cifar", local_mode="window")),
             "vit_tiny_cifar": lambda: create_model("vit_tiny_cifar")},  # the yardstick, in the same rounds
            args, device,
        )
        print(table("local retrieval mode, vhmn_tiny_cifar", sweeps["local_mode"]) + "\n")
    if "image_size" in wanted:
        sizes = [(32, 4), (64, 8), (224, 16)] if q else [(32, 4), (64, 4), (64, 8), (128, 8), (224, 16)]
        builders, sizes_of, meta = {}, {}, {}
        for size, patch in sizes:
            for kind, build in (
                ("vhmn", lambda s=size, pt=patch: create_model("vhmn_tiny_cifar", img_size=s, patch_size=pt)),
                ("vit", vit_like(size, patch)),
            ):
                name = f"{kind} {size}px/p{patch}"
                builders[name], sizes_of[name] = build, size
                meta[name] = dict(kind=kind, patch_size=patch, tokens=(size // patch) ** 2)
        sweeps["image_size"] = compare(builders, args, device, img_size=sizes_of)
        for r in sweeps["image_size"]:
            r.update(meta[r["model"]])
        print(table("image size (width 192, depth 6; tokens = (size / patch)²)", sweeps["image_size"]) + "\n")

    if "candidates" in wanted:
        sweeps["candidates"] = compare(long_protocol_candidates(args.candidates), args, device)
        vit_ips = sweeps["candidates"][0]["train_img_s"]
        for r in sweeps["candidates"]:
            r["train_vs_vit"] = r["train_img_s"] / vit_ips
        print(table("the converged protocol's candidates (width 64, depth 4) and its ViT", sweeps["candidates"]))
        print("  training throughput / ViT's: " + ", ".join(f"{r['model']} {r['train_vs_vit']:.2f}×" for r in sweeps["candidates"][1:]) + "\n")

    profile = profile_vhmn(args, device) if args.profile else None

    prov = collect(device)
    if prov.get("git_commit") is None and os.environ.get("VHMN_GIT_COMMIT"):  # a copy without .git
        prov["git_commit"] = os.environ["VHMN_GIT_COMMIT"]
        prov["git_dirty"] = os.environ.get("VHMN_GIT_DIRTY", "unknown")
    result = {
        "provenance": {
            **prov,
            "device_name": dev_name,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(time.time() - started, 1),
            "threads": torch.get_num_threads(),
        },
        "settings": {
            "quick": q, "sweeps": [w for w in SWEEPS if w in wanted], "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
            "precision": "bf16 autocast" if cuda else "float32", "compile": args.compile,
            "optimizer": "AdamW(lr=1e-4, weight_decay=0.05)",
            "peak_memory": "cuda max_memory_allocated" if cuda else "growth of process peak RSS (VmHWM) during one training step",
        },
        "main": main_rows,
        "ratios": ratios,
        "sweeps": sweeps,
    }
    if profile is not None:
        result["profile"] = profile
    slug = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-")
    out = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / f"{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    shown = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    print(f"wrote {shown} ({result['provenance']['wall_time_s']:.0f} s)")
    return result


def table(title: str, rows: list[dict]) -> str:
    head = f"{'model':<22}{'params M':>9}{'MFLOPs/img':>11}{'train img/s':>13}{'infer img/s':>13}{'train peak MiB':>16}"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        mem = r.get("train_peak_MiB")
        lines.append(
            f"{r['model']:<22}{r['params_M']:>9.2f}{r['MFLOPs_per_img']:>11.1f}{r['train_img_s']:>13.1f}"
            f"{r['infer_img_s']:>13.1f}{(f'{mem:.0f}' if mem is not None else '—'):>16}"
        )
    return "\n".join(lines)


def profile_vhmn(args, device: torch.device) -> dict:
    """Where one V-HMN training step spends its time: top operators and top modules."""
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.manual_seed(0)
    r = Runner("vhmn_tiny_cifar", create_model("vhmn_tiny_cifar"), args.batch, 32, device, args.compile)
    for _ in range(max(args.warmup, 1)):
        r.train_step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # label the parts of each block so the profile can be read per component
    labels = {}
    for name, mod in r.eager.named_modules():
        if re.search(r"mixer\.(local|glob)$|mlp$|mixer$|patch_embed$", name):
            labels[name] = mod
    handles = []
    stack: list = []
    for name, mod in labels.items():
        part = name.split(".")[-1]
        handles.append(mod.register_forward_pre_hook(lambda m, a, part=part: stack.append(record_function(f"## {part}").__enter__()) and None))
        handles.append(mod.register_forward_hook(lambda m, a, o: stack.pop().__exit__(None, None, None) and None))
    try:
        with profile(activities=acts) as prof:
            for _ in range(args.steps):
                r.train_step()
    finally:
        for h in handles:
            h.remove()
    avgs = prof.key_averages()
    key = "self_cpu_time_total"
    if device.type == "cuda":  # the attribute's name changed across torch versions
        key = next(k for k in ("self_device_time_total", "self_cuda_time_total") if hasattr(avgs[0], k))
    total = sum(getattr(e, key) for e in avgs) or 1.0
    ops = sorted(avgs, key=lambda e: -getattr(e, key))
    top_ops = [{"op": e.key, "share": getattr(e, key) / total, "calls": e.count} for e in ops if not e.key.startswith("##")][:15]
    parts = {e.key[3:]: e.cpu_time_total for e in avgs if e.key.startswith("## ")}
    step_time = sum(e.self_cpu_time_total for e in avgs) or 1.0
    print(f"profile: {args.steps} V-HMN training steps, {'GPU kernel' if device.type == 'cuda' else 'CPU'} time by operator")
    if device.type != "cuda":
        for name, t in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  forward of {name:<12} {t / step_time:6.1%} of the step's CPU time (backward not included)")
    for o in top_ops:
        print(f"  {o['op']:<50} {o['share']:6.1%}  ({o['calls']} calls)")
    return {"top_ops": top_ops, "forward_parts_share": {k: v / step_time for k, v in parts.items()}}


if __name__ == "__main__":
    main(sys.argv[1:])
