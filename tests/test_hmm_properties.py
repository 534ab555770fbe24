"""Property tests (Hypothesis) of the HMM's forward-backward and Viterbi (`lightning_modules.hmm.forward_backward`)
against brute-force enumeration of all N^T state paths in numpy float64, on random small HMMs (N <= 3,
T <= 5) given directly by their start, transition and log-emission matrices: categorical emissions (log of
a probability table at drawn tokens, with zeros) and Gaussian-like ones (log densities of drawn points,
down to thousands of nats), sparse transitions with exact zeros, peaked ones (1e-300, subnormals), padded
batches. Checked: log p(x), gamma, the transition counts xi (summed, and per sequence with one chain per
sequence), K chains side by side, the Viterbi path and score, that padding changes nothing, and the float32
recursions (`hmm.precision`) against the enumeration of the same HMM rounded to float32.

The fast profile (tests/conftest.py) draws a bounded number of examples; HYPOTHESIS_PROFILE=slow many more."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import logsumexp

from lightning_modules.hmm import forward_backward as fb


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- strategies -----------------------------------------------------------------------------------------
# a probability before its row is normalised: exact zeros, peaked (1e-300, subnormal) and ordinary ones
WEIGHT = st.one_of(st.just(0.0), st.sampled_from([5e-324, 1e-310, 1e-300, 1e-200, 1e-30]), st.floats(1e-3, 1.0))
# an ordinary, a very unlikely, an extreme and an impossible log p(x_t | z_t)
LOG_EMIT = st.one_of(st.floats(-30.0, 5.0), st.sampled_from([-1e3, -745.0, -2e3, -1e4, -math.inf]))


@st.composite
def prob_rows(draw, rows: int, n: int) -> np.ndarray:
    """(rows, n) stochastic matrix: each row drawn from WEIGHT with a positive sum, then normalised."""
    out = np.empty((rows, n))
    for r in range(rows):
        w = np.array(draw(st.lists(WEIGHT, min_size=n, max_size=n).filter(lambda ws: sum(ws) > 0)))
        out[r] = w / w.sum()
    return out


@st.composite
def log_emissions(draw, b: int, t: int, n: int) -> np.ndarray:
    """(B, T, N) log p(x_t | z_t = n): categorical (a probability table with zeros, at drawn tokens),
    Gaussian-like (log densities of drawn points, some very peaked) or drawn entry by entry."""
    kind = draw(st.sampled_from(["categorical", "gaussian", "entries"]))
    if kind == "categorical":
        vocab = draw(st.integers(1, 4))
        table = draw(prob_rows(n, vocab))
        tokens = np.array(draw(st.lists(st.integers(0, vocab - 1), min_size=b * t, max_size=b * t))).reshape(b, t)
        with np.errstate(divide="ignore"):
            return np.log(table).T[tokens]
    if kind == "gaussian":
        means = np.array(draw(st.lists(st.floats(-5, 5), min_size=n, max_size=n)))
        sigmas = np.array(draw(st.lists(st.sampled_from([1e-2, 0.1, 0.5, 1.0, 3.0]), min_size=n, max_size=n)))
        x = np.array(draw(st.lists(st.floats(-6, 6), min_size=b * t, max_size=b * t))).reshape(b, t, 1)
        return -0.5 * ((x - means) / sigmas) ** 2 - np.log(sigmas) - 0.5 * math.log(2 * math.pi)
    return np.array(draw(st.lists(LOG_EMIT, min_size=b * t * n, max_size=b * t * n))).reshape(b, t, n)


@st.composite
def hmm_cases(draw, max_batch: int = 3, chains: int = 1):
    """start (N,), trans (N, N), log_emit (B, T, N) (padding filled with junk) and the lengths (B,); with
    `chains` > 1 a list of that many such cases, of the same shape and lengths."""
    n, t, b = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, max_batch))
    lengths = np.array(draw(st.lists(st.integers(1, t), min_size=b, max_size=b)))
    cases = []
    for _ in range(chains):
        start = draw(prob_rows(1, n))[0]
        trans = draw(prob_rows(n, n))
        log_emit = draw(log_emissions(b, t, n))
        junk = draw(st.sampled_from([0.0, -1e3, 7.0]))  # on padding: must change nothing
        for i, length in enumerate(lengths):
            log_emit[i, length:] = junk
        cases.append((start, trans, log_emit, lengths))
    return cases[0] if chains == 1 else cases


# --- brute force ----------------------------------------------------------------------------------------
def enumerate_paths(start, trans, log_emit, length):
    """All N^length state paths (P, length) and their joint log-probabilities log p(z, x) (P,)."""
    n = len(start)
    paths = np.array(list(itertools.product(range(n), repeat=length)))
    with np.errstate(divide="ignore"):
        log_start, log_trans = np.log(start), np.log(trans)
    scores = log_start[paths[:, 0]] + log_emit[np.arange(length), paths].sum(1)
    if length > 1:
        scores = scores + log_trans[paths[:, :-1], paths[:, 1:]].sum(1)
    return paths, scores


def brute_force(start, trans, log_emit, length):
    """(log p(x), gamma (T, N) zero past the length, xi summed over steps (N, N), best score, the paths and
    their scores) of one sequence."""
    n, t = len(start), log_emit.shape[0]
    paths, scores = enumerate_paths(start, trans, log_emit[:length], length)
    ll = logsumexp(scores)
    gamma, xi = np.zeros((t, n)), np.zeros((n, n))
    if np.isfinite(ll):
        weights = np.exp(scores - ll)
        for s in range(length):
            gamma[s] = np.bincount(paths[:, s], weights, minlength=n)
        for s in range(length - 1):
            np.add.at(xi, (paths[:, s], paths[:, s + 1]), weights)
    return ll, gamma, xi, scores.max(), paths, scores


def as_torch(start, trans, log_emit, lengths):
    t = log_emit.shape[1]
    mask = torch.arange(t)[None, :] < torch.from_numpy(lengths)[:, None]
    return torch.from_numpy(start), torch.from_numpy(trans), torch.from_numpy(log_emit), mask


def tolerance(ll: float) -> float:
    """Absolute tolerance of posteriors: float64 rounding of log-probabilities of size |log p(x)|."""
    return 1e-9 + 1e-14 * (abs(ll) if np.isfinite(ll) else 0.0)


# --- properties -----------------------------------------------------------------------------------------
@given(hmm_cases())
def test_loglik_gamma_and_transition_counts_equal_enumeration(case):
    """One chain (N, N): log p(x) per sequence, gamma (zero on padding) and xi summed over sequences and
    steps; the same with one chain per sequence, (B, N, N), and xi per sequence."""
    start, trans, log_emit, lengths = case
    refs = [brute_force(start, trans, log_emit[i], lengths[i]) for i in range(len(lengths))]
    ref_ll = np.array([r[0] for r in refs])
    possible = np.isfinite(ref_ll)
    s, a, e, mask = as_torch(*case)
    b = len(lengths)
    for post, per_sequence in ((fb.forward_backward(s, a, e, mask), False),
                               (fb.forward_backward(s.expand(b, -1), a.expand(b, -1, -1), e, mask), True)):
        np.testing.assert_allclose(post.loglik.numpy(), ref_ll, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(fb.loglik(s, a, e, mask).numpy(), ref_ll, rtol=1e-12, atol=1e-9)
        for i in np.flatnonzero(possible):
            np.testing.assert_allclose(post.gamma[i].numpy(), refs[i][1], rtol=0, atol=tolerance(ref_ll[i]))
            if per_sequence:
                np.testing.assert_allclose(post.trans_counts[i].numpy(), refs[i][2], rtol=0,
                                           atol=tolerance(ref_ll[i]) * lengths[i])
        if possible.all():
            assert np.isfinite(post.gamma.numpy()).all() and np.isfinite(post.trans_counts.numpy()).all()
            assert (post.trans_counts.numpy()[..., trans == 0] == 0).all()  # Baum-Welch keeps zeros zero
            if not per_sequence:
                np.testing.assert_allclose(post.trans_counts.numpy(), sum(r[2] for r in refs), rtol=0,
                                           atol=sum(tolerance(ll) for ll in ref_ll) * lengths.max())


@given(hmm_cases())
def test_viterbi_path_is_a_most_probable_path(case):
    """The score is the best joint log-probability of any path; the path (-1 on padding) has that score
    (ties between paths may break either way)."""
    start, trans, log_emit, lengths = case
    path, score = fb.viterbi(*as_torch(*case))
    for i, length in enumerate(lengths):
        *_, best, paths, scores = brute_force(start, trans, log_emit[i], length)
        np.testing.assert_allclose(score[i].item(), best, rtol=1e-12, atol=1e-9)
        assert (path[i, length:] == -1).all()
        if np.isfinite(best):
            ours = path[i, :length].numpy()
            row = np.flatnonzero((paths == ours).all(1))
            np.testing.assert_allclose(scores[row[0]], best, rtol=1e-12, atol=1e-9)


@given(hmm_cases(max_batch=2, chains=2))
def test_k_chains_side_by_side_equal_each_chain_alone(cases):
    """`log_emit` (B, T, K, N) with start (K, N) and trans (K, N, N): each chain's log p(x | chain) and gamma
    are the enumeration's for that chain, however much less likely one chain is than the other."""
    lengths = cases[0][3]
    start = torch.from_numpy(np.stack([c[0] for c in cases]))
    trans = torch.from_numpy(np.stack([c[1] for c in cases]))
    log_emit = torch.from_numpy(np.stack([c[2] for c in cases], 2))  # (B, T, K, N)
    mask = as_torch(*cases[0])[3]
    *_, ll, gamma = fb.state_posteriors(start, trans, log_emit, mask)
    for k, (s, a, e, _) in enumerate(cases):
        for i, length in enumerate(lengths):
            ref_ll, ref_gamma, *_ = brute_force(s, a, e[i], length)
            np.testing.assert_allclose(ll[i, k].item(), ref_ll, rtol=1e-12, atol=1e-9)
            if np.isfinite(ref_ll):
                np.testing.assert_allclose(gamma[i, :, k].numpy(), ref_gamma, rtol=0, atol=tolerance(ref_ll))


