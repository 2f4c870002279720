"""Distributed training on CPU: two processes (gloo) run the real Trainer under DDP.

* learned memory (no episodic writes): two ranks with half batches compute exactly what one
  process computes with the whole batch — same global batches, same augmentation, averaged
  gradients — so the final weights match a single-process run;
* episodic memory: each rank writes its own micro-batch, and after the epoch-end
  ``sync_memory`` every rank holds rank 0's banks: weights and banks are identical across ranks;
* the training shards of the two ranks are disjoint.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from vhmn.checkpoint import unwrap
from vhmn.train import TrainConfig, Trainer

from _slice import session_slice, one_thread  # noqa: F401  (autouse fixture)


def config(root, out, **kw) -> TrainConfig:
    base = dict(name="ddp", model="vhmn_test", dataset="cifar10", data_root=str(root), train_limit=128, test_limit=64,
                epochs=2, batch_size=32, lr=2e-3, warmup_epochs=0.5, device="cpu", bf16=False, compile=False,
                ckpt_every=1, out_dir=str(out), export_fp16=False)
    base.update(kw)
    return TrainConfig(**base)


def _worker(rank: int, world: int, root: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        out = {}
        for memory in ("learned", "episodic"):
            t = Trainer(config(root, f"{tmp}/{memory}", model_kwargs={"memory": memory}))
            assert t.world_size == world and t.train_loader.batch_size == 32 // world
            t.train_loader.set_epoch(0)
            shard = torch.cat([i for _, _, i in t.train_loader])
            res = t.fit()
            out[memory] = {"state": {k: v.clone() for k, v in unwrap(t.model).state_dict().items()},
                           "shard": shard, "final": res["final"]}
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = session_slice(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(root), str(tmp)), nprocs=2, join=True)
    return root, tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_shards_are_disjoint_and_cover_the_epoch(ranks):
    _, _, (r0, r1) = ranks
    a, b = set(r0["episodic"]["shard"].tolist()), set(r1["episodic"]["shard"].tolist())
    assert not a & b and len(a) == len(b) == 64 and a | b == set(range(128))


def test_banks_and_weights_identical_across_ranks(ranks):
    _, _, (r0, r1) = ranks
    s0, s1 = r0["episodic"]["state"], r1["episodic"]["state"]
    banks = [k for k in s0 if ".memory." in k]
    assert banks and all(torch.equal(s0[k], s1[k]) for k in s0)
    written = s0["stages.0.0.mixer.glob.memory.src_index"][:-1]
    assert (written >= 0).all()  # the banks hold real training features, with provenance
    assert r0["episodic"]["final"] == r1["episodic"]["final"]


def test_two_ranks_equal_one_process(ranks, tmp_path):
    root, tmp, (r0, _) = ranks
    torch.set_num_threads(1)
    single = Trainer(config(root, tmp_path, model_kwargs={"memory": "learned"}))
    res = single.fit()
    ref = unwrap(single.model).state_dict()
    for k, v in r0["learned"]["state"].items():
        if v.is_floating_point():
            assert_close(v, ref[k], atol=1e-5, rtol=1e-4, msg=k)
    assert r0["learned"]["final"]["test_acc"] == res["final"]["test_acc"]
    assert json.loads((tmp / "learned" / "results.json").read_text())["provenance"]["world_size"] == 2
