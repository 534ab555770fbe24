"""Property tests (Hypothesis) of the likelihood and anomaly metrics of `pipeline.evaluation.scoring`:
- `likelihood_metrics`: the D ln(levels) offset, bits per dimension and per-token perplexity against values
  computed by hand (math.fsum), and a Monte Carlo check on a tiny model (a diagonal Gaussian on D = 2, L = 4
  levels) that the reported NLL of dequantised data bounds the discrete NLL (bin masses from scipy's normal
  CDF), with the expected bound also in closed form;
- `anomaly_metrics`: AUROC (higher score = more anomalous) against a brute-force Mann-Whitney count over all
  pairs and sklearn's roc_auc_score / roc_curve, on scores with ties, +-inf and NaN (NaN counts as +inf)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.special import log_ndtr
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from lightning_modules.contract import DataInfo
from pipeline.evaluation.scoring import anomaly_metrics, likelihood_metrics

LN2 = math.log(2)
AUROC_TOL = 1e-6  # torchmetrics returns the AUROC as float32 (its fpr / tpr are float32): ~1e-7 rounding


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Stub:
    """Just what the metrics ask of a model: `token_count` (token sequences padded with -1, or None),
    `anomaly_score` (the first column of x), and its `device` (where the scoring sends each batch)."""

    device = torch.device("cpu")

    def __init__(self, tokens: bool = False):
        self.tokens = tokens

    def token_count(self, x):
        return (x >= 0).sum(-1) if self.tokens else None

    def anomaly_score(self, x):
        return x[:, 0]


log_density = st.one_of(
    st.floats(-1e3, 1e2, allow_nan=False),
    st.sampled_from([0.0, -0.0, 5e-324, -5e-324, -1e-300, -745.0, -1e3, 50.0]),
)


# --- likelihood_metrics ----------------------------------------------------------------------------
@given(st.lists(log_density, min_size=1, max_size=30), st.sampled_from([(1,), (2,), (1, 3, 3), (8, 8)]),
       st.sampled_from([None, 2, 4, 17, 256]), st.integers(1, 7))
def test_nll_offset_and_bits_per_dim(log_p, shape, levels, batch_size):
    """nll = -mean log p + D ln L (no offset for continuous data), bpd = nll / (D ln 2)."""
    info = DataInfo(shape=shape, kind="image" if len(shape) == 3 else "vector", levels=levels)
    x = torch.zeros(len(log_p), *shape)
    # float32 log-densities, as a float32 model returns them: the mean must still be taken in float64
    out = likelihood_metrics(Stub(), torch.tensor(log_p, dtype=torch.float32), x, info, batch_size)
    d = math.prod(shape)
    lp32 = [float(np.float32(v)) for v in log_p]  # the test log-densities as a float32 tensor holds them
    ref_nll = -math.fsum(lp32) / len(lp32) + (d * math.log(levels) if levels else 0.0)
    assert set(out) == {"nll", "bpd"}
    assert out["nll"] == pytest.approx(ref_nll, rel=1e-12, abs=1e-9)
    assert out["bpd"] == pytest.approx(ref_nll / (d * LN2), rel=1e-12, abs=1e-9)


@st.composite
def token_batches(draw):
    """Token sequences of length T padded with -1 (each with >= 1 real token) and their log-probabilities."""
    n, t = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(1, t), min_size=n, max_size=n))
    x = torch.full((n, t), -1, dtype=torch.long)
    for i, length in enumerate(lengths):
        x[i, :length] = torch.tensor(draw(st.lists(st.integers(0, 9), min_size=length, max_size=length)))
    # NLL per token of each sequence: moderate, or past exp's overflow at ~709.78 nats (perplexity +inf)
    nll = st.one_of(st.floats(0, 800), st.sampled_from([0.0, 5e-324, math.log(10), 709.0, 709.78, 709.8, 1e4, math.inf]))
    per_token = draw(st.lists(nll, min_size=n, max_size=n))
    log_p = [-p * length for p, length in zip(per_token, lengths)]
    return x, log_p, lengths


@given(token_batches(), st.integers(1, 4))
def test_perplexity_and_bits_per_token(batch, batch_size):
    """perplexity = exp(-sum log p / number of real tokens), bpd = bits per real token; the -1 padding does not count.
    An overflowing perplexity is +inf."""
    x, log_p, lengths = batch
    info = DataInfo(shape=(x.shape[1],), kind="sequence", vocab_size=10)
    out = likelihood_metrics(Stub(tokens=True), torch.tensor(log_p, dtype=torch.float64), x, info, batch_size)
    tokens = sum(lengths)
    per_token = -math.fsum(log_p) / tokens
    assert out["nll"] == pytest.approx(-math.fsum(log_p) / len(log_p), rel=1e-12, abs=1e-12)
    assert out["bpd"] == pytest.approx(per_token / LN2, rel=1e-12, abs=1e-12)
    try:
        ref = math.exp(per_token)
    except OverflowError:
        ref = math.inf
    assert out["perplexity"] == (ref if math.isinf(ref) else pytest.approx(ref, rel=1e-11))


def log_bin_mass(lo, hi, mu, sigma):
    """log (Phi((hi - mu) / sigma) - Phi((lo - mu) / sigma)), accurate in both tails (log_ndtr of the nearer side)."""
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    right = a > 0  # both ends above the mean: use the upper tail, Phi(-a) - Phi(-b)
    top = np.where(right, log_ndtr(-a), log_ndtr(b))
    bottom = np.where(right, log_ndtr(-b), log_ndtr(a))
    return top + np.log1p(-np.exp(bottom - top))


@settings(max_examples=20)
@given(st.lists(st.floats(-0.5, 1.5), min_size=2, max_size=2), st.lists(st.floats(-3.5, 1.0), min_size=2, max_size=2),
       st.integers(0, 2**32 - 1))
def test_dequantised_nll_bounds_the_discrete_nll(mu, log10_sigma, seed):
    """A diagonal Gaussian p on R^2 and data on L = 4 levels per dimension. The discrete model it implies puts
    P(l) = prod_d [Phi((l_d + 1) / L) - Phi(l_d / L)] on bin l; by Jensen, E_u[-log p((l + u) / L)] + D ln L >=
    -log P(l). The NLL `likelihood_metrics` reports from Monte Carlo dequantised log-densities matches the exact
    expectation (closed form for a Gaussian) and bounds the discrete NLL, up to the Monte Carlo error."""
    levels, dim, draws = 4, 2, 4000
    mu, sigma = np.array(mu), 10.0 ** np.array(log10_sigma) * 3  # sigma in [1e-3, 30]
    rng = np.random.default_rng(seed)
    bins = np.stack(np.meshgrid(np.arange(levels), np.arange(levels), indexing="ij"), -1).reshape(-1, dim)  # all 16
    discrete_nll = -log_bin_mass(bins / levels, (bins + 1) / levels, mu, sigma).sum(1)  # (16,)
    # closed form: E_u[(x - mu)^2] over the bin = (centre - mu)^2 + width^2 / 12
    centre, width = (bins + 0.5) / levels, 1 / levels
    expected = (0.5 * np.log(2 * np.pi * sigma**2) + ((centre - mu) ** 2 + width**2 / 12) / (2 * sigma**2)).sum(1)
    bound = expected + dim * math.log(levels)
    assert np.all(bound >= discrete_nll - 1e-9 * (1 + np.abs(discrete_nll)))  # Jensen, exactly
    # Monte Carlo: every bin dequantised `draws` times, scored by the continuous density, through the metric
    x = (np.repeat(bins, draws, 0) + rng.uniform(size=(len(bins) * draws, dim))) / levels
    log_p = norm.logpdf(x, mu, sigma).sum(1)
    info = DataInfo(shape=(dim,), kind="vector", levels=levels)
    out = likelihood_metrics(Stub(), torch.from_numpy(log_p), torch.from_numpy(x), info, 1024)
    se = log_p.std() / math.sqrt(len(log_p))
    assert out["nll"] == pytest.approx(bound.mean(), abs=5 * se + 1e-9 * abs(bound.mean()))
    assert out["nll"] >= discrete_nll.mean() - 5 * se - 1e-9 * abs(discrete_nll.mean())
    assert out["bpd"] == pytest.approx(out["nll"] / (dim * LN2), rel=1e-12)


# --- anomaly_metrics -------------------------------------------------------------------------------------
score = st.one_of(
    st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 5e-324, 35.0, 40.0, 50.0, 1e6, 1e300, 1.7976931348623157e308, -1e300,
                     math.inf, -math.inf, math.nan]),
    st.integers(-3, 3).map(float),  # small integers: many ties
)
score_lists = st.lists(score, min_size=1, max_size=12)


def mann_whitney_auroc(normal, anomalous):
    """P(s_anomalous > s_normal) + P(tie) / 2 over all pairs, NaN read as +inf."""
    n = np.nan_to_num(np.asarray(normal, dtype=np.float64), nan=np.inf, posinf=np.inf, neginf=-np.inf)
    a = np.nan_to_num(np.asarray(anomalous, dtype=np.float64), nan=np.inf, posinf=np.inf, neginf=-np.inf)
    greater = (a[:, None] > n[None, :]).sum()
    ties = (a[:, None] == n[None, :]).sum()
    return (greater + 0.5 * ties) / (len(a) * len(n))


def sklearn_auroc_and_curve(normal, anomalous):
    """sklearn on the scores' ranks (it refuses infinities; AUROC and the ROC curve depend only on the order)."""
    s = np.nan_to_num(np.concatenate([normal, anomalous]).astype(np.float64), nan=np.inf, posinf=np.inf,
                      neginf=-np.inf)
    ranks = rankdata(s, method="dense").astype(np.float64)
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    fpr, tpr, _ = roc_curve(labels, ranks, drop_intermediate=False)
    return roc_auc_score(labels, ranks), fpr, tpr


