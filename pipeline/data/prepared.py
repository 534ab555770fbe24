"""What a data source returns: seeded train / val / test splits and the DataInfo that sizes a family.

Images are kept as integer levels (uint8) so that the bytes are exact and the number of levels is
known; the data module dequantises them. Vectors are float32, token sequences int64 padded with -1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from lightning_modules.contract import DataInfo

Split = Tuple[np.ndarray, np.ndarray]


@dataclass
class Prepared:
    splits: Dict[str, Split]  # train / val / test (+ holdout)
    info: DataInfo
    source: str
    extra: dict = field(default_factory=dict)  # e.g. the true model's test log-likelihood
    # semi-supervised (`data.labels_per_class`): the indices of the training examples that keep their label
    labels_per_class: Optional[int] = None
    labelled: Optional[np.ndarray] = None
    # continuous user vectors: standardised with the training split's statistics once any held-out class has
    # left it (`pipeline/data/standardise.py`, applied by `sources.load_source`)
    standardise: bool = False


def split_indices(n: int, val_fraction: float, test_fraction: float, rng: np.random.Generator):
    order = rng.permutation(n)
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def three_splits(x, y, dcfg, rng) -> Dict[str, Split]:
    tr, va, te = split_indices(len(x), dcfg.val_fraction, dcfg.test_fraction, rng)
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}
