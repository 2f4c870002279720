"""The V-HMN backbone (vhmn.model), its registry, and the FLOP counter (vhmn.flops).

Shapes and parameter counts of every registered variant; gradients reach every parameter and
never the episodic slots; training-mode forwards write the banks with correct provenance and eval
forwards write nothing; the refinement reduces to a single retrieval where the equations say so;
the fast path equals the reference path; state dicts round-trip banks and provenance; the window
local mode equals a brute-force per-token computation; the forward pass compiles without graph
breaks; bad inputs raise errors that say what to do.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import vhmn
from vhmn import VHMN, VHMNConfig, create_model, list_models
from vhmn.flops import count
from vhmn.memory import EpisodicMemory
from vhmn.registry import UnknownModelError

VARIANTS = list_models("vhmn_*")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are small: one thread is faster than several contended ones, and steadier."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(B=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, size, size, generator=g)


def banks_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".memory." in k}


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# registry and shapes
# ---------------------------------------------------------------------------------------------
# parameter counts (millions) that each variant should land in
PARAM_RANGE = {
    "vhmn_test": (0.01, 0.1),
    "vhmn_test_staged": (0.01, 0.1),
    "vhmn_tiny_cifar": (3.0, 4.5),
    "vhmn_tiny_cifar100": (3.0, 4.5),
    "vhmn_tiny_svhn": (3.0, 4.5),
    "vhmn_small_cifar": (15.0, 25.0),
    "vhmn_staged_cifar": (3.0, 8.0),
    "vhmn_small_imagenet": (25.0, 50.0),
}


def test_every_variant_has_a_parameter_range():
    assert set(VARIANTS) == set(PARAM_RANGE), "add the new variant to PARAM_RANGE"


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_output_shape_and_params(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters()) / 1e6
    lo, hi = PARAM_RANGE[name]
    assert lo <= n <= hi, f"{name}: {n:.2f} M parameters"
    # episodic slots are buffers of the configured sizes
    blocks = sum(cfg.depths)
    eps = [m for m in model.modules() if isinstance(m, EpisodicMemory)]
    assert len(eps) == blocks * (int(cfg.local_memory) + int(cfg.global_memory))
    # one image; the ImageNet variant at 64×64 (a size its 4-stage grid takes) keeps the suite fast —
    # its 224×224 forward runs in benchmarks/throughput.py
    size = 64 if cfg.img_size > 64 else cfg.img_size
    with torch.no_grad():
        y = model(images(1, size))
    assert y.shape == (1, cfg.num_classes)
    assert torch.isfinite(y).all()


def test_create_model_overrides_and_unknown_field():
    m = create_model("vhmn_test", refine_steps=0, num_classes=7)
    assert m.cfg.refine_steps == 0 and m(images()).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown VHMNConfig fields.*refine_stepz"):
        create_model("vhmn_test", refine_stepz=1)


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(UnknownModelError) as err:
        create_model("vhmn_tset")
    msg = str(err.value)
    assert "vhmn_tset" in msg and "Did you mean vhmn_test" in msg
    for known in ("vhmn_tiny_cifar", "vit_tiny_cifar"):
        assert known in msg


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(memory="ring"), "memory must be one of"),
        (dict(local_mode="conv"), "local_mode must be one of"),
        (dict(global_mod="mul"), "global_mod must be one of"),
        (dict(fusion="max"), "fusion must be one of"),
        (dict(pool="cls"), "pool must be one of"),
        (dict(kernel_size=4), "kernel_size must be odd"),
        (dict(refine_steps=-1), "refine_steps ≥ 0"),
        (dict(refine_rate=0.0), "0 < refine_rate ≤ 1"),
        (dict(refine_rate=1.5), "0 < refine_rate ≤ 1"),
        (dict(dims=(30,)), "divisible by head_dim"),
        (dict(dims=(32, 64), depths=(1,)), "equal length"),
        (dict(local_memory=False, global_memory=False), "at least one"),
        (dict(fusion="concat", global_mod="film"), "global_mod='add'"),
        (dict(img_size=30), "divisible by patch_size"),
    ],
)
def test_bad_config_values(bad, match):
    with pytest.raises(ValueError, match=match):
        create_model("vhmn_test", **bad)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("vhmn_test").eval()


def test_wrong_channel_count(tiny):
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\), got \(2, 1, 32, 32\)"):
        tiny(torch.randn(2, 1, 32, 32))


def test_channels_last_gets_a_hint(tiny):
    with pytest.raises(ValueError, match=r"channels-last\? use x.permute\(0, 3, 1, 2\)"):
        tiny(torch.randn(2, 32, 32, 3))


def test_image_size_that_does_not_fit(tiny):
    with pytest.raises(ValueError, match="30×30 does not fit.*patch_size 4"):
        tiny(torch.randn(1, 3, 30, 30))
    staged = create_model("vhmn_test_staged")  # patch 2, two stages: needs multiples of 4
    with pytest.raises(ValueError, match="divisible by patch_size 2 × 2\\^\\(stages−1\\) = 4"):
        staged(torch.randn(1, 3, 34, 34))
    # a different size that fits is accepted (tokens on a larger grid)
    assert tiny(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_uint8_input_is_rejected_with_a_fix(tiny):
    with pytest.raises(TypeError, match=r"floating-point.*x.float\(\) / 255"):
        tiny(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tiny([[0.0]])


def test_nan_input(tiny):
    x = images()
    x[1, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tiny(x)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
CONFIGS = [
    {},
    dict(memory="learned"),
    dict(local_mode="window"),
    dict(global_mod="film"),
    dict(fusion="concat"),
    dict(pool="attn"),
    dict(local_memory=False),
    dict(global_memory=False),
    dict(refine_steps=0),
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("name", ["vhmn_test", "vhmn_test_staged"])
def test_every_parameter_gets_a_gradient_slots_get_none(name, overrides):
    torch.manual_seed(0)
    model = create_model(name, **overrides).train()
    y = torch.tensor([1, 3])
    loss = F.cross_entropy(model(images(), index=torch.tensor([0, 1]), labels=y), y)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), n
    # not one parameter with an identically zero gradient, but for the scene retrieval behind FiLM's zeros: at
    # initialisation FiLM passes the local retrieval through (γ = δ = 0) and the scene retrieval gets its first
    # gradient once FiLM's own (nonzero) gradient has moved it
    zero = {n for n, p in model.named_parameters() if p.grad.abs().sum() == 0}
    if overrides.get("global_mod") == "film":
        assert zero == {n for n, _ in model.named_parameters() if ".glob." in n}, zero
        assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".film." in n)
        model.zero_grad()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("film.weight"):
                    p.normal_(0, 0.02)
        F.cross_entropy(model(images()), y).backward()
        zero = {n for n, p in model.named_parameters() if p.grad.abs().sum() == 0}
    assert not zero, f"zero gradients: {zero}"
    for n, b in model.named_buffers():
        assert not b.requires_grad and b.grad is None, n
    if overrides.get("memory") == "learned":  # learned slots are parameters and do learn
        slots = [n for n, _ in model.named_parameters() if n.endswith("memory.bank")]
        assert len(slots) == len(model.memory_banks()) > 0
    else:
        param_names = {n for n, _ in model.named_parameters()}
        assert not any(n.endswith("memory.bank") for n in param_names)


# ---------------------------------------------------------------------------------------------
# episodic writes
# ---------------------------------------------------------------------------------------------
def test_train_forward_writes_eval_forward_does_not():
    torch.manual_seed(0)
    model = create_model("vhmn_test")
    before = banks_state(model)
    model.eval()
    with torch.no_grad():
        model(images())
    assert states_equal(before, banks_state(model)), "eval forward changed a bank"
    model.inspect(images())  # inspection runs in eval mode: no writes either
    assert states_equal(before, banks_state(model))
    model.train()
    model(images(), index=torch.tensor([5, 6]), labels=torch.tensor([1, 2]))
    after = banks_state(model)
    for name, bank in model.memory_banks().items():
        key = f"{name}.bank"
        assert not torch.equal(before[key], after[key]), f"{name} not written"
        assert int(bank.writes) > 0


def test_write_provenance_points_at_the_written_token():
    """Every local slot holds the descriptor of token ``src_pos`` of image ``src_index``."""
    torch.manual_seed(0)
    model = create_model("vhmn_test", local_writes=8).train()
    x = images(3)
    index, labels = torch.tensor([100, 101, 102]), torch.tensor([3, 7, 1])
    model(x, index=index, labels=labels)
    mixer = model.stages[0][0].mixer
    with torch.no_grad():  # block 0's normalised input u and the local descriptor the bank stores
        z = model.patch_embed(x).flatten(2).transpose(1, 2)  # (B, L, d), row-major token order
        u = model.stages[0][0].norm1(z)
        desc = mixer.local.descriptor(u, (8, 8))
    mem = mixer.local.memory
    prov = mem.provenance()
    written = prov["index"] >= 0
    assert int(written.sum()) == 8
    for slot in written.nonzero().flatten().tolist():
        b = int(prov["index"][slot]) - 100
        pos = int(prov["position"][slot])
        assert 0 <= pos < 64
        assert int(prov["label"][slot]) == int(labels[b])
        assert_close(mem.bank[slot], desc[b, pos], atol=1e-5, rtol=1e-5)
    # global bank: the scene vector (mean of u) of each image, position 0
    g = mixer.glob.memory
    gp = g.provenance()
    assert sorted(gp["index"][gp["index"] >= 0].tolist()) == [100, 101, 102]
    for slot in (gp["index"] >= 0).nonzero().flatten().tolist():
        b = int(gp["index"][slot]) - 100
        assert int(gp["position"][slot]) == 0 and int(gp["label"][slot]) == int(labels[b])
        assert_close(g.bank[slot], u[b].mean(0), atol=1e-5, rtol=1e-5)


def test_token_position_maps_to_the_image_patch():
    """Position p is the patch at row p // w, column p % w: changing only that patch changes only
    the patch embedding of token p."""
    model = create_model("vhmn_test").eval()
    p, w = model.cfg.patch_size, 8
    x = images(1)
    pos = 27  # row 3, column 3
    x2 = x.clone()
    x2[0, :, (pos // w) * p : (pos // w + 1) * p, (pos % w) * p : (pos % w + 1) * p] += 1.0
    with torch.no_grad():
        t1 = model.patch_embed(x).flatten(2).transpose(1, 2)[0]
        t2 = model.patch_embed(x2).flatten(2).transpose(1, 2)[0]
    changed = (t1 - t2).abs().sum(-1) > 1e-6
    assert changed.nonzero().flatten().tolist() == [pos]


def test_missing_index_and_labels_are_recorded_as_unknown():
    torch.manual_seed(0)
    model = create_model("vhmn_test").train()
    model(images())
    prov = model.stages[0][0].mixer.local.memory.provenance()
    written = prov["position"] >= 0
    assert written.sum() == 8
    assert (prov["index"][written] == -1).all() and (prov["label"][written] == -1).all()


def test_class_balanced_global_memory_via_the_model():
    torch.manual_seed(0)
    model = create_model("vhmn_test", global_class_balanced=True, global_slots=20).train()  # 2 per class
    with pytest.raises(ValueError, match="labels=y"):
        model(images())
    labels = torch.tensor([4, 4, 4, 9])
    model(images(4), index=torch.arange(4), labels=labels)
    mem = model.stages[0][0].mixer.glob.memory
    lab = mem.provenance()["label"]
    assert lab[8:10].tolist() == [4, 4] and lab[18].item() == 9
    assert mem.provenance()["index"][8:10].tolist() == [0, 1]  # the third class-4 image overflowed
    assert int((lab >= 0).sum()) == 3
    assert mem.patterns().shape[0] == 20  # the sink row is never read


# ---------------------------------------------------------------------------------------------
# refinement
# ---------------------------------------------------------------------------------------------
def test_refine_steps_zero_is_a_single_retrieval():
    torch.manual_seed(0)
    model = create_model("vhmn_test", refine_steps=0).eval()
    mixer = model.stages[0][0].mixer
    u = torch.randn(2, 64, 32)
    with torch.no_grad():
        kv_l, kv_g = mixer.local.project_memory(), mixer.glob.project_memory()
        m = mixer.predict(u, (8, 8), kv_l, kv_g)
        assert_close(mixer(u, (8, 8)), m)
        # m(u) = local retrieval of the k×k descriptor + the global scene retrieval (sum fusion)
        loc = mixer.local.retrieval(mixer.local.descriptor(u, (8, 8)), kv_l)
        glob = mixer.glob.retrieval(u.mean(1, keepdim=True), kv_g)
        assert_close(m, loc + glob)


def test_refinement_equals_unrolled_predictive_coding():
    torch.manual_seed(0)
    model = create_model("vhmn_test", refine_steps=3, refine_rate=0.3).eval()
    mixer = model.stages[0][0].mixer
    u = torch.randn(2, 64, 32)
    with torch.no_grad():
        kv = (mixer.local.project_memory(), mixer.glob.project_memory())
        z = u
        for _ in range(3):
            z = z + 0.3 * (mixer.predict(z, (8, 8), *kv) - z)
        assert_close(mixer(u, (8, 8)), z)


def test_rate_one_single_step_equals_plain_retrieval_whole_model():
    torch.manual_seed(0)
    plain = create_model("vhmn_test", refine_steps=0).eval()
    one = create_model("vhmn_test", refine_steps=1, refine_rate=1.0).eval()
    one.load_state_dict(plain.state_dict())
    two = create_model("vhmn_test", refine_steps=2).eval()
    two.load_state_dict(plain.state_dict())
    x = images()
    with torch.no_grad():
        assert_close(one(x), plain(x))
        assert (two(x) - plain(x)).abs().max() > 1e-4  # refinement does change the output


# ---------------------------------------------------------------------------------------------
# fast path, state dict, seeds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vhmn_test", "vhmn_test_staged"])
def test_fast_path_equals_reference_path(name):
    torch.manual_seed(0)
    fast = create_model(name, pool="attn")
    ref = create_model(name, pool="attn", fast=False)
    ref.load_state_dict(fast.state_dict())
    x = images()
    fast.eval(), ref.eval()
    assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-4)
    # gradients agree too (training mode, same writes: same RNG state)
    fast.train(), ref.train()
    torch.manual_seed(1)
    fast(x).square().sum().backward()
    torch.manual_seed(1)
    ref(x).square().sum().backward()
    for (n, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters()):
        assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-3, msg=n)
    bf, br = banks_state(fast), banks_state(ref)  # same slots and provenance; features to rounding
    assert bf.keys() == br.keys()
    for k in bf:
        assert_close(bf[k], br[k], atol=1e-5, rtol=1e-4, msg=k)


def test_state_dict_round_trip_with_banks_and_provenance(tmp_path):
    torch.manual_seed(0)
    model = create_model("vhmn_test").train()
    for step in range(3):
        model(images(seed=step), index=torch.arange(2) + 2 * step, labels=torch.tensor([step, step + 1]))
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    for key in ("bank", "ptr", "src_index", "src_pos", "src_label", "writes"):
        assert f"stages.0.0.mixer.local.memory.{key}" in sd
    other = create_model("vhmn_test")
    other.load_state_dict(sd)
    assert states_equal(banks_state(model), banks_state(other))
    model.eval(), other.eval()
    assert torch.equal(model(images(seed=9)), other(images(seed=9)))
    # both continue writing at the same slots
    model.train(), other.train()
    torch.manual_seed(5)
    model(images(seed=10), index=torch.tensor([50, 51]))
    torch.manual_seed(5)
    other(images(seed=10), index=torch.tensor([50, 51]))
    assert states_equal(banks_state(model), banks_state(other))


def test_same_seed_same_model_same_output():
    def run():
        torch.manual_seed(123)
        m = create_model("vhmn_test_staged").train()
        y = m(images(), index=torch.tensor([0, 1]), labels=torch.tensor([0, 1]))
        return y, banks_state(m)

    (y1, b1), (y2, b2) = run(), run()
    assert torch.equal(y1, y2) and states_equal(b1, b2)


# ---------------------------------------------------------------------------------------------
# window local mode and staged layout
# ---------------------------------------------------------------------------------------------
def brute_force_window(local, s, hw):
    """For each token: attend to its k×k neighbours that lie inside the grid (no padding)."""
    r, (H, W), k = local.retrieval, hw, local.k
    B, L, d = s.shape
    e = r.head_dim
    q, kk, vv = r.q(s), r.k(s), r.v(s)
    out = torch.zeros(B, L, d)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                nb = [
                    yy * W + xx
                    for yy in range(y - k // 2, y + k // 2 + 1)
                    for xx in range(x - k // 2, x + k // 2 + 1)
                    if 0 <= yy < H and 0 <= xx < W
                ]
                for h in range(r.heads):
                    sl = slice(h * e, (h + 1) * e)
                    p = torch.softmax(r.inv_temp * kk[b, nb, sl] @ q[b, y * W + x, sl], dim=0)
                    out[b, y * W + x, sl] = p @ vv[b, nb, sl]
    return r.o(out)


def test_window_mode_equals_brute_force_and_masks_out_of_grid():
    torch.manual_seed(0)
    model = create_model("vhmn_test", local_mode="window", kernel_size=3).eval()
    local = model.stages[0][0].mixer.local
    s = torch.randn(2, 24, 32)  # a 4×6 grid: corners have 4 neighbours, edges 6, inside 9
    with torch.no_grad():
        got = local(s, (4, 6), None)
        assert_close(got, brute_force_window(local, s, (4, 6)), atol=1e-5, rtol=1e-4)
        # zero padding taken as real neighbours would differ at the border
        r = local.retrieval
        q = r.q(s[:, :1])  # token 0 (a corner)
        pad = torch.cat([torch.zeros(2, 5, 32), r.k(s[:, [0, 1, 6, 7]])], 1)
        padded_p = torch.softmax(r.inv_temp * (pad[..., :16] @ q[..., :16].transpose(1, 2)), 1)
        assert padded_p[:, :5].sum() > 0.01  # would have taken weight; the mask gives them none
    assert not hasattr(local, "memory")  # window mode has no local bank
    k5 = create_model("vhmn_test", local_mode="window", kernel_size=5).eval().stages[0][0].mixer.local
    with torch.no_grad():
        assert_close(k5(s, (4, 6), None), brute_force_window(k5, s, (4, 6)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("hw", [(4, 6), (8, 8), (1, 5)])
def test_window_fast_path_equals_the_unfold_reference_values_and_gradients(hw, k):
    torch.manual_seed(0)
    local = create_model("vhmn_test", local_mode="window", kernel_size=k).stages[0][0].mixer.local
    s = torch.randn(3, hw[0] * hw[1], 32, dtype=torch.float64, requires_grad=True)
    local = local.double()
    assert local.fast and hw[0] * hw[1] <= local.DENSE_WINDOW_MAX_TOKENS
    fast = local(s, hw, None)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), s)
    ref = local._window_unfold(s, hw)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), s)
    assert_close(fast, ref, atol=1e-12, rtol=1e-10)
    assert_close(g_fast, g_ref, atol=1e-12, rtol=1e-10)
    # the mask: each token sees exactly its in-grid k×k window (itself included)
    mask = local.neighbourhood_mask(hw)
    H, W = hw
    counts = [(min(y + k // 2, H - 1) - max(y - k // 2, 0) + 1) * (min(x + k // 2, W - 1) - max(x - k // 2, 0) + 1)
              for y in range(H) for x in range(W)]
    assert mask.sum(1).tolist() == counts and mask.diagonal().all() and torch.equal(mask, mask.T)


def test_window_mode_takes_the_unfold_path_on_large_grids(monkeypatch):
    torch.manual_seed(0)
    local = create_model("vhmn_test", local_mode="window").eval().stages[0][0].mixer.local
    s = torch.randn(2, 24, 32)
    calls = []
    monkeypatch.setattr(type(local), "_window_dense", lambda self, *a: calls.append("dense") or None)
    monkeypatch.setattr(local, "DENSE_WINDOW_MAX_TOKENS", 23)
    with torch.no_grad():
        assert_close(local(s, (4, 6), None), brute_force_window(local, s, (4, 6)), atol=1e-5, rtol=1e-4)
    assert calls == []  # 24 tokens > 23: the unfold path
    local.fast = False
    monkeypatch.setattr(local, "DENSE_WINDOW_MAX_TOKENS", 10_000)
    with torch.no_grad():
        assert_close(local(s, (4, 6), None), brute_force_window(local, s, (4, 6)), atol=1e-5, rtol=1e-4)
    assert calls == []  # fast=False: the reference path


def test_staged_layout():
    torch.manual_seed(0)
    model = create_model("vhmn_test_staged")
    assert model.cfg.layout == "staged" and len(model.merges) == 1
    x = images()
    out = model.inspect(x)
    assert [b["hw"] for b in out["blocks"]] == [(16, 16), (8, 8)]
    assert [b["stage"] for b in out["blocks"]] == [0, 1]
    z = model.forward_features(x)
    assert z.shape == (2, 64, 32)
    assert model.forward_head(z, pre_logits=True).shape == (2, 32)
    assert create_model("vhmn_test").cfg.layout == "isotropic"


# ---------------------------------------------------------------------------------------------
# inspection
# ---------------------------------------------------------------------------------------------
def test_inspect_associations_and_topk_provenance():
    torch.manual_seed(0)
    model = create_model("vhmn_test", refine_steps=2).train()
    for step in range(4):  # fill part of the banks with known provenance
        model(images(seed=step), index=torch.tensor([10 * step, 10 * step + 1]), labels=torch.tensor([step, 9]))
    out = model.inspect(images(seed=7), topk=3)
    assert model.training, "inspect restores training mode"
    assert_close(out["logits"], model.eval()(images(seed=7)))
    assert len(out["blocks"]) == 2
    for entry, block in zip(out["blocks"], model.stages[0]):
        assert len(entry["steps"]) == 2
        for st in entry["steps"]:
            assert st["local_assoc"].shape == (2, 64, 16) and st["global_assoc"].shape == (2, 8)
            assert_close(st["local_assoc"].sum(-1), torch.ones(2, 64))
            assert_close(st["global_assoc"].sum(-1), torch.ones(2))
            assert st["pred_error"].shape == (2,) and (st["pred_error"] >= 0).all()
        top = entry["local_top"]
        assert top["slot"].shape == (2, 64, 3)
        assert (top["weight"][..., :-1] >= top["weight"][..., 1:]).all()
        prov = block.mixer.local.memory.provenance()
        assert torch.equal(top["index"], prov["index"][top["slot"]])
        assert torch.equal(top["position"], prov["position"][top["slot"]])
        assert torch.equal(top["label"], prov["label"][top["slot"]])
        gtop = entry["global_top"]
        assert torch.equal(gtop["label"], block.mixer.glob.memory.provenance()["label"][gtop["slot"]])
        assert_close(gtop["weight"], entry["steps"][-1]["global_assoc"].topk(3, -1).values)


# ---------------------------------------------------------------------------------------------
# precision and compilation
# ---------------------------------------------------------------------------------------------
def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    torch.manual_seed(0)
    model = create_model("vhmn_test").eval()
    x = images(4)
    with torch.no_grad():
        ref = model.forward_features(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.forward_features(x)
            logits = model(x)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    err = (low.float() - ref).norm() / ref.norm()
    assert err < 0.03, f"relative error {err:.4f}"


def test_compiles_without_graph_breaks_in_train_and_eval():
    """``fullgraph=True`` raises on any graph break; the eager backend keeps this test fast."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("vhmn_test").train()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    args = (images(seed=1), torch.tensor([4, 5]), torch.tensor([6, 7]))
    torch.manual_seed(3)
    y = compiled(*args)  # training mode: writes into the banks inside the graph
    torch.manual_seed(3)
    y_ref = ref(*args)
    assert_close(y, y_ref)
    assert states_equal(banks_state(model), banks_state(ref))
    assert int(model.stages[0][0].mixer.local.memory.writes) == 8
    model.eval(), ref.eval()
    before = banks_state(model)
    assert_close(compiled(images(seed=2)), ref(images(seed=2)))
    assert states_equal(before, banks_state(model))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# FLOP and parameter counter
