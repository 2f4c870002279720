"""No host-device synchronisation in a V-HMN training step on a GPU (issue 13: the step must be able to run ahead
of the host, and later under CUDA graphs).

``torch.cuda.set_sync_debug_mode("error")`` makes every operation that would synchronise the host with the device
raise. Under it, a full training step — forward in training mode (the banks are written), loss, backward, gradient
clipping, the fused AdamW step — runs for the default model and for the converged CPU protocol's chosen candidate
(window mode with the input neighbours stored, write-after-read, label values, a position embedding), with every bank write
checked to have happened. Skipped where there is no GPU (here and in CI); ``scripts/gpu_reproduce.py`` runs it in
its first device call.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _slice import load_script
from vhmn import create_model
from vhmn.train import parse_override

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def best_candidate() -> dict:
    """The model fields of scripts/cpu_experiments.py's CHOSEN candidate (one definition, read from the script)."""
    mod = load_script("scripts/cpu_experiments.py", "cpu_experiments")
    return {k.removeprefix("model."): v for k, v in map(parse_override, mod.CANDIDATES[mod.CHOSEN])}


BEST = best_candidate()


@cuda
@pytest.mark.parametrize("kw", [{}, BEST], ids=["default", "best_candidate"])
def test_training_step_never_syncs_the_host(kw):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = create_model("vhmn_test", **kw).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(8, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (8,), device=dev)
    idx = torch.arange(8, device=dev)
    banks = model.memory_banks()
    before = {n: m.writes.clone() for n, m in banks.items() if hasattr(m, "writes")}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # the second step also reads what the first one wrote
            loss = F.cross_entropy(model(x, index=idx, labels=y), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(loss).item()
    for name, w in before.items():
        assert banks[name].writes.item() > w.item(), f"{name} was not written"
