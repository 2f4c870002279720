"""Checkpoints: safetensors weights with the model's identity in the metadata, plus training state.

A training run's checkpoint folder (``<out_dir>/checkpoint``) holds

    model-e0003-s000120.safetensors   model state dict (weights and memory banks, fp32)
    ema-e0003-s000120.safetensors     EMA weights (only with ema)
    state-e0003-s000120.pt            optimizer, scheduler, RNG states, epoch, step, loader state, curves
    latest.json                       which files form the latest checkpoint, with their sha256

Every file is written to a temporary name and moved into place with ``os.replace``; ``latest.json``
is replaced last, so a crash at any moment leaves the previous checkpoint intact and readable.

Every weights file carries, in its safetensors metadata, the registered model name, the keyword
overrides it was built with, and (for V-HMN) the full :class:`~vhmn.model.VHMNConfig`, so that
:func:`load_pretrained` can rebuild the model from the file alone. :func:`export_fp16` writes the
small half-precision files that are committed to the repository.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "CheckpointError",
    "unwrap",
    "model_metadata",
    "save_weights",
    "read_weights",
    "load_weights_into",
    "export_fp16",
    "load_pretrained",
    "CheckpointDir",
]

FORMAT = "vhmn-weights/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted, or belongs to another model."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# weights files
# --------------------------------------------------------------------------------------
def model_metadata(model: nn.Module, name: str | None = None, kwargs: dict | None = None, **extra) -> dict[str, str]:
    """safetensors metadata (str → str) naming the model so it can be rebuilt."""
    from .model import VHMN

    model = unwrap(model)
    spec = getattr(model, "_vhmn_spec", {})
    meta = {
        "format": FORMAT,
        "model": name or spec.get("model", ""),
        "model_kwargs": json.dumps(kwargs if kwargs is not None else spec.get("model_kwargs", {}), sort_keys=True),
    }
    if isinstance(model, VHMN):
        meta["vhmn_config"] = json.dumps(model.cfg.to_dict(), sort_keys=True)
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def save_weights(model_or_state: nn.Module | dict, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                 dtype: torch.dtype | None = None) -> None:
    """Write a state dict as safetensors, atomically; floating tensors cast to ``dtype`` if given."""
    from safetensors.torch import save_file

    if isinstance(model_or_state, nn.Module):
        if metadata is None:
            metadata = model_metadata(model_or_state)
        state = unwrap(model_or_state).state_dict()
    else:
        state = model_or_state
    tensors = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()
    _atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {"format": FORMAT}))


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state dict, metadata) of a safetensors file; :class:`CheckpointError` if unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError: header/buffer errors of truncated or corrupted files
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({path.stat().st_size} bytes): {e}. The file is truncated "
            f"or corrupted; copy it again, or resume from an earlier checkpoint."
        ) from e
    return state, meta


def _describe_mismatch(model_state: dict, file_state: dict, limit: int = 8) -> str:
    missing = sorted(set(model_state) - set(file_state))
    unexpected = sorted(set(file_state) - set(model_state))
    shapes = [
        f"{k}: checkpoint {tuple(file_state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in sorted(set(model_state) & set(file_state))
        if tuple(model_state[k].shape) != tuple(file_state[k].shape)
    ]

    def part(title: str, items: list[str]) -> str:
        if not items:
            return ""
        more = f" … and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more

    return part("missing in checkpoint", missing) + part("not in model", unexpected) + part("shape differs", shapes)


def load_weights_into(model: nn.Module, path: str | os.PathLike | None = None, state: dict | None = None,
                      meta: dict | None = None) -> dict[str, str]:
    """Load a weights file into ``model`` (strict); a clear error names the keys/shapes that differ."""
    if state is None:
        state, meta = read_weights(path)
    target = unwrap(model)
    own = target.state_dict()
    diff = _describe_mismatch(own, state)
    if diff:
        made = (meta or {}).get("model") or "another model"
        here = getattr(target, "_vhmn_spec", {}).get("model") or type(target).__name__
        raise CheckpointError(f"checkpoint {path or ''} was written by {made!r}, which does not match {here!r}:{diff}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))
    return meta or {}


def export_fp16(model: nn.Module, path: str | os.PathLike, name: str | None = None, kwargs: dict | None = None,
                **extra) -> Path:
    """A small half-precision safetensors of ``model`` (integer buffers unchanged), with its identity."""
    path = Path(path)
    save_weights(unwrap(model).state_dict(), path, model_metadata(model, name, kwargs, dtype="float16", **extra),
                 dtype=torch.float16)
    return path


def build_from_metadata(meta: dict[str, str]) -> nn.Module:
    from .model import VHMN, VHMNConfig
    from .registry import create_model

    if meta.get("format") != FORMAT:
        raise CheckpointError(f"not a vhmn weights file (metadata format {meta.get('format')!r}, expected {FORMAT!r})")
    if "vhmn_config" in meta:
        model = VHMN(VHMNConfig.from_dict(json.loads(meta["vhmn_config"])))
    elif meta.get("model"):
        model = create_model(meta["model"], **json.loads(meta.get("model_kwargs", "{}")))
    else:
        raise CheckpointError("the weights file does not name its model (no 'model' in its metadata)")
    model._vhmn_spec = {"model": meta.get("model", ""), "model_kwargs": json.loads(meta.get("model_kwargs", "{}"))}
    return model


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model named in a weights file's metadata, load it in fp32, eval mode."""
    state, meta = read_weights(path)
    model = build_from_metadata(meta)
    load_weights_into(model, path, state, meta)
    return model.float().to(device).eval()


