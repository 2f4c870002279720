"""Files of the repository that the chapters read: committed results, data splits.

    from vhmn.resources import repo_path
    repo_path("results/cpu10")          # the committed CPU-scale runs
    repo_path("data/splits")            # the committed index lists

In a checkout (``pip install -e .``, or the book run from a clone) these are the repository's own folders. A
wheel (``pip install "vhmn @ git+…"``, as on Colab) carries a copy of them inside the package, ``vhmn/_repo/``,
written at build time by ``setup.py`` (``results/**/*.json``, the committed fp16 checkpoints, ``data/splits``), so
every chapter runs where the package is installed from git without a clone.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["repo_path", "repo_root", "SHIPPED", "CHECKOUT", "SHIPPED_FILES"]

CHECKOUT = Path(__file__).resolve().parent.parent  # the repository root, when running from a checkout
SHIPPED = Path(__file__).resolve().parent / "_repo"  # the copy inside an installed wheel
# What a wheel ships (setup.py reads this): folder → glob patterns
SHIPPED_FILES = {"results": ["**/*.json", "**/*.safetensors"], "data/splits": ["*.json"]}


def repo_path(rel: str, must_exist: bool = True) -> Path:
    """The repository path ``rel`` (e.g. ``"results/cpu10"``): the checkout's if this package runs from one, else
    the copy shipped in the wheel. When neither exists: FileNotFoundError, saying how to get it (``must_exist``), or
    the checkout's path."""
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / rel).exists():
        return CHECKOUT / rel
    if (SHIPPED / rel).exists():
        return SHIPPED / rel
    if not must_exist:
        return CHECKOUT / rel
    from .notebook import REPO_URL

    raise FileNotFoundError(
        f"{rel} is neither in a checkout of the repository ({CHECKOUT / rel}) nor shipped with this installation "
        f"({SHIPPED / rel}). Install the package from the repository (pip install \"vhmn @ git+{REPO_URL}\") or "
        f"clone it (git clone {REPO_URL}) and run from the clone."
    )


def repo_root() -> Path:
    """The folder that holds ``results/`` and ``data/splits/``: the checkout, or the copy a wheel ships (same layout)."""
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "results").is_dir():
        return CHECKOUT
    if SHIPPED.is_dir():
        return SHIPPED
    return repo_path("results").parent  # raises, saying how to get the files
