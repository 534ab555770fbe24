"""A user's own data (`data.dataset=<prefix>:PATH`): the file or folder checked before anything is read, its
record in the manifest (path and sha256), the split sizes it allows, and its labels as class indices.

Every problem is one GenzooError naming the file (or the config key), raised before the fetch stage writes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np

from pipeline.data.prepared import split_indices
from pipeline.data.store import sha256 as file_sha256
from pipeline.errors import GenzooError


@dataclass
class SourceFile:
    path: Path
    kind: str  # the prefix: npy, npz, csv, imagefolder, text

    @classmethod
    def open(cls, path: str, kind: str, folder: bool = False) -> "SourceFile":
        p = Path(path).expanduser()
        what = f"{kind} {'folder' if folder else 'file'} {p}"
        if not p.exists():
            where = "" if p.is_absolute() else f", relative to {Path.cwd()}"
            raise GenzooError(f"{what} not found (data.dataset={kind}:{path}{where})")
        if folder and not p.is_dir():
            raise GenzooError(f"{what} is not a folder")
        if not folder and not p.is_file():
            raise GenzooError(f"{what} is not a file")
        if not folder and p.stat().st_size == 0:
            raise GenzooError(f"{what} is empty")
        return cls(p, kind)

    def read_bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as e:
            raise GenzooError(f"cannot read {self.kind} file {self.path}: {e.strerror or e}") from None

    def sha256(self) -> str:
        """The file's sha256; for a folder, the sha256 of its files' relative paths and sha256s, sorted."""
        if self.path.is_file():
            return file_sha256(self.path)
        lines = [f"{f.relative_to(self.path).as_posix()}:{file_sha256(f)}"
                 for f in sorted(self.path.rglob("*")) if f.is_file()]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def record(self) -> dict:
        """What the manifest says about the source: `source_file` = {kind, path, sha256}."""
        return {"kind": self.kind, "path": str(self.path), "sha256": self.sha256()}

    def check_splits(self, n: int, dcfg, what: str = "examples") -> None:
        """Every split gets at least one example with the configured fractions."""
        tr, va, te = split_indices(n, dcfg.val_fraction, dcfg.test_fraction, np.random.default_rng(0))
        for split, idx, key in (("train", tr, None), ("val", va, "val_fraction"), ("test", te, "test_fraction")):
            if len(idx) == 0:
                why = f" with data.{key}={getattr(dcfg, key)}" if key else ""
                raise GenzooError(f"{self.kind} {self.path}: {n} {what} leave the {split} split empty{why}: "
                                  "give more examples (or a larger fraction)")


def class_indices(values: np.ndarray, where: str) -> Tuple[np.ndarray, List]:
    """Label values -> (indices 0..K-1 in the sorted order of the distinct values, the values in index order).

    Integers (or integer-valued numbers, or strings that all read as integers) sort numerically; other
    strings sort as text. Non-integer numbers, NaN and empty labels are refused, naming `where`."""
    values = np.asarray(values)
    if values.dtype.kind in "US":
        text = [str(v).strip() for v in values]
        if any(t == "" for t in text):
            raise GenzooError(f"{where}: a label is empty (row {text.index('') + 1})")
        try:
            values = np.asarray([int(t) for t in text], dtype=np.int64)
        except ValueError:
            values = np.asarray(text)
    elif values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            raise GenzooError(f"{where}: labels must be class values (integers or names), not {values[bad][0]!r} "
                              f"(row {int(np.flatnonzero(bad)[0]) + 1})")
        values = values.astype(np.int64)
    elif values.dtype.kind not in "iub":
        raise GenzooError(f"{where}: labels must be integers or names, not {values.dtype} values")
    classes, y = np.unique(values, return_inverse=True)
    as_json = [str(c) if values.dtype.kind in "US" else int(c) for c in classes]
    return y.astype(np.int64).reshape(-1), as_json
