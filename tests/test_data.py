"""Data: the device-resident loader, the committed index lists, torchvision's on-disk formats, ImageNet.

The loader is checked against a NumPy reference of the CIFAR augmentation (reflect/zero padding,
crop, flip), for exact coverage of each epoch, determinism per (seed, epoch), disjoint DDP shards
and resumption in the middle of an epoch. The CIFAR-100 and SVHN readers are checked on small
synthetic files written in the exact layout torchvision reads, against torchvision's own classes.
"""
from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from vhmn.data import (
    DatasetNotFoundError,
    SPLITS_DIR,
    SUBSETS,
    imagenet_folder,
    imagenet_loaders,
    index_digest,
    load_subset_indices,
    make_subset,
    read_torchvision_files,
)
from vhmn.loader import DeviceLoader

from _slice import real_root, one_thread  # noqa: F401  (autouse fixture)

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def toy(n=40, h=8, w=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def np_augment(img_hwc, offset, flip, pad, mode):
    """Reference: pad (reflect or zeros), crop at ``offset``, flip; (H, W, C) uint8 → float64."""
    x = img_hwc.astype(np.float64)
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="reflect" if mode == "reflect" else "constant")
    H, W = img_hwc.shape[:2]
    x = x[offset[0] : offset[0] + H, offset[1] : offset[1] + W]
    return x[:, ::-1] if flip else x


# --------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_augmentation_matches_numpy_reference(mode):
    x, y = toy()
    L = DeviceLoader(x, y, 16, train=True, augment="crop_flip", pad_mode=mode, mean=MEAN, std=STD, seed=3)
    L.set_epoch(2)
    order, offsets, flips = L._epoch_plan()
    xb, yb, ib = next(iter(L))
    for j in range(16):
        r = int(order[j])
        ref = np_augment(x[r], offsets[j].tolist(), bool(flips[j]), 4, mode)
        ref = (ref / 255 - np.array(MEAN)) / np.array(STD)
        assert_close(xb[j].permute(1, 2, 0).double(), torch.from_numpy(ref), atol=1e-5, rtol=0)
    assert torch.equal(yb, torch.from_numpy(y)[ib])
    assert flips.any() and not flips.all() and offsets.min() >= 0 and offsets.max() <= 8


def test_epoch_covers_dataset_once_and_is_seeded():
    x, y = toy(50)
    L = DeviceLoader(x, y, 8, train=True, mean=MEAN, std=STD, seed=1, drop_last=False)
    L.set_epoch(0)
    idx0 = torch.cat([i for _, _, i in L])
    assert sorted(idx0.tolist()) == list(range(50))
    L2 = DeviceLoader(x, y, 8, train=True, mean=MEAN, std=STD, seed=1, drop_last=False)
    L2.set_epoch(0)
    b1, b2 = list(L), list(L2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(b1, b2))
    L.set_epoch(1)
    assert not torch.equal(torch.cat([i for _, _, i in L]), idx0)  # a new permutation each epoch
    # drop_last (the training default): only full batches
    L3 = DeviceLoader(x, y, 8, train=True, mean=MEAN, std=STD)
    assert len(L3) == 6 and all(xb.shape == (8, 3, 8, 8) for xb, _, _ in L3)


def test_subset_indices_and_eval_order():
    x, y = toy(30)
    sub = np.array([3, 7, 11, 20, 29])
    L = DeviceLoader(x, y, 2, indices=sub, train=False, mean=MEAN, std=STD)
    xb = torch.cat([b[0] for b in L])
    idx = torch.cat([b[2] for b in L])
    assert idx.tolist() == sub.tolist()  # evaluation keeps order, keeps the tail
    ref = (torch.from_numpy(x[sub]).permute(0, 3, 1, 2).double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1).double()) / torch.tensor(STD).view(1, 3, 1, 1).double()
    assert_close(xb.double(), ref, atol=1e-5, rtol=0)


