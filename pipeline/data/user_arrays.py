"""`npy:PATH` / `npz:PATH`: a user's NumPy arrays. A `.npy` file holds `x` alone; an `.npz` holds `x` and
optionally `y` (labels, one per example). Read with `allow_pickle=False`: an object (ragged or pickled) array is
refused, never unpickled.

What `x` becomes, by its shape:
- (N, C, H, W) with C = 1 or 3, or (N, H, W) -> (N, 1, H, W): images. Integer levels (a uint8 array: 256
  levels; other integers, or floats that are all integers, in 0..255: max + 1 levels) are stored as uint8 with
  `levels`, dequantised like the built-in image sources; non-integer images must be intensities in [0, 1]
  (the image space every family samples in) and are kept as they are (`continuous`).
- (N, D): vectors, integer or not (token sequences come through `text:`), standardised per feature with the
  training split's mean and std (`pipeline/data/standardise.py`).
"""
from __future__ import annotations

import zipfile

import numpy as np

from lightning_modules.contract import DataInfo
from pipeline.data.prepared import Prepared, three_splits
from pipeline.data.user_files import SourceFile, class_indices
from pipeline.errors import GenzooError


def read_arrays(src: SourceFile):
    """(x, y or None) from the file, without unpickling anything."""
    try:
        loaded = np.load(src.path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded:
            if "x" not in loaded.files:
                raise GenzooError(f"{src.kind} file {src.path} has no array 'x' (it holds: {', '.join(loaded.files) or 'nothing'})")
            return loaded["x"], (loaded["y"] if "y" in loaded.files else None)
    except GenzooError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Object arrays cannot be loaded" in msg:
            raise GenzooError(f"{src.kind} file {src.path} holds an object array (ragged rows or Python objects, which "
                              "need pickle; genzoo loads no pickles): save a numeric array of equal-length rows") from None
        if "pickled data" in msg:
            raise GenzooError(f"{src.kind} file {src.path} is not a .npy or .npz file (NumPy could read it only as a "
                              "pickle, which genzoo does not load)") from None
        raise GenzooError(f"cannot read {src.kind} file {src.path}: {msg}") from None


def image_levels(x: np.ndarray):
    """(uint8 levels, number of levels) for integer-valued images in 0..255, else None."""
    if x.dtype == np.uint8:
        return x, 256
    if x.dtype == np.bool_:
        return x.astype(np.uint8), 2
    if x.dtype.kind == "f" and not np.array_equal(x, np.round(x)):
        return None
    if x.size and (x.min() < 0 or x.max() > 255):
        return None
    top = int(x.max()) if x.size else 0
    return x.astype(np.uint8), max(2, top + 1)


def check_x(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise GenzooError(f"{where}: x must hold numbers, not {x.dtype} values")
    if x.ndim not in (2, 3, 4) or len(x) == 0:
        raise GenzooError(f"{where}: x has shape {x.shape}; genzoo reads images (N, C, H, W) or (N, H, W) and "
                          "vectors (N, D), with N >= 1")
    if x.ndim == 4 and x.shape[1] not in (1, 3):
        raise GenzooError(f"{where}: x has shape {x.shape}; images must be channels first (N, C, H, W) with C = 1 or 3")
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise GenzooError(f"{where}: x holds NaN or Inf values (first in example {int(np.flatnonzero(bad)[0])})")
    return x[:, None] if x.ndim == 3 else x


def load(dcfg, rng, path: str, kind: str = "npy") -> Prepared:
    src = SourceFile.open(path, kind)
    where = f"{kind} file {src.path}"
    x, y = read_arrays(src)
    x = check_x(x, where)
    extra = {"source_file": src.record()}
    if y is None:
        y, num_classes = np.zeros(len(x), dtype=np.int64), None
    else:
        if y.ndim != 1 or len(y) != len(x):
            raise GenzooError(f"{where}: y has shape {y.shape}; it must hold one label per example of x ({len(x)},)")
        y, classes = class_indices(y, f"{where}, array y")
        num_classes, extra["classes"] = len(classes), classes
    src.check_splits(len(x), dcfg)
    standardise = False
    if x.ndim == 2:
        x, info, standardise = x.astype(np.float32), DataInfo(shape=x.shape[1:], kind="vector", num_classes=num_classes), True
        extra["continuous"] = True
    else:
        levels = image_levels(x)
        if levels is not None:
            x, n_levels = levels
            info = DataInfo(shape=x.shape[1:], kind="image", levels=n_levels, num_classes=num_classes)
            extra["continuous"] = False
        elif x.min() >= 0 and x.max() <= 1:
            x, info = x.astype(np.float32), DataInfo(shape=x.shape[1:], kind="image", num_classes=num_classes)
            extra["continuous"] = True
        else:
            raise GenzooError(f"{where}: images must be integer levels 0..255 or intensities in [0, 1], and x holds "
                              f"values in [{x.min():g}, {x.max():g}]: rescale them")
    splits = three_splits(np.ascontiguousarray(x), y, dcfg, rng)
    return Prepared(splits, info, where, extra, standardise=standardise)
