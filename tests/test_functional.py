"""Modern Hopfield functions and predictive-coding refinement (vhmn.functional).

Every equation is checked against an independent float64 NumPy reference, and the theorems of
Ramsauer et al. (2020) that the book relies on are checked as properties: the update never
increases the energy, large β_H retrieves a single stored pattern, small β_H averages them all,
and the fast (fused attention) path computes the same thing as the readable one.
The classical (binary) networks are tested in test_classical.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from vhmn.functional import (
    Retrieval,
    association,
    hopfield_energy,
    hopfield_retrieve,
    hopfield_update,
    hopfield_update_reference,
    predictive_coding_refine,
)


# --------------------------------------------------------------------------------------
# An independent reference: float64 NumPy, numerically stable (max subtracted)
# --------------------------------------------------------------------------------------
def np_logits(state: np.ndarray, stored: np.ndarray, inv_temp: float) -> np.ndarray:
    return inv_temp * np.einsum("...qd,...nd->...qn", state, stored)


def np_association(state, stored, inv_temp):
    z = np_logits(state, stored, inv_temp)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_energy(state, stored, inv_temp):
    z = np_logits(state, stored, inv_temp)
    zmax = z.max(-1)
    lse = zmax + np.log(np.exp(z - zmax[..., None]).sum(-1))
    n = stored.shape[-2]
    m2 = (stored**2).sum(-1).max(-1)[..., None]
    return -lse / inv_temp + 0.5 * (state**2).sum(-1) + np.log(n) / inv_temp + 0.5 * m2


def np_update(state, stored, inv_temp, values=None):
    p = np_association(state, stored, inv_temp)
    return np.einsum("...qn,...nv->...qv", p, stored if values is None else values)


def randn(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def unit_rows(*shape, dtype=torch.float64, seed=0):
    x = randn(*shape, dtype=dtype, seed=seed)
    return x / x.norm(dim=-1, keepdim=True)


# (state shape, stored shape): single, batched, multi-head, stored broadcast over batch and heads
SHAPES = [
    ((3, 8), (5, 8)),
    ((4, 3, 8), (4, 5, 8)),  # batch
    ((2, 4, 3, 8), (2, 4, 5, 8)),  # batch × heads
    ((2, 4, 3, 8), (4, 5, 8)),  # per-head memory shared over the batch
    ((2, 4, 3, 8), (5, 8)),  # one memory for every batch element and head
    ((3, 8), (2, 5, 8)),  # one query set against several memories
]


# --------------------------------------------------------------------------------------
# Equations against the NumPy reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_shape,stored_shape", SHAPES)
@pytest.mark.parametrize("inv_temp", [0.3, 1.0, 4.0])
def test_association_energy_update_match_numpy(state_shape, stored_shape, inv_temp):
    state, stored = randn(*state_shape, seed=1), randn(*stored_shape, seed=2)
    s_np, x_np = state.numpy(), stored.numpy()

    p = association(state, stored, inv_temp)
    assert p.shape == torch.broadcast_shapes(state.shape[:-1], stored.shape[:-2] + (1,))[:-1] + (
        state.shape[-2],
        stored.shape[-2],
    )
    assert_close(p, torch.from_numpy(np_association(s_np, x_np, inv_temp)), rtol=1e-12, atol=1e-12)
    assert_close(p.sum(-1), torch.ones(p.shape[:-1], dtype=p.dtype))

    e = hopfield_energy(state, stored, inv_temp)
    assert e.shape == p.shape[:-1]
    assert_close(e, torch.from_numpy(np_energy(s_np, x_np, inv_temp)), rtol=1e-12, atol=1e-12)

    ref = torch.from_numpy(np_update(s_np, x_np, inv_temp))
    assert_close(hopfield_update_reference(state, stored, inv_temp), ref, rtol=1e-12, atol=1e-12)
    assert_close(hopfield_update(state, stored, inv_temp), ref, rtol=1e-10, atol=1e-12)


def test_energy_is_nonnegative_and_float32_matches_float64():
    """The constants β⁻¹log N + ½M² make E ≥ 0 (Ramsauer et al., eq. 2)."""
    state, stored = randn(4, 6, 16, seed=3), randn(4, 50, 16, seed=4)
    for inv_temp in (0.1, 1.0, 10.0):
        e64 = hopfield_energy(state, stored, inv_temp)
        assert bool((e64 >= -1e-12).all())
        e32 = hopfield_energy(state.float(), stored.float(), inv_temp)
        assert e32.dtype == torch.float32
        assert_close(e32.double(), e64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("inv_temp", [1e2, 1e4, 1e6])
def test_large_inv_temp_is_stable(inv_temp):
    """β_H·xᵀξ reaches 1e7 here: a naive exp overflows; ours must stay finite and exact."""
    state, stored = 3.0 * randn(2, 6, 32, seed=5), 3.0 * randn(2, 40, 32, seed=6)
    s_np, x_np = state.numpy(), stored.numpy()
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.exp(np_logits(s_np, x_np, inv_temp))).all()  # the naive way fails
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        s, x = state.to(dtype), stored.to(dtype)
        p, e = association(s, x, inv_temp), hopfield_energy(s, x, inv_temp)
        fast, slow = hopfield_update(s, x, inv_temp), hopfield_update_reference(s, x, inv_temp)
        for t in (p, e, fast, slow):
            assert bool(torch.isfinite(t).all())
        assert_close(p.double(), torch.from_numpy(np_association(s_np, x_np, inv_temp)), rtol=tol, atol=tol)
        # float32 energy: lse/β_H ≈ max_i x_iᵀξ (order 10²) so compare relatively
        assert_close(e.double(), torch.from_numpy(np_energy(s_np, x_np, inv_temp)), rtol=tol, atol=tol * 100)
        ref = torch.from_numpy(np_update(s_np, x_np, inv_temp))
        assert_close(fast.double(), ref, rtol=tol, atol=tol)
        assert_close(slow.double(), ref, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------
# The theorems the book relies on
# --------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_stored=st.integers(1, 40),
    dim=st.integers(1, 24),
    inv_temp=st.floats(1e-3, 1e3),
    scale=st.floats(0.1, 5.0),
)
def test_energy_never_increases_along_updates(seed, n_stored, dim, inv_temp, scale):
    """Ramsauer et al. Theorem 1: the update is a CCCP step, so E(ξ_{t+1}) ≤ E(ξ_t)."""
    stored = scale * randn(n_stored, dim, seed=seed)
    xi = scale * randn(8, dim, seed=seed + 1)  # queries anywhere, also far from the memory
    energy = hopfield_energy(xi, stored, inv_temp)
    for _ in range(6):
        xi = hopfield_update(xi, stored, inv_temp)
        new = hopfield_energy(xi, stored, inv_temp)
        tol = 1e-9 * (1.0 + energy.abs())
        assert bool((new <= energy + tol).all()), (energy - new).min().item()
        energy = new


def test_large_inv_temp_retrieves_the_nearest_stored_pattern():
    """Well separated patterns + large β_H: one update returns the pattern with the largest xᵢᵀξ."""
    stored = unit_rows(200, 64, seed=7)  # random unit vectors in 64-d: pairwise cos ≈ ±0.12
    target = torch.arange(0, 200, 7)
    query = stored[target] + 0.15 * randn(len(target), 64, seed=8)  # noisy copies
    nearest = (query @ stored.T).argmax(-1)
    assert torch.equal(nearest, target)  # sanity: the noise keeps the right pattern nearest
    out = hopfield_update(query, stored, inv_temp=200.0)
    assert_close(out, stored[nearest], rtol=0, atol=1e-8)
    assert_close(association(query, stored, 200.0).argmax(-1), nearest)


def test_nearest_is_by_dot_product_not_distance():
    """β_H → ∞ selects argmax xᵢᵀξ: a long stored vector wins over a closer short one."""
    stored = torch.tensor([[1.0, 0.0], [3.0, 1.5]], dtype=torch.float64)
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # equal to pattern 0
    out = hopfield_update(query, stored, inv_temp=100.0)
    assert_close(out, stored[1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("inv_temp", [0.0, 1e-8])
def test_small_inv_temp_returns_the_mean(inv_temp):
    stored, query = randn(3, 30, 16, seed=9), randn(3, 5, 16, seed=10)
    mean = stored.mean(-2, keepdim=True).expand(3, 5, 16)
    for fast in (True, False):
        assert_close(hopfield_update(query, stored, inv_temp, fast=fast), mean, rtol=0, atol=1e-7)


def test_intermediate_inv_temp_gives_a_metastable_average():
    """Two tight clusters: a moderate β_H averages within the cluster, not across clusters."""
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    stored = torch.cat([centres[0] + 0.1 * randn(10, 2, seed=11), centres[1] + 0.1 * randn(10, 2, seed=12)])
    query = centres[:1] + 0.05
    out = hopfield_retrieve(query, stored, inv_temp=0.5, max_steps=20).state
    p = association(out, stored, 0.5)[0]
    assert p[:10].sum() > 0.99  # almost all the weight stays in the query's cluster ...
    assert p[:10].min() > 0.05  # ... spread over all ten patterns of it: an average, not one pattern
    assert_close(out, stored[:10].mean(0, keepdim=True), rtol=0, atol=0.05)


# --------------------------------------------------------------------------------------
# Fast path (scaled_dot_product_attention) == reference path
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize(
    "state_shape,stored_shape,values_shape",
    [
        ((3, 8), (5, 8), (5, 8)),
        ((2, 4, 3, 8), (2, 4, 5, 8), (2, 4, 5, 12)),  # values ≠ stored, d_v ≠ d
        ((2, 4, 3, 8), (4, 5, 8), (4, 5, 6)),  # memory broadcast over the batch
        ((2, 4, 3, 8), (5, 8), (2, 4, 5, 6)),  # keys shared, values per batch/head
        ((3, 8), (2, 5, 8), (2, 5, 3)),  # one query set, several memories
    ],
)
def test_fast_path_equals_reference(dtype, tol, state_shape, stored_shape, values_shape):
    state = randn(*state_shape, dtype=dtype, seed=13)
    stored = randn(*stored_shape, dtype=dtype, seed=14)
    values = randn(*values_shape, dtype=dtype, seed=15)
    for inv_temp in (0.25, 1.0, 8.0):
        fast = hopfield_update(state, stored, inv_temp, values=values)
        ref = hopfield_update_reference(state, stored, inv_temp, values=values)
        assert fast.dtype == dtype and fast.shape == ref.shape
        assert_close(fast, ref, rtol=tol, atol=tol)
        assert_close(hopfield_update(state, stored, inv_temp, values=values, fast=False), ref, rtol=0, atol=0)
        np_ref = np_update(state.double().numpy(), stored.double().numpy(), inv_temp, values.double().numpy())
        assert_close(fast.double(), torch.from_numpy(np_ref), rtol=10 * tol, atol=10 * tol)


def test_fast_path_gradients_equal_reference():
    state = randn(2, 3, 4, 8, seed=16).requires_grad_()
    stored = randn(3, 6, 8, seed=17).requires_grad_()
    grads = []
    for fast in (True, False):
        out = hopfield_update(state, stored, 1.7, fast=fast)
        grads.append(torch.autograd.grad((out**2).sum(), (state, stored)))
    for a, b in zip(*grads):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_tensor_inv_temp_is_learnable():
    state, stored = randn(4, 8, seed=18), randn(10, 8, seed=19)
    beta = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    out = hopfield_update(state, stored, beta)
    assert_close(out, hopfield_update(state, stored, 2.0))
    (g,) = torch.autograd.grad(out.pow(2).sum(), beta)
    # d/dβ by central differences
    h = 1e-6
    fd = (hopfield_update(state, stored, 2.0 + h).pow(2).sum() - hopfield_update(state, stored, 2.0 - h).pow(2).sum()) / (2 * h)
    assert_close(g, fd, rtol=1e-5, atol=1e-7)
    assert g.abs() > 0


# --------------------------------------------------------------------------------------
# hopfield_retrieve: steps, convergence flags, frozen queries
# --------------------------------------------------------------------------------------
def manual_retrieve(query, stored, inv_temp, max_steps, tol):
    """Per-query loop: the definition of what hopfield_retrieve should return."""
    xi, steps = query.clone(), 0
    for _ in range(max_steps):
        new = hopfield_update_reference(xi, stored, inv_temp)
        steps += 1
        moved = (new - xi).abs().max().item()
        xi = new
        if moved <= tol:
            return xi, steps, True
    return xi, steps, False


def test_retrieve_matches_a_per_query_loop():
    stored = unit_rows(30, 16, seed=20)
    # a mix: exact stored patterns (fixed points), noisy ones, and random queries (slow, metastable)
    queries = torch.cat([stored[:3], stored[3:6] + 0.2 * randn(3, 16, seed=21), randn(4, 16, seed=22)])
    inv_temp, max_steps, tol = 10.0, 6, 1e-6
    r = hopfield_retrieve(queries, stored, inv_temp, max_steps=max_steps, tol=tol)
    assert isinstance(r, Retrieval)
    assert r.steps.dtype == torch.long and r.steps.shape == (10,) and r.converged.shape == (10,)
    assert bool((r.steps >= 1).all()) and bool((r.steps <= max_steps).all())
    for q in range(10):
        xi, steps, conv = manual_retrieve(queries[q : q + 1], stored, inv_temp, max_steps, tol)
        assert int(r.steps[q]) == steps, q
        assert bool(r.converged[q]) == conv, q
        # converged queries are frozen: their state is the one reached after `steps` updates
        assert_close(r.state[q : q + 1], xi, rtol=1e-6, atol=1e-9)
    # the mix really is a mix: some converge early, some at the last step, some not at all
    assert int(r.steps.min()) < max_steps and bool(r.converged.any()) and not bool(r.converged.all())
    assert bool(r.converged[r.steps == max_steps].any())


def test_retrieve_fixed_point_takes_one_step():
    """A stored pattern at large β_H is a fixed point: one update is applied (and checks it)."""
    stored = unit_rows(50, 32, seed=23)
    r = hopfield_retrieve(stored[:5], stored, inv_temp=100.0, max_steps=10)
    assert r.steps.tolist() == [1] * 5 and bool(r.converged.all())
    assert_close(r.state, stored[:5], rtol=0, atol=1e-6)


def test_retrieve_separated_patterns_converge_after_one_update():
    """Ramsauer et al.: with well separated patterns retrieval converges after one update."""
    stored = unit_rows(500, 64, seed=24)
    queries = stored[:20] + 0.1 * randn(20, 64, seed=25)
    r = hopfield_retrieve(queries, stored, inv_temp=64.0, max_steps=5, tol=1e-5)
    assert bool(r.converged.all())
    assert r.steps.tolist() == [2] * 20  # one update that moves, one that confirms the fixed point
    one = hopfield_update(queries, stored, 64.0)
    assert_close(r.state, one, rtol=0, atol=1e-5)


def test_retrieve_respects_max_steps_and_batches():
    stored = randn(2, 3, 40, 8, seed=26)
    query = 0.1 * randn(2, 3, 5, 8, seed=27)  # near the origin at small β_H: slow drift
    for max_steps in (1, 2, 3):
        r = hopfield_retrieve(query, stored, inv_temp=0.8, max_steps=max_steps, tol=0.0)
        assert r.state.shape == query.shape and r.steps.shape == (2, 3, 5)
        assert int(r.steps.max()) <= max_steps
        manual = query
        for _ in range(max_steps):
            manual = hopfield_update(manual, stored, 0.8)
        moving = ~r.converged
        assert bool(moving.any())
        assert bool((r.steps[moving] == max_steps).all())
        assert_close(r.state[moving], manual[moving], rtol=1e-10, atol=1e-12)


def test_retrieve_rejects_zero_steps():
    with pytest.raises(ValueError, match="max_steps"):
        hopfield_retrieve(randn(2, 4), randn(3, 4), 1.0, max_steps=0)


# --------------------------------------------------------------------------------------
# predictive_coding_refine: z ← z + β (m(z) − z)
# --------------------------------------------------------------------------------------
def test_refine_zero_steps_is_the_single_prediction():
    stored, z = randn(20, 8, seed=28), randn(5, 8, seed=29)
    calls = []

    def predict(x):
        calls.append(x)
        return hopfield_update(x, stored, 2.0)

    out = predictive_coding_refine(z, predict, refine_rate=0.5, refine_steps=0)
    assert len(calls) == 1
    assert_close(out, hopfield_update(z, stored, 2.0), rtol=0, atol=0)


def test_refine_rate_one_step_one_is_plain_retrieval():
    stored, z = randn(20, 8, seed=30), randn(5, 8, seed=31)
    out = predictive_coding_refine(z, lambda x: hopfield_update(x, stored, 2.0), refine_rate=1.0, refine_steps=1)
    assert_close(out, hopfield_update(z, stored, 2.0), rtol=1e-12, atol=1e-12)
    # and with rate 1, T steps are T Hopfield updates
    out3 = predictive_coding_refine(z, lambda x: hopfield_update(x, stored, 2.0), 1.0, 3)
    manual = z
    for _ in range(3):
        manual = hopfield_update(manual, stored, 2.0)
    assert_close(out3, manual, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("refine_rate,refine_steps", [(0.3, 1), (0.5, 2), (0.8, 5), (1.0, 3)])
def test_refine_linear_predictor_closed_form(refine_rate, refine_steps):
    """m(z) = A z + b ⇒ z_T = M^T z_0 + Σ_{k<T} M^k β b with M = (1−β) I + β A."""
    d = 6
    A, b = 0.5 * randn(d, d, seed=32), randn(d, seed=33)
    z0 = randn(4, d, seed=34)
    out = predictive_coding_refine(z0, lambda z: z @ A.T + b, refine_rate, refine_steps)
    M = (1 - refine_rate) * torch.eye(d, dtype=torch.float64) + refine_rate * A
    expected = z0 @ torch.linalg.matrix_power(M, refine_steps).T
    for k in range(refine_steps):
        expected = expected + refine_rate * (torch.linalg.matrix_power(M, k) @ b)
    assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_refine_gradients_flow_through_unrolled_steps():
    d, rate, steps = 5, 0.4, 3
    A, b = 0.5 * randn(d, d, seed=35), randn(d, seed=36)
    z0 = randn(d, seed=37)
    jac = torch.autograd.functional.jacobian(
        lambda z: predictive_coding_refine(z, lambda x: A @ x + b, rate, steps), z0
    )
    M = (1 - rate) * torch.eye(d, dtype=torch.float64) + rate * A
    assert_close(jac, torch.linalg.matrix_power(M, steps), rtol=1e-12, atol=1e-12)  # not just the last step

    # through Hopfield retrieval: the memory and β_H get gradients from every step
    stored = randn(12, d, seed=38).requires_grad_()
    beta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    seen = []
    out = predictive_coding_refine(
        randn(3, d, seed=39), lambda x: hopfield_update(x, stored, beta), rate, steps,
        on_step=lambda t, z, m: seen.append(t),
    )
    assert seen == [0, 1, 2]
    g_stored, g_beta = torch.autograd.grad(out.sum(), (stored, beta))
    assert bool(torch.isfinite(g_stored).all()) and g_stored.abs().sum() > 0 and g_beta.abs() > 0


@pytest.mark.parametrize("refine_rate,refine_steps", [(0.0, 1), (1.5, 1), (-0.1, 2), (0.5, -1)])
def test_refine_rejects_bad_arguments(refine_rate, refine_steps):
    with pytest.raises(ValueError, match="refine_rate in \\(0, 1\\]"):
        predictive_coding_refine(randn(2, 3), lambda z: z, refine_rate, refine_steps)


# --------------------------------------------------------------------------------------
# Bad input: clear errors
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [association, hopfield_energy, hopfield_update, hopfield_update_reference])
def test_missing_query_axis_is_explained(fn):
    with pytest.raises(ValueError, match=r"unsqueeze\(-2\)"):
        fn(randn(8), randn(5, 8), 1.0)
    with pytest.raises(ValueError, match=r"\(\.\.\., N, d\)"):
        fn(randn(3, 8), randn(8), 1.0)


@pytest.mark.parametrize("fn", [association, hopfield_energy, hopfield_update, hopfield_update_reference])
def test_dimension_mismatch_is_explained(fn):
    with pytest.raises(ValueError, match="share the last dim d; got 8 and 7"):
        fn(randn(3, 8), randn(5, 7), 1.0)


def test_retrieve_dimension_mismatch_is_explained():
    with pytest.raises(ValueError, match="share the last dim d"):
        hopfield_retrieve(randn(3, 8), randn(5, 7), 1.0)
