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

from .resources import repo_path as _repo_path

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "data_root",
    "load_arrays",
    "load_subset_indices",
    "make_fraction_indices",
    "make_long_tailed_indices",
    "make_subset",
    "SUBSETS",
    "SPLITS_DIR",
    "index_digest",
    "read_torchvision_files",
    "import_torchvision_folder",
    "imagenet_folder",
    "imagenet_loaders",
    "FolderLoader",
    "write_synthetic_imagefolder",
]

SPLITS_DIR = _repo_path("data/splits", must_exist=False)  # the checkout's data/splits, or the copy a wheel ships (vhmn.resources)


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


# The recipes of the subsets: name → (dataset, kind, parameter, seed). scripts/make_splits.py writes
# them to data/splits/<name>.json; a subset whose file is absent is generated from the labels.
SPLIT_SEED = 0
SUBSETS: dict[str, tuple[str, str, float, int]] = {}
for _ds in ("cifar10", "cifar100", "svhn"):
    for _pct in (10, 20, 30, 50):
        SUBSETS[f"{_ds}_frac{_pct}"] = (_ds, "fraction", _pct / 100, SPLIT_SEED)
    SUBSETS[f"{_ds}_lt100"] = (_ds, "long_tailed", 100.0, SPLIT_SEED)


def index_digest(idx: np.ndarray) -> str:
    """sha256 of an index list as little-endian int64 bytes."""
    return hashlib.sha256(np.asarray(idx, dtype="<i8").tobytes()).hexdigest()


def make_subset(subset: str, labels: np.ndarray) -> dict:
    """The JSON record of a known subset, generated from the training labels (deterministic)."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; known: {', '.join(SUBSETS)}")
    dataset, kind, param, seed = SUBSETS[subset]
    labels = np.asarray(labels)
    if kind == "fraction":
        idx = make_fraction_indices(labels, param, seed)
    else:
        idx = make_long_tailed_indices(labels, param, seed)
    counts = np.bincount(labels[idx], minlength=int(labels.max()) + 1)
    record = {
        "dataset": dataset, "subset": subset, "fraction": round(len(idx) / len(labels), 6), "seed": seed,
        "indices": idx.tolist(), "sha256": index_digest(idx), "n": int(len(idx)), "per_class": counts.tolist(),
    }
    if kind == "long_tailed":
        record["imbalance"] = param
    return record


def load_subset_indices(subset: str, dataset: str | None = None, root: str | os.PathLike | None = None,
                        splits_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The training indices of a subset: the committed ``data/splits/<subset>.json`` (checked against
    its sha256), or — when no file is committed (CIFAR-100, SVHN) — generated deterministically from
    the training labels by the same code that scripts/make_splits.py runs."""
    folder = Path(splits_dir) if splits_dir is not None else SPLITS_DIR
    path = folder / f"{subset}.json"
    if path.exists():
        spec = json.loads(path.read_text())
        idx = np.asarray(spec["indices"], dtype=np.int64)
        if index_digest(idx) != spec["sha256"] or len(idx) != spec.get("n", len(idx)):
            raise ValueError(f"{path}: index list does not match its sha256; regenerate with scripts/make_splits.py")
        if dataset is not None and spec.get("dataset", dataset) != dataset:
            raise ValueError(f"subset {subset!r} belongs to {spec['dataset']}, not {dataset}")
        return idx
    if subset in SUBSETS:
        ds = SUBSETS[subset][0]
        if dataset is not None and ds != dataset:
            raise ValueError(f"subset {subset!r} belongs to {ds}, not {dataset}")
        _, labels = load_arrays(ds, "train", root)
        return np.asarray(make_subset(subset, labels)["indices"], dtype=np.int64)
    known = sorted(set(p.stem for p in folder.glob("*.json")) | set(SUBSETS))
    raise FileNotFoundError(f"no index list {path} and no recipe for {subset!r}; known subsets: {', '.join(known)}")