@given(hmm_cases(), st.integers(1, 3))
def test_padding_changes_nothing(case, extra):
    """Each sequence run alone at its own length equals its row of the padded batch, also with more padding."""
    start, trans, log_emit, lengths = case
    b, t, n = log_emit.shape
    wider = np.concatenate([log_emit, np.full((b, extra, n), -5.0)], 1)
    s, a, e, mask = as_torch(start, trans, wider, lengths)
    batch = fb.forward_backward(s, a, e, mask)
    batch_path, batch_score = fb.viterbi(s, a, e, mask)
    alone = [fb.forward_backward(s, a, e[i:i + 1, :length], mask[i:i + 1, :length]) for i, length in enumerate(lengths)]
    np.testing.assert_array_equal(batch.loglik.numpy(), np.array([p.loglik.item() for p in alone]))
    for i, (length, p) in enumerate(zip(lengths, alone)):
        if np.isfinite(p.loglik.item()):
            np.testing.assert_allclose(batch.gamma[i, :length].numpy(), p.gamma[0].numpy(), rtol=1e-12, atol=1e-15)
            assert (batch.gamma[i, length:] == 0).all()
        path, score = fb.viterbi(s, a, e[i:i + 1, :length], mask[i:i + 1, :length])
        assert batch_score[i].item() == score.item()
        if np.isfinite(score.item()):
            np.testing.assert_array_equal(batch_path[i, :length].numpy(), path[0].numpy())
    if np.isfinite(batch.loglik.numpy()).all():
        np.testing.assert_allclose(batch.trans_counts.numpy(), sum(p.trans_counts for p in alone).numpy(),
                                   rtol=1e-12, atol=1e-15)


