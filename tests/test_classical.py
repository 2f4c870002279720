"""Classical (binary) Hopfield networks (Hopfield 1982) in vhmn.functional.

Storage is checked against a NumPy reference; recall against the textbook theory: few patterns
are fixed points, asynchronous updates never increase the energy (so they converge, while
synchronous ones can oscillate), the negated patterns are spurious fixed points, the one-step
bit-error rate follows the signal-to-noise estimate Φ(−√((n−1)/(P−1))), and recall collapses
beyond ≈ 0.138·n patterns.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from vhmn.functional import (
    async_update,
    classical_energy,
    classical_recall,
    hebbian_weights,
    sign,
    sync_update,
)


def random_patterns(P: int, n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (P, n), generator=g) * 2 - 1).to(dtype)


def flip(patterns: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(patterns.shape, generator=g, dtype=torch.float64) < fraction
    return torch.where(mask, -patterns, patterns)


# --------------------------------------------------------------------------------------
# Storage, sign, energy
# --------------------------------------------------------------------------------------
def test_hebbian_weights_match_numpy():
    x = random_patterns(7, 40, seed=0)
    W = hebbian_weights(x)
    xn = x.numpy()
    ref = sum(np.outer(p, p) for p in xn) / 40
    np.fill_diagonal(ref, 0.0)
    assert W.dtype == torch.float64 and W.shape == (40, 40)
    assert_close(W, torch.from_numpy(ref), rtol=0, atol=1e-15)
    assert torch.equal(W, W.T)
    assert bool((W.diagonal() == 0).all())
    assert not x.isnan().any() and torch.equal(x, random_patterns(7, 40, seed=0))  # input untouched


def test_hebbian_weights_accept_integer_and_float32_patterns():
    x = random_patterns(3, 10, seed=1)
    W32 = hebbian_weights(x.to(torch.int64))
    assert W32.dtype == torch.float32
    assert_close(W32.double(), hebbian_weights(x), rtol=0, atol=1e-7)
    x32 = x.float()
    hebbian_weights(x32)
    assert torch.equal(x32, x.float())  # fill_diagonal_ must not write into the caller's tensor


def test_sign_ties_keep_the_previous_value():
    x = torch.tensor([2.0, -0.5, 0.0, 0.0])
    assert sign(x).tolist() == [1.0, -1.0, 1.0, 1.0]
    prev = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    assert sign(x, previous=prev).tolist() == [1.0, -1.0, -1.0, 1.0]
    assert sign(x.double()).dtype == torch.float64


def test_ties_do_not_depend_on_the_order_of_summation():
    # Hebbian weights with n = 200 are multiples of 1/200, not exact in binary: a field that is
    # exactly zero comes out as ±1e-17 depending on the order of summation (the CPU's vector
    # width). Relabelling the neurons reorders every sum; the update must not change, and it must
    # equal the update computed from the integer fields n·h (exact in float64).
    n = 200
    x = random_patterns(10, n, seed=4)
    W = hebbian_weights(x)
    C = (x.T @ x).fill_diagonal_(0)  # n·W: integers
    s = random_patterns(64, n, seed=5)
    assert (s @ C == 0).sum() > 100  # many exact ties in this batch
    assert torch.equal(sync_update(W, s), sign(s @ C, previous=s))
    for seed in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sync_update(W[perm][:, perm], s[:, perm]), sync_update(W, s)[:, perm])
        ref = s[:4].clone()
        for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist():
            ref[:, i] = sign(ref @ C[:, i], previous=ref[:, i])
        assert torch.equal(async_update(W, s[:4], generator=torch.Generator().manual_seed(seed)), ref)


def test_classical_energy_and_sync_update_match_numpy():
    W = hebbian_weights(random_patterns(5, 30, seed=2))
    s = random_patterns(4, 30, seed=3)  # a batch of 4 states
    Wn, sn = W.numpy(), s.numpy()
    e_ref = np.array([-0.5 * v @ Wn @ v for v in sn])
    assert_close(classical_energy(W, s), torch.from_numpy(e_ref), rtol=1e-12, atol=1e-12)
    h = sn @ Wn.T
    sync_ref = np.where(h > 0, 1.0, np.where(h < 0, -1.0, sn))
    assert torch.equal(sync_update(W, s), torch.from_numpy(sync_ref))


# --------------------------------------------------------------------------------------
# Recall
# --------------------------------------------------------------------------------------
def test_few_stored_patterns_are_fixed_points_and_attract_noisy_copies():
    n = 200
    x = random_patterns(5, n, seed=4)  # 5 ≪ 0.138·200
    W = hebbian_weights(x)
    assert torch.equal(sync_update(W, x), x)
    assert torch.equal(async_update(W, x, torch.Generator().manual_seed(0)), x)
    state, sweeps = classical_recall(W, x)
    assert sweeps == 0 and torch.equal(state, x)
    noisy = flip(x, 0.15, seed=5)  # 30 of 200 bits wrong
    assert not torch.equal(noisy, x)
    for mode in ("async", "sync"):
        out, sweeps = classical_recall(W, noisy, mode=mode, generator=torch.Generator().manual_seed(1))
        assert torch.equal(out, x), mode
        assert 1 <= sweeps <= 5


def test_negated_patterns_are_spurious_fixed_points():
    x = random_patterns(4, 100, seed=6)
    W = hebbian_weights(x)
    assert torch.equal(sync_update(W, -x), -x)
    assert_close(classical_energy(W, -x), classical_energy(W, x), rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(5, 60), load=st.floats(0.02, 0.6))
def test_async_updates_never_increase_energy(seed, n, load):
    P = max(1, int(load * n))
    W = hebbian_weights(random_patterns(P, n, seed=seed))
    s = random_patterns(3, n, seed=seed + 1)  # arbitrary start states, not near any pattern
    g = torch.Generator().manual_seed(seed)
    energy = classical_energy(W, s)
    for _ in range(30):
        new = async_update(W, s, g)
        new_energy = classical_energy(W, new)
        assert bool((new_energy <= energy + 1e-9).all())
        if torch.equal(new, s):
            break
        s, energy = new, new_energy
    # the sweep ended at a fixed point: every neuron agrees with the sign of its field
    # (up to float rounding of exact ties, h = 0, where W's entries k/n are not exact in binary)
    assert bool(((s @ W.T) * s >= -1e-9).all()), "async recall must end at a fixed point"


def test_sync_updates_can_oscillate_where_async_converges():
    W = hebbian_weights(torch.tensor([[1.0, -1.0]], dtype=torch.float64))  # w12 = −½
    start = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert torch.equal(sync_update(W, start), -start)  # a 2-cycle: (1,1) → (−1,−1) → (1,1)
    assert torch.equal(sync_update(W, -start), start)
    _, sweeps = classical_recall(W, start, max_sweeps=7, mode="sync")
    assert sweeps == 7  # never settles
    out, sweeps = classical_recall(W, start, max_sweeps=7, mode="async", generator=torch.Generator().manual_seed(0))
    assert sweeps < 7 and abs(float(out[0] * out[1]) + 1) < 1e-12  # a stored pattern (or its negation)


def test_one_step_error_rate_follows_signal_to_noise_theory():
    """Crosstalk of P−1 random patterns is ≈ N(0, (P−1)(n−1)/n²) ⇒ P(bit flips) = Φ(−√((n−1)/(P−1)))."""
    n = 200
    for P in (20, 28, 40, 60):
        flips = sum(
            (sync_update(hebbian_weights(x), x) != x).double().mean().item()
            for x in (random_patterns(P, n, seed=100 + t) for t in range(20))
        ) / 20
        theory = 0.5 * math.erfc(math.sqrt((n - 1) / (P - 1)) / math.sqrt(2))
        assert abs(flips - theory) < 0.25 * theory + 2e-4, (P, flips, theory)


def recall_error(P: int, n: int, seeds=(0, 1, 2)) -> float:
    """Fraction of wrong bits after async recall started at the stored patterns themselves."""
    errs = []
    for seed in seeds:
        x = random_patterns(P, n, seed=seed)
        out, _ = classical_recall(hebbian_weights(x), x, max_sweeps=30, generator=torch.Generator().manual_seed(seed))
        errs.append((out != x).double().mean().item())
    return sum(errs) / len(errs)


def test_capacity_curve():
    """Hopfield's ≈ 0.138·n: recall is near perfect well below, and collapses well above."""
    n = 200
    errors = {load: recall_error(int(load * n), n) for load in (0.05, 0.1, 0.2, 0.3)}
    assert errors[0.05] == 0.0
    assert errors[0.1] < 0.01
    assert errors[0.2] > 0.03
    assert errors[0.3] > 0.15
    assert errors[0.05] <= errors[0.1] < errors[0.2] < errors[0.3]


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"\(P, n\) with entries ±1, got shape \(10,\)"):
        hebbian_weights(torch.ones(10))
    W = hebbian_weights(random_patterns(2, 10, seed=7))
    with pytest.raises(ValueError, match="mode must be 'async' or 'sync'"):
        classical_recall(W, random_patterns(1, 10, seed=8), mode="parallel")
