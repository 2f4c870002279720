"""Merge consecutive stdout/stderr outputs of a cell into one (as a reader's run shows them), in place.

    python scripts/coalesce_streams.py book/07_training_cifar10.ipynb [...]

A kernel may flush one print loop's output as several stream messages, depending on timing; stored that way it
makes noisy diffs. nbval compares the coalesced text, so the merge changes nothing it checks.
"""
from __future__ import annotations

import sys

import nbformat
from nbconvert.preprocessors import CoalesceStreamsPreprocessor


def main(paths: list[str]) -> int:
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        CoalesceStreamsPreprocessor().preprocess(nb, {})
        nbformat.write(nb, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
