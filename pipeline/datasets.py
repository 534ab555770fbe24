"""The fetch registry: each source turns raw data into seeded train/val/test splits.

Images are stored as integer levels (uint8) so that the bytes are exact and the number of levels is
known; the data module dequantises them. Vectors are float32, token sequences int64 padded with -1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from lightning_modules.contract import DataInfo
from pipeline.errors import GenzooError
from pipeline.toy2d import TOYS, true_log_density

Split = Tuple[np.ndarray, np.ndarray]


@dataclass
class Prepared:
    splits: Dict[str, Split]  # train / val / test (+ holdout)
    info: DataInfo
    source: str
    extra: dict = field(default_factory=dict)  # e.g. the true model's test log-likelihood


def split_indices(n: int, val_fraction: float, test_fraction: float, rng: np.random.Generator):
    order = rng.permutation(n)
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def _three_splits(x, y, dcfg, rng) -> Dict[str, Split]:
    tr, va, te = split_indices(len(x), dcfg.val_fraction, dcfg.test_fraction, rng)
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}


# --- images -----------------------------------------------------------------------------------
def digits(dcfg, rng) -> Prepared:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]  # (N, 1, 8, 8), levels 0..16
    y = d.target.astype(np.int64)
    info = DataInfo(shape=(1, 8, 8), kind="image", levels=17, num_classes=10)
    return Prepared(_three_splits(x, y, dcfg, rng), info, "sklearn.datasets.load_digits")


def digits_rows(dcfg, rng) -> Prepared:
    """The same digits as sequences: 8 time steps of 8-d rows (levels 0..16)."""
    p = digits(dcfg, rng)
    splits = {k: (x[:, 0], y) for k, (x, y) in p.splits.items()}
    info = DataInfo(shape=(8, 8), kind="sequence", levels=17, num_classes=10)
    return Prepared(splits, info, p.source + " (rows as time steps)")


TORCHVISION = {
    "mnist": ("MNIST", (1, 28, 28)),
    "fashion_mnist": ("FashionMNIST", (1, 28, 28)),
    "cifar10": ("CIFAR10", (3, 32, 32)),
}


def check_idx(path: Path, dataset: str) -> None:
    """An IDX file (MNIST's format) must be exactly its header plus prod(dims) bytes of ubyte data."""
    if not path.is_file():
        return  # torchvision downloads it, or says it is missing
    with open(path, "rb") as f:
        head = f.read(16)
    size, nd = path.stat().st_size, head[3] if len(head) >= 4 else 0
    if head[:3] != b"\x00\x00\x08" or not 1 <= nd <= 3 or len(head) < 4 + 4 * nd:
        raise GenzooError(f"{dataset}: {path} is not a ubyte IDX file (corrupt or truncated): delete it and fetch again")
    expected = 4 + 4 * nd + math.prod(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd))
    if size != expected:
        raise GenzooError(f"{dataset}: {path} is truncated or corrupt ({size} bytes, expected {expected}): "
                          "delete it and fetch again")


def torchvision_source(name: str) -> Callable:
    cls_name, shape = TORCHVISION[name]

    def load(dcfg, rng) -> Prepared:
        import torchvision.datasets as tvd

        root = Path(dcfg.root) / "raw"
        cls = getattr(tvd, cls_name)
        parts = {}
        for file, _ in getattr(cls, "resources", []):  # MNIST and FashionMNIST: IDX files (CIFAR10 has none)
            check_idx(root / cls_name / "raw" / file.removesuffix(".gz"), name)
        for train in (True, False):
            try:
                ds = cls(root=str(root), train=train, download=True)
            except Exception as e:  # offline, corrupt or truncated files: say which and where
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise GenzooError(f"cannot load {name} from {root}/{cls_name}: {msg}") from None
            x = np.asarray(ds.data)
            x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
            parts[train] = (np.ascontiguousarray(x.astype(np.uint8)), np.asarray(ds.targets, dtype=np.int64))
        (xtr, ytr), test = parts[True], parts[False]
        n_val = int(round(len(xtr) * dcfg.val_fraction))
        order = rng.permutation(len(xtr))
        splits = {"train": (xtr[order[n_val:]], ytr[order[n_val:]]), "val": (xtr[order[:n_val]], ytr[order[:n_val]]), "test": test}
        info = DataInfo(shape=shape, kind="image", levels=256, num_classes=10)
        return Prepared(splits, info, f"torchvision.datasets.{cls_name}")

    return load


