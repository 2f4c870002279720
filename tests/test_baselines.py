"""timm baselines sized for 32×32: registration, exact configs, sizes, training signal."""
from __future__ import annotations

import pytest
import torch

import vhmn

from _slice import one_thread  # noqa: F401  (autouse fixture)
from vhmn.baselines import __all__ as BASELINES


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_all_registered():
    assert set(BASELINES) <= set(vhmn.list_models())


def test_vit_tiny_cifar_is_exactly_the_agreed_config():
    from timm.models.vision_transformer import VisionTransformer

    ref = VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=6, mlp_ratio=4, num_classes=10,
                            class_token=False, global_pool="avg", drop_path_rate=0.1)
    m = vhmn.create_model("vit_tiny_cifar")
    assert type(m) is VisionTransformer and len(m.blocks) == 6 and m.embed_dim == 192 and m.global_pool == "avg"
    assert m.cls_token is None and m.blocks[0].attn.num_heads == 6
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_parameter_budgets():
    target = n_params(vhmn.create_model("vhmn_tiny_cifar"))  # 3.57 M
    for name in ("vit_cifar_params", "mixer_cifar", "swin_cifar"):
        assert abs(n_params(vhmn.create_model(name)) / target - 1) < 0.1, name
    r = vhmn.create_model("resnet18_cifar")
    assert r.conv1.stride == (1, 1) and r.conv1.kernel_size == (3, 3) and isinstance(r.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("name", BASELINES)
def test_forward_overrides_and_gradients(name):
    torch.manual_seed(0)
    m = vhmn.create_model(name, num_classes=100)
    x = torch.randn(2, 3, 32, 32)
    y = m(x)
    assert y.shape == (2, 100) and torch.isfinite(y).all()
    y.logsumexp(-1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_a_baseline_learns_a_fixed_batch():
    torch.manual_seed(0)
    m = vhmn.create_model("vit_tiny_cifar", embed_dim=48, depth=2, num_heads=2, drop_path_rate=0.0)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