def test_ddp_shards_are_disjoint_and_consistent():
    x, y = toy(45)
    full = DeviceLoader(x, y, 6, train=True, mean=MEAN, std=STD, seed=5)
    shards = [DeviceLoader(x, y, 3, train=True, mean=MEAN, std=STD, seed=5, rank=r, world_size=2) for r in range(2)]
    for L in (full, *shards):
        L.set_epoch(4)
    got = [torch.cat([i for _, _, i in L]) for L in shards]
    assert not set(got[0].tolist()) & set(got[1].tolist())
    # rank r's batch i and rank r' batch i together are the single-process batch i, augmented alike
    for (xf, _, i_f), (x0, _, i0), (x1, _, i1) in zip(full, *shards):
        assert sorted(i_f.tolist()) == sorted(i0.tolist() + i1.tolist())
        both = torch.cat([x0, x1])[torch.cat([i0, i1]).argsort()]
        assert torch.equal(xf[i_f.argsort()], both)
    ev = [DeviceLoader(x, y, 4, train=False, mean=MEAN, std=STD, rank=r, world_size=2) for r in range(2)]
    ids = sorted(torch.cat([torch.cat([i for _, _, i in L]) for L in ev]).tolist())
    assert ids == list(range(45))  # evaluation shards partition the test set


def test_resume_mid_epoch_gives_the_remaining_batches():
    x, y = toy(64)
    L = DeviceLoader(x, y, 8, train=True, mean=MEAN, std=STD, seed=2)
    L.set_epoch(3)
    ref = list(L)
    L.load_state_dict({"epoch": 3, "start_batch": 5, "seed": 2})
    rest = list(L)
    assert len(rest) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(ref[5:], rest))
    assert len(list(L)) == 8  # the skip applies once


def test_crop_only_never_flips_and_strong_runs():
    x, y = toy(32)
    L = DeviceLoader(x, y, 32, train=True, augment="crop", mean=MEAN, std=STD)
    _, _, flips = L._epoch_plan()
    assert not flips.any()
    S = DeviceLoader(x, y, 32, train=True, augment="strong", mean=MEAN, std=STD, strong_chunk=8)
    xb, _, _ = next(iter(S))
    assert xb.shape == (32, 3, 8, 8) and torch.isfinite(xb).all()


def test_loader_rejects_bad_input():
    x, y = toy(8)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(x.astype(np.float32), y, 4)
    with pytest.raises(ValueError, match="augment"):
        DeviceLoader(x, y, 4, augment="mixup")
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(x, y, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="indices"):
        DeviceLoader(x, y, 4, indices=[0, 8])


# --------------------------------------------------------------------------------------
# committed index lists
# --------------------------------------------------------------------------------------
def test_committed_splits_are_valid_and_reproducible():
    files = sorted(SPLITS_DIR.glob("cifar10_*.json"))
    assert {p.stem for p in files} == {n for n, (d, *_) in SUBSETS.items() if d == "cifar10"}
    root = real_root()
    labels = None
    if root is not None:
        from vhmn.data import load_arrays

        labels = load_arrays("cifar10", "train", root, download=False)[1]
    for p in files:
        spec = json.loads(p.read_text())
        idx = load_subset_indices(p.stem)
        assert spec["n"] == len(idx) == len(set(idx.tolist())) and spec["sha256"] == index_digest(idx)
        assert set(spec) >= {"dataset", "subset", "fraction", "seed", "indices", "sha256", "n", "per_class"}
        if labels is not None:
            assert np.bincount(labels[idx], minlength=10).tolist() == spec["per_class"]
            assert make_subset(p.stem, labels) == spec  # regenerated bit for bit
    frac10 = json.loads((SPLITS_DIR / "cifar10_frac10.json").read_text())
    assert frac10["per_class"] == [500] * 10
    lt = json.loads((SPLITS_DIR / "cifar10_lt100.json").read_text())
    assert lt["per_class"][0] == 5000 and lt["per_class"][-1] == 50 and lt["per_class"] == sorted(lt["per_class"], reverse=True)


