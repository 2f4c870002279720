"""The local memory's 'hybrid' mode and the neighbour-offset bias (rel_pos), and vhmn.diagnostics.

A brute-force per-token computation (a loop over tokens, heads and neighbours) is the reference for the
fast dense path and the unfold/einsum reference path, in values and gradients; rel_pos makes the retrieval
depend on where a neighbour sits in the window (without it, a window is a set); the bank's log-prior starts
with bank and neighbours weighing alike; hybrid writes token states with provenance; the diagnostics equal a
hand computation on a known association.
"""
from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from torch.testing import assert_close

from vhmn import create_model
from vhmn.diagnostics import effective_slots, memory_diagnostics
from vhmn.functional import predictive_coding_refine

from _slice import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)


def local_of(**kw):
    torch.manual_seed(0)
    return create_model("vhmn_test", **kw).double().stages[0][0].mixer.local


def randomise(local):
    with torch.no_grad():
        if local.rel_pos is not None:
            local.rel_pos.normal_()
        if hasattr(local, "bank_bias"):
            local.bank_bias.normal_()
        if hasattr(local, "memory"):
            local.memory.bank[:] = torch.randn_like(local.memory.bank)
        if local.offset_gain is not None:
            local.offset_gain.normal_()
        if hasattr(local, "neigh"):
            local.neigh.weight.normal_(0, 0.3)
            local.neigh.bias.normal_()


def brute_force(local, s, hw):
    """Each token, each head: softmax over [its in-grid k×k neighbours (+ offset bias); the bank (+ bank bias)]."""
    r, (H, W), k = local.retrieval, hw, local.k
    B, L, d = s.shape
    e, rad = r.head_dim, k // 2
    stored = local.descriptor(s, hw) if local.window_descriptor else s  # the neighbours' stored patterns
    q = r.query(local.descriptor(s, hw) if local.query_descriptor else s)  # the state patterns
    kk, vv = r.key(stored), r.v(stored)
    hybrid = local.mode == "hybrid"
    if hybrid:
        kb, vb = (t[0] for t in local.project_memory())  # (h, N, e)
    out = torch.zeros(B, L, d, dtype=s.dtype)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                i = y * W + x
                nb = [(yy * W + xx, (yy - y + rad) * k + (xx - x + rad))
                      for yy in range(y - rad, y + rad + 1) for xx in range(x - rad, x + rad + 1)
                      if 0 <= yy < H and 0 <= xx < W and (local.window_self or (yy, xx) != (y, x))]
                idx = [j for j, _ in nb]
                for h in range(r.heads):
                    sl = slice(h * e, (h + 1) * e)
                    logits = r.scale * kk[b, idx, sl] @ q[b, i, sl]
                    if local.rel_pos is not None:
                        logits = logits + local.rel_pos[h, [o for _, o in nb]]
                    values = vv[b, idx, sl]
                    if local.offset_gain is not None:
                        values = values * local.offset_gain[h, [o for _, o in nb]]
                    if hybrid:
                        logits = torch.cat([logits, r.scale * kb[h] @ q[b, i, sl] + local.bank_bias[h, 0]])
                        values = torch.cat([values, vb[h]])
                    out[b, i, sl] = torch.softmax(logits, 0) @ values
    return r.o(out)


CASES = [dict(local_mode="window", rel_pos=True), dict(local_mode="hybrid"), dict(local_mode="hybrid", rel_pos=True),
         dict(local_mode="window", qk_norm=True), dict(local_mode="hybrid", rel_pos=True, qk_norm=True),
         dict(local_mode="window", rel_pos=True, window_self=False), dict(local_mode="hybrid", window_self=False),
         dict(local_mode="window", rel_pos=True, offset_gain=True), dict(local_mode="hybrid", offset_gain=True),
         dict(local_mode="window", rel_pos=True, window_descriptor=True), dict(local_mode="hybrid", window_descriptor=True),
         dict(local_mode="window", rel_pos=True, window_descriptor=True, query_descriptor=True),
         dict(local_mode="window", query_descriptor=True), dict(local_mode="hybrid", query_descriptor=True)]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("hw", [(4, 6), (3, 3)])
def test_fast_and_reference_paths_equal_the_brute_force(kw, k, hw):
    local = local_of(kernel_size=k, **kw)
    randomise(local)
    s = torch.randn(2, hw[0] * hw[1], 32, dtype=torch.float64, requires_grad=True)
    kv = local.project_memory()
    ref_path = local._window_unfold if kw["local_mode"] == "window" else (lambda s, hw: local._hybrid_reference(s, hw, kv))
    outs = [local(s, hw, kv), ref_path(s, hw), brute_force(local, s, hw)]
    params = [s] + [p for p in (local.rel_pos, getattr(local, "bank_bias", None), getattr(local.retrieval, "log_inv_temp", None),
                                local.offset_gain, getattr(local, "neigh", None) and local.neigh.weight) if p is not None]
    grads = [torch.autograd.grad(o.square().sum(), params) for o in outs]
    for o, g in zip(outs[1:], grads[1:]):
        assert_close(outs[0], o, atol=1e-12, rtol=1e-10)
        assert_close(grads[0], g, atol=1e-12, rtol=1e-10)


