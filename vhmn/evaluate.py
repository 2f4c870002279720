"""Evaluate a checkpoint on a test set.

    python -m vhmn.evaluate runs/cifar10_vhmn                      # a run folder (its latest checkpoint)
    python -m vhmn.evaluate runs/cifar10_vhmn/checkpoint
    python -m vhmn.evaluate results/cifar10/cifar10_vhmn/model-fp16.safetensors --limit 1000
    python -m vhmn.evaluate MODEL.safetensors --dataset cifar10 --out eval.json

The model is rebuilt from the weights file's metadata (:func:`vhmn.checkpoint.load_pretrained`).
Prints the accuracy and writes a small JSON (default ``<checkpoint folder>/eval-<dataset>.json``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointDir, CheckpointError, load_pretrained, read_weights
from .provenance import collect

__all__ = ["resolve_weights", "normalize_images", "predict_arrays", "evaluate_model", "main"]


def resolve_weights(path: str | Path) -> Path:
    """A run folder, a checkpoint folder, or a .safetensors file → the weights file."""
    p = Path(path)
    if p.is_file():
        return p
    for folder in (p / "checkpoint", p):
        if (folder / "latest.json").is_file():
            return CheckpointDir(folder).weights_path()
    if (p / "model-fp16.safetensors").is_file():
        return p / "model-fp16.safetensors"
    raise CheckpointError(f"{path}: not a .safetensors file, a run folder or a checkpoint folder (no latest.json)")


def normalize_images(images, dataset: str = "cifar10") -> torch.Tensor:
    """uint8 images (n, H, W, 3), as :func:`vhmn.data.load_arrays` returns them → float32 (n, 3, H, W), scaled to
    [0, 1] and normalised by the dataset's mean and std: what the training loader feeds the model."""
    import numpy as np

    from .data import DATASETS

    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} of shape {tuple(getattr(images, 'shape', ()))}"
        raise ValueError(f"expected a uint8 numpy array of images (n, H, W, 3), got {got}; "
                         "load them with vhmn.data.load_arrays, or convert with np.asarray(images, dtype=np.uint8)")
    info = DATASETS[dataset]
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    return (torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2) - mean) / std


@torch.no_grad()
def predict_arrays(model: torch.nn.Module, images, dataset: str = "cifar10", batch_size: int = 250):
    """The predicted classes (n,) int64 numpy of uint8 images (n, H, W, 3), in eval mode, ``batch_size`` at a time
    (the same batches give the same predictions bit for bit: the robustness results store them)."""
    import numpy as np

    was_training = model.training
    model.eval()
    try:
        out = [model(normalize_images(images[s : s + batch_size], dataset)).argmax(-1) for s in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset: str = "cifar10", limit: int | None = None, batch_size: int = 500,
                   device: str | torch.device = "cpu", root=None) -> dict:
    """Top-1 accuracy, mean cross-entropy and per-class accuracy of ``model`` on the first ``limit`` test images.

    ``per_class_accuracy[c]`` is the accuracy on the test images of class c (NaN for a class with no image
    among them); it is what a long-tailed training set is judged by.
    """
    import numpy as np

    from .data import DATASETS, load_arrays
    from .loader import DeviceLoader

    info = DATASETS[dataset]
    images, labels = load_arrays(dataset, "test", root)
    idx = np.arange(min(limit, len(labels))) if limit else None
    loader = DeviceLoader(images, labels, batch_size, indices=idx, train=False, mean=info.mean, std=info.std, device=device)
    model = model.to(device).eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    per_class = torch.zeros(2, info.num_classes, dtype=torch.float64, device=device)  # correct, images
    for x, y, _ in loader:
        logits = model(x)
        hit = (logits.argmax(-1) == y).double()
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        per_class[0].index_add_(0, y, hit)
        per_class[1].index_add_(0, y, torch.ones_like(hit))
    loss = loss_sum.item()
    correct, n = per_class.sum(1).tolist()  # counts: exact in float64
    class_acc = [c / k if k else float("nan") for c, k in zip(*per_class.tolist())]
    return {"dataset": dataset, "images": int(n), "accuracy": correct / n, "loss": loss / n,
            "per_class_accuracy": class_acc}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vhmn.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="run folder, checkpoint folder or .safetensors file")
    ap.add_argument("--dataset", default=None, help="default: the dataset recorded in the checkpoint")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images")
    ap.add_argument("--data-root", default=None, help="data root (default: $VHMN_DATA or ./data)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON file to write (default: next to the checkpoint)")
    args = ap.parse_args(argv)
    try:
        path = resolve_weights(args.checkpoint)
        _, meta = read_weights(path)
        model = load_pretrained(path, args.device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dataset = args.dataset or meta.get("dataset") or "cifar10"
    t0 = time.perf_counter()
    result = evaluate_model(model, dataset, args.limit, device=args.device, root=args.data_root)
    result.update(checkpoint=str(path), model=meta.get("model"), experiment=meta.get("experiment"),
                  epoch=meta.get("epoch"), seconds=round(time.perf_counter() - t0, 2),
                  provenance={**collect(args.device), "command": "python -m vhmn.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])})
    print(f"{meta.get('model')} on {dataset} ({result['images']} test images): accuracy {result['accuracy']:.4f}, "
          f"loss {result['loss']:.4f}")
    out = Path(args.out) if args.out else path.parent / f"eval-{dataset}.json"
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