# --------------------------------------------------------------------------------------
# Reading torchvision's own files (CIFAR-100 pickles, SVHN .mat) into the cache
# --------------------------------------------------------------------------------------
def _torchvision_files(name: str, split: str) -> list[tuple[str, str]]:
    """(relative path, md5) of the files torchvision reads for ``name``/``split``."""
    from torchvision.datasets import CIFAR10, CIFAR100, SVHN

    if name in ("cifar10", "cifar100"):
        cls = CIFAR10 if name == "cifar10" else CIFAR100
        files = cls.train_list if split == "train" else cls.test_list
        return [(f"{cls.base_folder}/{f}", md5) for f, md5 in files]
    if name == "svhn":
        _, f, md5 = SVHN.split_list[split]
        return [(f, md5)]
    raise ValueError(f"no torchvision files for {name!r}")


def read_torchvision_files(name: str, folder: str | os.PathLike, split: str = "train",
                           check_md5: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, H, W, 3) uint8 and labels (n,) int64 from torchvision's on-disk files in ``folder``
    (what ``torchvision.datasets.CIFAR100(folder, download=True)`` / ``SVHN(...)`` leave there).

    ``check_md5``: compare every file with the md5 torchvision publishes (a clear error if one differs).
    The parsing is torchvision's: CIFAR pickles hold ``data`` (n, 3072) and ``labels``/``fine_labels``;
    SVHN's ``X`` is (32, 32, 3, n) and ``y`` (n, 1) with 10 standing for the digit 0.
    """
    import pickle

    from torchvision.datasets.utils import check_integrity

    folder = Path(folder)
    files = _torchvision_files(name, split)
    for rel, md5 in files:
        path = folder / rel
        if not path.is_file():
            raise DatasetNotFoundError(
                f"{path} is missing: {folder} must hold torchvision's {name} files ({', '.join(r for r, _ in files)})"
            )
        if check_md5 and not check_integrity(str(path), md5):
            raise DatasetNotFoundError(
                f"{path} does not match torchvision's md5 {md5}: the file is corrupted or incomplete; delete it and "
                f"download again (python -m vhmn.data fetch {name})"
            )
    if name == "svhn":
        import scipy.io as sio

        mat = sio.loadmat(str(folder / files[0][0]))
        images = np.ascontiguousarray(np.transpose(mat["X"], (3, 0, 1, 2)).astype(np.uint8))
        labels = mat["y"].astype(np.int64).reshape(-1)
        labels[labels == 10] = 0
        return images, labels
    data, targets = [], []
    for rel, _ in files:
        with open(folder / rel, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data.append(entry["data"])
        targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    images = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images, dtype=np.uint8), np.asarray(targets, dtype=np.int64)


def import_torchvision_folder(name: str, folder: str | os.PathLike, root: str | os.PathLike | None = None,
                              check_md5: bool = True) -> Path:
    """Write the cache ``<root>/<name>/{train,test}.npz`` from torchvision files already on disk."""
    out = data_root(root) / name
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images, labels = read_torchvision_files(name, folder, split, check_md5)
        tmp = out / f"{split}.tmp.npz"
        np.savez_compressed(tmp, images=images, labels=labels)
        os.replace(tmp, out / f"{split}.npz")
    return out


# --------------------------------------------------------------------------------------
# ImageNet-1k: ImageFolder layout, multi-worker DataLoader
# --------------------------------------------------------------------------------------
def imagenet_folder(root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``<root>/imagenet/train`` and ``<root>/imagenet/val``, each with one folder per class (wnid)."""
    base = data_root(root) / "imagenet"
    train, val = base / "train", base / "val"
    problems = [f"{p} is missing" for p in (train, val) if not p.is_dir()]
    if not problems:
        for p in (train, val):
            if not any(d.is_dir() for d in p.iterdir()):
                problems.append(f"{p} has no class folders")
    if problems:
        raise DatasetNotFoundError(
            "ImageNet-1k is not available: " + "; ".join(problems) + ".\nExpected the ImageFolder layout\n"
            f"    {base}/train/<wnid>/*.JPEG   (1000 class folders)\n    {base}/val/<wnid>/*.JPEG\n"
            "(torchvision.datasets.ImageNet(root, split='val') or the usual valprep.sh script sorts the validation "
            "images into class folders). Point VHMN_DATA at the folder that contains imagenet/."
        )
    return train, val


