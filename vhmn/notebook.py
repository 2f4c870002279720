"""One setup call for every chapter: seeds, run mode, plotting defaults, device.

Run modes (environment variable ``VHMN_MODE``; each chapter names its own default):

* ``smoke``      CPU, seconds: small models, few steps, real data. What CI and nbval run.
* ``pretrained`` load the committed checkpoints and evaluate them on real data.
* ``full``       train at full scale on a GPU and write results files.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

MODES = ("smoke", "pretrained", "full")
REPO_URL = "https://github.com/vhmn-book/vhmn"  # the one place the repository URL is set (also _config.yml)


@dataclass
class Setup:
    mode: str
    device: torch.device
    seed: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(seed: int = 0, default_mode: str = "smoke") -> Setup:
    """Seed everything, fix plotting defaults, read ``VHMN_MODE``; prints nothing."""
    mode = os.environ.get("VHMN_MODE", default_mode)
    if mode not in MODES:
        raise ValueError(f"VHMN_MODE must be one of {MODES}, got {mode!r}")
    seed_everything(seed)
    import matplotlib

    matplotlib.rcParams.update({"figure.dpi": 150, "savefig.dpi": 150, "figure.figsize": (6, 3.5), "font.size": 10})
    try:  # PNG figures in stored outputs
        from IPython import get_ipython

        ip = get_ipython()
        if ip is not None:
            ip.run_line_magic("config", "InlineBackend.figure_formats = ['png']")
    except ImportError:
        pass
    device = torch.device("cuda" if mode == "full" and torch.cuda.is_available() else "cpu")
    return Setup(mode=mode, device=device, seed=seed)