def column(v):
    return torch.tensor(v, dtype=torch.float64)[:, None]


@given(score_lists, st.dictionaries(st.sampled_from(["noise", "flip"]), score_lists, min_size=1, max_size=2),
       st.integers(1, 5))
def test_anomaly_auroc_matches_pairwise_count_and_sklearn(normal, anomalies, batch_size):
    metrics, curves = anomaly_metrics(Stub(), column(normal), {k: column(v) for k, v in anomalies.items()}, batch_size)
    every = [s for v in anomalies.values() for s in v]
    expected = {"anomaly_auroc": every, **{f"anomaly_auroc_{k}": v for k, v in anomalies.items()}}
    assert set(metrics) == set(expected)
    for key, anomalous in expected.items():
        ref = mann_whitney_auroc(normal, anomalous)
        assert metrics[key] == pytest.approx(ref, abs=AUROC_TOL), (key, normal, anomalous)
        assert metrics[key] == pytest.approx(sklearn_auroc_and_curve(normal, anomalous)[0], abs=AUROC_TOL)
    # the ROC curve of all anomalies together: sklearn's points, thresholds at every distinct score
    _, fpr, tpr = sklearn_auroc_and_curve(normal, every)
    got = sorted(set(zip(curves["roc"]["fpr"], curves["roc"]["tpr"])))
    ref = sorted(set(zip(fpr.tolist(), tpr.tolist())))
    assert len(got) == len(ref) and np.allclose(np.array(got), np.array(ref), atol=1e-7), (got, ref)


