"""Image sources: scikit-learn's bundled digits (the embedded default, also as row sequences) and the
torchvision sets (MNIST, Fashion-MNIST, CIFAR-10) through torchvision's own download code."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from lightning_modules.contract import DataInfo
from pipeline.data.prepared import Prepared, three_splits
from pipeline.errors import GenzooError


def digits(dcfg, rng) -> Prepared:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]  # (N, 1, 8, 8), levels 0..16
    y = d.target.astype(np.int64)
    info = DataInfo(shape=(1, 8, 8), kind="image", levels=17, num_classes=10)
    return Prepared(three_splits(x, y, dcfg, rng), info, "sklearn.datasets.load_digits")


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
        dataset_cls = getattr(tvd, cls_name)
        parts = {}
        for file, _ in getattr(dataset_cls, "resources", []):  # MNIST and FashionMNIST: IDX files (CIFAR10 has none)
            check_idx(root / cls_name / "raw" / file.removesuffix(".gz"), name)
        for train in (True, False):
            try:
                ds = dataset_cls(root=str(root), train=train, download=True)
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
