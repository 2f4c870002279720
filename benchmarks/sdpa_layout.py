"""Micro-benchmark: the layout of V-HMN's bank retrieval in ``F.scaled_dot_product_attention``.

vhmn.memory.HopfieldRetrieval folds the queries of all B images into one sequence,
q (1, h, B·L, e) against the shared bank k, v (1, h, N, e). The alternative keeps the batch axis,
q (B, h, L, e), with k, v expanded (stride-0 views) to (B, h, N, e). Same result; different
parallelism in the fused kernels (the backward of flash attention parallelises over key blocks
and batch × heads). Prints forward+backward time of both layouts.

    python benchmarks/sdpa_layout.py [--device cuda] [--batch 256] [--tokens 64] [--slots 512]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def bench(fn, device, steps=20, warmup=5):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--slots", type=int, nargs="+", default=[256, 512, 5000])
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=32)
    a = p.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    B, L, h, e = a.batch, a.tokens, a.heads, a.head_dim
    print(f"device {dev}, {dtype}, B={B}, L={L}, heads={h}, head_dim={e}: forward+backward ms")
    print(f"{'slots':>6}{'folded (1,h,B·L,e)':>22}{'batched (B,h,L,e)':>20}{'speed-up':>10}")
    for N in a.slots:
        q = torch.randn(B, h, L, e, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(1, h, N, e, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(1, h, N, e, device=dev, dtype=dtype, requires_grad=True)

        def folded():
            qf = q.transpose(0, 1).reshape(1, h, B * L, e)
            F.scaled_dot_product_attention(qf, k, v).float().sum().backward()

        def batched():
            F.scaled_dot_product_attention(q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)).float().sum().backward()

        with torch.no_grad():  # same numbers
            qf = q.transpose(0, 1).reshape(1, h, B * L, e)
            a1 = F.scaled_dot_product_attention(qf, k, v).reshape(h, B, L, e).transpose(0, 1)
            a2 = F.scaled_dot_product_attention(q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
            assert (a1.float() - a2.float()).abs().max() < 2e-2
        t1, t2 = bench(folded, dev), bench(batched, dev)
        print(f"{N:>6}{t1:>22.3f}{t2:>20.3f}{t1 / t2:>9.2f}×")


if __name__ == "__main__":
    main()
