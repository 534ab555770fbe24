"""Token sequences of characters: Python's bundled pydoc topics (`text`) and a user's UTF-8 file (`text:PATH`).

Both cut their documents with one encoder (`encode`): characters -> vocabulary indices, cut into sequences of
`TEXT_SEQ_LEN`, the last one of a document padded with -1.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import numpy as np

from lightning_modules.contract import DataInfo
from pipeline.data.prepared import Prepared, split_indices, three_splits
from pipeline.data.user_files import SourceFile
from pipeline.errors import GenzooError

TEXT_SEQ_LEN = 64


def encode(documents: Iterable[str], index: Dict[str, int]) -> np.ndarray:
    """Each document's characters (those in `index`) as indices, cut into padded sequences: (N, TEXT_SEQ_LEN) int64."""
    seqs: List[List[int]] = []
    for doc in documents:
        ids = [index[c] for c in doc if c in index]
        for s in range(0, len(ids), TEXT_SEQ_LEN):
            chunk = ids[s : s + TEXT_SEQ_LEN]
            seqs.append(chunk + [-1] * (TEXT_SEQ_LEN - len(chunk)))
    return np.asarray(seqs, dtype=np.int64).reshape(len(seqs), TEXT_SEQ_LEN)


def token_info(vocab: List[str]) -> DataInfo:
    return DataInfo(shape=(TEXT_SEQ_LEN,), kind="sequence", vocab_size=len(vocab))


def text(dcfg, rng) -> Prepared:
    """Characters of Python's bundled pydoc topics, split by topic, cut into padded sequences."""
    import string

    from pydoc_data.topics import topics

    vocab = sorted(set(string.printable) - set("\x0b\x0c\r"))
    index = {c: i for i, c in enumerate(vocab)}
    names = sorted(topics)
    tr, va, te = split_indices(len(names), dcfg.val_fraction, dcfg.test_fraction, rng)

    def split(topic_ids):
        x = encode((topics[names[t]] for t in sorted(topic_ids)), index)
        return x, np.zeros(len(x), dtype=np.int64)

    splits = {"train": split(tr), "val": split(va), "test": split(te)}
    return Prepared(splits, token_info(vocab), "pydoc_data.topics", {"vocab": "".join(vocab)})


def text_file(dcfg, rng, path: str) -> Prepared:
    """`text:PATH`: a UTF-8 file's characters; the vocabulary is the sorted set of its characters. The file is
    one document cut into sequences, and the sequences are split seeded like every other source."""
    src = SourceFile.open(path, "text")
    try:
        content = src.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise GenzooError(f"text file {src.path} is not UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start} "
                          "cannot be decoded") from None
    vocab = sorted(set(content))
    x = encode([content], {c: i for i, c in enumerate(vocab)})
    src.check_splits(len(x), dcfg, "sequences of 64 characters")
    splits = three_splits(x, np.zeros(len(x), dtype=np.int64), dcfg, rng)
    extra = {"vocab": "".join(vocab), "continuous": False, "source_file": src.record()}
    return Prepared(splits, token_info(vocab), f"text file {src.path}", extra)