@given(st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=12), st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=12))
def test_anomaly_auroc_finite_scores_match_sklearn_directly(normal, anomalous):
    """Plain finite scores, no rank transform on the reference side: sklearn's roc_auc_score as is."""
    metrics, _ = anomaly_metrics(Stub(), column(normal), {"noise": column(anomalous)}, 4)
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    ref = roc_auc_score(labels, np.r_[normal, anomalous])
    assert metrics["anomaly_auroc"] == pytest.approx(ref, abs=AUROC_TOL)
    assert metrics["anomaly_auroc_noise"] == pytest.approx(ref, abs=AUROC_TOL)


@given(st.floats(-1e4, 1e4), st.floats(0.01, 100), st.integers(0, 2**32 - 1))
def test_anomaly_auroc_is_shift_invariant_and_oriented(offset, spread, seed):
    """Typical negative log-likelihood scores (tens to thousands of nats): anomalies scored higher give an AUROC
    near 1, swapped sets the complement, and adding a constant to every score changes nothing."""
    rng = np.random.default_rng(seed)
    normal = offset + spread * rng.normal(size=40)
    anomalous = offset + spread * (rng.normal(size=30) + 3)
    ref = roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[normal, anomalous])
    up, _ = anomaly_metrics(Stub(), column(normal), {"noise": column(anomalous)}, 16)
    down, _ = anomaly_metrics(Stub(), column(anomalous), {"noise": column(normal)}, 16)
    assert up["anomaly_auroc"] == pytest.approx(ref, abs=AUROC_TOL)
    assert down["anomaly_auroc"] == pytest.approx(1 - ref, abs=AUROC_TOL)
    assert ref > 0.9