def test_rel_pos_makes_the_place_of_a_neighbour_matter():
    """Without rel_pos a token's window is a set: mirroring the grid left–right mirrors the output.
    A rel_pos bias that prefers the left neighbour breaks that symmetry."""
    s = torch.randn(1, 9, 32, dtype=torch.float64)
    mirror = torch.arange(9).view(3, 3).flip(1).flatten()
    for rel_pos, symmetric in ((False, True), (True, False)):
        local = local_of(local_mode="window", rel_pos=rel_pos)
        if rel_pos:
            with torch.no_grad():
                local.rel_pos.zero_()
                local.rel_pos[:, 3] = 5.0  # offset (dy, dx) = (0, −1): the left neighbour
        with torch.no_grad():
            a = local(s, (3, 3), None)[:, mirror]
            b = local(s[:, mirror], (3, 3), None)
        assert torch.allclose(a, b) == symmetric


def test_hybrid_bank_prior_starts_even_and_is_learned():
    local = local_of(local_mode="hybrid", kernel_size=3)
    N = local.memory.slots
    assert_close(local.bank_bias.detach(), torch.full_like(local.bank_bias, math.log(9 / N)))
    # with equal logits (a zero query projection) an interior token's mass splits 1 : 1 between 9 neighbours and N slots
    with torch.no_grad():
        local.retrieval.q.weight.zero_()
    s = torch.randn(1, 9, 32, dtype=torch.float64)
    p, share = local.bank_association(s, (3, 3), local.project_memory())
    assert_close(share[0, :, 4], torch.full_like(share[0, :, 4], 0.5))  # token 4: the centre of the 3×3 grid
    assert p.shape == (1, local.retrieval.heads, 9, N)
    m = create_model("vhmn_test", local_mode="hybrid")
    m(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 2])).sum().backward()
    assert m.stages[0][0].mixer.local.bank_bias.grad.abs().sum() > 0


def test_hybrid_writes_token_states_with_provenance():
    torch.manual_seed(0)
    m = create_model("vhmn_test", local_mode="hybrid", local_writes=8).train()
    local = m.stages[0][0].mixer.local
    captured = {}

    def keep_first_state(mod, args):  # the first call's state is u = LN(z), the tokens that are written
        captured.setdefault("s", args[0].detach().clone())

    hook = local.register_forward_pre_hook(keep_first_state)
    m(torch.randn(2, 3, 32, 32), index=torch.tensor([10, 11]), labels=torch.tensor([3, 7]))
    hook.remove()
    prov = local.memory.provenance()
    written = prov["index"] >= 0
    assert written.sum() == 8 and not hasattr(local, "neigh")  # no descriptor conv: the bank holds token states
    for slot in written.nonzero().flatten().tolist():
        img = prov["index"][slot].item() - 10
        assert prov["label"][slot].item() == (3, 7)[img]
        assert_close(local.memory.bank[slot], captured["s"][img, prov["position"][slot]])


@pytest.mark.parametrize("option", ["rel_pos", "window_descriptor", "query_descriptor", "offset_gain"])
def test_config_rejects_the_neighbours_options_in_bank_mode(option):
    """Options of the k×k neighbours as stored patterns are refused in bank mode (which has none), not ignored."""
    with pytest.raises(ValueError, match=f"{option} acts on the k×k neighbours"):
        create_model("vhmn_test", **{option: True})
    create_model("vhmn_test", local_mode="window", **{option: True})  # where they apply


def test_effective_slots_and_diagnostics_by_hand():
    assert_close(effective_slots(torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]])), torch.tensor([1.0, 4.0]))
    assert_close(effective_slots(torch.tensor([0.5, 0.5, 0.0])), torch.tensor(2.0))
    torch.manual_seed(0)
    model = create_model("vhmn_test", global_slots=10).eval()
    glob = model.stages[0][0].mixer.glob
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():  # global bank: slot c holds class c (labels 0..9); its keys make slot y_i win for image i
        glob.memory.src_label[:10] = torch.arange(10)
    d = memory_diagnostics(model, x, y, batch_size=4)
    assert d["images"] == 6 and len(d["blocks"]) == 2
    rec = model.inspect(x, topk=1)["blocks"][0]
    top = rec["global_top"]["label"][:, 0]
    assert d["blocks"][0]["global"]["label_agreement"] == pytest.approx((top == y).float().mean().item())
    assert d["blocks"][0]["global"]["chance"] == pytest.approx(0.1)  # one slot per class of ten
    eff = effective_slots(rec["steps"][-1]["global_assoc"]).mean().item()
    assert d["blocks"][0]["global"]["effective_slots"] == pytest.approx(eff, rel=1e-5)
    assert 1.0 <= eff <= 10.0
    assert d["blocks"][0]["local"]["slots"] == 16 and "bank_share" not in d["blocks"][0]["local"]
    hybrid = create_model("vhmn_test", local_mode="hybrid").eval()
    assert 0 < memory_diagnostics(hybrid, x, y)["blocks"][1]["local"]["bank_share"] < 1
    window = create_model("vhmn_test", local_mode="window").eval()
    assert memory_diagnostics(window, x, y)["blocks"][0]["local"] is None


