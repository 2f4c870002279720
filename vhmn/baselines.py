"""Baselines for 32×32 inputs, built from timm's own model classes (no hand-written copies).

Every function is registered in :mod:`vhmn.registry`, so ``vhmn.create_model("vit_tiny_cifar")``
works like any V-HMN variant, and accepts keyword overrides (``num_classes=100``, ``depth=8``, ...).
The baselines are trained by the same :mod:`vhmn.train` recipe as V-HMN.

==================  ============================================================  ==========
name                architecture                                                  parameters
==================  ============================================================  ==========
vit_tiny_cifar      ViT, patch 4 (8×8 tokens), width 192, depth 6, 6 heads,        2.7 M
                    mean pooling — the same width/depth/head size as
                    ``vhmn_tiny_cifar``
vit_cifar_params    ViT, patch 4, width 192, depth 8: V-HMN-tiny's parameter      3.6 M
                    count
mixer_cifar         MLP-Mixer, patch 4 (64 tokens), width 232, 8 blocks            3.6 M
swin_cifar          Swin, patch 2 (16×16 tokens), window 4, widths 64/128/256,     3.8 M
                    depths 2/2/4, heads of 32 (3 stages: 16×16 → 8×8 → 4×4)
resnet18_cifar      ResNet-18 with a CIFAR stem (3×3 conv, stride 1, no max-pool)  11.2 M
convmixer_cifar     ConvMixer-256/8, patch 2, kernel 5                             0.6 M
==================  ============================================================  ==========

Vision Mamba (Vim), the paper's fourth baseline family, is not here: timm has no pure-PyTorch
Vision Mamba, and the reference implementation needs the CUDA-only ``mamba-ssm`` kernels.
"""
from __future__ import annotations

import torch.nn as nn
from timm.models.convmixer import ConvMixer
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import BasicBlock, ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .registry import register_model

__all__ = ["vit_tiny_cifar", "vit_cifar_params", "mixer_cifar", "swin_cifar", "resnet18_cifar", "convmixer_cifar"]


def _vit(kw: dict, **defaults) -> VisionTransformer:
    args = dict(
        img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=6, mlp_ratio=4,
        num_classes=10, class_token=False, global_pool="avg", drop_path_rate=0.1,
    )
    args.update(defaults)
    args.update(kw)
    return VisionTransformer(**args)


@register_model
def vit_tiny_cifar(**kw) -> VisionTransformer:
    """ViT with vhmn_tiny_cifar's layout: patch 4, width 192, depth 6, 6 heads of 32, mean pooling."""
    return _vit(kw)


@register_model
def vit_cifar_params(**kw) -> VisionTransformer:
    """ViT at vhmn_tiny_cifar's parameter count (3.6 M): two more blocks than vit_tiny_cifar."""
    return _vit(kw, depth=8)


@register_model
def mixer_cifar(**kw) -> MlpMixer:
    """MLP-Mixer, patch 4 (64 tokens), width 232, 8 blocks: V-HMN-tiny's parameter count (3.6 M)."""
    args = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=232, num_blocks=8, drop_path_rate=0.1)
    args.update(kw)
    return MlpMixer(**args)


@register_model
def swin_cifar(**kw) -> SwinTransformer:
    """Swin for 32×32: patch 2 (16×16 tokens), window 4, stages 16→8→4 of widths 64/128/256 (3.8 M)."""
    args = dict(
        img_size=32, patch_size=2, window_size=4, embed_dim=64, depths=(2, 2, 4), num_heads=(2, 4, 8),
        num_classes=10, drop_path_rate=0.1,
    )
    args.update(kw)
    return SwinTransformer(**args)


@register_model
def resnet18_cifar(**kw) -> ResNet:
    """timm ResNet-18 with the CIFAR stem: 3×3 conv stride 1, no max-pool (32×32 → 4×4 at the end)."""
    args = dict(block=BasicBlock, layers=(2, 2, 2, 2), num_classes=10)
    args.update(kw)
    model = ResNet(**args)
    model.conv1 = nn.Conv2d(args.get("in_chans", 3), 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model
def convmixer_cifar(**kw) -> ConvMixer:
    """ConvMixer-256/8 for CIFAR: patch 2, depthwise kernel 5."""
    args = dict(dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=10)
    args.update(kw)
    return ConvMixer(**args)
