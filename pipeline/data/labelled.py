"""Semi-supervised splits (`data.labels_per_class`): which training examples keep their label.

The fetch stage draws the labelled subset once, seeded, and stores its indices beside the splits
(`train_labelled.npy`); the data module then serves every other training label as `UNLABELLED` (-1), so
the hidden labels never reach a family. Validation and test stay fully labelled for scoring.
"""
from __future__ import annotations

import numpy as np

from lightning_modules.contract import UNLABELLED


def select_labelled(y: np.ndarray, per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` examples of every class (all of a class that has fewer), drawn
    without replacement from a generator seeded by `seed` alone."""
    rng = np.random.default_rng([seed, 7919])  # its own stream: the split's generator is not disturbed
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        chosen.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def hide_labels(y: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """`y` with every label outside `labelled` replaced by UNLABELLED; the hidden values are not read."""
    visible = np.full(len(y), UNLABELLED, dtype=np.int64)
    visible[labelled] = y[labelled]
    return visible
