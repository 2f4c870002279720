"""Pure Hopfield functions: the equations every module of V-HMN is built from.

Conventions (hopfield-layers vocabulary, row-major like the rest of PyTorch):

* ``stored``  X, shape ``(..., N, d)``: the N *stored patterns* (memory slots), one per row.
* ``state``   ξ, shape ``(..., Q, d)``: Q *state patterns* (queries), one per row.
* ``inv_temp`` β_H: the softmax inverse temperature of retrieval. It is **not** the
  predictive-coding ``refine_rate`` β of :func:`predictive_coding_refine`.
* ``association`` p = softmax(β_H ξ Xᵀ), shape ``(..., Q, N)``: how much each query takes
  from each slot. This is the matrix the book visualises.

Leading dimensions (batch, heads) broadcast. Every function is differentiable.

Two families:

1. Classical (binary) Hopfield networks, Hopfield (1982): Hebbian storage, sign updates,
   the quadratic energy. Capacity ≈ 0.138·n patterns for n neurons.
2. Modern continuous Hopfield networks, Ramsauer et al. (2020), "Hopfield Networks is All
   You Need": energy ``E(ξ) = −β⁻¹ log Σᵢ exp(β xᵢᵀξ) + ½ ξᵀξ + β⁻¹ log N + ½ M²`` and the
   update ``ξ ← Xᵀ softmax(β X ξ)`` (in row form ``ξ ← softmax(β ξ Xᵀ) X``), which never
   increases E and is the attention of a transformer with the stored patterns as keys and
   values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "hebbian_weights",
    "sign",
    "classical_energy",
    "sync_update",
    "async_update",
    "classical_recall",
    "association",
    "hopfield_energy",
    "hopfield_update",
    "hopfield_update_reference",
    "hopfield_retrieve",
    "Retrieval",
    "predictive_coding_refine",
]


# --------------------------------------------------------------------------------------
# Classical (binary) Hopfield networks
# --------------------------------------------------------------------------------------
def hebbian_weights(patterns: Tensor) -> Tensor:
    """Hebbian storage ``W = (1/n) Σ_μ x^μ (x^μ)ᵀ`` with a zero diagonal.

    patterns: (P, n) with entries ±1. Returns W: (n, n), symmetric.
    """
    if patterns.ndim != 2:
        raise ValueError(f"patterns must be (P, n) with entries ±1, got shape {tuple(patterns.shape)}")
    P, n = patterns.shape
    x = patterns.to(torch.float64 if patterns.dtype == torch.float64 else torch.float32)
    W = x.T @ x / n  # (n, n)
    W.fill_diagonal_(0.0)
    return W


def sign(x: Tensor, previous: Tensor | None = None, tol: Tensor | float = 0.0) -> Tensor:
    """±1 sign; a zero field (``|x| ≤ tol``) keeps the previous value (or +1 when there is none)."""
    out = torch.where(x > 0, 1.0, -1.0).to(x.dtype)
    tie = x.abs() <= tol
    if previous is not None:
        return torch.where(tie, previous.to(x.dtype), out)
    return torch.where(tie, torch.ones_like(out), out)


def classical_energy(W: Tensor, state: Tensor) -> Tensor:
    """``E(s) = −½ sᵀ W s``. state: (..., n) → (...)."""
    return -0.5 * torch.einsum("...i,ij,...j->...", state, W, state)


def _rounding_tol(W: Tensor, state: Tensor) -> Tensor:
    """How far from zero rounding can push a field ``s @ Wᵀ`` whose exact value is zero.

    The field is a sum of n products; its rounding error is a few ε · Σ_j |W_ij s_j|, and its
    value depends on the order of summation (the CPU's vector width, the BLAS kernel). A field
    within ``64 ε Σ_j |W_ij s_j|`` of zero counts as zero, so that ties, which are frequent for
    Hebbian weights (W_ij = k/n), are decided the same way on every machine.
    """
    return 64 * torch.finfo(W.dtype).eps * (state.abs() @ W.abs().T)


def sync_update(W: Tensor, state: Tensor) -> Tensor:
    """One synchronous update: every neuron at once, ``s ← sign(W s)``. state: (..., n).

    A field that is zero up to rounding keeps the neuron's value (:func:`_rounding_tol`)."""
    return sign(state @ W.T, previous=state, tol=_rounding_tol(W, state))


def async_update(W: Tensor, state: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One asynchronous sweep: neurons updated one at a time in a random order.

    Unlike the synchronous rule, each single-neuron update never increases the energy
    (W symmetric, zero diagonal), so the sweep converges to a fixed point.
    state: (..., n) → (..., n)
    """
    s = state.clone()
    n = s.shape[-1]
    for i in torch.randperm(n, generator=generator).tolist():
        field = s @ W[i]  # (...)
        s[..., i] = sign(field, previous=s[..., i], tol=_rounding_tol(W[i : i + 1], s)[..., 0])
    return s


def classical_recall(
    W: Tensor,
    state: Tensor,
    max_sweeps: int = 100,
    mode: str = "async",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Update until a fixed point (or ``max_sweeps``). Returns (final state, sweeps applied)."""
    if mode not in ("async", "sync"):
        raise ValueError(f"mode must be 'async' or 'sync', got {mode!r}")
    s = state
    for sweep in range(1, max_sweeps + 1):
        new = async_update(W, s, generator) if mode == "async" else sync_update(W, s)
        if torch.equal(new, s):
            return s, sweep - 1
        s = new
    return s, max_sweeps


# --------------------------------------------------------------------------------------
# Modern continuous Hopfield networks
# --------------------------------------------------------------------------------------
def _check(state: Tensor, stored: Tensor) -> None:
    if state.ndim < 2 or stored.ndim < 2:
        raise ValueError(
            f"state must be (..., Q, d) and stored (..., N, d); got {tuple(state.shape)} and "
            f"{tuple(stored.shape)}. Add a query axis with state.unsqueeze(-2) for a single query."
        )
    if state.shape[-1] != stored.shape[-1]:
        raise ValueError(
            f"state and stored patterns must share the last dim d; got {state.shape[-1]} and {stored.shape[-1]}"
        )


def association(state: Tensor, stored: Tensor, inv_temp: float | Tensor) -> Tensor:
    """Association matrix ``p = softmax(β_H ξ Xᵀ)``: (..., Q, d), (..., N, d) → (..., Q, N)."""
    _check(state, stored)
    return torch.softmax(inv_temp * state @ stored.transpose(-1, -2), dim=-1)


def hopfield_energy(state: Tensor, stored: Tensor, inv_temp: float | Tensor) -> Tensor:
    """Modern Hopfield energy (Ramsauer et al. 2020, eq. 2), per query.

    ``E(ξ) = −β⁻¹ log Σᵢ exp(β xᵢᵀξ) + ½ ξᵀξ + β⁻¹ log N + ½ M²``, M = maxᵢ ‖xᵢ‖.
    The constants make E ≥ 0; they do not change where its minima are.
    state: (..., Q, d), stored: (..., N, d) → (..., Q)
    """
    _check(state, stored)
    N = stored.shape[-2]
    beta = torch.as_tensor(inv_temp, dtype=state.dtype, device=state.device)
    lse = torch.logsumexp(beta * state @ stored.transpose(-1, -2), dim=-1)  # (..., Q)
    M2 = stored.pow(2).sum(-1).amax(-1, keepdim=True)  # (..., 1)
    return -lse / beta + 0.5 * state.pow(2).sum(-1) + math.log(N) / beta + 0.5 * M2


def hopfield_update_reference(
    state: Tensor, stored: Tensor, inv_temp: float | Tensor, values: Tensor | None = None
) -> Tensor:
    """One update, the readable way: ``ξ_new = softmax(β_H ξ Xᵀ) V`` with V = X by default.

    state (..., Q, d), stored (..., N, d), values (..., N, d_v) → (..., Q, d_v)
    """
    p = association(state, stored, inv_temp)  # (..., Q, N)
    return p @ (stored if values is None else values)


def hopfield_update(
    state: Tensor,
    stored: Tensor,
    inv_temp: float | Tensor,
    values: Tensor | None = None,
    fast: bool = True,
) -> Tensor:
    """One update ``ξ_new = softmax(β_H ξ Xᵀ) V``; fast path through fused attention.

    ``scaled_dot_product_attention(q=ξ, k=X, v=V, scale=β_H)`` computes exactly this; it never
    materialises the (Q, N) association matrix. Use :func:`association` to inspect it.
    Leading dimensions of ``stored``/``values`` broadcast against ``state`` (expanded as views,
    never copied). A tensor ``inv_temp`` (e.g. learnable) takes the reference path.
    """
    _check(state, stored)
    if not fast or isinstance(inv_temp, Tensor):
        return hopfield_update_reference(state, stored, inv_temp, values)
    v = stored if values is None else values
    lead = torch.broadcast_shapes(state.shape[:-2], stored.shape[:-2], v.shape[:-2])
    q = state.expand(*lead, *state.shape[-2:])
    k = stored.expand(*lead, *stored.shape[-2:])
    v = v.expand(*lead, *v.shape[-2:])
    return F.scaled_dot_product_attention(q, k, v, scale=float(inv_temp))


@dataclass
class Retrieval:
    """Result of :func:`hopfield_retrieve`."""

    state: Tensor  # (..., Q, d) the retrieved patterns
    steps: Tensor  # (..., Q) updates actually applied to each query (int64)
    converged: Tensor  # (..., Q) bool: last update moved the query by ≤ tol


def hopfield_retrieve(
    state: Tensor,
    stored: Tensor,
    inv_temp: float | Tensor,
    max_steps: int = 1,
    tol: float = 1e-6,
    fast: bool = True,
) -> Retrieval:
    """Iterate the update until each query moves by at most ``tol`` (max-norm) or ``max_steps``.

    A query that has converged is frozen, so ``steps`` counts the updates actually applied to
    it: a query already at a fixed point gets one (it must be checked), a query still moving at
    ``max_steps`` gets ``max_steps``. One step is the usual transformer-style retrieval.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be ≥ 1, got {max_steps}")
    xi = state
    steps = torch.zeros(state.shape[:-1], dtype=torch.long, device=state.device)
    active = torch.ones(state.shape[:-1], dtype=torch.bool, device=state.device)
    for _ in range(max_steps):
        new = hopfield_update(xi, stored, inv_temp, fast=fast)
        moved = (new - xi).abs().amax(-1)  # (..., Q)
        xi = torch.where(active.unsqueeze(-1), new, xi)
        steps = steps + active.long()
        active = active & (moved > tol)
        if not bool(active.any()):
            break
    return Retrieval(state=xi, steps=steps, converged=~active)


# --------------------------------------------------------------------------------------
# Predictive-coding refinement
# --------------------------------------------------------------------------------------
def predictive_coding_refine(
    state: Tensor,
    predict,
    refine_rate: float,
    refine_steps: int,
    on_step=None,
) -> Tensor:
    """``z ← z + β (m(z) − z)`` for ``refine_steps`` steps, β = ``refine_rate``.

    ``predict(z)`` is the memory's prediction m (a retrieval recomputed from the current state at
    every step); ``m − z`` is the prediction error. ``refine_steps = 0`` is the feed-forward case:
    the single prediction ``m(state)`` is returned. ``refine_rate = 1, refine_steps = 1`` is the
    same plain retrieval. Gradients flow through all unrolled steps.
    ``on_step(t, z, m)`` is called at every step (for inspection).
    """
    if refine_steps < 0 or not 0 < refine_rate <= 1:
        raise ValueError(f"need refine_steps ≥ 0 and refine_rate in (0, 1]; got {refine_steps}, {refine_rate}")
    if refine_steps == 0:
        m = predict(state)
        if on_step is not None:
            on_step(0, state, m)
        return m
    z = state
    for t in range(refine_steps):
        m = predict(z)
        if on_step is not None:
            on_step(t, z, m)
        z = z + refine_rate * (m - z)
    return z