# ---------------------------------------------------------------------------------------------
def _sum(res, key):
    return sum(v[key] for k, v in res.items() if k != "total")


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("vhmn_test", {}),
        ("vhmn_test", dict(local_mode="window", pool="attn", global_mod="film")),
        ("vhmn_test_staged", dict(fusion="concat")),
        ("vhmn_test", dict(memory="learned", refine_steps=3)),
    ],
)
def test_flops_components_add_up(name, overrides):
    model = create_model(name, **overrides)
    res = count(model, batch_size=2)
    assert _sum(res, "flops") == res["total"]["flops"] > 0
    assert _sum(res, "params") == res["total"]["params"] == sum(p.numel() for p in model.parameters())
    assert res["refinement"]["params"] == 0


def test_flops_match_hand_counts():
    cfg = create_model("vhmn_test").cfg
    model = create_model("vhmn_test", refine_steps=1)
    res = count(model, batch_size=1)
    d, p, L, depth = 32, cfg.patch_size, 64, 2
    assert res["patch_embed"]["flops"] == 2 * L * d * 3 * p * p
    assert res["mlp"]["flops"] == depth * 2 * L * 2 * d * 4 * d
    assert res["head"]["flops"] == 2 * d * 10
    N_l, N_g, k = cfg.local_slots, cfg.global_slots, cfg.kernel_size
    local = 2 * L * d * k * k + 2 * N_l * d * d * 2 + 2 * L * d * d * 2 + 2 * L * N_l * d * 2
    glob = 2 * N_g * d * d * 2 + 2 * d * d * 2 + 2 * N_g * d * 2
    assert res["local"]["flops"] == depth * local
    assert res["global"]["flops"] == depth * glob
    assert res["refinement"]["flops"] == 0


