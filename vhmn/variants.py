"""Registered V-HMN variants. Each returns a :class:`~vhmn.model.VHMN`; overrides replace fields."""
from __future__ import annotations

from .model import VHMN, VHMNConfig
from .registry import register_model


def _build(overrides: dict, **defaults) -> VHMN:
    return VHMN(VHMNConfig.from_dict({**defaults, **overrides}))


# ---- tiny variants for tests (CPU, milliseconds) -------------------------------------------
@register_model
def vhmn_test(**kw) -> VHMN:
    """Isotropic, 2 blocks of width 32, 16 local / 8 global slots."""
    return _build(kw, dims=(32,), depths=(2,), head_dim=16, local_slots=16, global_slots=8, local_writes=8, drop_path=0.0)


@register_model
def vhmn_test_staged(**kw) -> VHMN:
    """Two stages (16 → 32 wide) with patch merging."""
    return _build(kw, patch_size=2, dims=(16, 32), depths=(1, 1), head_dim=16, local_slots=16, global_slots=8, local_writes=8, drop_path=0.0)


# ---- CIFAR-10 / CIFAR-100 / SVHN (32×32) -------------------------------------------------
@register_model
def vhmn_tiny_cifar(**kw) -> VHMN:
    """Isotropic, patch 4 (8×8 tokens), width 192, depth 6: a ViT-Tiny-sized V-HMN."""
    return _build(kw, dims=(192,), depths=(6,))


@register_model
def vhmn_small_cifar(**kw) -> VHMN:
    """Isotropic, patch 4, width 384, depth 8."""
    return _build(kw, dims=(384,), depths=(8,), local_slots=1024, global_slots=512, drop_path=0.2)


@register_model
def vhmn_staged_cifar(**kw) -> VHMN:
    """Staged, patch 2 (16×16 tokens) → 8×8 → 4×4, widths 64/128/256, depths 2/2/4."""
    return _build(kw, patch_size=2, dims=(64, 128, 256), depths=(2, 2, 4), local_slots=512, global_slots=256)


@register_model
def vhmn_tiny_cifar100(**kw) -> VHMN:
    return _build(kw, num_classes=100, dims=(192,), depths=(6,), global_slots=500)


@register_model
def vhmn_tiny_svhn(**kw) -> VHMN:
    return _build(kw, dims=(192,), depths=(6,))


# ---- ImageNet-1k (224×224) ------------------------------------------------------------------
@register_model
def vhmn_small_imagenet(**kw) -> VHMN:
    """Staged, patch 4 (56×56) → 28 → 14 → 7, widths 96/192/384/768, depths 2/2/6/2, 5000-slot banks."""
    return _build(
        kw, img_size=224, num_classes=1000, patch_size=4, dims=(96, 192, 384, 768), depths=(2, 2, 6, 2),
        local_slots=5000, global_slots=5000, local_writes=256, drop_path=0.2,
    )
