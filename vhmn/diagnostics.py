"""What the memories do: per block, how sharp the retrieval is and whether it retrieves the right class.

    d = memory_diagnostics(model, images, labels)     # images normalised (B, 3, H, W), labels (B,)
    d["blocks"][0]["local"]["effective_slots"]         # exp(entropy) of the association over the bank slots

For every block (and the last refinement step), with ``p`` the association over a bank's N slots:

* ``effective_slots``: ``exp(H(p))``, H the entropy, averaged over queries (tokens, or scenes for the global
  bank): 1 when one slot takes all the weight, N when the weight is uniform. For the local bank of the
  'hybrid' mode ``p`` is renormalised over the bank slots.
* ``label_agreement``: how often the label of the top-1 slot is the query image's label, and ``chance``: the
  agreement expected from the bank's label mix alone (Σ_c share_c of the images' classes). Slots never
  written (label −1) never agree.
* ``bank_share`` ('hybrid' only): the share of the association mass on the bank, against the k×k neighbours.
* ``pred_error``: ‖m − z‖ of the last refinement step, averaged over tokens.

Banks of learned slots have no labels; their ``label_agreement`` and ``chance`` are None.
The trainer records these at every evaluation when ``diagnose`` > 0 (``TrainConfig.diagnose`` test images).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["effective_slots", "memory_diagnostics"]


def effective_slots(p: Tensor) -> Tensor:
    """exp(entropy) of each distribution along the last axis: (..., N) → (...)."""
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.exp(-(p * p.clamp_min(1e-30).log()).sum(-1))


def _agreement(top_label: Tensor, y: Tensor, bank_labels: Tensor, num_classes: int) -> tuple[float, float]:
    yy = y.view(-1, *([1] * (top_label.ndim - 1))).expand_as(top_label)
    agree = (top_label == yy).float().mean().item()
    share = torch.bincount(bank_labels.clamp(min=0), weights=(bank_labels >= 0).float(), minlength=num_classes)
    share = share[:num_classes] / bank_labels.numel()
    return agree, share[y].mean().item()


@torch.no_grad()
def memory_diagnostics(model, images: Tensor, labels: Tensor, batch_size: int = 100) -> dict:
    """Per-block retrieval diagnostics of a V-HMN on ``images`` (normalised) with ``labels``; eval mode,
    nothing is written to the banks. Returns ``{"images": n, "blocks": [{"local": {...}, "global": {...},
    "pred_error": float}, ...]}`` (a path without a bank, e.g. window mode's local path, is None)."""
    mixers = [blk.mixer for stage in model.stages for blk in stage]
    acc = [{"local": [], "global": [], "err": []} for _ in mixers]
    for s in range(0, len(images), batch_size):
        x, y = images[s : s + batch_size], labels[s : s + batch_size].to(images.device)
        rec = model.inspect(x, topk=1)["blocks"]
        for a, entry in zip(acc, rec):
            last = entry["steps"][-1]
            a["err"].append(last["pred_error"])
            for kind in ("local", "global"):
                if f"{kind}_assoc" not in last:
                    continue
                p = last[f"{kind}_assoc"]  # (B, L, N) or (B, N)
                top = entry.get(f"{kind}_top")
                a[kind].append((effective_slots(p), top["label"][..., 0] if top is not None else None, y,
                                last.get("local_bank_share") if kind == "local" else None))
    num_classes = model.cfg.num_classes
    blocks = []
    for mixer, a in zip(mixers, acc):
        out = {"pred_error": torch.cat(a["err"]).mean().item()}
        for kind, mod in (("local", mixer.local), ("global", mixer.glob)):
            if not a[kind]:
                out[kind] = None
                continue
            eff = torch.cat([r[0].flatten() for r in a[kind]]).mean().item()
            d = {"effective_slots": eff, "slots": mod.memory.slots, "label_agreement": None, "chance": None}
            if a[kind][0][1] is not None:
                top = torch.cat([r[1] for r in a[kind]])
                y = torch.cat([r[2] for r in a[kind]])
                d["label_agreement"], d["chance"] = _agreement(top, y, mod.memory.provenance()["label"], num_classes)
            if kind == "local" and mod.mode == "hybrid":
                d["bank_share"] = torch.cat([r[3].flatten() for r in a[kind]]).mean().item()
            out[kind] = d
        blocks.append(out)
    return {"images": int(len(images)), "blocks": blocks}
