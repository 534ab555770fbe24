"""The n-gram baselines of token data (`pipeline.evaluation.token_baselines`) against a brute-force reference:
counts and add-k probabilities computed token by token in plain Python, over random small cases (Hypothesis:
padding, one-token sequences, tokens never seen in training, a vocabulary of one)."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.evaluation.token_baselines import K_GRID, PADDING, _counts, _log_probs, ngram_baseline, total_nll

START = "<s>"


def sequences(draw, vocab: int, min_n: int = 1):
    """(N, T) int64 with each row a run of tokens then padding; every row holds at least one token."""
    n, t = draw(st.integers(min_n, 5)), draw(st.integers(1, 6))
    rows = []
    for _ in range(n):
        length = draw(st.integers(1, t))
        rows.append(draw(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length)) + [PADDING] * (t - length))
    return torch.tensor(rows, dtype=torch.int64)


def tokens(x):
    return [[int(v) for v in row if v != PADDING] for row in x]


def reference_nll(train, test, vocab: int, order: int, k: float) -> float:
    """-sum log p(w | h) with p = (c(h, w) + k) / (c(h) + k V), every count made by a Python loop."""
    pairs, history = Counter(), Counter()
    for seq in tokens(train):
        for i, w in enumerate(seq):
            h = () if order == 1 else ((START,) if i == 0 else (seq[i - 1],))
            pairs[h, w] += 1
            history[h] += 1
    nll = 0.0
    for seq in tokens(test):
        for i, w in enumerate(seq):
            h = () if order == 1 else ((START,) if i == 0 else (seq[i - 1],))
            nll -= math.log((pairs[h, w] + k) / (history[h] + k * vocab))
    return nll


@st.composite
def cases(draw):
    vocab = draw(st.integers(1, 5))
    return vocab, sequences(draw, vocab), sequences(draw, vocab), sequences(draw, vocab)


@settings(max_examples=60, deadline=None)
@given(cases(), st.sampled_from([1, 2]), st.sampled_from(K_GRID))
def test_nll_equals_the_token_by_token_reference(case, order, k):
    vocab, train, _, test = case
    ours = total_nll(_log_probs(_counts(train, vocab, order), k), test, vocab)
    assert ours == pytest.approx(reference_nll(train, test, vocab, order, k), rel=1e-9, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(cases(), st.sampled_from([1, 2]))
def test_every_history_is_a_distribution_and_k_is_the_best_on_validation(case, order):
    vocab, train, val, test = case
    counts = _counts(train, vocab, order)
    for k in K_GRID:
        assert torch.allclose(_log_probs(counts, k).exp().sum(1), torch.ones(len(counts), dtype=torch.float64))
    out = ngram_baseline(train, val, test, vocab, order)
    best = min(reference_nll(train, val, vocab, order, k) for k in K_GRID)
    assert reference_nll(train, val, vocab, order, out["smoothing_k"]) == pytest.approx(best, rel=1e-12)
    n_tokens = int((test != PADDING).sum())
    nll = reference_nll(train, test, vocab, order, out["smoothing_k"])
    assert out["nll"] == pytest.approx(nll / len(test))
    assert out["perplexity"] == pytest.approx(math.exp(nll / n_tokens))
    assert out["bpd"] == pytest.approx(nll / n_tokens / math.log(2))


def test_a_bigram_beats_the_unigram_on_text_with_an_order():
    """Alternating tokens: the bigram predicts each next token almost surely (perplexity near 1), the unigram
    sees two equally frequent tokens (perplexity near 2)."""
    x = torch.tensor([[0, 1] * 20, [1, 0] * 20], dtype=torch.int64)
    uni = ngram_baseline(x, x, x, 2, 1)
    bi = ngram_baseline(x, x, x, 2, 2)
    assert uni["perplexity"] == pytest.approx(2.0, rel=1e-3) and bi["perplexity"] < 1.1