@pytest.mark.parametrize("mode", ["window", "hybrid"])
def test_window_stored_input_fixes_the_neighbours_during_refinement(mode):
    """'input': every refinement step retrieves from the neighbours of the block input u; with one step (or none)
    that is the same as 'state'; with two, the second step's stored patterns are u's, not z₁'s."""
    torch.manual_seed(0)
    kw = dict(local_mode=mode, rel_pos=True, global_memory=False, refine_rate=0.5)
    for T in (0, 1, 2):
        a = create_model("vhmn_test", refine_steps=T, window_stored="state", **kw).double().eval()
        b = create_model("vhmn_test", refine_steps=T, window_stored="input", **kw).double().eval()
        b.load_state_dict(a.state_dict())
        u = torch.randn(2, 64, 32, dtype=torch.float64)
        mix_a, mix_b = a.stages[0][0].mixer, b.stages[0][0].mixer
        with torch.no_grad():
            out_a, out_b = mix_a(u, (8, 8)), mix_b(u, (8, 8))
        assert torch.allclose(out_a, out_b) == (T < 2)
        if T == 2:  # by hand: z₁ = u + β(m(u) − u); z₂ = z₁ + β(m(z₁; stored = u) − z₁)
            loc, kv = mix_b.local, mix_b.local.project_memory()
            with torch.no_grad():
                tokens = (loc.retrieval.k(u), loc.retrieval.v(u))
                z1 = u + 0.5 * (loc(u, (8, 8), kv) - u)
                z2 = z1 + 0.5 * (loc(z1, (8, 8), kv, tokens) - z1)
                assert_close(out_b, z2)
                # the reference path agrees with the fast path when the neighbours are given
                ref = loc._window_unfold(z1, (8, 8), tokens) if mode == "window" else loc._hybrid_reference(z1, (8, 8), kv, tokens)
                assert_close(loc(z1, (8, 8), kv, tokens), ref, atol=1e-12, rtol=1e-10)


def test_write_after_read_no_image_retrieves_itself():
    """write_after_read: a training forward retrieves from the banks as they were before this batch (so it equals
    an eval forward on the old banks), then writes the batch; the default writes first, so the batch sees itself."""
    torch.manual_seed(0)
    x, idx, y = torch.randn(3, 3, 32, 32), torch.arange(3), torch.tensor([1, 2, 3])
    for after in (True, False):
        for mode in ("bank", "hybrid"):
            m = create_model("vhmn_test", local_mode=mode, write_after_read=after).double()
            old = create_model("vhmn_test", local_mode=mode, write_after_read=after).double().eval()
            old.load_state_dict(m.state_dict())
            out = m.train()(x.double(), index=idx, labels=y)
            out.sum().backward()  # the write after the forward leaves what autograd saved intact
            assert torch.allclose(out, old(x.double())) == after
            prov = m.stages[0][0].mixer.glob.memory.provenance()
            assert prov["label"][:3].tolist() == [1, 2, 3]  # written either way


def test_global_label_values_add_a_learned_label_embedding():
    torch.manual_seed(0)
    m = create_model("vhmn_test", global_label_values=True, write_after_read=True)
    glob = m.stages[0][0].mixer.glob
    k0, v0 = glob.project_memory()
    assert torch.equal(v0, glob.retrieval.project_memory(glob.memory.patterns())[1])  # zero at initialisation
    with torch.no_grad():
        glob.label_values.weight[1:] = torch.randn(10, 32)
        glob.memory.src_label[:8] = torch.tensor([0, 1, 2, 3, -1, 5, 6, 7])
    k, v = glob.project_memory()
    plain = glob.retrieval.project_memory(glob.memory.patterns())[1]
    for slot, label in enumerate([0, 1, 2, 3, -1, 5, 6, 7]):
        want = torch.zeros(32) if label < 0 else glob.label_values.weight[label + 1]
        assert_close((v - plain)[0, :, slot].flatten(), want)  # heads concatenated = the label's embedding
    assert torch.equal(k, k0)  # keys do not see labels
    m.train()(torch.randn(2, 3, 32, 32), labels=torch.tensor([3, 4])).sum().backward()
    assert glob.label_values.weight.grad[1:].abs().sum() > 0 and glob.label_values.weight.grad[0].abs().sum() == 0
    with pytest.raises(ValueError, match="global_label_values"):
        create_model("vhmn_test", global_label_values=True, memory="learned")


