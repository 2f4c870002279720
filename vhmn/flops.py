"""FLOPs and parameters per component of a model, counted by ``torch.utils.flop_counter``.

:func:`count` runs one forward pass under :class:`~torch.utils.flop_counter.FlopCounterMode`
(which counts matrix products and convolutions, 2 FLOPs per multiply-add; element-wise ops,
softmax and normalisation are not counted) and sums the counts and the parameters of each
component:

=============  ==============================================================================
component      modules (V-HMN)
=============  ==============================================================================
patch_embed    the p×p patch convolution
local          local Hopfield paths: neighbourhood conv, q/k/v/o projections, retrieval —
               the cost of *one* prediction (refine_steps ≤ 1), bank projection included
               (FLOPs of a module are booked to the innermost module running them)
global         global Hopfield paths (scene query, bank projection, retrieval), one prediction
fusion         FiLM or concat+linear fusion of the two paths (absent with the default sum)
refinement     the extra cost of refine_steps > 1: every extra step recomputes the prediction
mlp            the blocks' MLPs
norm           the blocks' LayerNorms (parameters only; normalisation FLOPs are not counted)
merge          patch merging between stages (staged layout)
head           final norm, pooling, classifier
=============  ==============================================================================

``total`` is counted over the whole model, independently of the components; the two agree
(the tests check it). For other models (e.g. a timm ViT) the components are ``patch_embed``,
``attn``, ``mlp``, ``norm`` and ``head`` when the module names match timm's, else only ``total``.

FLOPs are per image. The banks' keys and values are projected once per forward pass and shared by
the whole batch, so V-HMN's FLOPs per image fall with the batch size: pass ``batch_size``.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count", "count_per_image", "episodic_size", "format_table", "COMPONENTS"]

COMPONENTS = ("patch_embed", "local", "global", "fusion", "refinement", "mlp", "norm", "merge", "head")

# (component, regex on the module name) — first match wins; names are relative to the model.
_VHMN_RULES = [
    ("patch_embed", r"^patch_embed$"),
    ("local", r"^stages\.\d+\.\d+\.mixer\.local$"),
    ("global", r"^stages\.\d+\.\d+\.mixer\.glob$"),
    ("fusion", r"^stages\.\d+\.\d+\.mixer\.(film|fuse)$"),
    ("mlp", r"^stages\.\d+\.\d+\.mlp$"),
    ("norm", r"^stages\.\d+\.\d+\.norm[12]$"),
    ("merge", r"^merges\.\d+$"),
    ("head", r"^(norm|head|pool_kv)$"),
]
_VIT_RULES = [
    ("patch_embed", r"^patch_embed$"),
    ("attn", r"^blocks\.\d+\.attn$"),
    ("mlp", r"^blocks\.\d+\.mlp$"),
    ("norm", r"^blocks\.\d+\.(norm[12]|ls[12])$"),
    ("head", r"^(norm|fc_norm|head|head_drop|attn_pool)$"),
]


class _InnermostCounter(FlopCounterMode):
    """FlopCounterMode that also books every op to the innermost module running it.

    FlopCounterMode's own per-module counts include every module whose forward is on the stack,
    and miss a submodule called from outside its parent's forward (V-HMN projects its banks
    from the mixer); booking to the innermost module and summing over a module's subtree
    attributes every FLOP exactly once.
    """

    def __init__(self, model: nn.Module):
        super().__init__(display=False)
        self.stack: list[str] = []
        self.innermost: dict[str, int] = defaultdict(int)
        self._handles = []
        def enter(name):
            def hook(module, args) -> None:
                self.stack.append(name)
            return hook

        def leave(module, args, output) -> None:
            self.stack.pop()

        for name, mod in model.named_modules():
            self._handles.append(mod.register_forward_pre_hook(enter(name)))
            self._handles.append(mod.register_forward_hook(leave))

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            n = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            self.innermost[self.stack[-1] if self.stack else ""] += n
        return super()._count_flops(func_packet, out, args, kwargs)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _counts(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Forward ``x`` under the FLOP counter: (total FLOPs, FLOPs booked per innermost module)."""
    counter = _InnermostCounter(model)
    try:
        # The math SDPA backend decomposes attention into matrix products, which the counter sees.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(x)
    finally:
        counter.remove()
    return int(counter.get_total_flops()), dict(counter.innermost)