class _Indexed:
    """A dataset returning (image, label, index)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x, y, i


class _ShardSampler:
    """Seeded per-epoch permutation (train) or strided order (eval), sharded over ranks, resumable."""

    def __init__(self, n: int, train: bool, seed: int, rank: int, world_size: int, batch_size: int):
        self.n, self.train, self.seed, self.rank, self.world_size, self.batch_size = n, train, seed, rank, world_size, batch_size
        self.epoch, self.skip = 0, 0

    def order(self):
        import torch

        if self.train:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
            order = order[: (self.n // self.world_size) * self.world_size][self.rank :: self.world_size]
        else:
            order = torch.arange(self.rank, self.n, self.world_size)
        return order[self.skip * self.batch_size :].tolist()

    def __iter__(self):
        return iter(self.order())

    def __len__(self):
        return len(self.order())


class FolderLoader:
    """ImageNet batches with the :class:`~vhmn.loader.DeviceLoader` interface: decoding and resizing
    in DataLoader workers (uint8), normalisation on the device; yields (x, y, idx)."""

    def __init__(self, folder: Path, batch_size: int, train: bool, *, image_size: int = 224, num_workers: int = 8,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device="cpu", limit: int | None = None,
                 mean=DATASETS["imagenet"].mean, std=DATASETS["imagenet"].std, augment: str = "crop_flip"):
        import torch
        from torchvision import datasets
        from torchvision.transforms import v2

        if train:
            ops = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
            if augment == "strong":
                ops.append(v2.TrivialAugmentWide())
        else:
            ops = [v2.Resize(int(round(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size)]
        tf = v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.uint8)])
        ds = datasets.ImageFolder(str(folder), transform=tf)
        if limit:
            ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
        self.dataset, self.train, self.batch_size, self.world_size = _Indexed(ds), train, batch_size, world_size
        self.device = torch.device(device)
        self.sampler = _ShardSampler(len(ds), train, seed, rank, world_size, batch_size)
        self.num_workers = num_workers
        self.drop_last = train
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.seed = seed

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def shard_size(self) -> int:
        n = self.num_images
        return n // self.world_size if self.train else len(range(self.sampler.rank, n, self.world_size))

    def __len__(self) -> int:
        m = self.shard_size
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch, self.sampler.skip = int(epoch), int(start_batch)

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "start_batch": self.sampler.skip, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"], state.get("start_batch", 0))

    def __iter__(self):
        import torch

        dl = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", drop_last=self.drop_last, persistent_workers=False,
        )
        for x, y, idx in dl:
            x = x.to(self.device, non_blocking=True).float()
            yield (x - self.mean) / self.std, y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)
        self.sampler.skip = 0


def write_synthetic_imagefolder(folder: str | os.PathLike, classes: int = 4, per_class: int = 16, size: int = 72,
                                seed: int = 0) -> Path:
    """A tiny ImageNet-layout folder of random JPEGs (``<folder>/imagenet/{train,val}/<class>/``) for
    pipeline checks where ImageNet is absent. Random images: nothing to learn; never a result."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            d = folder / "imagenet" / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split == "train" else per_class // 2):
                Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    return folder


def imagenet_loaders(root, batch_size: int, *, num_workers: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1,
                     device="cpu", train_limit: int | None = None, test_limit: int | None = None,
                     augment: str = "crop_flip", image_size: int = 224) -> tuple[FolderLoader, FolderLoader]:
    """Train and validation loaders of ImageNet-1k (ImageFolder layout, see :func:`imagenet_folder`)."""
    train, val = imagenet_folder(root)
    common = dict(image_size=image_size, num_workers=num_workers, seed=seed, rank=rank, world_size=world_size, device=device)
    return (FolderLoader(train, batch_size, True, limit=train_limit, augment=augment, **common),
            FolderLoader(val, batch_size, False, limit=test_limit, **common))


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vhmn.data", description="Fetch and cache datasets.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a dataset with torchvision and write the uint8 cache")
    f.add_argument("name", choices=[k for k in DATASETS if k != "imagenet"])
    f.add_argument("--root", default=None, help="data root (default: $VHMN_DATA or ./data)")
    f.add_argument("--from", dest="src", default=None,
                   help="a folder that already holds torchvision's files for NAME (no download; md5 checked)")
    args = ap.parse_args(argv)
    if args.src:
        out = import_torchvision_folder(args.name, args.src, args.root)
        print(f"{args.name}: cache written to {out}")
        return 0
    for split in ("train", "test"):
        images, labels = load_arrays(args.name, split, args.root, download=True)
        print(f"{args.name} {split}: {images.shape[0]} images {images.shape[1:]} -> {data_root(args.root) / args.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