def test_qk_norm_is_cosine_retrieval_with_a_learned_inverse_temperature():
    torch.manual_seed(0)
    m = create_model("vhmn_test", qk_norm=True).double()
    r = m.stages[0][0].mixer.local.retrieval
    assert r.scale == 1.0 and torch.allclose(r.log_inv_temp.exp(), torch.full((2, 1), 10.0, dtype=torch.float64))
    kv = r.project_memory(torch.randn(16, 32, dtype=torch.float64))
    assert_close(kv[0].norm(dim=-1), torch.ones(1, 2, 16, dtype=torch.float64))  # unit keys per head
    state = torch.randn(2, 5, 32, dtype=torch.float64)
    p = r.association(state, kv)
    # cosine: the association does not change when a query's projection is scaled
    with torch.no_grad():
        r.q.weight.mul_(7.0)
    assert_close(r.association(state, kv), p)
    # by hand: softmax(β_h · cos(q_h, k_h))
    q = torch.nn.functional.normalize(r.q(state).view(2, 5, 2, 16), dim=-1)
    k = kv[0][0]  # (h, N, e), unit
    logits = 10.0 * torch.einsum("blhe,hne->bhln", q, k)
    assert_close(p, torch.softmax(logits, -1))
    m(torch.randn(2, 3, 32, 32, dtype=torch.float64), labels=torch.tensor([0, 1])).sum().backward()
    assert r.log_inv_temp.grad.abs().sum() > 0


def test_window_self_false_predicts_a_token_from_its_context_alone():
    """Changing a token's own state changes its prediction only through its query when window_self=False: with the
    query projection zeroed (uniform association), the prediction of token i is then independent of s_i."""
    for mode in ("window", "hybrid"):
        local = local_of(local_mode=mode, window_self=False)
        with torch.no_grad():
            local.retrieval.q.weight.zero_()
        s = torch.randn(1, 9, 32, dtype=torch.float64)
        s2 = s.clone()
        s2[0, 4] += 3.0  # token 4, the centre of a 3×3 grid
        kv = local.project_memory()
        with torch.no_grad():
            a, b = local(s, (3, 3), kv), local(s2, (3, 3), kv)
        assert_close(a[0, 4], b[0, 4])  # its own prediction did not move
        assert not torch.allclose(a[0, 0], b[0, 0])  # its neighbours' did
        mask = local.neighbourhood_mask((3, 3))
        assert not mask.diagonal().any()
        assert mask.sum(1).tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]


@pytest.mark.parametrize("kw", [
    dict(local_mode="window", rel_pos=True, window_stored="input", window_self=False, qk_norm=True,
         write_after_read=True, global_label_values=True),
    dict(local_mode="hybrid", rel_pos=True, window_stored="input", write_after_read=True),
    dict(local_mode="window", rel_pos=True, kernel_size=5, pos_embed=True, window_stored="input", write_after_read=True,
         global_label_values=True, window_descriptor=True),
    dict(local_mode="window", rel_pos=True, kernel_size=5, pos_embed=True, window_stored="input", write_after_read=True,
         global_label_values=True, window_descriptor=True, query_descriptor=True),
], ids=["window-candidate", "hybrid-candidate", "chosen-descriptor", "descriptor-query"])
def test_candidates_compile_without_graph_breaks(kw):
    """``fullgraph=True`` raises on any graph break (the mask cache, the writes after the read, the label values)."""
    import copy

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("vhmn_test", **kw).train()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x, idx, y = torch.randn(2, 3, 32, 32), torch.tensor([4, 5]), torch.tensor([6, 7])
    torch.manual_seed(3)
    out = compiled(x, idx, y)
    torch.manual_seed(3)
    assert_close(out, ref(x, idx, y))
    out.sum().backward()
    model.eval(), ref.eval()
    assert_close(compiled(x), ref(x))
    torch._dynamo.reset()


def test_mixer_output_modes_separate_the_input_pass_through_from_the_retrievals():
    """s_T = (1 − β)^T u + (retrievals): with a memory that predicts nothing (m ≡ 0, zeroed output projections) the
    mixer adds (1 − β)^T u with 'state', nothing with 'retrieval' and −(1 − (1 − β)^T) u with 'change' (s_T − u);
    with a memory that does predict, 'state' − 'retrieval' is exactly the pass-through (1 − β)^T u."""
    torch.manual_seed(0)
    u = torch.randn(2, 64, 32, dtype=torch.float64)
    for T, beta in ((0, 0.5), (1, 0.5), (2, 0.5), (3, 0.25)):
        outs, full = {}, {}
        for mode in ("state", "retrieval", "change"):
            torch.manual_seed(1)
            m = create_model("vhmn_test", refine_steps=T, refine_rate=beta, mixer_output=mode).double().eval()
            with torch.no_grad():
                full[mode] = m.stages[0][0].mixer(u, (8, 8))
        keep = (1 - beta) ** T if T > 0 else 0.0
        assert_close(full["state"] - full["retrieval"], keep * u)
        assert_close(full["state"] - full["change"], u)
        for mode in ("state", "retrieval", "change"):
            m = create_model("vhmn_test", refine_steps=T, refine_rate=beta, mixer_output=mode).double().eval()
            mixer = m.stages[0][0].mixer
            with torch.no_grad():
                for r in (mixer.local.retrieval, mixer.glob.retrieval):
                    r.o.weight.zero_(), r.o.bias.zero_()
                outs[mode] = mixer(u, (8, 8))
        assert_close(outs["state"], keep * u)
        assert_close(outs["retrieval"], torch.zeros_like(u))
        assert_close(outs["change"], (keep - 1) * u)


