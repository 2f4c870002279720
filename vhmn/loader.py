"""A device-resident loader for the small datasets (CIFAR-10/100, SVHN).

The whole uint8 dataset (or an index subset of it) is moved to the device once, channels-first.
Every epoch draws, from a generator seeded by ``(seed, epoch)``, a permutation and the random
augmentation parameters of every image (crop offsets, flips), and moves them to the device in one
transfer. A batch is then pure device indexing: no worker processes, no host↔device copies, no
host syncs per batch. The same code runs on CPU and produces the same batches there.

    loader = DeviceLoader(images, labels, batch_size=512, train=True, mean=..., std=..., device="cuda")
    for epoch in range(E):
        loader.set_epoch(epoch)
        for x, y, idx in loader:   # x (B, 3, H, W) float32 normalised, y (B,) long, idx (B,) dataset indices
            ...

Distributed training: ``rank``/``world_size`` give every process a disjoint shard of each epoch's
permutation (the same permutation on every rank; the tail that does not divide evenly is dropped,
as in ``DistributedSampler(drop_last=True)``). Evaluation loaders (``train=False``) keep every
image: shard r holds positions r, r + W, r + 2W, … so the shards partition the dataset.

Augmentation (``augment``):
  ``"none"``       normalisation only;
  ``"crop"``       padded random crop without flips (digits: SVHN);
  ``"crop_flip"``  the standard CIFAR recipe: pad 4 px (``pad_mode`` "reflect" or "zeros"),
                   random 32×32 crop, horizontal flip with probability ½;
  ``"strong"``     crop_flip, then torchvision.transforms.v2.TrivialAugmentWide on uint8 images.
                   v2 transforms draw one operation per call, so it is applied per chunk of
                   ``strong_chunk`` images (every chunk gets its own operation); its randomness
                   comes from torch's global generator (which the trainer seeds and checkpoints).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DeviceLoader", "AUGMENTATIONS"]

AUGMENTATIONS = ("none", "crop", "crop_flip", "strong")


def _as_tensor(a, dtype) -> Tensor:
    return a if isinstance(a, Tensor) else torch.from_numpy(np.ascontiguousarray(a))


class DeviceLoader:
    """Batches of a uint8 image array kept on ``device``. See the module docstring."""

    def __init__(
        self,
        images: np.ndarray | Tensor,
        labels: np.ndarray | Tensor,
        batch_size: int,
        *,
        indices: np.ndarray | Tensor | None = None,
        train: bool = True,
        augment: str = "crop_flip",
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        crop_padding: int = 4,
        pad_mode: str = "reflect",
        strong_chunk: int = 32,
    ):
        images, labels = _as_tensor(images, torch.uint8), _as_tensor(labels, torch.long)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"images must be uint8 (n, H, W, C) with C in (1, 3) (the vhmn.data cache layout), got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        if pad_mode not in ("reflect", "zeros"):
            raise ValueError(f"pad_mode must be 'reflect' or 'zeros', got {pad_mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        n_all = images.shape[0]
        if indices is None:
            indices = torch.arange(n_all)
        indices = _as_tensor(indices, torch.long).to(torch.long)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_all):
            raise ValueError(f"indices must lie in [0, {n_all}), got range [{int(indices.min())}, {int(indices.max())}]")
        self.device = torch.device(device)
        self.train, self.augment = train, augment if train else "none"
        self.batch_size, self.seed = batch_size, seed
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = rank, world_size
        self.crop_padding, self.pad_mode, self.strong_chunk = crop_padding, pad_mode, strong_chunk
        # Moved once: (n, C, H, W) uint8, labels, and the dataset index of every row.
        self.images = images[indices].permute(0, 3, 1, 2).contiguous().to(self.device)
        self.labels = labels[indices].to(self.device, torch.long)
        self.indices = indices.to(self.device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255
        self.epoch, self.start_batch = 0, 0
        self._strong = None
        if self.augment == "strong":
            from torchvision.transforms import v2

            self._strong = v2.TrivialAugmentWide()

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        """Images in the dataset (all ranks)."""
        return self.images.shape[0]

    @property
    def shard_size(self) -> int:
        """Images this rank sees per epoch."""
        n = self.num_images
        if self.train:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        m = self.shard_size
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    # ---- epoch state ------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (its permutation and augmentation); ``start_batch`` skips batches (resume)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self.set_epoch(state["epoch"], state.get("start_batch", 0))

    def _epoch_plan(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """This rank's row order for the epoch, and per-row crop offsets (n, 2) and flips (n,)."""
        n = self.num_images
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.train:
            order = torch.randperm(n, generator=g)
            order = order[: (n // self.world_size) * self.world_size][self.rank :: self.world_size]
        else:
            order = torch.arange(self.rank, n, self.world_size)
        offsets = flips = None
        if self.augment != "none":
            # Drawn for every image of the dataset so a row's augmentation does not depend on the shard.
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=g)[order]
            flips = (torch.rand(n, generator=g) < 0.5)[order]
            if self.augment == "crop":
                flips = torch.zeros_like(flips)
            offsets, flips = offsets.to(self.device), flips.to(self.device)
        return order.to(self.device), offsets, flips

    # ---- augmentation -------------------------------------------------------------------------
    def _crop_flip(self, x: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
        """x (B, C, H, W) float → padded random crops, some flipped horizontally."""
        p = self.crop_padding
        B, C, H, W = x.shape
        if p > 0:
            x = F.pad(x, (p, p, p, p), mode="reflect" if self.pad_mode == "reflect" else "constant")
            rows = offsets[:, 0, None] + torch.arange(H, device=x.device)  # (B, H)
            cols = offsets[:, 1, None] + torch.arange(W, device=x.device)  # (B, W)
            b = torch.arange(B, device=x.device)[:, None, None]
            x = x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)
        return torch.where(flips[:, None, None, None], x.flip(-1), x)

    def _apply_strong(self, x: Tensor) -> Tensor:
        """uint8 (B, C, H, W) → TrivialAugmentWide, one operation per chunk of ``strong_chunk`` images."""
        return torch.cat([self._strong(c) for c in x.split(self.strong_chunk)])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order, offsets, flips = self._epoch_plan()
        B = self.batch_size
        for i in range(self.start_batch, len(self)):
            rows = order[i * B : (i + 1) * B]
            x = self.images[rows]  # (B, C, H, W) uint8
            if offsets is not None:
                o, f = offsets[i * B : (i + 1) * B], flips[i * B : (i + 1) * B]
                if self.augment == "strong":
                    x = self._apply_strong(self._crop_flip(x.float(), o, f).round_().to(torch.uint8))
                    x = x.float()
                else:
                    x = self._crop_flip(x.float(), o, f)
            else:
                x = x.float()
            x = (x - self.mean) / self.std
            yield x, self.labels[rows], self.indices[rows]
        self.start_batch = 0  # a resumed epoch skips batches only once