def test_split_errors_and_generation(tmp_path, monkeypatch):
    spec = json.loads((SPLITS_DIR / "cifar10_frac10.json").read_text())
    spec["indices"][0] += 1
    (tmp_path / "cifar10_frac10.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="sha256"):
        load_subset_indices("cifar10_frac10", splits_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="known subsets"):
        load_subset_indices("cifar10_frac7", splits_dir=tmp_path)
    with pytest.raises(ValueError, match="belongs to"):
        load_subset_indices("cifar10_frac20", dataset="svhn")
    # no committed file (CIFAR-100 / SVHN here): generated from the labels, deterministically
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), 50)
    rng.shuffle(labels)
    monkeypatch.setattr("vhmn.data.load_arrays", lambda name, split, root=None, download=True: (None, labels))
    a = load_subset_indices("cifar100_frac10", splits_dir=tmp_path)
    b = load_subset_indices("cifar100_frac10", splits_dir=tmp_path)
    assert np.array_equal(a, b) and len(a) == 500 and np.bincount(labels[a]).tolist() == [5] * 100


# --------------------------------------------------------------------------------------
# torchvision's on-disk formats (synthetic files)
# --------------------------------------------------------------------------------------
def write_cifar100(folder, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    base = folder / "cifar-100-python"
    base.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        entry = {"filenames": [f"{i}.png" for i in range(n)], "batch_label": f"{split} batch", "fine_labels": fine,
                 "coarse_labels": [f // 5 for f in fine], "data": data}
        with open(base / split, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        out[split] = (data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), np.array(fine))
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}, f)
    return out


def write_svhn(folder, n=12, seed=0):
    import scipy.io as sio

    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "test"):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # SVHN's (H, W, C, n)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 10 stands for the digit 0
        sio.savemat(folder / f"{split}_32x32.mat", {"X": X, "y": y})
        lab = y[:, 0].astype(np.int64)
        lab[lab == 10] = 0
        out[split] = (X.transpose(3, 0, 1, 2), lab)
    return out


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar100_reader_matches_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    truth = write_cifar100(tmp_path)
    base = tmp_path / "cifar-100-python"
    # torchvision checks published md5s; point them at our synthetic files to run its own reader
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5(base / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(base / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5(base / "meta")})
    for split in ("train", "test"):
        x, y = read_torchvision_files("cifar100", tmp_path, split)
        tv = CIFAR100(str(tmp_path), train=split == "train", download=False)
        assert np.array_equal(x, tv.data) and np.array_equal(y, tv.targets)
        assert np.array_equal(x, truth[split][0]) and np.array_equal(y, truth[split][1])
        assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3)


def test_svhn_reader_matches_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import SVHN

    truth = write_svhn(tmp_path)
    monkeypatch.setattr(SVHN, "split_list", {s: ["", f"{s}_32x32.mat", md5(tmp_path / f"{s}_32x32.mat")] for s in ("train", "test")})
    for split in ("train", "test"):
        x, y = read_torchvision_files("svhn", tmp_path, split)
        tv = SVHN(str(tmp_path), split=split, download=False)
        assert np.array_equal(x, tv.data.transpose(0, 2, 3, 1)) and np.array_equal(y, tv.labels)
        assert np.array_equal(x, truth[split][0]) and np.array_equal(y, truth[split][1]) and y.max() <= 9


def test_torchvision_readers_report_bad_files(tmp_path):
    write_svhn(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="md5"):  # synthetic files do not carry the published md5
        read_torchvision_files("svhn", tmp_path, "train")
    x, _ = read_torchvision_files("svhn", tmp_path, "train", check_md5=False)
    assert x.shape == (12, 32, 32, 3)
    with pytest.raises(DatasetNotFoundError, match="missing"):
        read_torchvision_files("cifar100", tmp_path, "train")


# --------------------------------------------------------------------------------------
# ImageNet (ImageFolder)
# --------------------------------------------------------------------------------------
def test_imagenet_layout_error_and_folder_loader(tmp_path):
    from PIL import Image

    with pytest.raises(DatasetNotFoundError, match="ImageFolder layout"):
        imagenet_folder(tmp_path)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("n01", "n02", "n03"):
            d = tmp_path / "imagenet" / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    tr, va = imagenet_loaders(tmp_path, 4, num_workers=0, image_size=32, seed=1)
    tr.set_epoch(0)
    batches = list(tr)
    assert len(batches) == len(tr) == 3 and batches[0][0].shape == (4, 3, 32, 32)
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(12))
    ids = torch.cat([b[2] for b in va])
    assert ids.tolist() == list(range(12)) and torch.cat([b[1] for b in va]).tolist() == [0] * 4 + [1] * 4 + [2] * 4
