"""Where a result came from: git commit (and whether the tree was dirty), library versions, device."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["git_info", "library_versions", "device_name", "collect"]

_REPO = Path(__file__).resolve().parent.parent


def git_info(repo: str | Path = _REPO) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}``. Outside a git checkout: $VHMN_GIT_COMMIT and
    $VHMN_GIT_DIRTY ('0'/'1') where set, else None."""
    def run(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if commit is None:  # a copy without .git (e.g. the working tree sent to a GPU machine): the sender's word
        env = os.environ.get("VHMN_GIT_COMMIT")
        dirty = os.environ.get("VHMN_GIT_DIRTY")
        return {"commit": env or None, "dirty": None if dirty is None else dirty == "1"}
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def library_versions() -> dict:
    import numpy

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("timm", "torchvision", "safetensors", "einops"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed
            out[name] = None
    from . import __version__

    out["vhmn"] = __version__
    return out


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def collect(device: torch.device | str, world_size: int = 1) -> dict:
    return {
        **{f"git_{k}": v for k, v in git_info().items()},
        "versions": library_versions(),
        "device": device_name(device),
        "world_size": world_size,
        "command": " ".join(["python"] + [Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else None,
    }
