"""Continuous user vectors (`csv:`, and 2-D arrays of `npy:`) are standardised per feature with the mean and
standard deviation of the training split, after any held-out class has left it: the model's training data
have mean 0 and std 1. A constant feature keeps std 1. The manifest records both (`standardisation`), so a
sample maps back to the source's units as `x * std + mean`."""
from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.data.prepared import Prepared


def standardise(p: Prepared) -> Prepared:
    train = p.splits["train"][0].astype(np.float64)
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    splits = {k: (((x.astype(np.float64) - mean) / std).astype(np.float32), y) for k, (x, y) in p.splits.items()}
    record = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return dataclasses.replace(p, splits=splits, extra={**p.extra, "standardisation": record}, standardise=False)
