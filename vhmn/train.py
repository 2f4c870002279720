"""One trainer for V-HMN and every baseline (one recipe: a fair comparison).

    python -m vhmn.train --list                                  # the experiments
    python -m vhmn.train cifar10_vhmn --smoke                    # CPU, < 1 min, small slice of real data
    python -m vhmn.train cifar10_vhmn epochs=5 model.refine_steps=0 --out runs/t0
    python -m vhmn.train cifar10_vhmn --resume                   # continue the run in its out_dir
    torchrun --nproc_per_node=8 -m vhmn.train imagenet_vhmn      # multi-GPU (DDP)

Recipe: AdamW (no weight decay on norms, biases, position embeddings), linear warmup then cosine
decay per step, label smoothing, gradient clipping, optional EMA of the weights, bf16 autocast and
torch.compile on CUDA. V-HMN models are called ``model(x, index=idx, labels=y)`` so that their
episodic banks record where each slot came from; baselines are called ``model(x)``.

Distributed: ``DistributedDataParallel(model, broadcast_buffers=False)`` (each rank writes its own
micro-batch into its copy of the banks) and :func:`vhmn.memory.sync_memory` at every epoch end, so
every rank evaluates and saves rank 0's banks. The global batch is split evenly over the ranks.

Metrics are accumulated on the device and read once per epoch (no ``.item()`` per step); a
non-finite loss is noticed within ``nan_check_every`` steps and stops the run, leaving the last good
checkpoint in place. Every run writes ``<out_dir>/results.json`` (see :data:`RESULTS_SCHEMA`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointDir, export_fp16, model_metadata, unwrap
from .memory import sync_memory
from .model import VHMN

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "ConfigError", "build_config", "main", "RESULTS_SCHEMA"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class ConfigError(ValueError):
    """An experiment config or a command-line override is invalid."""


@dataclass
class TrainConfig:
    name: str = "custom"  # experiment name (file stem)
    description: str = ""
    # model
    model: str = "vhmn_tiny_cifar"  # a name from vhmn.list_models()
    model_kwargs: dict = field(default_factory=dict)  # overrides, e.g. {"refine_steps": 0}
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | svhn | imagenet
    subset: str | None = None  # a committed index list data/splits/<subset>.json (e.g. cifar10_frac10)
    train_limit: int | None = None  # use only the first N training images (of the subset) — smoke runs
    test_limit: int | None = None  # evaluate on the first N test images — smoke runs
    augment: str = "crop_flip"  # none | crop_flip | strong (crop_flip + TrivialAugmentWide)
    pad_mode: str = "reflect"  # padding of the random crop: reflect | zeros
    data_root: str | None = None  # default: $VHMN_DATA or ./data
    num_workers: int = 8  # ImageNet only (the small datasets live on the device)
    image_size: int = 224  # ImageNet only: training crop / evaluation centre crop
    stand_in: str | None = None  # smoke runs only: if the dataset is absent, use this instead ('cifar10'; 'synthetic'
    #                              for ImageNet: random images in an ImageFolder) — recorded in results.json
    # optimisation (one recipe for every model)
    epochs: int = 200
    batch_size: int = 512  # global batch (split over DDP ranks)
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 10.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0  # max global grad norm; None = off
    ema: float | None = None  # EMA decay per step (e.g. 0.9998); None = off
    # execution
    bf16: bool = True  # autocast to bfloat16 (CUDA only)
    compile: bool = True  # torch.compile (CUDA only)
    seed: int = 0
    eval_every: int = 1  # epochs between test evaluations (the last epoch is always evaluated)
    ckpt_every: int = 1  # epochs between checkpoints (the last epoch always saves)
    nan_check_every: int = 50  # steps between checks of the loss for NaN/inf (a host sync)
    out_dir: str | None = None  # default runs/<name> (runs/smoke/<name> with --smoke)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # CPU intra-op threads (torch.set_num_threads); None = torch's default
    export_fp16: bool = True  # also write <out_dir>/model-fp16.safetensors at the end
    diagnose: int = 0  # V-HMN: at every evaluation, memory diagnostics (vhmn.diagnostics) on this many test images
    smoke: dict = field(default_factory=dict)  # overrides applied by --smoke

    def __post_init__(self):
        from .loader import AUGMENTATIONS

        checks = [
            (self.augment in AUGMENTATIONS, f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}"),
            (self.pad_mode in ("reflect", "zeros"), f"pad_mode must be 'reflect' or 'zeros', got {self.pad_mode!r}"),
            (self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be ≥ 0, got {self.warmup_epochs}"),
            (self.ema is None or 0 < self.ema < 1, f"ema must be None or in (0, 1), got {self.ema}"),
            (self.eval_every >= 1 and self.ckpt_every >= 1, "eval_every and ckpt_every must be ≥ 1"),
            (self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


RESULTS_SCHEMA = {
    "schema": "vhmn-results/1",
    "experiment": "experiment name",
    "status": "running | complete | interrupted | diverged",
    "config": "every TrainConfig field (after --smoke and overrides)",
    "seed": "int",
    "provenance": "git_commit, git_dirty, versions{python,torch,numpy,timm,torchvision,safetensors,einops,vhmn}, device, world_size, command",
    "model": "{name, kwargs, num_params, config (V-HMN: the full VHMNConfig)}",
    "data": "{dataset, subset, train_images, test_images, steps_per_epoch, stand_in (smoke runs on another dataset, else null)}",
    "epochs": "per epoch: epoch, lr, train_loss, train_acc, test_loss, test_acc (null when not evaluated), [ema_test_acc], [memory (diagnose > 0)], images_per_s, epoch_time_s",
    "final": "{epochs_done, train_loss, train_acc, test_loss, test_acc, best_test_acc, [ema_test_acc]}",
    "wall_time_s": "seconds of training (summed over resumptions)",
    "started_at / finished_at": "UTC ISO times",
}

_RESUME_MAY_DIFFER = {"device", "threads", "diagnose", "compile", "eval_every", "ckpt_every", "out_dir", "nan_check_every", "num_workers", "data_root", "description"}


# --------------------------------------------------------------------------------------
# config: experiment file + --smoke + key=value overrides
# --------------------------------------------------------------------------------------
def _field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(key: str, value, hint):
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if isinstance(value, str) and base in (int, float):  # "1e-3" (YAML 1.1 reads it as a string)
        try:
            value = base(value) if base is float else int(value)
        except ValueError:
            pass
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(base) is dict or base is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    name = getattr(base, "__name__", str(base))
    raise ConfigError(f"{key} must be {name}{' or null' if optional else ''}, got {value!r}")


def _apply(spec: dict, key: str, value) -> None:
    types = _field_types()
    if key.startswith("model."):
        spec.setdefault("model_kwargs", {})
        spec["model_kwargs"] = {**spec["model_kwargs"], key[len("model."):]: value}
        return
    if key not in types:
        import difflib

        close = difflib.get_close_matches(key, types, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown config key {key!r}.{hint}\nValid keys: {', '.join(types)}\n"
            f"(model options are set as model.<field>=value, e.g. model.refine_steps=0)"
        )
    spec[key] = _coerce(key, value, types[key])


def parse_override(text: str) -> tuple[str, typing.Any]:
    import yaml

    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. epochs=5 or model.refine_steps=0)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value {raw!r} ({e})") from e
    return key.strip(), value


def build_config(experiment: str | dict, overrides: list[str] = (), smoke: bool = False, out: str | None = None) -> TrainConfig:
    """An experiment (name, YAML path or dict) + ``--smoke`` + ``key=value`` overrides → TrainConfig."""
    from .experiments import load_experiment

    raw = dict(load_experiment(experiment)) if isinstance(experiment, str) else dict(experiment)
    spec: dict = {}
    for key, value in raw.items():
        if key == "smoke":
            spec["smoke"] = dict(value or {})
        elif key == "model_kwargs":
            spec["model_kwargs"] = dict(value or {})
        else:
            _apply(spec, key, value)
    if smoke:
        for key, value in spec.get("smoke", {}).items():
            if key == "model_kwargs":
                spec["model_kwargs"] = {**spec.get("model_kwargs", {}), **value}
            else:
                _apply(spec, key, value)
        spec.update(device="cpu", bf16=False, compile=False)
    for text in overrides:
        _apply(spec, *parse_override(text))
    if out is not None:
        spec["out_dir"] = out
    if spec.get("out_dir") is None:
        name = spec.get("name", "custom")
        spec["out_dir"] = str(Path("runs") / ("smoke" if smoke else "") / name)
    try:
        return TrainConfig(**spec)
    except TypeError as e:
        raise ConfigError(str(e)) from e


# --------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    from .registry import UnknownModelError, create_model

    try:
        model = create_model(cfg.model, **cfg.model_kwargs)
    except UnknownModelError as e:
        raise ConfigError(str(e)) from e
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"model {cfg.model!r} rejected the overrides {cfg.model_kwargs}: {e}"
        ) from e
    model._vhmn_spec = {"model": cfg.model, "model_kwargs": dict(cfg.model_kwargs)}
    n_out = getattr(model, "num_classes", None)
    if n_out is not None and n_out != num_classes:
        raise ConfigError(
            f"model {cfg.model!r} has {n_out} outputs but {cfg.dataset} has {num_classes} classes; "
            f"set model.num_classes={num_classes} (or use the dataset's variant)"
        )
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on norms, biases, tokens or position embeddings."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.split(".")[0] in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup from 0, then cosine from 1 to ``min_ratio`` (multiplies the base lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class ModelEma(nn.Module):
    """Exponential moving average of the weights; buffers (memory banks) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(unwrap(model)).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model)
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in src.parameters()], 1 - self.decay)
        for b_ema, b in zip(self.module.buffers(), src.buffers()):
            b_ema.copy_(b)

    def state_dict(self, *a, **k):
        return self.module.state_dict(*a, **k)

    def forward(self, *a, **k):
        return self.module(*a, **k)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------