# --- sequences --------------------------------------------------------------------------------
TEXT_SEQ_LEN = 64


def text(dcfg, rng) -> Prepared:
    """Characters of Python's bundled pydoc topics, split by topic, cut into padded sequences."""
    import string

    from pydoc_data.topics import topics

    vocab = sorted(set(string.printable) - set("\x0b\x0c\r"))
    index = {c: i for i, c in enumerate(vocab)}
    names = sorted(topics)
    tr, va, te = split_indices(len(names), dcfg.val_fraction, dcfg.test_fraction, rng)

    def encode(topic_ids):
        seqs = []
        for t in sorted(topic_ids):
            ids = [index[c] for c in topics[names[t]] if c in index]
            for s in range(0, len(ids), TEXT_SEQ_LEN):
                chunk = ids[s : s + TEXT_SEQ_LEN]
                seqs.append(chunk + [-1] * (TEXT_SEQ_LEN - len(chunk)))
        x = np.asarray(seqs, dtype=np.int64)
        return x, np.zeros(len(x), dtype=np.int64)

    splits = {"train": encode(tr), "val": encode(va), "test": encode(te)}
    info = DataInfo(shape=(TEXT_SEQ_LEN,), kind="sequence", vocab_size=len(vocab))
    return Prepared(splits, info, "pydoc_data.topics", {"vocab": "".join(vocab)})


# --- 2-D toys ---------------------------------------------------------------------------------
def toy2d(name: str) -> Callable:
    def load(dcfg, rng) -> Prepared:
        x, y = TOYS[name](dcfg.toy_samples, rng)
        x, y = x.astype(np.float32), np.asarray(y, dtype=np.int64)
        splits = _three_splits(x, y, dcfg, rng)
        extra = {}
        truth = true_log_density(name)
        if truth is not None:
            extra["true_test_nll"] = float(-truth(splits["test"][0].astype(np.float64)).mean())
        info = DataInfo(shape=(2,), kind="vector")
        return Prepared(splits, info, f"genzoo toy2d:{name}", extra)

    return load


SOURCES: Dict[str, Callable] = {
    "digits": digits,
    "digits_rows": digits_rows,
    **{name: torchvision_source(name) for name in TORCHVISION},
    "text": text,
    **{f"toy2d:{name}": toy2d(name) for name in TOYS},
}


def register(name: str, source: Callable) -> None:
    SOURCES[name] = source


def _ensure_plugins() -> None:
    """Sources defined next to the family that needs them (hmm_synthetic samples a random HMM)."""
    try:
        import pipeline.hmm_synthetic  # noqa: F401  (registers itself)
    except ImportError:
        pass


def validate_dataset_name(name: str) -> None:
    _ensure_plugins()
    if name not in SOURCES:
        raise GenzooError(f"unknown dataset '{name}' for data.dataset (choices: {', '.join(SOURCES)})")


def load_source(dcfg) -> Prepared:
    validate_dataset_name(dcfg.dataset)
    rng = np.random.default_rng(dcfg.seed)
    prepared = SOURCES[dcfg.dataset](dcfg, rng)
    if dcfg.holdout_class is not None:
        prepared = hold_out_class(prepared, int(dcfg.holdout_class))
    return prepared


def hold_out_class(p: Prepared, cls: int) -> Prepared:
    """Remove one class from every split; its test examples become the `holdout` (anomaly) split."""
    if p.info.num_classes is None or not 0 <= cls < p.info.num_classes:
        raise GenzooError(f"data.holdout_class={cls} is not a class of this dataset")
    splits = {k: (x[y != cls], y[y != cls]) for k, (x, y) in p.splits.items()}
    x, y = p.splits["test"]
    splits["holdout"] = (x[y == cls], y[y == cls])
    return Prepared(splits, p.info, p.source, {**p.extra, "holdout_class": cls})


def prepared_dir(dcfg) -> Path:
    return Path(dcfg.root) / "prepared" / dcfg.dataset.replace(":", "-")