def test_prediction_output_is_the_memory_read_out_at_the_refined_state():
    """mixer_output='prediction' adds m(s_T) to the residual stream: the prediction of the memory at the state that T
    refinement steps reached (predictive_coding_refine, then one retrieval more), not s_T; at T = 0 it is m(u), as
    'state'. It is a fixed point of the refinement exactly when 'prediction' and 'state' agree."""
    torch.manual_seed(0)
    u = torch.randn(2, 64, 32, dtype=torch.float64)
    for T, beta in ((0, 0.5), (1, 0.5), (2, 0.5), (3, 0.25)):
        out = {}
        for mode in ("state", "prediction"):
            torch.manual_seed(1)
            m = create_model("vhmn_test", refine_steps=T, refine_rate=beta, mixer_output=mode).double().eval()
            mixer = m.stages[0][0].mixer
            with torch.no_grad():
                out[mode] = mixer(u, (8, 8))
        kv_l, kv_g = mixer.local.project_memory(), mixer.glob.project_memory()
        predict = lambda s: mixer.predict(s, (8, 8), kv_l, kv_g)  # noqa: E731
        with torch.no_grad():
            s_T = predictive_coding_refine(u, predict, beta, T)
            assert_close(out["state"], s_T)
            assert_close(out["prediction"], predict(s_T) if T else s_T)
            if T:
                assert (out["prediction"] - out["state"]).abs().max() > 1e-3


def test_film_scene_memory_starts_as_the_model_without_it():
    """global_mod='film': the scene retrieval g enters the prediction as m ⊙ (1 + scale(g)) + shift(g), with scale
    and shift zero at initialisation, so that a V-HMN with a written scene memory computes, at first, exactly what
    the same weights compute without a scene memory; once the FiLM weights move, the stored scenes change it."""
    kw = dict(local_mode="window", rel_pos=True, kernel_size=5, window_stored="input", window_descriptor=True, pos_embed=True)
    torch.manual_seed(0)
    film = create_model("vhmn_test", global_mod="film", write_after_read=True, global_label_values=True, **kw).double()
    plain = create_model("vhmn_test", global_memory=False, **kw).double()
    missing, unexpected = plain.load_state_dict(film.state_dict(), strict=False)
    assert not missing and unexpected and all(".glob." in k or ".film." in k for k in unexpected)
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.arange(8) % 10
    film.train()
    with torch.no_grad():
        film(x, index=torch.arange(8), labels=y)  # write 8 scenes (with their labels) into every block's memory
    film.eval(), plain.eval()
    glob = film.stages[0][0].mixer.glob
    assert int((glob.memory.provenance()["label"] >= 0).sum()) == 8
    with torch.no_grad():
        for blk in film.stages[0]:  # a scene memory whose retrieval is far from zero
            blk.mixer.glob.label_values.weight.normal_()
        assert_close(film(x), plain(x))  # (a VHMN whose generic Linear init overwrote FiLM's zeros fails here)
        film.stages[0][0].mixer.film.weight.normal_(0, 0.1)
        assert (film(x) - plain(x)).abs().max() > 1e-3


def test_offset_gain_with_a_uniform_association_is_a_depthwise_convolution():
    """With zero queries (every neighbour weighted alike) a token's retrieval is the mean over its in-grid window of
    gain(offset) ⊙ v_j: inside the grid, a depthwise k×k convolution of the values with the gains / k² as filter."""
    local = local_of(local_mode="window", offset_gain=True)
    with torch.no_grad():
        local.retrieval.q.weight.zero_()
        local.offset_gain.normal_()
    s = torch.randn(2, 36, 32, dtype=torch.float64)
    r = local.retrieval
    with torch.no_grad():
        got = local(s, (6, 6), None)
        v = r.v(s).view(2, 6, 6, 32).permute(0, 3, 1, 2)  # (B, d, H, W)
        w = local.offset_gain.reshape(2, 3, 3, 16).permute(0, 3, 1, 2).reshape(32, 1, 3, 3) / 9  # (d, 1, k, k)
        conv = torch.nn.functional.conv2d(v, w, padding=1, groups=32).permute(0, 2, 3, 1).reshape(2, 36, 32)
        want = r.o(conv)
    inner = torch.tensor([y * 6 + x for y in range(1, 5) for x in range(1, 5)])  # full 3×3 windows
    assert_close(got[:, inner], want[:, inner])


LINEAR_CASES = [dict(T=T, qk_norm=qk, rel_pos=rp, global_memory=g, mixer_output=out)
                for T in (0, 1, 2, 3) for qk in (False, True) for rp in (False, True) for g in (False, True)
                for out in ("state", "retrieval", "change") if not (out != "state" and (qk or rp))]
