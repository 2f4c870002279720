"""scripts/gpu_reproduce.py, the lease-sized GPU reproduction, run end to end on CPU (--dry-run).

On the real CIFAR-10: the packed chunks fit what a device call carries and hash to what the manifest says; staging
assembles the training set bit for bit (the 10% stage first, from the subset alone, with the subset's rows equal to
the real ones); every stage of every call trains (tiny models, one epoch) and writes its results with provenance and
the checkpoints it keeps, within the 8 files a call brings back; a corrupted chunk is refused; `ingest` files the
results under results/gpu/; `plan` names every stage.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from _slice import load_script, real_root, one_thread  # noqa: F401  (autouse fixture)

gr = load_script("scripts/gpu_reproduce.py", "gpu_reproduce")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = real_root()
    if root is None:
        pytest.skip("real CIFAR-10 not available (set VHMN_DATA)")
    dest = tmp_path_factory.mktemp("packed")
    return dest, gr.pack(dest, data_root=str(root)), root


def test_chunks_fit_a_call_and_match_the_manifest(packed):
    dest, manifest, _ = packed
    for call, (chunks, _, _) in gr.CALLS.items():
        files = sorted((dest / call).glob("*.npz"))
        assert [f.stem for f in files] == sorted(chunks)
        assert sum(f.stat().st_size for f in files) < 52 * 2**20  # + the working tree (~10 MiB) < 64 MiB a call
        for f in files:
            with np.load(f) as z:
                assert gr.array_sha256(z["images"], z["labels"]) == manifest["chunks"][f.stem]
    assert set(manifest["chunks"]) == {"test", "frac10", *(f"train-{i}" for i in range(gr.TRAIN_CHUNKS))}
    # the shared copy's published file hashes (../shared/data/README.md)
    assert manifest["source_files_sha256"]["test.npz"].startswith("f0af87a8")


def test_dry_run_every_stage_and_ingest(packed, tmp_path, capsys):
    dest, manifest, root = packed
    out = tmp_path / "out"
    assert gr.main(["run", "all", "--dry-run", "--packed", str(dest), "--out", str(out)]) == 0
    log = (out / "gpu_reproduce.log").read_text()
    # call1 staged only the test set and the subset: the 10% stage ran before the training set was whole
    assert "call1: data ready: frac10" in log and "call4: data ready: full" in log
    staged = np.load(out / "_staged" / "cifar10" / "train.npz")
    from vhmn.data import load_arrays

    x, y = load_arrays("cifar10", "train", root, download=False)
    assert gr.array_sha256(staged["images"], staged["labels"]) == manifest["train"]["sha256"] == gr.array_sha256(x, y)
    runs = [r for st in gr.STAGES for r in st.runs]
    for run in runs:
        res = json.loads((out / f"{run.name}.json").read_text())
        assert res["status"] == "complete" and res["provenance"]["command"].startswith("python scripts/gpu_reproduce.py")
        assert res["data"]["subset"] == build_subset(run) and res["provenance"]["device"].startswith("cpu")
        assert (out / f"{run.name}.safetensors").is_file() == run.keep_weights
    for call, (_, keys, bench) in gr.CALLS.items():  # what one call brings back: ≤ 8 files
        n = sum(1 + r.keep_weights for st in gr.STAGES if st.key in keys for r in st.runs) + 1 + bench
        assert n <= 8, call
    results = tmp_path / "results"
    lines = gr.ingest(out, results)
    assert len(lines) == len(runs)
    assert (results / "vhmn_frac10_s0" / "model-fp16.safetensors").is_file()
    assert json.loads((results / "vit_full_e20_s0" / "results.json").read_text())["status"] == "complete"


def build_subset(run):
    from vhmn.train import build_config

    return build_config(run.experiment, run.overrides).subset


def test_a_corrupted_chunk_is_refused(packed, tmp_path):
    dest, _, _ = packed
    bad = tmp_path / "call1"
    bad.mkdir()
    (bad / "manifest.json").write_text((dest / "call1" / "manifest.json").read_text())
    with np.load(dest / "call1" / "test.npz") as z:
        images = z["images"].copy()
        images[0, 0, 0, 0] ^= 1
        np.savez(bad / "test.npz", images=images, labels=z["labels"])
    with pytest.raises(ValueError, match="does not match the manifest"):
        gr.stage_data(bad, tmp_path / "staged")
    with pytest.raises(FileNotFoundError, match="gpu_reproduce.py pack"):
        gr.stage_data(tmp_path / "empty", tmp_path / "staged2")


def test_plan_names_every_stage(capsys):
    assert gr.main(["plan"]) == 0
    text = capsys.readouterr().out
    for st in gr.STAGES:
        assert st.key in text
    assert all(0 < gr.estimate_minutes(st) <= 8 for st in gr.STAGES)  # each stage fits one call with room
