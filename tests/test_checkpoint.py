"""Checkpoints: round trips, atomic folders with sha256, clear errors, fp16 export/rebuild."""
from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

import vhmn

from _slice import one_thread  # noqa: F401  (autouse fixture)
from vhmn.checkpoint import (
    CheckpointDir,
    CheckpointError,
    export_fp16,
    load_pretrained,
    load_weights_into,
    model_metadata,
    read_weights,
    save_weights,
)


def trained_test_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = vhmn.create_model("vhmn_test", **kw)
    m._vhmn_spec = {"model": "vhmn_test", "model_kwargs": kw}
    m.train()
    m(torch.randn(4, 3, 32, 32), index=torch.arange(4), labels=torch.arange(4))  # fill some bank slots
    return m.eval()


def test_roundtrip_keeps_weights_and_banks(tmp_path):
    m = trained_test_model()
    save_weights(m, tmp_path / "w.safetensors")
    m2 = trained_test_model(seed=1)
    load_weights_into(m2, tmp_path / "w.safetensors")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    banks = m2.memory_banks()
    assert any((b.src_index >= 0).any() for b in banks.values())  # provenance travelled too
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m(x), m2(x))


def test_truncated_and_corrupted_files(tmp_path):
    m = trained_test_model()
    path = tmp_path / "w.safetensors"
    save_weights(m, path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_weights(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_weights(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_weights(tmp_path / "nope.safetensors")


def test_checkpoint_dir_detects_corruption_and_keeps_one(tmp_path):
    m = trained_test_model()
    ck = CheckpointDir(tmp_path / "ck")
    meta = model_metadata(m)
    for epoch in (1, 2):
        ck.save(m, {"epoch": epoch, "step": 10 * epoch, "x": torch.arange(3)}, meta)
    assert json.loads(ck.pointer.read_text())["epoch"] == 2
    assert len(list(ck.folder.glob("*.safetensors"))) == 1 and len(list(ck.folder.glob("state-*.pt"))) == 1
    state = ck.load(trained_test_model(seed=3))
    assert state["epoch"] == 2 and torch.equal(state["x"], torch.arange(3))
    w = ck.weights_path()
    raw = bytearray(w.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte inside a tensor: safetensors itself cannot notice
    w.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted or truncated: sha256"):
        ck.load(trained_test_model())
    with pytest.raises(CheckpointError, match="latest.json is missing"):
        CheckpointDir(tmp_path / "empty").load(m)


def test_other_variant_names_keys_and_shapes(tmp_path):
    save_weights(trained_test_model(), tmp_path / "w.safetensors")
    other = vhmn.create_model("vhmn_test", local_slots=32)
    with pytest.raises(CheckpointError) as e:
        load_weights_into(other, tmp_path / "w.safetensors")
    msg = str(e.value)
    assert "shape differs" in msg and "bank" in msg and "(17, 32) vs model (33, 32)" in msg
    staged = vhmn.create_model("vhmn_test_staged")
    with pytest.raises(CheckpointError, match="(?s)missing in checkpoint.*not in model"):
        load_weights_into(staged, tmp_path / "w.safetensors")


def test_export_fp16_and_load_pretrained(tmp_path):
    m = trained_test_model(refine_steps=1)
    path = export_fp16(m, tmp_path / "m16.safetensors", experiment="unit")
    state, meta = read_weights(path)
    assert meta["model"] == "vhmn_test" and json.loads(meta["model_kwargs"]) == {"refine_steps": 1}
    assert json.loads(meta["vhmn_config"])["refine_steps"] == 1 and meta["experiment"] == "unit"
    assert all(v.dtype in (torch.float16, torch.int64) for v in state.values())
    full = tmp_path / "m32.safetensors"
    save_weights(m, full)
    assert path.stat().st_size < 0.6 * full.stat().st_size
    r = load_pretrained(path)
    assert isinstance(r, vhmn.VHMN) and not r.training and r.cfg.refine_steps == 1
    assert all(p.dtype == torch.float32 for p in r.parameters())
    x = torch.randn(3, 3, 32, 32)
    assert_close(r(x), m(x), atol=2e-2, rtol=0)
    # baselines rebuild from their registered name
    torch.manual_seed(0)
    c = vhmn.create_model("convmixer_cifar", dim=32, depth=1)
    export_fp16(c, tmp_path / "c.safetensors", "convmixer_cifar", {"dim": 32, "depth": 1})
    rc = load_pretrained(tmp_path / "c.safetensors")
    assert_close(rc(x), c.eval()(x), atol=2e-2, rtol=0)
