"""Datasets: one uint8 cache format for the small datasets, fetched through torchvision.

Small datasets (CIFAR-10, CIFAR-100, SVHN) live under the data root as

    <root>/<name>/train.npz, <root>/<name>/test.npz   with arrays  images (n, H, W, 3) uint8 RGB
                                                                   labels (n,) int64

The data root is ``$VHMN_DATA`` if set, else ``data/`` in the working directory. On a machine
with internet access the first :func:`load_arrays` downloads the dataset with torchvision
into ``<root>/<name>/download`` and writes the cache; later calls read the cache (≈1 s).
ImageNet-1k is read from an ImageFolder layout ``<root>/imagenet/{train,val}/<wnid>/*.JPEG``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "data_root",
    "load_arrays",
    "load_subset_indices",
    "make_fraction_indices",
    "make_long_tailed_indices",
    "SPLITS_DIR",
]

SPLITS_DIR = Path(__file__).resolve().parent.parent / "data" / "splits"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...] = ()


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10_CLASSES),
    "cifar100": DatasetInfo("cifar100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": DatasetInfo("svhn", 10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), tuple(str(i) for i in range(10))),
    "imagenet": DatasetInfo("imagenet", 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is neither cached nor downloadable here; the message says how to fetch it."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the argument, else ``$VHMN_DATA``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("VHMN_DATA", "data")).expanduser()


def _fetch_hint(name: str, root: Path) -> str:
    return (
        f"Fetch it on a machine with internet access with\n"
        f"    python -m vhmn.data fetch {name} --root {root}\n"
        f"or point VHMN_DATA at a folder that already holds {name}/train.npz and {name}/test.npz."
    )


def _download_torchvision(name: str, train: bool, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    if name == "cifar10":
        ds = torchvision.datasets.CIFAR10(folder, train=train, download=True)
        return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)
    if name == "cifar100":
        ds = torchvision.datasets.CIFAR100(folder, train=train, download=True)
        return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)
    if name == "svhn":
        ds = torchvision.datasets.SVHN(folder, split="train" if train else "test", download=True)
        # torchvision's SVHN.data is (n, 3, H, W); the cache is HWC like CIFAR.
        return np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), np.asarray(ds.labels, dtype=np.int64)
    raise ValueError(f"no torchvision download for {name!r}")


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except Exception as e:  # zipfile.BadZipFile, KeyError, EOFError, ...
        raise DatasetNotFoundError(
            f"{path} is not a readable dataset cache ({type(e).__name__}: {e}). It must be an .npz with "
            f"'images' (n, H, W, 3) uint8 and 'labels' (n,) int64. Delete it and fetch again."
        ) from e
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise DatasetNotFoundError(
            f"{path}: expected images (n, H, W, 3) uint8 and labels (n,), got images {images.shape} "
            f"{images.dtype} and labels {labels.shape}. Delete it and fetch again."
        )
    return images, labels.astype(np.int64, copy=False)


def load_arrays(
    name: str, split: str = "train", root: str | os.PathLike | None = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, H, W, 3) uint8 and labels (n,) int64 of a small dataset, from the cache.

    If the cache is missing and ``download`` is true, torchvision downloads the dataset and the
    cache is written; without network access this fails with a :class:`DatasetNotFoundError`
    that names the expected files and the command that fetches them.
    """
    if name not in DATASETS or name == "imagenet":
        known = ", ".join(k for k in DATASETS if k != "imagenet")
        raise ValueError(f"unknown small dataset {name!r}; known: {known} (ImageNet: vhmn.data.imagenet_folder)")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root_p = data_root(root)
    path = root_p / name / f"{split}.npz"
    if path.exists():
        return _read_cache(path)
    if not download:
        raise DatasetNotFoundError(f"{path} does not exist.\n" + _fetch_hint(name, root_p))
    try:
        images, labels = _download_torchvision(name, split == "train", root_p / name / "download")
    except Exception as e:  # URLError, RuntimeError(checksum), OSError, ...
        raise DatasetNotFoundError(
            f"{name} ({split}) is not cached at {path} and downloading it failed: {type(e).__name__}: {e}\n"
            + _fetch_hint(name, root_p)
        ) from e
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=images, labels=labels)
    os.replace(tmp, path)
    return images, labels


# --------------------------------------------------------------------------------------
# Committed index lists: data fractions and the long-tailed subset
# --------------------------------------------------------------------------------------
def make_fraction_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified, seeded subset: ``round(fraction · n_c)`` indices of every class c, sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.append(rng.choice(idx, size=int(round(fraction * len(idx))), replace=False))
    return np.sort(np.concatenate(out))


def make_long_tailed_indices(labels: np.ndarray, imbalance: float, seed: int) -> np.ndarray:
    """Exponential long tail (Cui et al. 2019): class c keeps ``n_max · imbalance^(−c/(C−1))``."""
    if imbalance < 1:
        raise ValueError(f"imbalance ratio must be ≥ 1, got {imbalance}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    n_max = min(int((labels == c).sum()) for c in classes)
    out = []
    for i, c in enumerate(classes):
        n_c = int(round(n_max * imbalance ** (-i / max(len(classes) - 1, 1))))
        out.append(rng.choice(np.flatnonzero(labels == c), size=n_c, replace=False))
    return np.sort(np.concatenate(out))


def load_subset_indices(subset: str) -> np.ndarray:
    """Read a committed index list ``data/splits/<subset>.json`` (made by scripts/make_splits.py)."""
    path = SPLITS_DIR / f"{subset}.json"
    if not path.exists():
        known = sorted(p.stem for p in SPLITS_DIR.glob("*.json"))
        raise FileNotFoundError(f"no index list {path}; known subsets: {', '.join(known) or 'none'}")
    spec = json.loads(path.read_text())
    idx = np.asarray(spec["indices"], dtype=np.int64)
    digest = hashlib.sha256(idx.tobytes()).hexdigest()
    if digest != spec["sha256"]:
        raise ValueError(f"{path}: index list does not match its sha256; regenerate with scripts/make_splits.py")
    return idx


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vhmn.data", description="Fetch and cache datasets.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a dataset with torchvision and write the uint8 cache")
    f.add_argument("name", choices=[k for k in DATASETS if k != "imagenet"])
    f.add_argument("--root", default=None, help="data root (default: $VHMN_DATA or ./data)")
    args = ap.parse_args(argv)
    for split in ("train", "test"):
        images, labels = load_arrays(args.name, split, args.root, download=True)
        print(f"{args.name} {split}: {images.shape[0]} images {images.shape[1:]} -> {data_root(args.root) / args.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