def tolerance32(ll: float) -> float:
    """Absolute tolerance of float32 posteriors: float32 rounding (~6e-8) of log-probabilities of size |log p(x)|,
    accumulated over the <= 5 steps and the forward, backward and log p(x) they are formed from."""
    return 1e-5 + 2e-6 * (abs(ll) if np.isfinite(ll) else 0.0)


@given(hmm_cases())
def test_float32_forward_backward_equals_enumeration_to_float32_rounding(case):
    """In float32 (`hmm.precision`), on the same cases rounded to float32 (weights below float32's range, 1e-300
    and the subnormals, become exact zeros there): log p(x), gamma and xi equal the float64 enumeration of the
    rounded HMM to float32's rounding, impossible sequences stay -inf, zero transitions keep zero counts."""
    start, trans, log_emit, lengths = case
    rounded = [a.astype(np.float32).astype(np.float64) for a in (start, trans, log_emit)]
    refs = [brute_force(*rounded[:2], rounded[2][i], lengths[i]) for i in range(len(lengths))]
    ref_ll = np.array([r[0] for r in refs])
    s, a, e, mask = (t.float() if t.is_floating_point() else t for t in as_torch(*rounded, lengths))
    post = fb.forward_backward(s, a, e, mask)
    assert post.loglik.dtype == torch.float32 and post.trans_counts.dtype == torch.float32
    np.testing.assert_array_equal(np.isfinite(post.loglik.numpy()), np.isfinite(ref_ll))
    possible = np.isfinite(ref_ll)
    np.testing.assert_allclose(post.loglik.numpy()[possible], ref_ll[possible], rtol=2e-6, atol=1e-4)
    for i in np.flatnonzero(possible):
        np.testing.assert_allclose(post.gamma[i].numpy(), refs[i][1], rtol=0, atol=tolerance32(ref_ll[i]))
    if possible.all():
        assert np.isfinite(post.gamma.numpy()).all() and np.isfinite(post.trans_counts.numpy()).all()
        assert (post.trans_counts.numpy()[rounded[1] == 0] == 0).all()
        np.testing.assert_allclose(post.trans_counts.numpy(), sum(r[2] for r in refs), rtol=0,
                                   atol=sum(tolerance32(ll) for ll in ref_ll) * lengths.max())