def test_flops_grow_linearly_with_refine_steps():
    f = [count(create_model("vhmn_test", refine_steps=t), batch_size=2)["total"]["flops"] for t in range(5)]
    assert f[0] == f[1]  # T=0 and T=1 both compute one prediction
    step = f[2] - f[1]
    assert step > 0 and all(f[t + 1] - f[t] == step for t in range(1, 4))
    r = count(create_model("vhmn_test", refine_steps=3), batch_size=2)
    assert r["refinement"]["flops"] == 2 * step  # (T − 1) extra predictions, per image
    # an extra prediction costs the per-token part of local + global (bank projections are once)
    assert step // 2 < r["local"]["flops"] + r["global"]["flops"]


def test_flops_per_image_extrapolates_the_batch_exactly():
    from vhmn.flops import count_per_image

    model = create_model("vhmn_test")
    at4 = count(model, batch_size=4)
    est = count_per_image(model, batch_size=4)
    for comp in at4:
        assert abs(est[comp]["flops"] - at4[comp]["flops"]) <= 1, comp
    # the bank projections are shared: FLOPs per image fall with the batch size
    assert count_per_image(model, 64)["total"]["flops"] < at4["total"]["flops"]


def test_flops_for_timm_vit():
    vit = create_model("vit_tiny_cifar")
    res = count(vit)
    assert set(res) == {"patch_embed", "attn", "mlp", "norm", "head", "total"}
    assert _sum(res, "flops") == res["total"]["flops"]
    assert _sum(res, "params") == res["total"]["params"] == sum(p.numel() for p in vit.parameters())
    L, d, depth = 64, 192, 6
    attn = 2 * L * d * 3 * d + 2 * L * L * d * 2 + 2 * L * d * d
    assert res["attn"]["flops"] == depth * attn
    # same width/depth V-HMN: identical MLP cost
    assert count(create_model("vhmn_tiny_cifar"))["mlp"]["flops"] == res["mlp"]["flops"]


def test_package_exports():
    assert vhmn.VHMN is VHMN and isinstance(create_model("vhmn_test").cfg, VHMNConfig)