LINEAR_CASES += [dict(T=T, qk_norm=False, rel_pos=True, global_memory=True, mixer_output=out, window_descriptor=True)
                 for T in (0, 1, 2) for out in ("state", "prediction")]
LINEAR_CASES += [dict(T=T, qk_norm=qk, rel_pos=False, global_memory=g, mixer_output="prediction") for T in (1, 3) for qk in (False, True) for g in (False, True)]
LINEAR_CASES += [dict(T=T, qk_norm=qk, rel_pos=True, global_memory=True, mixer_output="state", window_descriptor=True, query_descriptor=True)
                 for T in (0, 1, 2, 3) for qk in (False, True)]


@pytest.mark.parametrize("c", LINEAR_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_linear_refinement_equals_the_reference_loop(c):
    """The fast refinement (the state carried as its projection W_q s_t and its mean, W_o applied once to the
    weighted sum of the retrievals) equals the reference loop of predictive_coding_refine, in the output and
    in every gradient, with and without cosine retrieval, offset biases, global memory and for each mixer output."""
    kw = dict(local_mode="window", window_stored="input", window_self=False, refine_steps=c["T"], refine_rate=0.5 if c["T"] < 3 else 0.3,
              qk_norm=c["qk_norm"], rel_pos=c["rel_pos"], global_memory=c["global_memory"], mixer_output=c["mixer_output"], drop_path=0.0,
              window_descriptor=c.get("window_descriptor", False), query_descriptor=c.get("query_descriptor", False))
    torch.manual_seed(0)
    fast = create_model("vhmn_test", **kw).double().train()
    ref = create_model("vhmn_test", **kw, fast=False).double().train()
    ref.load_state_dict(fast.state_dict())
    mixers = [m.stages[0][0].mixer for m in (fast, ref)]
    assert mixers[0].linear_refinement and not mixers[1].linear_refinement
    with torch.no_grad():
        for model in (fast, ref):  # learned biases, gains and temperatures away from their starting values
            torch.manual_seed(1)
            for n, p in model.named_parameters():
                if "rel_pos" in n or "log_inv_temp" in n or n.endswith("o.bias") or "neigh" in n:
                    p.normal_(0, 0.5)
    torch.manual_seed(2)
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 2, 3])
    out = [model(x, labels=y) for model in (fast, ref)]
    assert_close(out[0], out[1])
    for o in out:
        o.square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close(p.grad, q.grad, msg=name)


def test_linear_refinement_on_a_large_grid_takes_the_unfold_path():
    """On a grid above DENSE_WINDOW_MAX_TOKENS (24×24 tokens), the fast refinement's window retrievals take the unfold
    path; it still equals the reference loop."""
    kw = dict(local_mode="window", window_stored="input", rel_pos=True, qk_norm=True, refine_steps=2, img_size=96, drop_path=0.0)
    torch.manual_seed(0)
    fast, ref = create_model("vhmn_test", **kw).double(), create_model("vhmn_test", **kw, fast=False).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    fast.eval(), ref.eval()
    assert_close(fast(x), ref(x))


def test_position_embedding_makes_a_bag_of_patches_model_see_where_patches_are():
    """With a window covering the whole grid (k = 15 on 8×8 tokens), no offset biases and no global memory, the mixer
    treats the tokens as a set and the head pools them: permuting the image's 4×4 patches leaves the logits as they
    are. pos_embed adds a learned (1, h·w, d) embedding to the patch tokens, and the same permutation then changes
    them. Another image size resamples the embedding to its grid (bicubic, as timm)."""
    kw = dict(local_mode="window", kernel_size=15, global_memory=False, drop_path=0.0)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    patches = x.reshape(2, 3, 8, 4, 8, 4).permute(0, 2, 4, 1, 3, 5).reshape(2, 64, 3, 4, 4)
    perm = torch.randperm(64)
    shuffled = patches[:, perm].reshape(2, 8, 8, 3, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 32)
    for pos in (False, True):
        torch.manual_seed(1)
        m = create_model("vhmn_test", **kw, pos_embed=pos).double().eval()
        with torch.no_grad():
            same = torch.allclose(m(x), m(shuffled))
        assert same != pos
    assert m.pos_embed.shape == (1, 64, m.cfg.dims[0])
    with torch.no_grad():
        assert m(torch.randn(2, 3, 48, 48, dtype=torch.float64)).shape == (2, m.num_classes)  # a 12×12 grid
    assert "pos_embed" in m.no_weight_decay()


def test_position_biases_and_inverse_temperatures_are_not_weight_decayed():
    """The recipe decays weight matrices only; V-HMN's position embedding and offset biases, its learned inverse
    temperatures (log β_H), its offset gains and the bank's log-prior are left out (VHMN.no_weight_decay), as timm's
    ViT leaves out its position embedding; the projections are decayed."""
    from vhmn.train import param_groups

    m = create_model("vhmn_test", local_mode="hybrid", rel_pos=True, qk_norm=True, offset_gain=True, pos_embed=True)
    decay, no_decay = (set(map(id, g["params"])) for g in param_groups(m, 0.05))
    names = {n: id(p) for n, p in m.named_parameters()}
    for kind in ("pos_embed", "rel_pos", "log_inv_temp", "offset_gain", "bank_bias"):
        hits = [n for n in names if n.rsplit(".", 1)[-1] == kind]
        assert hits, kind
        assert all(names[n] in no_decay for n in hits), kind
    assert names["stages.0.0.mixer.local.retrieval.q.weight"] in decay
    assert names["stages.0.0.mlp.fc1.weight"] in decay


