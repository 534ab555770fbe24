"""Prepared splits on disk: `<split>_x.npy`, `<split>_y.npy` and `manifest.json` with their sha256.

Written to a temporary folder and renamed into place, so a failed fetch never leaves a folder that
looks finished. `.npy` (not `.npz`, whose zip entries carry timestamps) keeps the bytes identical for
identical params. Reading verifies every hash and names the file that does not match.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from lightning_modules.contract import DataInfo
from pipeline.data.prepared import Prepared
from pipeline.errors import GenzooError

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


LABELLED = "train_labelled.npy"  # the labelled subset's indices, where `data.labels_per_class` is set


def write_prepared(p: Prepared, out: Path, dataset: str, seed: int) -> dict:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for split, (x, y) in p.splits.items():
        for part, arr in (("x", x), ("y", y)):
            name = f"{split}_{part}.npy"
            np.save(tmp / name, np.ascontiguousarray(arr), allow_pickle=False)
            files[name] = sha256(tmp / name)
    if p.labelled is not None:
        np.save(tmp / LABELLED, p.labelled, allow_pickle=False)
        files[LABELLED] = sha256(tmp / LABELLED)
    content_hash = hashlib.sha256("".join(f"{k}:{v}" for k, v in sorted(files.items())).encode()).hexdigest()
    manifest = {
        "dataset": dataset,
        "source": p.source,
        "seed": seed,
        "info": p.info.to_dict(),
        "splits": {k: {"n": int(len(x)), "x_shape": list(x.shape), "x_dtype": str(x.dtype)} for k, (x, y) in p.splits.items()},
        "files": files,
        "labels_per_class": p.labels_per_class,
        "content_hash": content_hash,
        **p.extra,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise GenzooError(f"{path} not found: run `genzoo fetch` (or `dvc repro fetch`) first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GenzooError(f"{path} is corrupt: {e}") from None


def _read_checked(folder: Path, split: str, part: str, manifest: dict) -> np.ndarray:
    name = f"{split}_{part}.npy"
    if name not in manifest["files"]:
        raise GenzooError(f"{Path(folder) / name}: split '{split}' is not in {folder / MANIFEST}")
    return _read_file(folder, name, manifest)


# Files whose sha256 matched their manifest in this process, by (path, inode, size, mtime): a stage that reads
# a file twice (the labels alone, then the split) hashes it once; a file replaced since is hashed again.
_VERIFIED: dict = {}


def _read_file(folder: Path, name: str, manifest: dict) -> np.ndarray:
    path = Path(folder) / name
    if not path.is_file():
        raise GenzooError(f"{path} is missing: re-run `genzoo fetch`")
    st = path.stat()
    key, expected = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns), manifest["files"][name]
    if _VERIFIED.get(key) != expected:
        if sha256(path) != expected:  # a damaged file, or one changed behind DVC's back since the fetch
            raise GenzooError(f"{path} is corrupt or was changed after fetch (its sha256 differs from {MANIFEST}): "
                              "re-run `genzoo fetch` (or `dvc checkout`)")
        _VERIFIED[key] = expected
    return np.load(path, allow_pickle=False)


def read_split(folder: Path, split: str, manifest: dict):
    return _read_checked(folder, split, "x", manifest), _read_checked(folder, split, "y", manifest)


def read_labels(folder: Path, split: str, manifest: dict) -> np.ndarray:
    """A split's labels alone (checked like the data)."""
    return _read_checked(folder, split, "y", manifest)


def read_labelled(folder: Path, manifest: dict):
    """The labelled training subset's indices (`data.labels_per_class`), or None: every label is kept."""
    return _read_file(folder, LABELLED, manifest) if LABELLED in manifest["files"] else None


def data_info(manifest: dict) -> DataInfo:
    return DataInfo.from_dict(manifest["info"])
