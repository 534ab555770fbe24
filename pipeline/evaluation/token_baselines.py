"""The n-gram baselines of token data: what a smoothed unigram and bigram model reach on the test split, the rows
a sequence model's perplexity is read against (Jurafsky & Martin, "Speech and Language Processing", ch. 3).

Additive (add-k) smoothing: p(w | h) = (c(h, w) + k) / (c(h) + k V), V the vocabulary. A bigram's first token is
conditioned on the start of the sequence, as if every sequence began with a start symbol. k is chosen from
`K_GRID` by the validation split's likelihood. Sequences are (N, T) int64 with -1 as padding (`hmm.sequences`);
NLL is per sequence (the test/nll of a sequence model), bits and perplexity per token.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import Tensor

K_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
PADDING = -1


def _pairs(x: Tensor, vocab_size: int) -> Tuple[Tensor, Tensor]:
    """(history, token) of every real token; the history of a sequence's first token is `vocab_size` (the start
    symbol)."""
    start = torch.full((len(x), 1), vocab_size, dtype=x.dtype)
    history = torch.cat([start, x[:, :-1]], 1)
    real = x != PADDING
    return history[real], x[real]


def _counts(x: Tensor, vocab_size: int, order: int) -> Tensor:
    """Counts c(h, w): (1, V) for a unigram, (V + 1, V) for a bigram (the last row: the start symbol)."""
    history, token = _pairs(x, vocab_size)
    if order == 1:
        return torch.bincount(token, minlength=vocab_size).to(torch.float64)[None]
    return torch.bincount(history * vocab_size + token, minlength=(vocab_size + 1) * vocab_size).to(
        torch.float64).view(vocab_size + 1, vocab_size)


def _log_probs(counts: Tensor, k: float) -> Tensor:
    return ((counts + k) / (counts.sum(1, keepdim=True) + k * counts.shape[1])).log()


def total_nll(log_probs: Tensor, x: Tensor, vocab_size: int) -> float:
    """-sum log p(w | h) over the real tokens of x, in nats."""
    history, token = _pairs(x, vocab_size)
    rows = torch.zeros_like(history) if len(log_probs) == 1 else history
    return -log_probs[rows, token].sum().item()


def ngram_baseline(train: Tensor, val: Tensor, test: Tensor, vocab_size: int, order: int) -> Dict[str, float]:
    counts = _counts(train, vocab_size, order)
    k = min(K_GRID, key=lambda k: total_nll(_log_probs(counts, k), val, vocab_size))
    nll = total_nll(_log_probs(counts, k), test, vocab_size)
    per_token = nll / int((test != PADDING).sum())
    return {"nll": nll / len(test), "bpd": per_token / math.log(2), "perplexity": math.exp(per_token), "smoothing_k": k}


def ngram_baselines(train: Tensor, val: Tensor, test: Tensor, vocab_size: int) -> Dict[str, Dict[str, float]]:
    """{"unigram": ..., "bigram": ...}: each model's test NLL per sequence, bits per token, perplexity and its k."""
    return {name: ngram_baseline(train, val, test, vocab_size, order)
            for name, order in (("unigram", 1), ("bigram", 2))}
