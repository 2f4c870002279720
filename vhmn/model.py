"""The Vision Hopfield Memory Network (V-HMN) backbone.

    image (B, 3, H, W)
      └─ patch embedding (conv p×p, stride p) ─► tokens z (B, L, d) on an h×w grid
      └─ stages of HMN blocks (patch merging 2×2 between stages when there are several):
             z = z + MemoryMixer(LN(z))       # memory paths + predictive-coding refinement
             z = z + MLP(LN(z))
      └─ head: LN → mean over tokens → Linear ─► logits (B, num_classes)

MemoryMixer, for the normalised tokens u = LN(z):
    prediction m(s) = fuse( LocalHopfield(s), GlobalHopfield(mean_L s) )
    output          = predictive_coding_refine(u, m, refine_rate, refine_steps)

What the paper states and what we chose is listed in the book ("What the paper says and what we
chose"); every alternative there is a field of :class:`VHMNConfig`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, resample_abs_pos_embed
from torch import Tensor

from .functional import predictive_coding_refine
from .memory import HopfieldRetrieval, make_memory

__all__ = ["VHMNConfig", "VHMN", "LocalHopfield", "GlobalHopfield", "MemoryMixer", "HMNBlock"]


@dataclass
class VHMNConfig:
    # input / output
    img_size: int = 32
    in_chans: int = 3
    num_classes: int = 10
    # layout: one stage = isotropic (ViT-like); several = staged with 2×2 patch merging (Swin-like)
    patch_size: int = 4
    dims: tuple[int, ...] = (192,)
    depths: tuple[int, ...] = (6,)
    head_dim: int = 32  # heads per block = dim // head_dim
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    # memory
    memory: str = "episodic"  # 'episodic' (ring buffer of detached features) | 'learned' (parameters)
    local_memory: bool = True
    global_memory: bool = True
    # 'bank': retrieve from patch prototypes | 'window': the k×k neighbours are the memory |
    # 'hybrid': one softmax over the k×k neighbours and the bank's prototypes (explicit stored patterns)
    local_mode: str = "bank"
    kernel_size: int = 3  # k of the k×k neighbourhood
    rel_pos: bool = False  # window/hybrid: a learned bias per head for each of the k² neighbour offsets
    # window/hybrid: the neighbours stored as patterns are the current refinement 'state' (re-projected at every
    # step) or the block 'input' u = LN(z), fixed while the state is refined (as a Hopfield memory is fixed)
    window_stored: str = "state"
    # window/hybrid: whether a token's own state is among the patterns it retrieves from. False: the prediction m of
    # a token comes from its context alone (its neighbours, and the bank), so m − z is an error of prediction
    window_self: bool = True
    # window/hybrid: each neighbour's value is read through a learned gain per head, offset and channel, so that the
    # retrieval weighs a neighbour's channels by where it sits (with a uniform association: a depthwise k×k conv)
    offset_gain: bool = False
    # window/hybrid: the stored patterns (the neighbours' keys and values) are their k×k descriptors, a depthwise k×k
    # conv of the stored tokens (bank mode's descriptor; the identity at initialisation), not the tokens themselves.
    # The query stays the token's state
    window_descriptor: bool = False
    # window/hybrid: the query is the token's k×k descriptor too (decision 2's local query: the same depthwise conv as
    # the stored patterns', applied to the current state; the identity at initialisation), not the state itself
    query_descriptor: bool = False
    local_slots: int = 512
    global_slots: int = 256
    local_writes: int = 64  # features each local bank writes per training step
    global_class_balanced: bool = False
    # episodic banks: write this batch's features after it has retrieved (no image retrieves itself while training,
    # as none can at test time) instead of before
    write_after_read: bool = False
    global_label_values: bool = False  # episodic global bank: a slot's value adds a learned embedding of its label
    global_mod: str = "add"  # 'add' | 'film' (scale and shift)
    fusion: str = "sum"  # 'sum' | 'concat' (concat + linear); only with global_mod='add'
    inv_temp: float | None = None  # Hopfield inverse temperature β_H; None → 1/√head_dim (qk_norm: 10, then learned)
    qk_norm: bool = False  # cosine retrieval: queries and keys unit per head, β_H learned per head
    # predictive-coding refinement
    refine_steps: int = 2  # T; 0 = feed-forward (one retrieval)
    refine_rate: float = 0.5  # β of z ← z + β(m − z)
    # what the mixer adds to the residual stream. For T ≥ 1, s_T = (1 − β)^T u + (the retrieved terms):
    # 'state': s_T; 'retrieval': s_T − (1 − β)^T u, the retrieved terms alone (the clean control of the refinement
    # ablation: T steps without the input pass-through, as T = 0 has none); 'change': s_T − u, the refinement's total
    # change (it replaces the pass-through (1 − β)^T u by −(1 − (1 − β)^T) u); 'prediction': m(s_T), the memory's
    # prediction read out at the refined state (one retrieval more: T + 1 in all). T = 0 is m(u) in every mode but 'change'
    mixer_output: str = "state"
    # a learned absolute position embedding added to the patch tokens, as the ViT's (resampled for other image
    # sizes). False: positions enter only through the local path (the depthwise conv of bank mode, rel_pos)
    pos_embed: bool = False
    # head
    pool: str = "mean"  # 'mean' | 'attn' (attention pooling with a learned query)
    fast: bool = True  # fused attention kernels; False = explicit reference path

    def __post_init__(self):
        self.dims, self.depths = tuple(self.dims), tuple(self.depths)
        choices = {
            "memory": ("episodic", "learned"),
            "local_mode": ("bank", "window", "hybrid"),
            "global_mod": ("add", "film"),
            "fusion": ("sum", "concat"),
            "window_stored": ("state", "input"),
            "mixer_output": ("state", "retrieval", "change", "prediction"),
            "pool": ("mean", "attn"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"VHMNConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if len(self.dims) != len(self.depths) or not self.dims:
            raise ValueError(f"dims {self.dims} and depths {self.depths} must be non-empty and of equal length")
        for d in self.dims:
            if d % self.head_dim:
                raise ValueError(f"every dim must be divisible by head_dim={self.head_dim}; got dims {self.dims}")
        if not (self.local_memory or self.global_memory):
            raise ValueError("at least one of local_memory and global_memory must be on")
        if self.fusion == "concat" and self.global_mod != "add":
            raise ValueError("fusion='concat' combines additive global retrievals; use global_mod='add'")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.global_label_values and (self.memory != "episodic" or not self.global_memory):
            raise ValueError("global_label_values reads the labels stored with episodic slots: needs memory='episodic' and global_memory")
        for name in ("rel_pos", "window_descriptor", "query_descriptor", "offset_gain"):  # options of the k×k neighbours as stored patterns
            if getattr(self, name) and self.local_mode == "bank":
                raise ValueError(f"{name} acts on the k×k neighbours of local_mode 'window' or 'hybrid'; bank mode has none")
        if self.refine_steps < 0 or not 0 < self.refine_rate <= 1:
            raise ValueError(f"need refine_steps ≥ 0 and 0 < refine_rate ≤ 1; got {self.refine_steps}, {self.refine_rate}")
        grid = self.img_size // self.patch_size
        if self.img_size % self.patch_size or grid % (2 ** (len(self.dims) - 1)):
            raise ValueError(
                f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}, and the "
                f"{grid}×{grid} grid by 2^(stages−1) = {2 ** (len(self.dims) - 1)}"
            )

    @property
    def layout(self) -> str:
        return "isotropic" if len(self.dims) == 1 else "staged"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VHMNConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VHMNConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


class LocalHopfield(nn.Module):
    """Patch-level associative memory over k×k neighbourhoods.

    'bank':   a depthwise k×k convolution turns each token's neighbourhood into a descriptor
              h (B, L, d); h is the state pattern that retrieves from a bank of patch prototypes
              (stored patterns are such descriptors, written from training images).
    'window': the k×k neighbours themselves are the stored patterns (windowed attention).
    'hybrid': each token's state retrieves, in one softmax, from its k×k neighbours *and* from a bank of
              N explicit patch prototypes (token states written from training images, with provenance):
              stored patterns X_i = [neighbours of i; bank], association p_i = softmax(β_H q_i K_iᵀ + b).
    offset_gain: a neighbour's value is multiplied by a learned gain per head, offset and channel (the unfold path
              computes it; with a uniform association the retrieval is then a depthwise k×k convolution).
    window_self=False: a token's own state is left out of its window (for 'window' and 'hybrid'): the prediction
              comes from the context alone.
    window_descriptor: the neighbours' keys and values are projected from their k×k descriptors (the depthwise conv
              of 'bank', initialised to the identity) instead of from the tokens themselves.
    query_descriptor: the query is projected from the state's k×k descriptor (the same conv) instead of the state.
    window_stored='input': the neighbours' keys and values are projected once per block from its input u and
              stay fixed through the refinement steps; only the state (the query) moves. 'state': they are
              re-projected from the current state at every step.
    rel_pos:  b holds a learned bias per head for each of the k² neighbour offsets (window, hybrid), so
              that a neighbour's place in the window matters. In 'hybrid' mode the bank slots share one
              learned bias per head (the bank's log-prior against the neighbours).
    """

    def __init__(self, dim: int, cfg: VHMNConfig):
        super().__init__()
        k = cfg.kernel_size
        self.mode, self.k, self.fast = cfg.local_mode, k, cfg.fast
        self.window_stored = cfg.window_stored
        self.window_self = cfg.window_self
        if not cfg.window_self and k == 1:
            raise ValueError("window_self=False with kernel_size=1 leaves no neighbour to retrieve from")
        self.retrieval = HopfieldRetrieval(dim, dim // cfg.head_dim, cfg.inv_temp, qk_norm=cfg.qk_norm)
        heads = self.retrieval.heads
        self.window_descriptor = cfg.window_descriptor  # (the config rejects both in bank mode)
        self.query_descriptor = cfg.query_descriptor
        if self.mode == "bank" or self.window_descriptor or self.query_descriptor:
            self.neigh = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        if self.window_descriptor or self.query_descriptor:  # the identity: at initialisation the stored patterns are the tokens themselves
            nn.init.dirac_(self.neigh.weight, groups=dim)
            nn.init.zeros_(self.neigh.bias)
        if self.mode in ("bank", "hybrid"):
            self.memory = make_memory(cfg.memory, cfg.local_slots, dim)
            self.writes = cfg.local_writes
        self.rel_pos = nn.Parameter(torch.zeros(heads, k * k)) if cfg.rel_pos else None  # (h, k²), offset (dy, dx) → (dy+r)·k + dx+r
        if self.mode == "hybrid":
            # (h, 1): a learned log-prior of the bank slots against the neighbours; log(k²/N) gives the bank as a whole
            # the weight of the k² neighbours at initialisation (with 0 the N slots would outweigh them N : k²)
            self.bank_bias = nn.Parameter(torch.full((heads, 1), math.log(k * k / cfg.local_slots)))
        # (h, k², e), ones at first: the plain window retrieval
        self.offset_gain = nn.Parameter(torch.ones(heads, k * k, dim // heads)) if cfg.offset_gain and self.mode != "bank" else None
        self._mask_cache: dict = {}

    def descriptor(self, s: Tensor, hw: tuple[int, int]) -> Tensor:
        """(B, L, d) → (B, L, d): each token's k×k neighbourhood through a depthwise conv."""
        x = rearrange(s, "b (h w) d -> b d h w", h=hw[0])
        return rearrange(self.neigh(x), "b d h w -> b (h w) d")

    def query_input(self, s: Tensor, hw: tuple[int, int]) -> Tensor:
        """What the local query is projected from (B, L, d): the state s, or its k×k descriptor (query_descriptor)."""
        return self.descriptor(s, hw) if self.query_descriptor else s

    def project_memory(self, snapshot: bool = False):
        """The bank's keys and values (1, h, N, e), or None without a bank. snapshot: project a copy of the slots,
        so that writing the bank after this forward (write_after_read) leaves what autograd saved intact."""
        if self.mode not in ("bank", "hybrid"):
            return None
        x = self.memory.patterns()
        return self.retrieval.project_memory(x.clone() if snapshot else x)

    def stored_tokens(self, u: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor] | None:
        """window_stored='input': keys and values (B, L, d) of the block input's tokens (or of their descriptors,
        window_descriptor), projected once per block forward and shared by the refinement steps. None otherwise
        (bank mode, or window_stored='state')."""
        if self.mode == "bank" or self.window_stored == "state":
            return None
        return self._kv(u, hw)

    def forward(self, s: Tensor, hw: tuple[int, int], kv, tokens: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """s (B, L, d) → retrieval (B, L, d). kv: the bank's projected keys/values (bank, hybrid); tokens: the
        neighbours' keys/values (window_stored='input'; None: projected from s)."""
        if self.mode == "bank":
            return self.retrieval(self.descriptor(s, hw), kv, fast=self.fast)
        if self.mode == "hybrid":
            return self._hybrid(s, hw, kv, tokens)
        return self._window(s, hw, tokens)

    # Grids of at most this many tokens take the dense fast path of window mode (one fused attention over
    # all tokens with a neighbourhood mask); larger grids the unfold path, whose cost grows as L·k², not L².
    DENSE_WINDOW_MAX_TOKENS = 256

    def _window(self, s: Tensor, hw: tuple[int, int], tokens=None) -> Tensor:
        if self.fast and hw[0] * hw[1] <= self.DENSE_WINDOW_MAX_TOKENS:
            if self.offset_gain is not None:
                return self._window_gain_dense(s, hw, tokens)
            return self._window_dense(s, hw, tokens)
        return self._window_unfold(s, hw, tokens)

    def _hybrid(self, s: Tensor, hw: tuple[int, int], kv, tokens=None) -> Tensor:
        if self.fast and hw[0] * hw[1] <= self.DENSE_WINDOW_MAX_TOKENS and self.offset_gain is None:
            return self._hybrid_dense(s, hw, kv, tokens)
        return self._hybrid_reference(s, hw, kv, tokens)

    def neighbourhood_mask(self, hw: tuple[int, int], device: torch.device | None = None) -> Tensor:
        """(L, L) bool: token j lies in the k×k window of token i (inside the grid)."""
        return self._offsets(hw, device)[1]

    def _offsets(self, hw: tuple[int, int], device) -> tuple[Tensor, Tensor]:
        """(L, L) offset index (dy+r)·k + (dx+r) of token j in the window of token i (clamped outside it), and
        the (L, L) bool neighbourhood mask. Cached per grid and device: built once, not at every forward."""
        key = (hw, str(device))
        if key not in self._mask_cache:
            H, W = hw
            r = self.k // 2
            yx = torch.stack(torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij"), -1)
            d = yx.reshape(H * W, 1, 2) - yx.reshape(1, H * W, 2)  # (L, L, 2): position of i minus position of j
            inside = (d.abs() <= r).all(-1)
            if not self.window_self:
                inside.fill_diagonal_(False)
            d = -d  # offset of the neighbour j from the centre i
            index = ((d[..., 0].clamp(-r, r) + r) * self.k + d[..., 1].clamp(-r, r) + r).long()
            self._mask_cache[key] = (index, inside)
        return self._mask_cache[key]

    def window_bias(self, hw: tuple[int, int], device, dtype) -> Tensor:
        """(h, L, L) float attention bias: the offset's learned bias inside the window, −inf outside."""
        index, inside = self._offsets(hw, device)
        heads = self.retrieval.heads
        bias = self.rel_pos[:, index] if self.rel_pos is not None else torch.zeros(heads, *index.shape, device=device)
        return bias.to(dtype).masked_fill(~inside, float("-inf"))

    def _kv(self, s: Tensor, hw: tuple[int, int], tokens=None) -> tuple[Tensor, Tensor]:
        """The neighbours' keys and values (B, L, d): given (window_stored='input') or projected from the state s
        (from its k×k descriptors with window_descriptor)."""
        if tokens is not None:
            return tokens
        x = self.descriptor(s, hw) if self.window_descriptor else s
        return self.retrieval.key(x), self.retrieval.v(x)

    def _qkv(self, s: Tensor, hw: tuple[int, int], tokens=None) -> tuple[Tensor, Tensor, Tensor]:
        r = self.retrieval
        return tuple(rearrange(t, "b l (h e) -> b h l e", h=r.heads) for t in (r.query(self.query_input(s, hw)), *self._kv(s, hw, tokens)))

    def _window_dense(self, s: Tensor, hw: tuple[int, int], tokens=None) -> Tensor:
        """Fast path: every token attends to all L tokens through one fused attention call, with the
        neighbourhood mask: no unfold copies. Equal to :meth:`_window_unfold` up to rounding."""
        r = self.retrieval
        return r.o(self.window_values(r.query(self.query_input(s, hw)), hw, self._kv(s, hw, tokens)))

    def head_tokens(self, tokens: tuple[Tensor, Tensor], hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The neighbours' keys and values (B, L, d) in the dense path's layout, (B, h, L, e) each and contiguous,
        so that refinement steps that share them copy them once (given already so, or on a grid the unfold path
        takes: unchanged)."""
        if tokens[0].ndim == 4 or hw[0] * hw[1] > self.DENSE_WINDOW_MAX_TOKENS:
            return tokens
        return tuple(rearrange(t, "b l (h e) -> b h l e", h=self.retrieval.heads).contiguous() for t in tokens)

    def window_values(self, q: Tensor, hw: tuple[int, int], tokens: tuple[Tensor, Tensor], bias: Tensor | None = None) -> Tensor:
        """The window retrieval before the output projection: queries q (B, L, d) (already scaled, see
        ``HopfieldRetrieval.scale_query``), the neighbours' keys and values ``tokens`` (B, L, d) each →
        ``softmax(β_H q Kᵀ + b) V`` (B, L, d), heads concatenated (keys and values may come as (B, h, L, e), from
        :meth:`head_tokens`). bias: :meth:`window_bias`, if already built.
        Dense over the L tokens (masked to the window) on small grids, by unfold on larger ones."""
        r = self.retrieval
        if hw[0] * hw[1] > self.DENSE_WINDOW_MAX_TOKENS:
            return self._unfold_values(q, hw, tokens)
        q = rearrange(q, "b l (h e) -> b h l e", h=r.heads)  # (B, h, L, e)
        k, v = self.head_tokens(tokens, hw)  # (B, h, L, e) each
        if self.rel_pos is None:  # a boolean mask: the fused attention kernel
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.neighbourhood_mask(hw, q.device), scale=r.scale)
        else:  # a learned float bias: one matrix product and a softmax beat the kernel's float-mask path on CPU
            bias = self.window_bias(hw, q.device, q.dtype) if bias is None else bias
            logits = r.scale * q @ k.transpose(-1, -2) + bias  # (B, h, L, L)
            out = torch.softmax(logits, dim=-1) @ v
        return rearrange(out, "b h l e -> b l (h e)")

    def _neighbours(self, t: Tensor, hw: tuple[int, int]) -> Tensor:
        """(B, L, d) → (B·L, heads, k², e): each token's k×k neighbours (zero-padded outside the grid)."""
        k = self.k
        t = F.unfold(rearrange(t, "b (y x) d -> b d y x", y=hw[0]), k, padding=k // 2)  # (B, d·k², L)
        return rearrange(t, "b (h e kk) l -> (b l) h kk e", h=self.retrieval.heads, kk=k * k)

    def _neighbour_index(self, hw: tuple[int, int], device) -> tuple[Tensor, Tensor]:
        """(L, k²) index of each token's neighbour at each offset (clamped into the grid) and (L, k²) bool: that
        neighbour exists (inside the grid; not the token itself with window_self=False). Cached per grid."""
        key = ("nb", hw, str(device))
        if key not in self._mask_cache:
            H, W = hw
            r, k = self.k // 2, self.k
            y, x = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
            dy, dx = torch.meshgrid(torch.arange(-r, r + 1, device=device), torch.arange(-r, r + 1, device=device), indexing="ij")
            ny = y.reshape(-1, 1) + dy.reshape(1, -1)  # (L, k²)
            nx = x.reshape(-1, 1) + dx.reshape(1, -1)
            ok = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
            if not self.window_self:
                ok[:, (k * k) // 2] = False
            index = ny.clamp(0, H - 1) * W + nx.clamp(0, W - 1)
            self._mask_cache[key] = (index, ok)
        return self._mask_cache[key]

    def _window_gain_dense(self, s: Tensor, hw: tuple[int, int], tokens=None) -> Tensor:
        """Fast path of window mode with offset gains: the association over all L tokens (masked to the window) in
        one matrix product; then, per offset, its weight times the gained value grid shifted by that offset (k²
        shifts, no gathered copies). Equal to :meth:`_window_unfold` up to rounding."""
        r = self.retrieval
        q, k, v = self._qkv(s, hw, tokens)  # (B, h, L, e)
        logits = r.scale * q @ k.transpose(-1, -2) + self.window_bias(hw, s.device, q.dtype)  # (B, h, L, L)
        p = torch.softmax(logits, dim=-1)
        index, ok = self._neighbour_index(hw, s.device)  # (L, k²)
        B, h, L, e = v.shape
        p_nb = p.gather(-1, index.expand(B, h, L, -1)) * ok  # (B, h, L, k²): the weight of each offset's neighbour
        # each offset's neighbours are the value grid shifted by that offset (zero outside; its weight is 0 there)
        rad, (H, W) = self.k // 2, hw
        v_pad = F.pad(rearrange(v, "b h (y x) e -> b h e y x", y=H), (rad, rad, rad, rad))  # (B, h, e, H+2r, W+2r)
        out = 0
        for o in range(self.k * self.k):
            dy, dx = divmod(o, self.k)
            shifted = rearrange(v_pad[..., dy : dy + H, dx : dx + W], "b h e y x -> b h (y x) e")
            out = out + p_nb[..., o : o + 1] * self.offset_gain[:, o].unsqueeze(1) * shifted  # (B, h, L, e)
        return r.o(rearrange(out, "b h l e -> b l (h e)"))

    def _neighbour_values(self, v: Tensor, hw: tuple[int, int]) -> Tensor:
        """(B, L, d) → (B·L, heads, k², e): the neighbours' values, through the offset gains if there are any."""
        nb = self._neighbours(v, hw)
        return nb if self.offset_gain is None else nb * self.offset_gain

    def _unfold_bias(self, hw: tuple[int, int], device, dtype) -> Tensor:
        """(L, h, 1, k²) float: the offset bias for neighbours inside the grid, −inf for the zero padding."""
        H, W = hw
        ones = torch.ones(1, 1, H, W, device=device, dtype=dtype)
        valid = rearrange(F.unfold(ones, self.k, padding=self.k // 2) > 0, "1 kk l -> l 1 1 kk")  # (L, 1, 1, k²)
        if not self.window_self:
            valid[..., (self.k * self.k) // 2] = False  # the centre offset (0, 0): the token itself
        heads = self.retrieval.heads
        bias = self.rel_pos if self.rel_pos is not None else torch.zeros(heads, self.k**2, device=device)
        return bias.to(dtype)[None, :, None, :].masked_fill(~valid, float("-inf"))  # (L, h, 1, k²)

    def _window_unfold(self, s: Tensor, hw: tuple[int, int], tokens=None) -> Tensor:
        """Reference path: gather each token's k×k neighbours (unfold, zero-padded) and attend to the
        ones inside the grid."""
        r = self.retrieval
        return r.o(self._unfold_values(r.query(self.query_input(s, hw)), hw, self._kv(s, hw, tokens)))

    def _unfold_values(self, q: Tensor, hw: tuple[int, int], tokens: tuple[Tensor, Tensor]) -> Tensor:
        """:meth:`window_values` by unfold: queries q (B, L, d), the neighbours' keys and values (B, L, d) each →
        (B, L, d), before the output projection."""
        r, B = self.retrieval, q.shape[0]
        qh = rearrange(q, "b l (h e) -> (b l) h 1 e", h=r.heads)
        mask = self._unfold_bias(hw, q.device, q.dtype).repeat(B, 1, 1, 1)  # (B·L, h, 1, k²)
        out = F.scaled_dot_product_attention(qh, self._neighbours(tokens[0], hw), self._neighbour_values(tokens[1], hw), attn_mask=mask, scale=r.scale)
        return rearrange(out, "(b l) h 1 e -> b l (h e)", b=B)

    def _hybrid_dense(self, s: Tensor, hw: tuple[int, int], kv, tokens=None) -> Tensor:
        """Fast path of 'hybrid': one fused attention over [all L tokens (neighbourhood-masked); the N bank slots]."""
        r, B = self.retrieval, s.shape[0]
        q, k, v = self._qkv(s, hw, tokens)  # (B, h, L, e)
        kb, vb = kv  # (1, h, N, e)
        N = kb.shape[2]
        keys = torch.cat([k, kb.expand(B, -1, -1, -1)], dim=2)  # (B, h, L+N, e)
        values = torch.cat([v, vb.expand(B, -1, -1, -1)], dim=2)
        mask = torch.cat([self.window_bias(hw, s.device, q.dtype), self._bank_bias(q.dtype).expand(-1, q.shape[2], N)], dim=2)  # (h, L, L+N)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=r.scale)
        return r.o(rearrange(out, "b h l e -> b l (h e)"))

    def _bank_bias(self, dtype) -> Tensor:
        heads = self.retrieval.heads
        return self.bank_bias.to(dtype)[:, None, :]  # (h, 1, 1)

    def hybrid_logits(self, s: Tensor, hw: tuple[int, int], kv, tokens=None) -> tuple[Tensor, Tensor]:
        """The readable way: logits of each token's k² neighbours (B·L, h, k²) and of the N bank slots
        (B·L, h, N), biases included (−inf for neighbours outside the grid)."""
        r, B = self.retrieval, s.shape[0]
        q = rearrange(r.query(self.query_input(s, hw)), "b l (h e) -> (b l) h e", h=r.heads)
        logits_n = r.scale * torch.einsum("qhe,qhke->qhk", q, self._neighbours(self._kv(s, hw, tokens)[0], hw))
        logits_n = logits_n + self._unfold_bias(hw, s.device, q.dtype)[:, :, 0, :].repeat(B, 1, 1)
        logits_b = r.scale * torch.einsum("qhe,hne->qhn", q, kv[0][0]) + self._bank_bias(q.dtype)[:, 0, :]
        return logits_n, logits_b

    def _hybrid_reference(self, s: Tensor, hw: tuple[int, int], kv, tokens=None) -> Tensor:
        """Reference path of 'hybrid': neighbours by unfold, the bank shared, one softmax over both."""
        r, B = self.retrieval, s.shape[0]
        logits_n, logits_b = self.hybrid_logits(s, hw, kv, tokens)
        p = torch.softmax(torch.cat([logits_n, logits_b], dim=-1), dim=-1)  # (B·L, h, k² + N)
        kk = self.k**2
        out = torch.einsum("qhk,qhke->qhe", p[..., :kk], self._neighbour_values(self._kv(s, hw, tokens)[1], hw))
        out = out + torch.einsum("qhn,hne->qhe", p[..., kk:], kv[1][0])
        return r.o(rearrange(out, "(b l) h e -> b l (h e)", b=B))

    def bank_association(self, s: Tensor, hw: tuple[int, int], kv, tokens=None) -> tuple[Tensor, Tensor]:
        """Inspection. 'bank': the association over the N slots (B, h, L, N). 'hybrid': the same association's
        share on the bank slots (B, h, L, N; rows sum to the bank's share of the mass, not to 1) and that
        share (B, h, L). None in window mode."""
        if self.mode == "bank":
            p = self.retrieval.association(self.descriptor(s, hw), kv)
            return p, p.sum(-1)
        if self.mode == "hybrid":
            B = s.shape[0]
            logits_n, logits_b = self.hybrid_logits(s, hw, kv, tokens)
            p = torch.softmax(torch.cat([logits_n, logits_b], dim=-1), dim=-1)[..., self.k**2 :]
            p = rearrange(p, "(b l) h n -> b h l n", b=B)
            return p, p.sum(-1)
        return None

    def window_association(self, s: Tensor, hw: tuple[int, int], tokens=None) -> Tensor:
        """Inspection, window mode: each token's association over its k×k neighbours (B, h, L, k²), offsets in
        row-major order ((dy, dx) → (dy + r)·k + dx + r, r = k // 2), computed the readable way (unfold). Rows sum to
        1; a neighbour outside the grid (or the token itself with window_self=False) has weight 0."""
        r, B = self.retrieval, s.shape[0]
        q = rearrange(r.query(self.query_input(s, hw)), "b l (h e) -> (b l) h e", h=r.heads)
        logits = r.scale * torch.einsum("qhe,qhke->qhk", q, self._neighbours(self._kv(s, hw, tokens)[0], hw))
        logits = logits + self._unfold_bias(hw, s.device, q.dtype)[:, :, 0, :].repeat(B, 1, 1)  # (B·L, h, k²)
        return rearrange(torch.softmax(logits, dim=-1), "(b l) h k -> b h l k", b=B)

    def write(self, s: Tensor, hw: tuple[int, int], ctx: dict) -> None:
        """Write ``local_writes`` random tokens of this batch (detached): their descriptors in 'bank' mode,
        their states in 'hybrid' mode."""
        if self.mode == "window":
            return
        with torch.no_grad():
            h = (self.descriptor(s, hw) if self.mode == "bank" else s).flatten(0, 1)  # (B·L, d)
            L = hw[0] * hw[1]
            pick = torch.randperm(h.shape[0], device=h.device)[: self.writes]
            img = pick // L
            self.memory.write(h[pick], ctx["index"][img], pick % L, ctx["labels"][img])


class GlobalHopfield(nn.Module):
    """Episodic scene memory: the scene query (mean of tokens) retrieves a scene-level prior."""

    def __init__(self, dim: int, cfg: VHMNConfig):
        super().__init__()
        self.fast = cfg.fast
        self.retrieval = HopfieldRetrieval(dim, dim // cfg.head_dim, cfg.inv_temp, qk_norm=cfg.qk_norm)
        self.memory = make_memory(cfg.memory, cfg.global_slots, dim, cfg.global_class_balanced, cfg.num_classes)
        if cfg.global_label_values:  # row 0: "no label" (a slot never written), kept at zero
            self.label_values = nn.Embedding(cfg.num_classes + 1, dim, padding_idx=0)
            nn.init.zeros_(self.label_values.weight)

    def project_memory(self, snapshot: bool = False):
        """Keys and values (1, h, N, e) of the stored scenes; with global_label_values the value of slot i is
        W_v x_i + E[label_i] (E learned; zero for slots never written). snapshot: as LocalHopfield.project_memory."""
        x = self.memory.patterns()
        k, v = self.retrieval.project_memory(x.clone() if snapshot else x)
        if hasattr(self, "label_values"):
            labels = self.memory.provenance()["label"]
            e = self.label_values((labels.clone() if snapshot else labels) + 1)  # (N, d)
            v = v + rearrange(e, "n (h e) -> 1 h n e", h=self.retrieval.heads)
        return k, v

    def forward(self, s: Tensor, kv) -> Tensor:
        """(B, L, d) → scene retrieval g (B, 1, d)."""
        return self.retrieval(s.mean(1, keepdim=True), kv, fast=self.fast)

    def write(self, s: Tensor, ctx: dict) -> None:
        with torch.no_grad():
            B = s.shape[0]
            self.memory.write(s.mean(1), ctx["index"], torch.zeros(B, dtype=torch.long, device=s.device), ctx["labels"])


class MemoryMixer(nn.Module):
    """Token mixer of an HMN block: memory prediction m(s) refined by predictive coding."""

    def __init__(self, dim: int, cfg: VHMNConfig):
        super().__init__()
        self.cfg = cfg
        self.local = LocalHopfield(dim, cfg) if cfg.local_memory else None
        self.glob = GlobalHopfield(dim, cfg) if cfg.global_memory else None
        if self.glob is not None and cfg.global_mod == "film":
            self.film = nn.Linear(dim, 2 * dim)
        self.init_identity()
        if cfg.fusion == "concat" and self.local is not None and self.glob is not None:
            self.fuse = nn.Linear(2 * dim, dim)

    def init_identity(self) -> None:
        """FiLM's scale and shift start at zero: the prior passes the local retrieval through until it learns to
        modulate it. (VHMN calls this again after its own initialisation of every Linear.)"""
        if hasattr(self, "film"):
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def predict(self, s: Tensor, hw: tuple[int, int], kv_l, kv_g, tokens=None) -> Tensor:
        """The memory's prediction m(s): (B, L, d) → (B, L, d)."""
        m = self.local(s, hw, kv_l, tokens) if self.local is not None else None
        if self.glob is None:
            return m
        g = self.glob(s, kv_g)  # (B, 1, d)
        if self.cfg.global_mod == "film":
            scale, shift = self.film(g).chunk(2, dim=-1)
            return (m if m is not None else torch.zeros_like(s)) * (1 + scale) + shift
        if m is None:
            return g.expand_as(s)
        if self.cfg.fusion == "concat":
            return self.fuse(torch.cat([m, g.expand_as(m)], dim=-1))
        return m + g

    def forward(self, u: Tensor, hw: tuple[int, int], ctx: dict | None = None) -> Tensor:
        cfg = self.cfg
        write = self.training and ctx is not None and ctx.get("write", True)
        if write and not cfg.write_after_read:
            self._write(u, hw, ctx)
        out = self._refine(u, hw, ctx, snapshot=write and cfg.write_after_read)
        if write and cfg.write_after_read:
            self._write(u, hw, ctx)
        return out

    def _write(self, u: Tensor, hw: tuple[int, int], ctx: dict) -> None:
        if self.local is not None:
            self.local.write(u, hw, ctx)
        if self.glob is not None:
            self.glob.write(u, ctx)

    def _refine(self, u: Tensor, hw: tuple[int, int], ctx: dict | None, snapshot: bool = False) -> Tensor:
        cfg = self.cfg
        kv_l = self.local.project_memory(snapshot) if self.local is not None else None
        kv_g = self.glob.project_memory(snapshot) if self.glob is not None else None
        tokens = self.local.stored_tokens(u, hw) if self.local is not None else None  # fixed neighbours (window_stored='input')
        on_step = None
        if ctx is not None and ctx.get("record") is not None:
            on_step = self._recorder(ctx["record"], hw, kv_l, kv_g, tokens)
        elif self.linear_refinement:
            return self._refine_linear(u, hw, kv_g, tokens)
        predict = lambda s: self.predict(s, hw, kv_l, kv_g, tokens)  # noqa: E731
        s_T = predictive_coding_refine(u, predict, cfg.refine_rate, cfg.refine_steps, on_step)
        if cfg.mixer_output == "prediction" and cfg.refine_steps > 0:
            m = predict(s_T)  # m(s_T): the prediction at the refined state
            if on_step is not None:
                on_step(cfg.refine_steps, s_T, m, readout=True)
            return m
        return self._output(s_T, u)

    def _output(self, s_T: Tensor, u: Tensor) -> Tensor:
        """What the mixer adds to the residual stream (``mixer_output``), from the refined state s_T (m(u) for T = 0)."""
        cfg = self.cfg
        if cfg.mixer_output == "change":
            return s_T - u
        if cfg.mixer_output == "retrieval" and cfg.refine_steps > 0:  # T = 0 returns m(u): no pass-through to remove
            return s_T - (1 - cfg.refine_rate) ** cfg.refine_steps * u
        return s_T

    @property
    def linear_refinement(self) -> bool:
        """Whether the fast path :meth:`_refine_linear` applies: window mode with the block input's neighbours
        stored (fixed keys and values), no offset gains, global retrievals added to the local ones."""
        cfg, loc = self.cfg, self.local
        return (cfg.fast and loc is not None and loc.mode == "window" and loc.window_stored == "input"
                and loc.offset_gain is None and cfg.global_mod == "add" and cfg.fusion == "sum")

    def _refine_linear(self, u: Tensor, hw: tuple[int, int], kv_g, tokens: tuple[Tensor, Tensor]) -> Tensor:
        """Fast path of the refinement, equal to the reference loop up to rounding, with fewer projections.

        With the neighbours' keys and values fixed, the state enters a step only through its projection
        P_t = W_q s_t (the local query before scaling) and its mean μ_t (the scene query), and both are affine
        in s_t. With r_t = softmax(β_H q_t Kᵀ + b) V (B, L, d), the retrieval before W_o, and γ_t the global
        retrieval (B, 1, d), the step s_{t+1} = (1 − β) s_t + β (W_o r_t + b_o + γ_t) gives

            P_{t+1} = (1 − β) P_t + β ((W_q W_o) r_t + W_q (b_o + γ_t) + b_q)        one d×d product per step
            μ_{t+1} = (1 − β) μ_t + β (W_o mean_L(r_t) + b_o + γ_t)                  (B, 1, d): per image
            s_T     = (1 − β)^T u + W_o Σ_t w_t r_t + Σ_t w_t (b_o + γ_t),   w_t = β (1 − β)^(T−1−t)

        so W_o is applied once (to the weighted sum of the r_t) instead of at every step, and W_q once to u:
        T + 3 token projections instead of 2T + 2 (T = 2: 5 instead of 6, the ViT's attention has 4).
        mixer_output='prediction' carries P_t and μ_t through all T steps and returns the readout m(s_T) = W_o r_T + b_o + γ_T
        instead of the sums (T + 1 retrievals, T + 4 token projections: W_q, one W_q W_o per step, W_o, and the keys and values).
        With query_descriptor P_t = W_q D(s_t) + b_q, and D (the depthwise conv) is affine too, so
        P_{t+1} = (1 − β) P_t + β (W_q D(W_o r_t + b_o + γ_t) + b_q): two projections and a conv per step.
        """
        cfg, loc = self.cfg, self.local
        r, beta, T = loc.retrieval, cfg.refine_rate, cfg.refine_steps
        p = r.q(loc.query_input(u, hw))  # (B, L, d) P_0 = W_q u + b_q (W_q D(u) + b_q with query_descriptor)
        mu = u.mean(1, keepdim=True) if self.glob is not None else None  # (B, 1, d) μ_0
        bias = loc.window_bias(hw, u.device, u.dtype) if loc.rel_pos is not None and hw[0] * hw[1] <= loc.DENSE_WINDOW_MAX_TOKENS else None
        readout = cfg.mixer_output == "prediction" and T > 0  # the output is m(s_T): one retrieval more, no sums
        W_qo = r.q.weight @ r.o.weight if (T > 1 or readout) and not loc.query_descriptor else None  # (d, d)
        tokens = loc.head_tokens(tokens, hw)  # the fixed keys and values in the heads' layout, once for all steps
        acc_r, acc_c = 0, 0
        for t in range(T + 1 if readout else max(T, 1)):
            rt = loc.window_values(r.scale_query(p), hw, tokens, bias)  # (B, L, d)
            g = self.glob.retrieval(mu, kv_g, fast=self.glob.fast) if mu is not None else None  # (B, 1, d)
            if t == T:  # the prediction itself: m(u) at T = 0 (the feed-forward case), else the readout m(s_T)
                m = r.o(rt) if g is None else r.o(rt) + g
                return m if readout else self._output(m, u)
            c = r.o.bias if g is None else r.o.bias + g  # (d,) or (B, 1, d): b_o + γ_t
            if not readout:
                w = beta * (1 - beta) ** (T - 1 - t)
                acc_r, acc_c = acc_r + w * rt, acc_c + w * c
            if t < T - 1 or readout:
                if loc.query_descriptor:  # D is affine: D(s_{t+1}) = (1 − β) D(s_t) + β D(m_t), m_t = W_o r_t + b_o + γ_t
                    p = (1 - beta) * p + beta * r.q(loc.descriptor(F.linear(rt, r.o.weight) + c, hw))
                else:
                    p = (1 - beta) * p + beta * (F.linear(rt, W_qo) + r.q(c))
                if mu is not None:
                    mu = (1 - beta) * mu + beta * (F.linear(rt.mean(1, keepdim=True), r.o.weight) + c)
        return self._output((1 - beta) ** T * u + F.linear(acc_r, r.o.weight) + acc_c, u)

    def _recorder(self, record: list, hw, kv_l, kv_g, tokens=None):
        """Inspection: per refinement step, the associations and the prediction error; with
        mixer_output='prediction', the readout m(s_T) too (``entry["readout"]``, the retrieval the block adds)."""
        entry = {"hw": hw, "steps": []}
        record.append(entry)

        def on_step(t: int, z: Tensor, m: Tensor, readout: bool = False) -> None:
            step = {"pred_error": (m - z).norm(dim=-1).mean(-1).detach()}  # (B,)
            if self.local is not None and self.local.mode != "window":
                p, share = self.local.bank_association(z, hw, kv_l, tokens)  # (B, h, L, N), (B, h, L)
                step["local_assoc"] = p.mean(1).detach()  # (B, L, N)
                step["local_bank_share"] = share.mean(1).detach()  # (B, L): 1 in bank mode
            if self.local is not None and self.local.mode == "window":
                step["window_assoc"] = self.local.window_association(z, hw, tokens).mean(1).detach()  # (B, L, k²)
            if self.glob is not None:
                step["global_assoc"] = self.glob.retrieval.association(z.mean(1, keepdim=True), kv_g).mean(1)[:, 0].detach()
            if readout:
                entry["readout"] = step
            else:
                entry["steps"].append(step)

        return on_step


class HMNBlock(nn.Module):
    """Pre-norm residual block: ``z += DropPath(MemoryMixer(LN z)); z += DropPath(MLP(LN z))``."""

    def __init__(self, dim: int, cfg: VHMNConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = MemoryMixer(dim, cfg)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, z: Tensor, hw: tuple[int, int], ctx: dict | None = None) -> Tensor:
        z = z + self.drop_path(self.mixer(self.norm1(z), hw, ctx))
        return z + self.drop_path(self.mlp(self.norm2(z)))


class PatchMerging(nn.Module):
    """2×2 neighbouring tokens → one token of the next stage's width (conv 2×2, stride 2)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduce = nn.Conv2d(dim, out_dim, 2, stride=2)

    def forward(self, z: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        x = rearrange(self.norm(z), "b (h w) d -> b d h w", h=hw[0])
        x = self.reduce(x)
        return rearrange(x, "b d h w -> b (h w) d"), (hw[0] // 2, hw[1] // 2)


class VHMN(nn.Module):
    """V-HMN with the timm model contract (``forward_features``, ``forward_head``, ``forward``).

    ``forward(x, index=None, labels=None)``: in training mode the episodic banks write features of
    this batch; ``index`` (dataset indices) and ``labels`` become the provenance of those slots
    (−1 when not given). In eval mode nothing is written.
    """

    def __init__(self, cfg: VHMNConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or VHMNConfig()
        if overrides:
            cfg = VHMNConfig.from_dict({**cfg.to_dict(), **overrides})
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.dims[-1]
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dims[0], cfg.patch_size, stride=cfg.patch_size)
        self.grid = (cfg.img_size // cfg.patch_size,) * 2
        if cfg.pos_embed:  # (1, h·w, d), initialised as timm's ViT
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], cfg.dims[0]))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        rates = torch.linspace(0, cfg.drop_path, sum(cfg.depths)).tolist()
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        i = 0
        for s, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths)):
            if s > 0:
                self.merges.append(PatchMerging(cfg.dims[s - 1], dim))
            self.stages.append(nn.ModuleList(HMNBlock(dim, cfg, rates[i + j]) for j in range(depth)))
            i += depth
        self.norm = nn.LayerNorm(self.num_features)
        if cfg.pool == "attn":
            self.pool_query = nn.Parameter(torch.zeros(1, 1, self.num_features))
            self.pool_kv = nn.Linear(self.num_features, 2 * self.num_features)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for m in self.modules():  # the layers that start as the identity, after the generic init above
            if isinstance(m, MemoryMixer):
                m.init_identity()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- input checks: what was wrong, and how to fix it ----------------------------------
    def check_input(self, x: Tensor) -> None:
        cfg = self.cfg
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor image batch (B, {cfg.in_chans}, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"expected a floating-point image batch, got {x.dtype}. Convert uint8 images with "
                f"x.float() / 255 and normalise with the dataset mean/std (vhmn.data.DATASETS)."
            )
        if x.ndim != 4 or x.shape[1] != cfg.in_chans:
            hint = " (channels-last? use x.permute(0, 3, 1, 2))" if x.ndim == 4 and x.shape[-1] == cfg.in_chans else ""
            raise ValueError(f"expected images of shape (B, {cfg.in_chans}, H, W), got {tuple(x.shape)}{hint}")
        H, W = x.shape[-2:]
        if H % cfg.patch_size or W % cfg.patch_size or (H // cfg.patch_size) % 2 ** (len(cfg.dims) - 1) or (W // cfg.patch_size) % 2 ** (len(cfg.dims) - 1):
            raise ValueError(
                f"image size {H}×{W} does not fit this model: it needs sides divisible by patch_size "
                f"{cfg.patch_size} × 2^(stages−1) = {cfg.patch_size * 2 ** (len(cfg.dims) - 1)} "
                f"(configured for {cfg.img_size}×{cfg.img_size})"
            )
        if not x.is_cuda and torch.isnan(x).any():
            raise ValueError("input contains NaN values; check the data pipeline (normalisation by a zero std?)")

    # ---- timm contract -------------------------------------------------------------------
    def forward_features(self, x: Tensor, ctx: dict | None = None) -> Tensor:
        """(B, C, H, W) → final tokens (B, L, d_last), normalised."""
        z = self.patch_embed(x)  # (B, d, H/p, W/p)
        hw = (z.shape[2], z.shape[3])
        z = rearrange(z, "b d h w -> b (h w) d")
        if self.cfg.pos_embed:
            pos = self.pos_embed
            if hw != self.grid:  # another image size: the embedding resampled to its grid (bicubic, as timm)
                pos = resample_abs_pos_embed(pos, list(hw), list(self.grid), num_prefix_tokens=0)
            z = z + pos
        for s, blocks in enumerate(self.stages):
            if s > 0:
                z, hw = self.merges[s - 1](z, hw)
            for blk in blocks:
                z = blk(z, hw, ctx)
        return self.norm(z)

    def forward_head(self, z: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, L, d) → logits (B, num_classes), or pooled features (B, d) if ``pre_logits``."""
        if self.cfg.pool == "attn":
            k, v = self.pool_kv(z).chunk(2, dim=-1)
            z = F.scaled_dot_product_attention(self.pool_query.expand(z.shape[0], -1, -1), k, v)[:, 0]
        else:
            z = z.mean(1)
        return z if pre_logits else self.head(z)

    def forward(self, x: Tensor, index: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        if not torch.compiler.is_compiling():
            self.check_input(x)
        ctx = None
        if self.training:
            ctx = self._write_context(x, index, labels)
        return self.forward_head(self.forward_features(x, ctx))

    def _write_context(self, x: Tensor, index: Tensor | None, labels: Tensor | None) -> dict:
        B = x.shape[0]
        unknown = torch.full((B,), -1, dtype=torch.long, device=x.device)
        if labels is None and self.cfg.global_class_balanced and self.cfg.global_memory and self.cfg.memory == "episodic":
            raise ValueError("class-balanced global memory writes by label: call model(x, labels=y) in training mode")
        return {
            "index": unknown if index is None else index.to(x.device, torch.long),
            "labels": unknown if labels is None else labels.to(x.device, torch.long),
        }

    def no_weight_decay(self) -> set[str]:
        """Parameters the recipe does not decay (besides norms and biases, ``ndim ≤ 1``): the position embedding
        and biases (as timm's ViT and Swin exclude theirs), the learned inverse temperatures (log β_H), the offset
        gains (start at 1) and the bank's log-prior. Decaying them would pull positions to uniform, β_H to 1
        and the gains to 0: a regulariser the ViT's position embedding does not get."""
        names = ("pos_embed", "rel_pos", "log_inv_temp", "offset_gain", "bank_bias")
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in names}

    # ---- inspection ------------------------------------------------------------------------
    @torch.no_grad()
    def inspect(self, x: Tensor, topk: int = 5) -> dict:
        """Run in eval mode and return logits and, per block, what the memories retrieved.

        Returns ``{"logits": (B, C), "blocks": [...]}``; each block entry has ``stage``, ``hw`` and
        ``steps`` (one per refinement step: ``pred_error`` (B,), ``local_assoc`` (B, L, N_local) in bank and
        hybrid mode, ``window_assoc`` (B, L, k²) in window mode (the weight of each neighbour offset, see
        ``LocalHopfield.window_association``), ``global_assoc`` (B, N_global)), plus ``local_top``/``global_top``:
        the top-k slots of the last step and their provenance (dataset index, token position, label). With
        mixer_output='prediction' (and T > 0), ``readout`` holds the same fields for the readout m(s_T), the
        retrieval the block adds to the residual stream.
        """
        was_training = self.training
        self.eval()
        try:
            self.check_input(x)
            record: list = []
            logits = self.forward_head(self.forward_features(x, {"record": record, "write": False}))
        finally:
            self.train(was_training)
        blocks = [m.mixer for stage in self.stages for m in stage]
        stage_of = [s for s, stage in enumerate(self.stages) for _ in stage]
        for entry, mixer, s in zip(record, blocks, stage_of):
            entry["stage"] = s
            last = entry["steps"][-1]
            for key, mod in (("local", mixer.local), ("global", mixer.glob)):
                if f"{key}_assoc" in last and mod.memory.provenance() is not None:
                    w, slot = last[f"{key}_assoc"].topk(min(topk, mod.memory.slots), dim=-1)
                    prov = mod.memory.provenance()
                    entry[f"{key}_top"] = {"weight": w, "slot": slot, **{k: v[slot] for k, v in prov.items()}}
        return {"logits": logits, "blocks": record}

    @torch.no_grad()
    def write_memory(self, x: Tensor, index: Tensor | None = None, labels: Tensor | None = None) -> None:
        """Write the episodic banks from the images ``x`` (B, 3, H, W) as a training step would (each block writes
        its input's features, with ``index`` and ``labels`` as their provenance), without training: no gradients,
        the other layers in eval mode (no drop path). A probe of what the stored patterns do: fill the banks with
        other images, or one class's, and predict again (chapter 11)."""
        self.check_input(x)
        was_training = self.training
        self.eval()
        try:
            for stage in self.stages:
                for blk in stage:
                    blk.mixer.train()  # the mixer writes in training mode; nothing in it behaves otherwise
            self.forward_features(x, self._write_context(x, index, labels))
        finally:
            self.train(was_training)

    def memory_banks(self) -> dict[str, nn.Module]:
        """Every memory bank by module name."""
        from .memory import EpisodicMemory, LearnedMemory

        return {n: m for n, m in self.named_modules() if isinstance(m, (EpisodicMemory, LearnedMemory))}

    def extra_repr(self) -> str:
        c = self.cfg
        return f"layout={c.layout}, dims={c.dims}, depths={c.depths}, memory={c.memory}, refine_steps={c.refine_steps}, refine_rate={c.refine_rate}"
