"""The GPU reproduction, sized to a device lease: resumable stages, each one `run` call of at most 7 minutes.

A lent GPU gives a session 15 minutes of device time in all (start-up and idle time included, at most 10 minutes a
call), and a call carries at most 64 MiB of files. So the data travel in chunks, and the work is cut into stages that
each fit one call and write their results under $OUT; a stage whose results are committed (results/gpu/) is skipped.

    python scripts/gpu_reproduce.py pack                  # here, once: CIFAR-10 → .gpu_data/call<k>/ (git-ignored)
    python scripts/gpu_reproduce.py calls                 # here: the device calls, in order (what each carries, runs)
    python scripts/gpu_reproduce.py plan                  # stages, estimated minutes, data needed, done or not
    python scripts/gpu_reproduce.py run CALL --out $OUT   # there: stage the carried chunks, run the call's stages
    python scripts/gpu_reproduce.py run all --dry-run     # here: every stage on CPU, tiny models, a few steps

Data. ``pack`` reads CIFAR-10 from $VHMN_DATA (CI and developers: ../shared/data) and writes the test set, the
committed 10% subset and the training set in six row chunks, each with the sha256 of its arrays, into one folder
per call (at most ~50 MiB each, under the 64 MiB a call carries). On the device ``run`` appends the chunks of its
call to /tmp/vhmn_gpu_data (which survives between calls while the machine stays warm), checks every sha256, and
assembles ``cifar10/{train,test}.npz`` as soon as all parts are there; the 10% stages run as soon as the test set and
the 10% subset are there (the other rows then hold zeros and label −1, never read: the subset's indices pick rows).
The trainer keeps the whole dataset on the GPU (vhmn.loader.DeviceLoader) and augments it there.

Order. The issue's priority is (1) V-HMN and ViT on the full CIFAR-10, short; (2) the 10% table, seed 0, converged,
and the converged CPU protocol's best memory mixer at that scale (call2); (3) MLP-Mixer and ConvMixer on 10%;
(4) seeds 1–2; (5) the long full run. The full training set needs three calls
to travel, so the calls run (2) first (with the GPU throughput benchmark), carry the training chunks while running
(3) and (4), and run (1) once the full set is assembled, then the rest of (4) and (5): no call waits idle for data.

Results: per run ``$OUT/<run>.json`` (the trainer's results.json: config, seed, commit, device, wall time, curves,
images/s) and, for the main runs, ``$OUT/<run>.safetensors`` (fp16); commit them under ``results/gpu/<run>/``
(``results.json``, ``model-fp16.safetensors``). At most 8 files come back from a call: the stages are sized to that.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PACKED = ROOT / ".gpu_data"  # git-ignored; carried to the device machine one call folder at a time
RESULTS = ROOT / "results" / "gpu"
STAGED = Path(os.environ.get("VHMN_GPU_STAGE", "/tmp/vhmn_gpu_data"))
TRAIN_CHUNKS = 6


@dataclass
class Run:
    name: str  # the run's folder under results/gpu/
    experiment: str  # a config of vhmn/experiments
    overrides: list[str] = field(default_factory=list)
    keep_weights: bool = False  # bring the fp16 checkpoint back


@dataclass
class Stage:
    key: str
    title: str
    data: str  # 'frac10' (test set + the 10% subset) or 'full'
    runs: list[Run]


def _best_candidate() -> tuple[str, list[str]]:
    """The converged CPU protocol's chosen candidate (scripts/cpu_experiments.py CHOSEN): name, model overrides."""
    spec = importlib.util.spec_from_file_location("cpu_experiments", Path(__file__).resolve().parent / "cpu_experiments.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CHOSEN, mod.CANDIDATES[mod.CHOSEN]


BEST, BEST_OVERRIDES = _best_candidate()
FULL_SHORT = ["epochs=20", "warmup_epochs=1", "eval_every=5", "ckpt_every=20"]
FRAC10 = []  # cifar10_frac10_* : the shared recipe, 200 epochs, warmup 10
STAGES = [
    Stage("frac10", "10% CIFAR-10, seed 0: V-HMN and ViT (200 epochs)", "frac10",
          [Run("vhmn_frac10_s0", "cifar10_frac10_vhmn", FRAC10, True), Run("vit_frac10_s0", "cifar10_frac10_vit", FRAC10, True)]),
    # the converged CPU protocol's best fast candidate at the paper-scale width and recipe: does it beat the ViT there?
    Stage("frac10_candidate", f"10% CIFAR-10, seed 0: V-HMN with the CPU protocol's chosen candidate ({BEST})", "frac10",
          [Run(f"{BEST}_frac10_s0", "cifar10_frac10_vhmn", BEST_OVERRIDES, True)]),
    Stage("frac10_baselines", "10% CIFAR-10, seed 0: MLP-Mixer and ConvMixer", "frac10",
          [Run(f"{m}_frac10_s0", f"cifar10_{m}", ["subset=cifar10_frac10", "epochs=200", "warmup_epochs=10"]) for m in ("mixer", "convmixer")]),
    *[Stage(f"frac10_s{s}", f"10% CIFAR-10, seed {s}: V-HMN and ViT", "frac10",
            [Run(f"{m}_frac10_s{s}", f"cifar10_frac10_{m}", [f"seed={s}"]) for m in ("vhmn", "vit")]) for s in (1, 2)],
    Stage("full_short", "full CIFAR-10, 20 epochs: V-HMN and ViT", "full",
          [Run("vhmn_full_e20_s0", "cifar10_vhmn", FULL_SHORT, True), Run("vit_full_e20_s0", "cifar10_vit", FULL_SHORT, True)]),
    Stage("full_long", "full CIFAR-10, 35 epochs: V-HMN (toward the 94.5% target)", "full",
          [Run("vhmn_full_e35_s0", "cifar10_vhmn", ["epochs=35", "warmup_epochs=2", "eval_every=5", "ckpt_every=35"], True)]),
]
# One call each; what it carries (chunk files packed into .gpu_data/<call>/) and which stages it runs.
CALLS = {
    "call1": (["test", "frac10"], ["frac10"], True),  # + the GPU sync test and throughput benchmark
    "call2": (["train-0", "train-1"], ["frac10_candidate"], False),
    "call3": (["train-2", "train-3"], ["frac10_s1"], False),
    "call4": (["train-4", "train-5"], ["full_short"], False),
    "call5": ([], ["frac10_baselines"], False),
    "call6": ([], ["frac10_s2"], False),
    "call7": ([], ["full_long"], False),
}
# Training images/s used by `plan` when no GPU run of the model is committed yet: the committed H100 benchmark
# (results/benchmarks/nvidia-h100-80gb-hbm3.json, compiled bf16, batch 256); MLP-Mixer and ConvMixer: the ViT's.
FALLBACK_IMG_S = {"vhmn_tiny_cifar": 4879.0, "vit_tiny_cifar": 13619.0}


# ---------------------------------------------------------------------------------------------
# data: pack here, stage there
# ---------------------------------------------------------------------------------------------
def array_sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def pack(dest: Path = PACKED, data_root: str | None = None) -> dict:
    """Write the chunks of every call into dest/<call>/<chunk>.npz with their sha256 in dest/manifest.json."""
    sys.path.insert(0, str(ROOT))
    from vhmn.data import load_arrays, load_subset_indices

    x_tr, y_tr = load_arrays("cifar10", "train", data_root, download=False)
    x_te, y_te = load_arrays("cifar10", "test", data_root, download=False)
    idx = load_subset_indices("cifar10_frac10", dataset="cifar10")
    chunks = {"test": dict(images=x_te, labels=y_te), "frac10": dict(images=x_tr[idx], labels=y_tr[idx], indices=idx)}
    bounds = np.linspace(0, len(y_tr), TRAIN_CHUNKS + 1).astype(int)
    for i in range(TRAIN_CHUNKS):
        a, b = bounds[i], bounds[i + 1]
        chunks[f"train-{i}"] = dict(images=x_tr[a:b], labels=y_tr[a:b], start=np.array(a))
    from vhmn.data import data_root as root_of

    files = {f"{split}.npz": hashlib.sha256((root_of(data_root) / "cifar10" / f"{split}.npz").read_bytes()).hexdigest()
             for split in ("train", "test")}
    manifest = {"source_files_sha256": files,  # ../shared/data/README.md lists these for the shared copy
                "train": {"n": int(len(y_tr)), "sha256": array_sha256(x_tr, y_tr), "chunks": TRAIN_CHUNKS},
                "test": {"n": int(len(y_te)), "sha256": array_sha256(x_te, y_te)}, "chunks": {}}
    shutil.rmtree(dest, ignore_errors=True)
    for call, (names, _, _) in CALLS.items():
        for name in names:
            folder = dest / call
            folder.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(folder / f"{name}.npz", **chunks[name])
            manifest["chunks"][name] = array_sha256(chunks[name]["images"], chunks[name]["labels"])
    for call in CALLS:
        (dest / call).mkdir(parents=True, exist_ok=True)
        (dest / call / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def stage_data(carried: Path, staged: Path = STAGED) -> str:
    """Append the carried chunks (sha256-checked) to ``staged``; assemble what can be. Returns what is ready:
    'full', 'frac10' or 'none'."""
    staged.mkdir(parents=True, exist_ok=True)
    manifest_path = carried / "manifest.json"
    if manifest_path.is_file():
        shutil.copy2(manifest_path, staged / "manifest.json")
    if not (staged / "manifest.json").is_file():
        raise FileNotFoundError(f"no manifest.json in {carried} or {staged}: run `python scripts/gpu_reproduce.py pack` "
                                f"here and carry .gpu_data/<call>")
    manifest = json.loads((staged / "manifest.json").read_text())
    for f in sorted(carried.glob("*.npz")):
        with np.load(f) as z:
            got = array_sha256(z["images"], z["labels"])
        if got != manifest["chunks"].get(f.stem):
            raise ValueError(f"{f}: sha256 {got[:12]}… does not match the manifest; pack again")
        shutil.copy2(f, staged / f.name)
    cifar = staged / "cifar10"
    cifar.mkdir(exist_ok=True)
    parts = [staged / f"train-{i}.npz" for i in range(manifest["train"]["chunks"])]
    marker = cifar / "staged.json"
    ready = json.loads(marker.read_text())["ready"] if marker.is_file() else "none"
    if (staged / "test.npz").is_file() and not (cifar / "test.npz").is_file():
        with np.load(staged / "test.npz") as z:
            np.savez(cifar / "test.npz", images=z["images"], labels=z["labels"])
    if ready != "full" and all(p.is_file() for p in parts) and (cifar / "test.npz").is_file():
        xs, ys = zip(*[(z["images"], z["labels"]) for z in map(np.load, parts)])
        x, y = np.concatenate(xs), np.concatenate(ys)
        if array_sha256(x, y) != manifest["train"]["sha256"]:
            raise ValueError("the reassembled training set does not match its sha256; pack again")
        np.savez(cifar / "train.npz", images=x, labels=y)
        ready = "full"
    elif ready == "none" and (staged / "frac10.npz").is_file() and (cifar / "test.npz").is_file():
        with np.load(staged / "frac10.npz") as z:
            x = np.zeros((manifest["train"]["n"], *z["images"].shape[1:]), np.uint8)
            y = np.full(manifest["train"]["n"], -1, np.int64)  # rows outside the subset: never read
            x[z["indices"]], y[z["indices"]] = z["images"], z["labels"]
        np.savez(cifar / "train.npz", images=x, labels=y)
        ready = "frac10"
    marker.write_text(json.dumps({"ready": ready}))
    return ready


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
def done(run: Run) -> bool:
    path = RESULTS / run.name / "results.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "complete"


DRY = {"vhmn": ["model.dims=[32]", "model.depths=[1]", "model.head_dim=16", "model.local_slots=16", "model.global_slots=8",
                "model.local_writes=8"],
       "vit": ["model.embed_dim=32", "model.depth=1", "model.num_heads=2"],
       "mixer": ["model.embed_dim=32", "model.num_blocks=1"],
       "convmixer": ["model.dim=32", "model.depth=1"]}
DRY_COMMON = ["epochs=1", "warmup_epochs=0", "batch_size=32", "train_limit=64", "test_limit=64", "eval_every=1",
              "ckpt_every=1", "device=cpu", "threads=1", "compile=false"]


def run_stage(stage: Stage, out: Path, work: Path, data_root: Path, dry_run: bool, log=print) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from vhmn.train import Trainer, build_config

    lines = []
    for run in stage.runs:
        if done(run) and not dry_run:
            lines.append(f"{run.name}: committed already, skipped")
            continue
        overrides = list(run.overrides) + [f"data_root={data_root}"]
        if dry_run:
            kind = run.experiment.split("_")[-1]
            overrides = [o for o in overrides if not o.split("=")[0] in ("epochs", "warmup_epochs", "eval_every", "ckpt_every")]
            overrides += DRY_COMMON + DRY[kind]
        cfg = build_config(run.experiment, overrides, out=str(work / run.name))
        t0 = time.time()
        trainer = Trainer(cfg, log=log)
        trainer.provenance["command"] = f"python scripts/gpu_reproduce.py ({stage.key}) {run.experiment} " + " ".join(overrides)
        res = trainer.fit()
        shutil.copy2(work / run.name / "results.json", out / f"{run.name}.json")
        if run.keep_weights:
            shutil.copy2(work / run.name / "model-fp16.safetensors", out / f"{run.name}.safetensors")
        ips = [e["images_per_s"] for e in res["epochs"]]
        lines.append(f"{run.name}: test accuracy {res['final']['test_acc']:.4f}, {res['final']['epochs_done']} epochs, "
                     f"{statistics.median(ips):.0f} img/s, {time.time() - t0:.0f} s with evaluation")
    return lines


def ingest(folder: Path, results: Path = RESULTS) -> list[str]:
    """Fetched ``<run>.json`` (+ ``<run>.safetensors``) → ``results/gpu/<run>/results.json`` (+ model-fp16.safetensors);
    throughput.json → results/benchmarks/<device>-reproduce.json. Only complete runs are taken."""
    lines = []
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        if f.name == "throughput.json":
            dev = str(r.get("provenance", {}).get("device", "gpu")).lower().replace(" ", "-")
            dest = ROOT / "results" / "benchmarks" / f"{dev}-reproduce.json"
            shutil.copy2(f, dest)
            lines.append(f"throughput → {dest.relative_to(ROOT)}")
            continue
        if r.get("schema") != "vhmn-results/1" or r.get("status") != "complete":
            lines.append(f"{f.name}: not a complete run (status {r.get('status')}), left out")
            continue
        dest = results / f.stem
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest / "results.json")
        if (folder / f"{f.stem}.safetensors").is_file():
            shutil.copy2(folder / f"{f.stem}.safetensors", dest / "model-fp16.safetensors")
        lines.append(f"{f.stem}: {r['final']['test_acc']:.4f} on {r['provenance']['device']} → {dest}")
    return lines


def estimate_minutes(stage: Stage) -> float:
    """Training minutes of a stage from the last measured images/s of each model on a GPU (committed runs of
    results/gpu/, else the committed H100 benchmark), plus one minute of compilation per run."""
    sys.path.insert(0, str(ROOT))
    from vhmn.train import build_config

    measured: dict[str, list[float]] = {}
    for path in RESULTS.glob("*/results.json"):
        r = json.loads(path.read_text())
        measured.setdefault(r["model"]["name"], []).extend(e["images_per_s"] for e in r["epochs"])
    total = 0.0
    for run in stage.runs:
        cfg = build_config(run.experiment, run.overrides)
        n = 5000 if cfg.subset == "cifar10_frac10" else 50_000
        ips = statistics.median(measured[cfg.model]) if measured.get(cfg.model) else FALLBACK_IMG_S.get(cfg.model, FALLBACK_IMG_S["vit_tiny_cifar"])
        total += n * cfg.epochs / ips / 60 + 1.0
    return total


def throughput(out: Path, dry_run: bool) -> str:
    """The GPU throughput benchmark (benchmarks/throughput.py --quick) into $OUT/throughput.json."""
    import subprocess

    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--out", str(out / "throughput.json")]
    if dry_run:
        return "throughput: skipped in a dry run (benchmarks/throughput.py has its own tests)"
    rc = subprocess.call(cmd, cwd=ROOT)
    return f"throughput: benchmarks/throughput.py --quick exited {rc}"


def sync_test(dry_run: bool) -> str:
    """tests/test_gpu_sync.py: no host-device sync in a training step (skipped without a GPU). Its summary line."""
    import subprocess

    if dry_run:
        return "sync test: skipped in a dry run (it needs a GPU)"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu_sync.py")],
                          cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return f"sync test (tests/test_gpu_sync.py): exit {proc.returncode}, {lines[-1] if lines else 'no output'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: write the chunks of every call into .gpu_data/")
    p.add_argument("--data-root", default=None)
    p.add_argument("--packed", default=str(PACKED), help="where to write the call folders (default .gpu_data)")
    sub.add_parser("calls", help="the device calls in order")
    p = sub.add_parser("ingest", help="here: copy a call's fetched files into results/gpu/<run>/")
    p.add_argument("folder", help="where the fetched $OUT files lie (the run tool's files_at)")
    sub.add_parser("plan", help="stages, estimated minutes, done or not")
    p = sub.add_parser("run", help="stage the carried chunks and run the stages of a call ('all': every stage)")
    p.add_argument("call", choices=[*CALLS, "all"])
    p.add_argument("--chunks", default=None, help="the carried folder (default .gpu_data/<call>)")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    p.add_argument("--packed", default=str(PACKED), help="the packed call folders, for 'all' (default .gpu_data)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, a few steps, every stage")
    args = ap.parse_args(argv)

    if args.cmd == "pack":
        dest = Path(args.packed)
        m = pack(dest, data_root=args.data_root)
        for call in CALLS:
            size = sum(f.stat().st_size for f in (dest / call).iterdir()) / 2**20
            print(f"{call}: {size:5.1f} MiB in {dest / call}")
        print(f"train sha256 {m['train']['sha256'][:16]}…, test sha256 {m['test']['sha256'][:16]}…")
        return 0
    if args.cmd == "calls":
        for call, (chunks, stages, bench) in CALLS.items():
            carry = f'carry [".gpu_data/{call}"]' if chunks else "carry nothing"
            what = (["sync test", "throughput benchmark"] if bench else []) + stages
            print(f"{call}: {carry}; runs {', '.join(what)}\n    command: PYTHONUNBUFFERED=1 VHMN_GIT_COMMIT=<git rev-parse HEAD> "
                  f"python3 scripts/gpu_reproduce.py run {call} --out $OUT")
        return 0
    if args.cmd == "ingest":
        for line in ingest(Path(args.folder)):
            print(line)
        return 0
    if args.cmd == "plan":
        for st in STAGES:
            state = "done" if all(done(r) for r in st.runs) else f"{sum(map(done, st.runs))}/{len(st.runs)} runs done"
            call = next(c for c, (_, stages, _) in CALLS.items() if st.key in stages)
            print(f"{st.key:<17} {estimate_minutes(st):5.1f} min  data {st.data:<6}  {call}  {state:<16} {st.title}")
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calls = list(CALLS) if args.call == "all" else [args.call]
    staged = STAGED if not args.dry_run else Path(args.out) / "_staged"
    work = Path("/tmp/vhmn_gpu_runs") if not args.dry_run else Path(args.out) / "_runs"
    lines, t0 = [], time.time()
    for call in calls:
        chunks, stage_keys, bench = CALLS[call]
        n_before = len(lines)
        carried = Path(args.chunks) if args.chunks and args.call != "all" else Path(args.packed) / call
        ready = stage_data(carried, staged)
        lines.append(f"{call}: data ready: {ready}")
        if bench:
            lines.append(sync_test(args.dry_run))
            lines.append(throughput(out, args.dry_run))
        for st in (s for s in STAGES if s.key in stage_keys):
            if st.data == "full" and ready != "full":
                lines.append(f"{st.key}: needs the full training set (ready: {ready}); carry the remaining chunks first")
                continue
            lines += run_stage(st, out, work, staged, args.dry_run)
        print("\n".join(lines[n_before:]), flush=True)
    (out / "gpu_reproduce.log").write_text("\n".join(lines) + f"\ntotal {time.time() - t0:.0f} s\n")
    print(f"total {time.time() - t0:.0f} s; {len(list(out.glob('*.json')))} results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
