"""Memory banks and retrieval with learned projections (vhmn.memory).

The episodic bank is a ring buffer: writes fill slots in order, wrap around, and overwrite the
oldest slot first; provenance (dataset index, token position, label) travels with every slot;
class-balanced writing keeps one FIFO per class and drops overflow into a sink row that is never
read. HopfieldRetrieval is checked against a per-head explicit computation.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vhmn.memory import EpisodicMemory, HopfieldRetrieval, LearnedMemory, make_memory


def rows(values, d=3):
    """Feature rows whose every entry is the given value: easy to recognise in the bank."""
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1).repeat(1, d)


def write(mem, values, labels=None, start_index=0):
    n = len(values)
    index = torch.arange(start_index, start_index + n)
    pos = 10 * index  # a position that differs from the index
    label = torch.tensor(labels) if labels is not None else index % 7
    mem.write(rows(values, mem.dim), index, pos, label)
    return index, pos, label


# ---------------------------------------------------------------------------------------------
# FIFO ring buffer and provenance
# ---------------------------------------------------------------------------------------------
def test_fresh_bank_has_unknown_provenance_and_n_slots():
    mem = EpisodicMemory(5, 3)
    assert mem.patterns().shape == (5, 3)
    for v in mem.provenance().values():
        assert v.shape == (5,) and (v == -1).all()
    assert int(mem.writes) == 0 and int(mem.ptr[0]) == 0


def test_fifo_fills_in_order_then_overwrites_oldest_first():
    mem = EpisodicMemory(5, 3)
    write(mem, [0, 1, 2], start_index=0)
    assert_close(mem.patterns()[:3], rows([0, 1, 2]))
    assert int(mem.ptr[0]) == 3
    write(mem, [3, 4, 5, 6], start_index=3)  # wraps: 5, 6 overwrite the oldest (0, 1)
    assert_close(mem.patterns(), rows([5, 6, 2, 3, 4]))
    prov = mem.provenance()
    assert prov["index"].tolist() == [5, 6, 2, 3, 4]
    assert prov["position"].tolist() == [50, 60, 20, 30, 40]
    assert prov["label"].tolist() == [5 % 7, 6 % 7, 2, 3, 4]
    assert int(mem.ptr[0]) == 2 and int(mem.writes) == 7
    write(mem, [7], start_index=7)  # next oldest is slot 2
    assert mem.provenance()["index"].tolist() == [5, 6, 7, 3, 4]


def test_batch_larger_than_bank_keeps_the_last_rows_in_fifo_order():
    mem = EpisodicMemory(4, 3)
    write(mem, [1])  # ptr at 1
    write(mem, list(range(10, 17)), start_index=10)  # 7 rows into 4 slots: keep 13..16
    kept = sorted(mem.provenance()["index"].tolist())
    assert kept == [13, 14, 15, 16]
    # the slots hold the values matching their provenance
    assert_close(mem.patterns()[:, 0], mem.provenance()["index"].float())
    # the next write overwrites the oldest kept row (13)
    oldest_slot = mem.provenance()["index"].tolist().index(13)
    assert int(mem.ptr[0]) == oldest_slot


def test_write_detaches_and_bank_is_a_buffer():
    mem = EpisodicMemory(4, 3)
    feats = torch.randn(2, 3, requires_grad=True)
    mem.write(feats * 2, torch.arange(2), torch.arange(2), torch.arange(2))
    assert not mem.bank.requires_grad
    assert list(mem.parameters()) == []
    assert {"bank", "ptr", "src_index", "src_pos", "src_label", "writes"} <= set(dict(mem.named_buffers()))


def test_state_dict_round_trip_keeps_slots_pointer_and_provenance():
    mem = EpisodicMemory(5, 3)
    write(mem, [0, 1, 2, 3, 4, 5, 6])
    other = EpisodicMemory(5, 3)
    other.load_state_dict(mem.state_dict())
    for name, buf in mem.named_buffers():
        assert torch.equal(buf, dict(other.named_buffers())[name]), name
    write(mem, [9], start_index=9)
    write(other, [9], start_index=9)
    assert torch.equal(mem.bank, other.bank) and torch.equal(mem.src_index, other.src_index)


# ---------------------------------------------------------------------------------------------
# class-balanced writing
# ---------------------------------------------------------------------------------------------
def test_class_balanced_regions_overflow_goes_to_the_sink():
    mem = EpisodicMemory(6, 3, class_balanced=True, num_classes=3)  # 2 slots per class
    # class 0 three times (third overflows), class 1 once, class 2 once, unknown label once
    write(mem, [10, 11, 12, 20, 30, 99], labels=[0, 0, 0, 1, 2, -1])
    pat, prov = mem.patterns(), mem.provenance()
    assert pat.shape == (6, 3)
    assert_close(pat[0:2, 0], torch.tensor([10.0, 11.0]))  # class 0 region
    assert_close(pat[2, 0], torch.tensor(20.0))  # class 1 region, first slot
    assert_close(pat[4, 0], torch.tensor(30.0))  # class 2 region, first slot
    assert prov["label"].tolist() == [0, 0, 1, -1, 2, -1]
    # the dropped rows (value 12 and 99) are only in the sink row, never in patterns()
    assert not (pat[:, 0] == 12).any() and not (pat[:, 0] == 99).any()
    assert float(mem.bank[6, 0]) in (12.0, 99.0)
    assert mem.ptr.tolist() == [0, 1, 1]
    # class 1 twice more: fills slot 3, then wraps to slot 2 (its oldest)
    write(mem, [21, 22], labels=[1, 1], start_index=100)
    assert_close(mem.patterns()[2:4, 0], torch.tensor([22.0, 21.0]))
    assert mem.provenance()["index"][2:4].tolist() == [101, 100]
    # other regions untouched
    assert_close(mem.patterns()[0:2, 0], torch.tensor([10.0, 11.0]))


def test_class_balanced_every_region_stays_its_class():
    torch.manual_seed(0)
    mem = EpisodicMemory(20, 4, class_balanced=True, num_classes=4)
    for step in range(12):
        labels = torch.randint(0, 4, (9,))
        mem.write(torch.randn(9, 4), torch.arange(9) + 9 * step, torch.zeros(9, dtype=torch.long), labels)
    lab = mem.provenance()["label"].view(4, 5)
    for c in range(4):
        assert ((lab[c] == c) | (lab[c] == -1)).all()


def test_class_balanced_needs_divisible_slots():
    with pytest.raises(ValueError, match="divisible by num_classes"):
        EpisodicMemory(10, 3, class_balanced=True, num_classes=3)


def test_make_memory_kinds():
    assert isinstance(make_memory("episodic", 4, 3), EpisodicMemory)
    learned = make_memory("learned", 4, 3)
    assert isinstance(learned, LearnedMemory)
    assert learned.bank.requires_grad and learned.provenance() is None
    before = learned.bank.detach().clone()
    learned.write(torch.randn(2, 3), torch.arange(2), torch.arange(2), torch.arange(2))  # no-op
    assert torch.equal(before, learned.bank.detach())
    with pytest.raises(ValueError, match="'episodic' or 'learned'"):
        make_memory("ring", 4, 3)


# ---------------------------------------------------------------------------------------------
# retrieval with learned projections
# ---------------------------------------------------------------------------------------------
def explicit_retrieval(r: HopfieldRetrieval, state, stored):
    """Per image, per head, per query: softmax(β_H q·k) weighted sum of v, heads concatenated."""
    B, L, d = state.shape
    e = r.head_dim
    q, k, v = r.q(state), r.k(stored), r.v(stored)
    out = torch.zeros(B, L, d, dtype=torch.float64)
    for b in range(B):
        for h in range(r.heads):
            sl = slice(h * e, (h + 1) * e)
            p = torch.softmax(r.inv_temp * q[b, :, sl].double() @ k[:, sl].double().T, dim=-1)  # (L, N)
            out[b, :, sl] = p @ v[:, sl].double()
    return r.o(out.float())


@pytest.mark.parametrize("fast", [True, False])
def test_retrieval_matches_explicit_per_head_computation(fast):
    torch.manual_seed(0)
    r = HopfieldRetrieval(dim=12, heads=3)
    assert math.isclose(r.inv_temp, 1 / math.sqrt(4))
    state, stored = torch.randn(2, 5, 12), torch.randn(7, 12)
    got = r(state, r.project_memory(stored), fast=fast)
    assert_close(got, explicit_retrieval(r, state, stored), atol=1e-5, rtol=1e-4)


def test_association_is_a_distribution_per_head_and_query():
    torch.manual_seed(0)
    r = HopfieldRetrieval(dim=8, heads=2, inv_temp=3.0)
    p = r.association(torch.randn(3, 4, 8), r.project_memory(torch.randn(6, 8)))
    assert p.shape == (3, 2, 4, 6)
    assert (p >= 0).all()
    assert_close(p.sum(-1), torch.ones(3, 2, 4))


def test_retrieval_rejects_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible by heads"):
        HopfieldRetrieval(dim=10, heads=3)