def test_window_descriptor_starts_as_the_plain_window_and_widens_what_a_token_reads():
    """window_descriptor: the neighbours' keys and values come from their k×k descriptors (a depthwise conv of the
    stored tokens), initialised to the identity, so a new model retrieves exactly as the plain window does. Once the
    conv is learned, a token's retrieval reads tokens up to 2·(k // 2) away (a neighbour's own neighbours), and none
    further; the plain window reads k // 2 away."""
    plain, desc = local_of(local_mode="window", rel_pos=True), local_of(local_mode="window", rel_pos=True, window_descriptor=True)
    desc.load_state_dict(plain.state_dict(), strict=False)
    s = torch.randn(1, 49, 32, dtype=torch.float64)
    hw = (7, 7)
    assert_close(desc(s, hw, None), plain(s, hw, None))  # identity at initialisation
    with torch.no_grad():
        desc.neigh.weight.normal_()
    centre = 3 * 7 + 3

    def reads(local, dist):  # does the centre token's retrieval change when a token `dist` columns away does?
        t = s.clone()
        t[0, 3 * 7 + 3 + dist] += 1.0
        return not torch.allclose(local(t, hw, None)[0, centre], local(s, hw, None)[0, centre])

    assert [reads(plain, d) for d in (1, 2)] == [True, False]
    assert [reads(desc, d) for d in (1, 2, 3)] == [True, True, False]


@pytest.mark.parametrize("name", ["window_descriptor", "query_descriptor"])
def test_config_rejects_the_descriptor_options_in_bank_mode(name):
    with pytest.raises(ValueError, match=name):
        create_model("vhmn_test", local_mode="bank", **{name: True})


def test_query_descriptor_starts_as_the_token_query_and_lets_the_query_see_its_neighbours():
    """query_descriptor: the query is projected from the state's k×k descriptor (the same depthwise conv as the
    stored patterns', the identity at first). At initialisation the retrieval is the plain window's; once the conv is
    learned, a token's association depends on its neighbours' states through its query, and not only through the
    neighbours' keys: with the keys held fixed (window_stored='input' tokens given), changing a neighbour changes
    the centre's retrieval only with the descriptor query."""
    plain = local_of(local_mode="window", rel_pos=True, window_stored="input")
    qd = local_of(local_mode="window", rel_pos=True, window_stored="input", query_descriptor=True)
    qd.load_state_dict(plain.state_dict(), strict=False)
    s = torch.randn(1, 49, 32, dtype=torch.float64)
    hw = (7, 7)
    tokens = plain.stored_tokens(s, hw)  # the neighbours' keys and values, fixed
    assert_close(qd(s, hw, None, tokens), plain(s, hw, None, tokens))  # identity at initialisation
    with torch.no_grad():
        qd.neigh.weight.normal_()
    centre = 3 * 7 + 3
    t = s.clone()
    t[0, centre + 1] += 1.0  # a neighbour's state moves; the stored keys and values do not
    assert_close(plain(t, hw, None, tokens)[0, centre], plain(s, hw, None, tokens)[0, centre])
    assert not torch.allclose(qd(t, hw, None, tokens)[0, centre], qd(s, hw, None, tokens)[0, centre])
    t = s.clone()
    t[0, centre + 2] += 1.0  # two columns away: outside the query's 3×3 descriptor
    assert_close(qd(t, hw, None, tokens)[0, centre], qd(s, hw, None, tokens)[0, centre])


CHOSEN_LIKE = dict(local_mode="window", rel_pos=True, kernel_size=5, pos_embed=True, window_stored="input",
                   write_after_read=True, global_label_values=True, window_descriptor=True)


@pytest.mark.parametrize("kw", [dict(CHOSEN_LIKE), dict(CHOSEN_LIKE, window_self=False, qk_norm=True, query_descriptor=True),
                                dict(local_mode="window", kernel_size=3)])