# --------------------------------------------------------------------------------------
# a training run's checkpoint folder
# --------------------------------------------------------------------------------------
class CheckpointDir:
    """The checkpoint folder of a run: atomic saves, ``latest.json`` pointer, sha256 checks on load."""

    def __init__(self, folder: str | os.PathLike, keep: int = 1):
        self.folder = Path(folder)
        self.keep = keep

    @property
    def pointer(self) -> Path:
        return self.folder / "latest.json"

    def exists(self) -> bool:
        return self.pointer.is_file()

    def save(self, model: nn.Module, state: dict, metadata: dict[str, str], ema: nn.Module | None = None) -> Path:
        tag = f"e{state['epoch']:04d}-s{state['step']:07d}"
        files = {"model": f"model-{tag}.safetensors", "state": f"state-{tag}.pt"}
        save_weights(unwrap(model).state_dict(), self.folder / files["model"], metadata)
        if ema is not None:
            files["ema"] = f"ema-{tag}.safetensors"
            save_weights(ema.state_dict(), self.folder / files["ema"], metadata)
        _atomic_write(self.folder / files["state"], lambda tmp: torch.save(state, tmp))
        pointer = {
            "epoch": state["epoch"], "step": state["step"], "files": files,
            "sha256": {k: sha256_file(self.folder / f) for k, f in files.items()},
        }
        _atomic_write(self.pointer, lambda tmp: tmp.write_text(json.dumps(pointer, indent=1)))
        self._prune(set(files.values()))
        return self.folder / files["model"]

    def _prune(self, current: set[str]) -> None:
        tags = sorted({p.name.split("-", 1)[1].rsplit(".", 1)[0] for p in self.folder.glob("state-*.pt")})
        old = [t for t in tags if f"state-{t}.pt" not in current][: max(len(tags) - self.keep, 0)]
        for t in old:
            for p in self.folder.glob(f"*-{t}.*"):
                p.unlink(missing_ok=True)

    def read_pointer(self) -> dict:
        if not self.exists():
            raise CheckpointError(f"no checkpoint in {self.folder} (latest.json is missing)")
        try:
            pointer = json.loads(self.pointer.read_text())
            files = pointer["files"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{self.pointer} is corrupted ({e}); delete the folder to start over") from e
        for key, name in files.items():
            p = self.folder / name
            if not p.is_file():
                raise CheckpointError(f"checkpoint file {p} named in latest.json is missing")
            digest = sha256_file(p)
            if digest != pointer["sha256"][key]:
                raise CheckpointError(
                    f"checkpoint file {p} is corrupted or truncated: sha256 {digest[:12]}… differs from the "
                    f"{pointer['sha256'][key][:12]}… recorded when it was written ({p.stat().st_size} bytes now)"
                )
        return pointer

    def load(self, model: nn.Module, ema: nn.Module | None = None, map_location: str | torch.device = "cpu") -> dict:
        """Load the latest checkpoint into ``model`` (and ``ema``); returns the training state."""
        pointer = self.read_pointer()
        load_weights_into(model, self.folder / pointer["files"]["model"])
        if ema is not None and "ema" in pointer["files"]:
            state, meta = read_weights(self.folder / pointer["files"]["ema"])
            load_weights_into(ema, None, state, meta)
        try:
            # Our own file (RNG states hold numpy arrays), hence weights_only=False.
            return torch.load(self.folder / pointer["files"]["state"], map_location=map_location, weights_only=False)
        except Exception as e:
            raise CheckpointError(f"training state {pointer['files']['state']} is unreadable: {e}") from e

    def weights_path(self) -> Path:
        return self.folder / self.read_pointer()["files"]["model"]
