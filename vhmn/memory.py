"""Memory banks (the stored patterns) and retrieval with learned projections.

Two kinds of bank, one interface (``patterns()`` → (N, d), ``write(...)``):

* :class:`EpisodicMemory` (our default; a decision, see the book's decisions page): a ring buffer
  of N slots holding *detached* features seen in training batches. Writes are FIFO (optionally
  one FIFO per class), happen only in training mode, and record the provenance of every slot
  (dataset index, token position, label) so that a slot can be shown as the image patch it was
  written from. Slots are buffers: they travel with the state dict and receive no gradient.
  Before the first write the slots hold random unit-variance features with provenance −1.
* :class:`LearnedMemory`: slots are parameters, trained by backpropagation like any weight
  (the idea of hopfield-layers' ``HopfieldLayer``).

:class:`HopfieldRetrieval` is the chapter-2 update with learned projections (pattern projections
W_q, W_k, W_v, W_o) and several heads. The bank is projected once per forward pass and shared by
the whole batch: queries of all images are folded into one long query sequence, so the bank is
never copied per image.

Distributed training: each rank writes the features of its own micro-batch into its own copy of
the bank; :func:`sync_memory` broadcasts rank 0's banks to every rank (the trainer calls it at the
end of every epoch, before evaluation and checkpointing), so all ranks evaluate and save the same
memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from .functional import association, hopfield_update

__all__ = ["EpisodicMemory", "LearnedMemory", "HopfieldRetrieval", "make_memory", "sync_memory"]


class EpisodicMemory(nn.Module):
    """Ring buffer of ``slots`` detached feature vectors of size ``dim``, with provenance.

    class_balanced: the slots are split into ``num_classes`` equal FIFO regions and a feature is
    written into the region of its label (samples beyond a region's size in one batch are dropped).
    """

    def __init__(self, slots: int, dim: int, class_balanced: bool = False, num_classes: int = 0):
        super().__init__()
        if class_balanced and (num_classes < 1 or slots % num_classes):
            raise ValueError(f"class-balanced memory needs slots ({slots}) divisible by num_classes ({num_classes})")
        self.slots, self.dim, self.class_balanced = slots, dim, class_balanced
        self.num_classes = num_classes if class_balanced else 0
        regions = max(self.num_classes, 1)
        # One extra row (index `slots`) is a sink for dropped class-balanced writes; it is never read.
        self.register_buffer("bank", torch.randn(slots + 1, dim))
        self.register_buffer("ptr", torch.zeros(regions, dtype=torch.long))
        self.register_buffer("src_index", torch.full((slots + 1,), -1, dtype=torch.long))  # dataset index
        self.register_buffer("src_pos", torch.full((slots + 1,), -1, dtype=torch.long))  # token position
        self.register_buffer("src_label", torch.full((slots + 1,), -1, dtype=torch.long))
        self.register_buffer("writes", torch.zeros((), dtype=torch.long))  # total features written

    def patterns(self) -> Tensor:
        return self.bank[: self.slots]  # (N, d)

    def provenance(self) -> dict[str, Tensor]:
        """Per slot: dataset index, token position, label (−1 = never written)."""
        n = self.slots
        return {"index": self.src_index[:n], "position": self.src_pos[:n], "label": self.src_label[:n]}

    @torch.no_grad()
    def write(self, feats: Tensor, index: Tensor, position: Tensor, label: Tensor) -> None:
        """Write n feature rows (n, d) FIFO. Tensor ops only: no host sync, no graph break."""
        n = feats.shape[0]
        if self.class_balanced:
            per = self.slots // self.num_classes
            onehot = nn.functional.one_hot(label.clamp(min=0), self.num_classes) * (label >= 0).unsqueeze(1)
            rank = (onehot.cumsum(0) - 1).gather(1, label.clamp(min=0).unsqueeze(1)).squeeze(1)  # (n,)
            ok = (label >= 0) & (rank < per)
            c = label.clamp(min=0)
            slot = torch.where(ok, c * per + (self.ptr[c] + rank) % per, torch.full_like(c, self.slots))
            self.ptr.add_(onehot.sum(0).clamp(max=per)).remainder_(per)
        else:
            if n > self.slots:  # keep the last `slots` rows, as a FIFO would
                feats, index, position, label = feats[-self.slots :], index[-self.slots :], position[-self.slots :], label[-self.slots :]
                n = self.slots
            slot = (self.ptr[0] + torch.arange(n, device=feats.device)) % self.slots
            self.ptr.add_(n).remainder_(self.slots)
        self.bank.index_copy_(0, slot, feats.detach().to(self.bank.dtype))
        self.src_index.index_copy_(0, slot, index)
        self.src_pos.index_copy_(0, slot, position)
        self.src_label.index_copy_(0, slot, label)
        self.writes.add_(n)

    def extra_repr(self) -> str:
        return f"slots={self.slots}, dim={self.dim}, class_balanced={self.class_balanced}"


class LearnedMemory(nn.Module):
    """Slots as parameters (N, d), trained by backpropagation; ``write`` does nothing."""

    def __init__(self, slots: int, dim: int):
        super().__init__()
        self.slots, self.dim = slots, dim
        self.bank = nn.Parameter(torch.randn(slots, dim))

    def patterns(self) -> Tensor:
        return self.bank

    def provenance(self) -> None:
        return None

    def write(self, feats: Tensor, index: Tensor, position: Tensor, label: Tensor) -> None:
        pass


def make_memory(kind: str, slots: int, dim: int, class_balanced: bool = False, num_classes: int = 0) -> nn.Module:
    if kind == "episodic":
        return EpisodicMemory(slots, dim, class_balanced, num_classes)
    if kind == "learned":
        return LearnedMemory(slots, dim)
    raise ValueError(f"memory must be 'episodic' or 'learned', got {kind!r}")


class HopfieldRetrieval(nn.Module):
    """``m = W_o · softmax(β_H (W_q ξ)(W_k X)ᵀ) (W_v X)`` per head, heads concatenated.

    inv_temp: β_H; None → 1/√head_dim (the transformer's choice).
    qk_norm: cosine retrieval: state and stored patterns are L2-normalised per head after their projections, and
    β_H is learned per head (log-parametrised), starting at ``inv_temp`` (None → 10); a sharp association is then
    a choice the model can learn, not a side effect of the patterns' norms.
    """

    def __init__(self, dim: int, heads: int, inv_temp: float | None = None, bias: bool = False, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.head_dim = heads, dim // heads
        self.qk_norm = qk_norm
        if qk_norm:
            start = 10.0 if inv_temp is None else float(inv_temp)
            self.log_inv_temp = nn.Parameter(torch.full((heads, 1), math.log(start)))  # (h, 1)
            self.inv_temp = start  # the starting value; the learned one is exp(log_inv_temp)
        else:
            self.inv_temp = float(inv_temp) if inv_temp is not None else 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.o = nn.Linear(dim, dim)

    @property
    def scale(self) -> float:
        """The factor the fused attention applies to q·k: β_H, or 1 with qk_norm (β_H is then inside :meth:`query`)."""
        return 1.0 if self.qk_norm else self.inv_temp

    def _per_head_unit(self, t: Tensor, scale: Tensor | float = 1.0) -> Tensor:
        """(..., d) → (..., h, e): each head's part at length ``scale`` (unit by default). rms_norm is one fused
        kernel (x / rms(x) has length √e; F.normalize's norm, clamp and division are three passes)."""
        t = rearrange(t, "... (h e) -> ... h e", h=self.heads)
        return torch.nn.functional.rms_norm(t, (self.head_dim,), eps=1e-12) * (scale / math.sqrt(self.head_dim))

    def query(self, state: Tensor) -> Tensor:
        """State patterns (..., d) → projected queries (..., d); with qk_norm unit per head and scaled by β_H."""
        return self.scale_query(self.q(state))

    def scale_query(self, q: Tensor) -> Tensor:
        """Projected state W_q ξ (..., d) → the query: itself, or with qk_norm unit per head times β_H."""
        if not self.qk_norm:
            return q
        return rearrange(self._per_head_unit(q, self.log_inv_temp.exp()), "... h e -> ... (h e)")

    def key(self, stored: Tensor) -> Tensor:
        """Stored patterns (..., d) → projected keys (..., d); with qk_norm unit per head."""
        k = self.k(stored)
        return rearrange(self._per_head_unit(k), "... h e -> ... (h e)") if self.qk_norm else k

    def project_memory(self, stored: Tensor) -> tuple[Tensor, Tensor]:
        """Stored patterns (N, d) → keys, values (1, h, N, e). Once per forward pass."""
        k = rearrange(self.key(stored), "n (h e) -> 1 h n e", h=self.heads)
        v = rearrange(self.v(stored), "n (h e) -> 1 h n e", h=self.heads)
        return k, v

    def forward(self, state: Tensor, kv: tuple[Tensor, Tensor], fast: bool = True) -> Tensor:
        """state (B, L, d) → retrieval (B, L, d). All B·L queries share one bank."""
        B = state.shape[0]
        q = rearrange(self.query(state), "b l (h e) -> 1 h (b l) e", h=self.heads)
        out = hopfield_update(q, kv[0], self.scale, values=kv[1], fast=fast)  # (1, h, B·L, e)
        return self.o(rearrange(out, "1 h (b l) e -> b l (h e)", b=B))

    def association(self, state: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        """The association matrix, per head: (B, L, d) → (B, h, L, N)."""
        B = state.shape[0]
        q = rearrange(self.query(state), "b l (h e) -> 1 h (b l) e", h=self.heads)
        p = association(q, kv[0], self.scale)  # (1, h, B·L, N)
        return rearrange(p, "1 h (b l) n -> b h l n", b=B)


@torch.no_grad()
def sync_memory(model: nn.Module, src: int = 0) -> None:
    """Broadcast every episodic bank (slots, pointers, provenance) from rank ``src`` to all ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for m in model.modules():
        if isinstance(m, EpisodicMemory):
            for buf in m.buffers(recurse=False):
                dist.broadcast(buf, src)