def test_window_association_is_the_weights_of_the_window_retrieval(kw):
    """window_association (B, h, L, k²): rows sum to 1, neighbours outside the grid (and the token itself with
    window_self=False) get 0, and the weights times the neighbours' values are the window retrieval before W_o."""
    torch.manual_seed(0)
    loc = create_model("vhmn_test", **kw).double().stages[0][0].mixer.local
    with torch.no_grad():
        if loc.rel_pos is not None:
            loc.rel_pos.normal_()
        if hasattr(loc, "neigh"):
            loc.neigh.weight.normal_(0, 0.3)
    hw, k = (8, 8), loc.k
    s = torch.randn(2, 64, loc.retrieval.q.in_features, dtype=torch.float64)
    with torch.no_grad():
        p = loc.window_association(s, hw)  # (B, h, L, k²)
        tokens = loc._kv(s, hw)
        ref = loc._unfold_values(loc.retrieval.query(loc.query_input(s, hw)), hw, tokens)  # (B, L, d)
    B, h, L, kk = p.shape
    assert (B, L, kk) == (2, 64, k * k) and h == loc.retrieval.heads
    assert_close(p.sum(-1), torch.ones(B, h, L, dtype=torch.float64))
    r = k // 2
    corner = p[:, :, 0].reshape(B, h, k, k)  # token (0, 0): only the offsets dy, dx ≥ 0 lie inside the grid
    assert (corner[:, :, :r] == 0).all() and (corner[:, :, :, :r] == 0).all()
    inside = corner[:, :, r:, r:].flatten(2)  # the centre (the token itself) first
    if kw.get("window_self", True):
        assert (inside > 0).all()
    else:
        assert (p[..., (k * k) // 2] == 0).all() and (inside[..., 1:] > 0).all()
    values = loc._neighbours(tokens[1], hw)  # (B·L, h, k², e)
    out = torch.einsum("qhk,qhke->qhe", rearrange(p, "b h l k -> (b l) h k"), values)
    assert_close(rearrange(out, "(b l) h e -> b l (h e)", b=B), ref)


def test_inspect_records_the_readout_of_the_prediction_output():
    """mixer_output='prediction': the recorder keeps the T refinement steps and, apart, the readout m(s_T), the
    retrieval the block adds; with β = 1 and T = 1, s_1 = m(u), so the readout is the retrieval at m(u)."""
    torch.manual_seed(0)
    model = create_model("vhmn_test", **CHOSEN_LIKE, mixer_output="prediction", refine_steps=1, refine_rate=1.0).double().eval()
    mixer = model.stages[0][0].mixer
    hw = (8, 8)
    u = torch.randn(2, 64, mixer.local.retrieval.q.in_features, dtype=torch.float64)
    record: list = []
    with torch.no_grad():
        out = mixer._refine(u, hw, {"record": record})
        kv_g, tokens = mixer.glob.project_memory(), mixer.local.stored_tokens(u, hw)
        s1 = mixer.predict(u, hw, None, kv_g, tokens)
        assert_close(out, mixer.predict(s1, hw, None, kv_g, tokens))
        assert_close(out, mixer(u, hw))  # the fast path, which records nothing, agrees
        readout, steps = record[0]["readout"], record[0]["steps"]
        assert len(steps) == 1 and set(readout) == {"pred_error", "window_assoc", "global_assoc"}
        assert_close(readout["window_assoc"], mixer.local.window_association(s1, hw, tokens).mean(1))
        assert_close(steps[0]["window_assoc"], mixer.local.window_association(u, hw, tokens).mean(1))
        assert_close(readout["global_assoc"], mixer.glob.retrieval.association(s1.mean(1, keepdim=True), kv_g).mean(1)[:, 0])
        assert_close(readout["pred_error"], (out - s1).norm(dim=-1).mean(-1))
    full = model.inspect(torch.randn(2, 3, 32, 32, dtype=torch.float64))["blocks"]
    assert all("readout" in b and len(b["steps"]) == 1 and b["steps"][0]["window_assoc"].shape == (2, 64, 25) for b in full)
    state = create_model("vhmn_test", **CHOSEN_LIKE, refine_steps=2).eval().inspect(torch.randn(1, 3, 32, 32))["blocks"]
    assert all("readout" not in b and len(b["steps"]) == 2 for b in state)  # the state output s_T: no readout


def test_write_memory_fills_the_banks_without_training():
    """write_memory(x, index, labels): the scene banks then hold x's provenance (the last `slots` images, FIFO),
    no parameter changes, the mode is restored, and what is predicted depends on what is stored."""
    torch.manual_seed(0)
    model = create_model("vhmn_test", **CHOSEN_LIKE, mixer_output="prediction", global_slots=8).eval()
    params = {n: p.clone() for n, p in model.named_parameters()}
    x, probe = torch.randn(12, 3, 32, 32), torch.randn(4, 3, 32, 32)
    index, labels = torch.arange(100, 112), torch.arange(12) % 10
    with torch.no_grad():
        before = model(probe)
    model.write_memory(x, index=index, labels=labels)
    assert not model.training
    for mixer in (blk.mixer for stage in model.stages for blk in stage):
        prov = mixer.glob.memory.provenance()
        assert sorted(prov["index"].tolist()) == list(range(104, 112))  # 12 written into 8 slots: the last 8 stay
        assert_close(prov["label"], (prov["index"] - 100) % 10)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert not torch.allclose(model(probe), before)
    model.train()
    model.write_memory(x[:2])
    assert model.training and all(blk.mixer.training for stage in model.stages for blk in stage)
    with pytest.raises(ValueError, match="shape"):
        model.write_memory(torch.randn(2, 32, 32))
