"""Experiment configs: one YAML file per row of the paper's experiments.

``<name>.yaml`` holds :class:`~vhmn.train.TrainConfig` fields; ``base: <other>`` inherits another file
(files whose name starts with ``_`` are shared recipes, not experiments); ``model_kwargs`` are the
model's keyword overrides; ``smoke:`` holds the overrides that ``--smoke`` applies (a CPU run of
at most a minute on a small slice of real data).

    >>> from vhmn.experiments import list_experiments, load_experiment
    >>> "cifar10_vhmn" in list_experiments()
    True
"""
from __future__ import annotations

import difflib
from pathlib import Path

import yaml

__all__ = ["EXPERIMENTS_DIR", "list_experiments", "load_experiment", "UnknownExperimentError", "describe"]

EXPERIMENTS_DIR = Path(__file__).resolve().parent


class UnknownExperimentError(ValueError):
    pass


def list_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _read(path: Path, seen: tuple = ()) -> dict:
    if path in seen:
        raise ValueError(f"experiment configs inherit in a cycle: {' -> '.join(str(p.name) for p in seen + (path,))}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path.name}: an experiment config must be a mapping of TrainConfig fields")
    base = spec.pop("base", None)
    if base is None:
        return spec
    parent = _read(EXPERIMENTS_DIR / f"{base}.yaml", seen + (path,))
    out = {**parent, **spec}
    for key in ("model_kwargs", "smoke"):  # merged one level deep
        if key in parent or key in spec:
            out[key] = {**(parent.get(key) or {}), **(spec.get(key) or {})}
    return out


def load_experiment(name_or_path: str) -> dict:
    """The merged config dict of an experiment name, or of a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UnknownExperimentError(f"experiment file {name_or_path} does not exist")
        spec = _read(path.resolve())
        spec.setdefault("name", path.stem)
        return spec
    names = list_experiments()
    if name_or_path not in names:
        close = difflib.get_close_matches(name_or_path, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownExperimentError(
            f"unknown experiment {name_or_path!r}.{hint}\nKnown experiments: {', '.join(names)}\n"
            f"(or pass the path of a YAML file)"
        )
    spec = _read(EXPERIMENTS_DIR / f"{name_or_path}.yaml")
    spec["name"] = name_or_path
    return spec


def describe(name: str) -> str:
    spec = load_experiment(name)
    return spec.get("description", "")
