"""A small model registry, timm style: ``create_model(name, **overrides)``, ``list_models()``.

A registered function takes keyword overrides and returns an ``nn.Module``. V-HMN variants build a
:class:`~vhmn.model.VHMNConfig`; the timm baselines live in :mod:`vhmn.baselines`.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}

__all__ = ["register_model", "create_model", "list_models", "UnknownModelError"]


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def _ensure_loaded() -> None:
    from . import baselines, variants  # noqa: F401  (registration side effects)


def list_models(pattern: str = "*") -> list[str]:
    _ensure_loaded()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` replace config fields (e.g. ``refine_steps=0``)."""
    _ensure_loaded()
    if name not in _MODELS:
        import difflib

        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**overrides)
