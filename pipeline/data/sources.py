"""The data sources registry: dataset name -> a loader `(data config, rng) -> Prepared`. Every source
is listed here, so `data.dataset` is validated against one dict; `load_source` applies the hold-out and the labelled subset."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import numpy as np

from pipeline.data import hmm_synthetic, text, toy2d
from pipeline.data.images import TORCHVISION, digits, digits_rows, torchvision_source
from pipeline.data.labelled import select_labelled
from pipeline.data.prepared import Prepared
from pipeline.errors import GenzooError

SOURCES: Dict[str, Callable] = {
    "digits": digits,
    "digits_rows": digits_rows,
    **{name: torchvision_source(name) for name in TORCHVISION},
    "text": text.text,
    **{f"toy2d:{name}": toy2d.toy_source(name) for name in toy2d.TOYS},
    "hmm_synthetic": hmm_synthetic.load,
}


def validate_dataset_name(name: str) -> None:
    if name not in SOURCES:
        raise GenzooError(f"bad value for config key 'data.dataset': must be one of {', '.join(SOURCES)}, not {name!r}")


def load_source(dcfg) -> Prepared:
    validate_dataset_name(dcfg.dataset)
    rng = np.random.default_rng(dcfg.seed)
    prepared = SOURCES[dcfg.dataset](dcfg, rng)
    if dcfg.holdout_class is not None:
        prepared = hold_out_class(prepared, int(dcfg.holdout_class), dcfg.dataset)
    if dcfg.labels_per_class is not None:
        prepared = keep_few_labels(prepared, int(dcfg.labels_per_class), dcfg.seed)
    return prepared


def keep_few_labels(p: Prepared, per_class: int, seed: int) -> Prepared:
    """Semi-supervised data: `per_class` seeded training labels per class are kept (`pipeline/data/labelled.py`)."""
    if p.info.num_classes is None:
        raise GenzooError(f"data.labels_per_class={per_class}: dataset '{p.source}' has no labels")
    y = p.splits["train"][1]
    labelled = select_labelled(y, per_class, p.info.num_classes, seed)
    return dataclasses.replace(p, labels_per_class=per_class, labelled=labelled)


def hold_out_class(p: Prepared, cls: int, dataset: str = "the dataset") -> Prepared:
    """Remove one class from every split; its test examples become the `holdout` (anomaly) split."""
    classes = p.info.num_classes
    if not classes or not 0 <= cls < classes:
        allowed = f"a class of {dataset} (0 to {classes - 1}) or null" if classes else f"null ({dataset} has no labels)"
        raise GenzooError(f"bad value for config key 'data.holdout_class': must be {allowed}, not {cls}")
    splits = {k: (x[y != cls], y[y != cls]) for k, (x, y) in p.splits.items()}
    x, y = p.splits["test"]
    splits["holdout"] = (x[y == cls], y[y == cls])
    return Prepared(splits, p.info, p.source, {**p.extra, "holdout_class": cls})
