"""Token sequences: characters of Python's bundled pydoc topics."""
from __future__ import annotations

import numpy as np

from lightning_modules.contract import DataInfo
from pipeline.data.prepared import Prepared, split_indices

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