def count(
    model: nn.Module,
    img_size: int | None = None,
    batch_size: int = 1,
    in_chans: int | None = None,
) -> dict[str, dict[str, int]]:
    """FLOPs (per image) and parameters per component, plus ``total``.

    Returns ``{component: {"flops": int, "params": int}, ..., "total": {...}}``.
    The model is run in eval mode on random input (nothing is written to its banks).
    """
    cfg = getattr(model, "cfg", None)
    if img_size is None:
        img_size = getattr(cfg, "img_size", None) or _timm_img_size(model)
    if in_chans is None:
        in_chans = getattr(cfg, "in_chans", None) or getattr(getattr(model, "patch_embed", None), "proj", nn.Conv2d(3, 1, 1)).in_channels
    device = next(model.parameters()).device
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    try:
        is_vhmn = cfg is not None and hasattr(cfg, "refine_steps")
        total, booked = _counts(model, x)
        extra = 0
        if is_vhmn and cfg.refine_steps > 1:
            steps = cfg.refine_steps
            cfg.refine_steps = 1  # one prediction per block: the cost without refinement
            try:
                one_total, booked = _counts(model, x)
            finally:
                cfg.refine_steps = steps
            extra = total - one_total
    finally:
        model.train(was_training)

    rules = _VHMN_RULES if is_vhmn else (_VIT_RULES if hasattr(model, "blocks") and hasattr(model, "patch_embed") else [])
    comps: dict[str, dict[str, int]] = defaultdict(lambda: {"flops": 0, "params": 0})
    modules = dict(model.named_modules())
    for name in modules:
        for comp, pattern in rules:
            if name and re.match(pattern, name):
                comps[comp]["flops"] += sum(f for n, f in booked.items() if n == name or n.startswith(name + "."))
                comps[comp]["params"] += sum(p.numel() for p in modules[name].parameters())
                break
    if rules:
        # parameters held directly by the root (e.g. the pooling query, pos_embed, cls_token)
        own = sum(p.numel() for p in model.parameters(recurse=False))
        # FLOPs computed by the root itself, outside any child (e.g. attention pooling in forward_head)
        comps["head"]["flops"] += booked.get("", 0)
        comps["head"]["params"] += own if is_vhmn else 0
        if not is_vhmn and own:
            comps["patch_embed"]["params"] += own  # ViT: positional embedding, class token
    out: dict[str, dict[str, int]] = {}
    order = COMPONENTS if is_vhmn else ("patch_embed", "attn", "mlp", "norm", "head")
    for comp in order:
        if comp == "refinement" and is_vhmn:
            out[comp] = {"flops": extra // batch_size, "params": 0}
        elif comp in comps:
            out[comp] = {"flops": comps[comp]["flops"] // batch_size, "params": comps[comp]["params"]}
    out["total"] = {"flops": total // batch_size, "params": sum(p.numel() for p in model.parameters())}
    return out


def count_per_image(model: nn.Module, batch_size: int, img_size: int | None = None) -> dict[str, dict[str, float]]:
    """:func:`count` at any batch size without running that batch.

    FLOPs are affine in the batch size B (bank projections once per pass, everything else per
    image), so counts at B = 1 and B = 2 give the per-image FLOPs at any B exactly.
    """
    one = count(model, img_size=img_size, batch_size=1)
    two = count(model, img_size=img_size, batch_size=2)
    out = {}
    for comp in one:
        f1, f2 = one[comp]["flops"], 2 * two[comp]["flops"]
        per, shared = f2 - f1, 2 * f1 - f2
        out[comp] = {"flops": shared / batch_size + per, "params": one[comp]["params"]}
    return out


def episodic_size(model: nn.Module) -> int:
    """Numbers held in episodic banks (slots × dim over all banks): state, not parameters."""
    from .memory import EpisodicMemory

    return sum(m.slots * m.dim for m in model.modules() if isinstance(m, EpisodicMemory))


def _timm_img_size(model: nn.Module) -> int:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        raise ValueError("cannot tell the model's input size; pass img_size=")
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def format_table(columns: dict[str, dict[str, dict[str, int]]]) -> str:
    """A text table: one row per component, ``MFLOPs`` and ``params (k)`` per model column."""
    comps: list[str] = []
    for res in columns.values():
        for c in res:
            if c not in comps and c != "total":
                comps.append(c)
    comps.append("total")
    head = f"{'component':<14}" + "".join(f"{name + ' MFLOPs':>24}{'params (k)':>12}" for name in columns)
    lines = [head, "-" * len(head)]
    for c in comps:
        row = f"{c:<14}"
        for res in columns.values():
            if c in res:
                row += f"{res[c]['flops'] / 1e6:>24.2f}{res[c]['params'] / 1e3:>12.1f}"
            else:
                row += f"{'—':>24}{'—':>12}"
        lines.append(row)
    return "\n".join(lines)
