"""A small slice of the real CIFAR-10 as a data root, shared by the training-pipeline tests.

The real data root is $VHMN_DATA, else ../shared/data beside the repository (where CI has it).
The slice (first 512 training / 256 test images, original order) is written once per session
into a temporary folder in the cache format, so every Trainer reads it in milliseconds.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def load_script(relpath: str, name: str):
    """A script of the repository (not a package, e.g. ``scripts/cpu_experiments.py``) imported as a fresh module
    ``name``, registered in sys.modules (dataclasses look their module up there)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def real_root() -> Path | None:
    for cand in (os.environ.get("VHMN_DATA"), REPO.parent / "shared" / "data", REPO / "data"):
        if cand and (Path(cand) / "cifar10" / "train.npz").is_file():
            return Path(cand)
    return None


def make_slice(folder: Path, n_train: int = 512, n_test: int = 256) -> Path:
    root = real_root()
    if root is None:
        pytest.skip("real CIFAR-10 not available (set VHMN_DATA)")
    from vhmn.data import load_arrays

    out = folder / "cifar10"
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = load_arrays("cifar10", split, root, download=False)
        np.savez(out / f"{split}.npz", images=x[:n], labels=y[:n])
    return folder


def session_slice(tmp_path_factory) -> Path:
    """The slice in this pytest session's base temp folder (written by the first module asking)."""
    folder = tmp_path_factory.getbasetemp() / "cifar10-slice"
    if not (folder / "cifar10" / "test.npz").is_file():
        make_slice(folder)
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread while these modules run: tiny CPU trainings are fastest that way, and a
    shared, busy machine cannot stall them (OpenMP threads waiting on a descheduled sibling)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
