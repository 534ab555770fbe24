"""`csv:PATH`: a user's table, UTF-8 with a header row. Every column but the label column is a numeric feature;
the examples are vectors, standardised per feature with the training split's mean and std
(`pipeline/data/standardise.py`). `data.label_column` names the labels (default `label`; when the default is
absent the table has no labels, while any other name must exist; null: no labels)."""
from __future__ import annotations

import csv
import io

import numpy as np

from lightning_modules.contract import DataInfo
from pipeline.data.prepared import Prepared, three_splits
from pipeline.data.user_files import SourceFile, class_indices
from pipeline.errors import GenzooError

DEFAULT_LABEL_COLUMN = "label"


def read_table(src: SourceFile):
    """(header, rows, line numbers): every row as long as the header; blank lines are skipped."""
    where = f"csv file {src.path}"
    try:
        text = src.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GenzooError(f"{where} is not UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start}") from None
    reader = csv.reader(io.StringIO(text))
    rows, lines = [], []
    try:
        for row in reader:
            if row and any(cell.strip() for cell in row):
                rows.append(row)
                lines.append(reader.line_num)
    except csv.Error as e:
        raise GenzooError(f"{where}, line {reader.line_num}: {e}") from None
    if not rows:
        raise GenzooError(f"{where} is empty (no header row)")
    header = [h.strip() for h in rows[0]]
    if any(not h for h in header):
        raise GenzooError(f"{where}: the header row has an empty column name (column {header.index('') + 1})")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise GenzooError(f"{where}: the header names column '{repeated[0]}' more than once")
    if len(rows) == 1:
        raise GenzooError(f"{where} has a header row and no data rows")
    for row, line in zip(rows[1:], lines[1:]):
        if len(row) != len(header):
            raise GenzooError(f"{where}, line {line}: {len(row)} fields where the header has {len(header)} (ragged rows)")
    return header, rows[1:], lines[1:]


def numeric_column(values, name: str, lines, where: str) -> np.ndarray:
    cells = np.asarray([v.strip() for v in values])
    try:
        col = cells.astype(np.float64)
    except ValueError:
        for v, line in zip(cells, lines):
            try:
                float(v)
            except ValueError:
                shown = "an empty value" if v == "" else repr(str(v))
                raise GenzooError(f"{where}: column '{name}' is not numeric ({shown} on line {line})") from None
        raise
    bad = ~np.isfinite(col)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise GenzooError(f"{where}: column '{name}' holds NaN or Inf values ({str(cells[i])!r} on line {lines[i]})")
    return col


def load(dcfg, rng, path: str) -> Prepared:
    src = SourceFile.open(path, "csv")
    where = f"csv file {src.path}"
    header, rows, lines = read_table(src)
    label = dcfg.label_column
    if label is not None and label not in header:
        if label != DEFAULT_LABEL_COLUMN:
            raise GenzooError(f"bad value for config key 'data.label_column': {where} has no column {label!r} "
                              f"(its columns: {', '.join(header)})")
        label = None  # the default name, absent: no labels
    features = [h for h in header if h != label]
    if not features:
        raise GenzooError(f"{where} has no feature columns besides the label column {label!r}")
    columns = list(zip(*rows))
    x = np.stack([numeric_column(columns[header.index(h)], h, lines, where) for h in features], axis=1)
    extra = {"source_file": src.record(), "continuous": True, "columns": features, "label_column": label}
    if label is None:
        y, num_classes = np.zeros(len(x), dtype=np.int64), None
    else:
        y, classes = class_indices(np.asarray(columns[header.index(label)]), f"{where}, column '{label}'")
        num_classes, extra["classes"] = len(classes), classes
    src.check_splits(len(x), dcfg, "rows")
    info = DataInfo(shape=(len(features),), kind="vector", num_classes=num_classes)
    return Prepared(three_splits(x, y, dcfg, rng), info, where, extra, standardise=True)
