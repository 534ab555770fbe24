"""The data sources registry: dataset name -> a loader `(data config, rng) -> Prepared`. Every source
is listed here, so `data.dataset` is validated against one dict; `load_source` applies the hold-out, the
standardisation of continuous user vectors and the labelled subset.

A user's own data is named by a prefix and a path (`csv:data/user/wine.csv`): `USER_SOURCES` maps the
prefix to a loader `(data config, rng, path) -> Prepared`."""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Dict

import numpy as np

from pipeline.data import hmm_synthetic, text, toy2d, user_arrays, user_csv, user_images
from pipeline.data.images import TORCHVISION, digits, digits_rows, torchvision_source
from pipeline.data.labelled import select_labelled
from pipeline.data.names import user_source
from pipeline.data.prepared import Prepared
from pipeline.data.standardise import standardise
from pipeline.errors import GenzooError

SOURCES: Dict[str, Callable] = {
    "digits": digits,
    "digits_rows": digits_rows,
    **{name: torchvision_source(name) for name in TORCHVISION},
    "text": text.text,
    **{f"toy2d:{name}": toy2d.toy_source(name) for name in toy2d.TOYS},
    "hmm_synthetic": hmm_synthetic.load,
}


# `<prefix>:PATH`: the user's own file (or folder), read by the prefix's loader
USER_SOURCES: Dict[str, Callable] = {
    "npy": partial(user_arrays.load, kind="npy"),
    "npz": partial(user_arrays.load, kind="npz"),
    "csv": user_csv.load,
    "imagefolder": user_images.load,
    "text": text.text_file,
}


def validate_dataset_name(name: str) -> None:
    user = user_source(name)
    if user is None and name not in SOURCES:
        prefixes = ", ".join(f"{p}:PATH" for p in USER_SOURCES)
        raise GenzooError(f"bad value for config key 'data.dataset': must be one of {', '.join(SOURCES)} "
                          f"or your own data as {prefixes}, not {name!r}")


def load_source(dcfg) -> Prepared:
    validate_dataset_name(dcfg.dataset)
    rng = np.random.default_rng(dcfg.seed)
    user = user_source(dcfg.dataset)
    prepared = USER_SOURCES[user[0]](dcfg, rng, user[1]) if user else SOURCES[dcfg.dataset](dcfg, rng)
    if dcfg.holdout_class is not None:
        prepared = hold_out_class(prepared, int(dcfg.holdout_class), dcfg.dataset)
    if prepared.standardise:  # after the hold-out: the statistics of the examples the model trains on
        prepared = standardise(prepared)
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
    return dataclasses.replace(p, splits=splits, extra={**p.extra, "holdout_class": cls})