class Trainer:
    """Builds data, model, optimiser and schedule from a :class:`TrainConfig`; :meth:`fit` trains."""

    def __init__(self, cfg: TrainConfig, rank: int | None = None, world_size: int | None = None, log=print):
        self.cfg = cfg
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else (rank or 0)
        self.world_size = dist.get_world_size() if self.distributed else (world_size or 1)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.device = self._device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.batch_size % self.world_size:
            raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {self.world_size}")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.out_dir = Path(cfg.out_dir or Path("runs") / cfg.name)
        self.ckpt = CheckpointDir(self.out_dir / "checkpoint")
        from .data import DATASETS

        if cfg.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {cfg.dataset!r}; known: {', '.join(DATASETS)}")
        self.model = build_model(cfg, DATASETS[cfg.dataset].num_classes).to(self.device)  # bad overrides fail here
        self._build_data()
        self.is_vhmn = isinstance(self.model, VHMN)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.ema = ModelEma(self.model, cfg.ema) if cfg.ema else None
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999),
                                           fused=self.device.type == "cuda")
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set of this rank ({self.train_loader.shard_size} images) is smaller than one batch "
                f"({self.train_loader.batch_size}); lower batch_size"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        ratio = cfg.min_lr / cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.warmup_steps, self.total_steps, ratio)
        )
        self.net = self.model
        if cfg.compile and self.device.type == "cuda":
            self.net = torch.compile(self.net)
        if self.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False
            )
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and self.device.type == "cuda")
        # run state
        self.epoch, self.step = 0, 0
        self.history: list[dict] = []
        self.wall_time = 0.0
        self.started_at = _now()
        self.status = "running"
        # the code that runs: taken when the trainer starts (a commit made while it trains is not its code)
        from .provenance import collect

        self.provenance = collect(self.device, self.world_size)
        self.provenance["command"] = ("python -m vhmn.train " + " ".join(sys.argv[1:])
                                      if Path(sys.argv[0]).stem in ("train", "vhmn-train", "__main__") else None)
        self._stop_signal = None
        self._resume_partial = None

    # ---- setup ----------------------------------------------------------------------------
    def _device(self) -> torch.device:
        d = self.cfg.device
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        if d.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device {d!r} requested but CUDA is not available; use device=cpu")
            if d == "cuda":
                local = os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count() if self.distributed else 0)
                d = f"cuda:{int(local)}"
        return torch.device(d)

    def _build_data(self) -> None:
        from .data import DATASETS, load_arrays, load_subset_indices

        cfg = self.cfg
        if cfg.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {cfg.dataset!r}; known: {', '.join(DATASETS)}")
        info = DATASETS[cfg.dataset]
        common = dict(mean=info.mean, std=info.std, device=self.device, rank=self.rank, world_size=self.world_size)
        per_rank = cfg.batch_size // self.world_size
        if cfg.dataset == "imagenet":
            from .data import DatasetNotFoundError, imagenet_folder, imagenet_loaders, write_synthetic_imagefolder

            root, synthetic = cfg.data_root, False
            try:
                imagenet_folder(root)
            except DatasetNotFoundError:
                if cfg.stand_in != "synthetic":
                    raise
                root, synthetic = write_synthetic_imagefolder(self.out_dir / "synthetic_data", seed=cfg.seed), True
                self.log("ImageNet is not available here: this smoke run uses a tiny SYNTHETIC ImageFolder of random "
                         "images; it checks the pipeline, its accuracy means nothing")
            self.train_loader, self.test_loader = imagenet_loaders(
                root, per_rank, num_workers=cfg.num_workers, seed=cfg.seed, rank=self.rank,
                world_size=self.world_size, device=self.device, train_limit=cfg.train_limit, test_limit=cfg.test_limit,
                augment=cfg.augment, image_size=cfg.image_size,
            )
            self.data_info = {"dataset": "imagenet", "subset": cfg.subset, "train_images": self.train_loader.num_images,
                              "test_images": self.test_loader.num_images, "stand_in": "synthetic" if synthetic else None}
            return
        from .loader import DeviceLoader

        dataset, stand_in = cfg.dataset, None
        if cfg.stand_in:
            from .data import DatasetNotFoundError

            try:
                load_arrays(cfg.dataset, "test", cfg.data_root, download=False)
            except DatasetNotFoundError:
                dataset = stand_in = cfg.stand_in
                self.log(f"{cfg.dataset} is not available here: this smoke run reads {stand_in} instead "
                         f"(same pipeline and model; its accuracy is not a {cfg.dataset} result)")
        x_tr, y_tr = load_arrays(dataset, "train", cfg.data_root)
        x_te, y_te = load_arrays(dataset, "test", cfg.data_root)
        idx = load_subset_indices(cfg.subset, dataset=cfg.dataset, root=cfg.data_root) if cfg.subset else np.arange(len(y_tr))
        if cfg.train_limit:
            idx = idx[: cfg.train_limit]
        test_idx = np.arange(min(cfg.test_limit, len(y_te))) if cfg.test_limit else None
        self.train_loader = DeviceLoader(x_tr, y_tr, per_rank, indices=idx, train=True, augment=cfg.augment,
                                         pad_mode=cfg.pad_mode, seed=cfg.seed, **common)
        self.test_loader = DeviceLoader(x_te, y_te, min(per_rank * 2, 1024), indices=test_idx, train=False, **common)
        self.data_info = {"dataset": cfg.dataset, "subset": cfg.subset, "train_images": int(len(idx)),
                          "test_images": self.test_loader.num_images, "stand_in": stand_in}

    # ---- checkpoint / results -----------------------------------------------------------------
    def _state(self, epoch: int, start_batch: int, partial: dict | None) -> dict:
        return {
            "config": asdict(self.cfg), "epoch": epoch, "step": self.step, "start_batch": start_batch,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(), "loader": self.train_loader.state_dict(), "history": self.history,
            "wall_time": self.wall_time, "started_at": self.started_at, "partial": partial,
        }

    def save_checkpoint(self, epoch: int, start_batch: int = 0, partial: dict | None = None) -> None:
        """``epoch``/``start_batch``: where training continues after a resume."""
        if self.rank != 0:
            return
        meta = model_metadata(self.model, self.cfg.model, self.cfg.model_kwargs, experiment=self.cfg.name,
                              dataset=self.cfg.dataset, epoch=str(epoch))
        self.ckpt.save(self.model, self._state(epoch, start_batch, partial), meta, self.ema.module if self.ema else None)

    def resume(self) -> bool:
        """Load ``<out_dir>/checkpoint`` if present; True if training continues from it."""
        if not self.ckpt.exists():
            self.log(f"no checkpoint in {self.ckpt.folder}; starting from scratch")
            return False
        state = self.ckpt.load(self.model, self.ema.module if self.ema else None, map_location="cpu")
        saved, now = state["config"], asdict(self.cfg)
        diff = {k: (saved.get(k), now[k]) for k in now if k not in _RESUME_MAY_DIFFER and saved.get(k) != now[k]}
        if diff:
            lines = "\n".join(f"  {k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"cannot resume {self.ckpt.folder}: the config differs from the checkpoint's:\n{lines}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.wall_time, self.started_at = state["wall_time"], state["started_at"]
        self._start_batch = state["start_batch"]
        self._resume_partial = state["partial"]
        set_rng_state(state["rng"])
        self.log(f"resumed from {self.ckpt.folder} at epoch {self.epoch}, batch {self._start_batch} (step {self.step})")
        return True

    def results(self) -> dict:
        m = unwrap(self.model)
        last_eval = next((h for h in reversed(self.history) if h["test_acc"] is not None), None)
        final = {"epochs_done": len(self.history)}
        if self.history:
            final.update(train_loss=self.history[-1]["train_loss"], train_acc=self.history[-1]["train_acc"])
        if last_eval:
            final.update(test_loss=last_eval["test_loss"], test_acc=last_eval["test_acc"],
                         best_test_acc=max(h["test_acc"] for h in self.history if h["test_acc"] is not None))
            if "ema_test_acc" in last_eval:
                final["ema_test_acc"] = last_eval["ema_test_acc"]
        return {
            "schema": RESULTS_SCHEMA["schema"], "experiment": self.cfg.name, "status": self.status,
            "config": asdict(self.cfg), "seed": self.cfg.seed, "provenance": self.provenance,
            "model": {"name": self.cfg.model, "kwargs": self.cfg.model_kwargs, "num_params": self.num_params,
                      "config": m.cfg.to_dict() if isinstance(m, VHMN) else None},
            "data": {**self.data_info, "steps_per_epoch": self.steps_per_epoch},
            "epochs": self.history, "final": final, "wall_time_s": round(self.wall_time, 2),
            "started_at": self.started_at, "finished_at": _now() if self.status != "running" else None,
        }

    def write_results(self) -> Path:
        path = self.out_dir / "results.json"
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _atomic_json(path, self.results())
        return path

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> tuple[float, float]:
        """(loss, accuracy) on the test set; summed over ranks."""
        net = self.net if model is None else model
        net.eval()
        tot = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss sum, correct, count
        for x, y, _ in self.test_loader:
            with self.autocast:
                logits = net(x)
            tot[0] += F.cross_entropy(logits.float(), y, reduction="sum")
            tot[1] += (logits.argmax(-1) == y).sum()
            tot[2] += y.numel()
        if self.distributed:
            dist.all_reduce(tot)
        loss, correct, n = tot.tolist()
        return loss / max(n, 1), correct / max(n, 1)

    def diagnose(self) -> dict:
        """Memory diagnostics (:func:`vhmn.diagnostics.memory_diagnostics`) on the first ``diagnose`` test images."""
        from .diagnostics import memory_diagnostics

        xs, ys, n = [], [], 0
        for x, y, _ in self.test_loader:
            xs.append(x), ys.append(y)
            n += len(y)
            if n >= self.cfg.diagnose:
                break
        x, y = torch.cat(xs)[: self.cfg.diagnose], torch.cat(ys)[: self.cfg.diagnose]
        return memory_diagnostics(unwrap(self.model), x.float(), y)

    # ---- training ---------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        """SIGTERM / first Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: abort."""
        if signum == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt
        self._stop_signal = signum

    def fit(self, resume: bool = False) -> dict:
        cfg = self.cfg
        self._start_batch = 0
        if resume:
            self.resume()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not sys.stdout.isatty() or self.rank != 0,
                   desc=cfg.name, unit="step", dynamic_ncols=True)
        self.log(f"{cfg.name}: {cfg.model} ({self.num_params / 1e6:.2f} M parameters) on {self.data_info['dataset']}"
                 f" ({self.data_info['train_images']} training images), {cfg.epochs} epochs × {self.steps_per_epoch} steps,"
                 f" device {self.device}, {self.world_size} process(es)")
        try:
            while self.epoch < cfg.epochs:
                self._train_epoch(bar)
                if self.status == "interrupted":
                    break
        except KeyboardInterrupt:
            self.status = "interrupted"
            self.log("interrupted (KeyboardInterrupt); the last checkpoint is kept")
            self.write_results()
            raise
        finally:
            bar.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        if self.status == "interrupted":
            self.write_results()
            return self.results()
        self.status = "complete"
        if cfg.export_fp16 and self.rank == 0:
            export_fp16(self.model, self.out_dir / "model-fp16.safetensors", cfg.model, cfg.model_kwargs,
                        experiment=cfg.name, dataset=cfg.dataset, epoch=str(self.epoch))
        self.write_results()
        final = self.results()["final"]
        if "test_acc" in final:
            self.log(f"{cfg.name}: test accuracy {final['test_acc']:.4f} after {final['epochs_done']} epochs "
                     f"({self.wall_time:.1f} s); results in {self.out_dir / 'results.json'}")
        return self.results()

    def _check_finite(self, bad: torch.Tensor, epoch: int) -> None:
        if bool(bad):  # host sync, every nan_check_every steps and at the epoch end
            self.status = "diverged"
            self.write_results()
            where = f"latest checkpoint {self.ckpt.folder} is kept" if self.ckpt.exists() else "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"{self.cfg.name}: the training loss became NaN/inf in epoch {epoch} (by step {self.step}); stopping. "
                f"The {where}. Try a lower lr, a longer warmup, grad_clip, or bf16=false."
            )

    def _train_epoch(self, bar) -> None:
        cfg, epoch = self.cfg, self.epoch
        self.train_loader.set_epoch(epoch, self._start_batch)
        start_batch, self._start_batch = self._start_batch, 0
        acc = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss sum, correct, count
        bad = torch.zeros((), device=self.device, dtype=torch.bool)
        elapsed = 0.0
        if self._resume_partial is not None:
            acc += torch.tensor(self._resume_partial["acc"], dtype=torch.float64, device=self.device)
            elapsed = self._resume_partial["elapsed"]
            self._resume_partial = None
        self.net.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        for i, (x, y, idx) in enumerate(self.train_loader, start=start_batch):
            with self.autocast:
                logits = self.net(x, index=idx, labels=y) if self.is_vhmn else self.net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.step += 1
            with torch.no_grad():
                acc[0] += loss.detach() * y.numel()
                acc[1] += (logits.argmax(-1) == y).sum()
                acc[2] += y.numel()
                bad |= ~torch.isfinite(loss.detach())
            bar.update(1)
            if self.step % cfg.nan_check_every == 0:
                self._check_finite(bad, epoch)
            if self._stop_signal is not None and self.distributed:
                # Ranks may see the signal one step apart, so no collective (and no mid-epoch save) here:
                # a distributed run resumes from its last epoch checkpoint.
                self.status = "interrupted"
                self.log(f"stopped by signal {self._stop_signal} in epoch {epoch}; resume from the last epoch checkpoint")
                return
            if self._stop_signal is not None:
                self._check_finite(bad, epoch)
                self.wall_time += time.perf_counter() - t0
                partial = {"acc": acc.tolist(), "elapsed": elapsed + time.perf_counter() - t0}
                self.save_checkpoint(epoch, i + 1, partial)
                self.status = "interrupted"
                self.log(f"stopped by signal {self._stop_signal} in epoch {epoch} after batch {i + 1}; checkpoint saved")
                return
        self._check_finite(bad, epoch)
        if self.distributed:
            sync_memory(self.model)  # every rank now holds rank 0's banks
            dist.all_reduce(acc)
            if self.ema is not None:
                sync_memory(self.ema.module)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.wall_time += dt
        loss_sum, correct, count = acc.tolist()
        record = {
            "epoch": epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / count, "train_acc": correct / count,
            "test_loss": None, "test_acc": None,
            # a resumed epoch: images/s over the part run in this process
            "images_per_s": round((self.steps_per_epoch - start_batch) * self.train_loader.batch_size * self.world_size / dt, 1),
            "epoch_time_s": round(elapsed + dt, 3),
        }
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            record["test_loss"], record["test_acc"] = self.evaluate()
            if self.ema is not None:
                record["ema_test_acc"] = self.evaluate(self.ema.module)[1]
            if cfg.diagnose and self.is_vhmn:
                record["memory"] = self.diagnose()
        self.history.append(record)
        self.epoch = epoch + 1
        if self.epoch % cfg.ckpt_every == 0 or last:
            self.save_checkpoint(self.epoch)
        self.write_results()
        msg = f"epoch {self.epoch}/{cfg.epochs}  lr {record['lr']:.2e}  train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}"
        if record["test_acc"] is not None:
            msg += f"  test loss {record['test_loss']:.4f} acc {record['test_acc']:.4f}"
        if bar.disable:
            self.log(msg + f"  ({record['epoch_time_s']:.1f} s)")
        else:
            bar.write(msg)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def _init_distributed() -> bool:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .experiments import UnknownExperimentError, list_experiments, load_experiment

    ap = argparse.ArgumentParser(
        prog="python -m vhmn.train",
        description="Train a V-HMN or a baseline with the shared recipe. Overrides: key=value (TrainConfig "
                    "fields) or model.<field>=value (model options).",
    )
    ap.add_argument("experiment", nargs="?", help="experiment name (see --list) or path of a YAML file")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. epochs=5 lr=5e-4 model.refine_steps=0")
    ap.add_argument("--smoke", action="store_true", help="the experiment's CPU smoke settings (≤ 1 min)")
    ap.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint if it exists")
    ap.add_argument("--out", default=None, help="output folder (default runs/<experiment>)")
    ap.add_argument("--list", action="store_true", help="list the experiments and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name in list_experiments():
            print(f"{name:28s} {load_experiment(name).get('description', '')}")
        return 0
    if not args.experiment:
        ap.error("name an experiment (python -m vhmn.train --list shows them)")
    try:
        cfg = build_config(args.experiment, args.overrides, smoke=args.smoke, out=args.out)
    except (ConfigError, UnknownExperimentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distributed = _init_distributed()
    try:
        trainer = Trainer(cfg)
        result = trainer.fit(resume=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    finally:
        if distributed:
            dist.destroy_process_group()
    return 143 if result["status"] == "interrupted" else 0


if __name__ == "__main__":
    raise SystemExit(main())
