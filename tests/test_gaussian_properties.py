"""Property tests (Hypothesis) of `lightning_modules.common.gaussian` against independent references:
scipy.stats.multivariate_normal.logpdf for the densities of all four covariance types, numpy for the
precision Cholesky factors and brute-force weighted moments (full and tied densities also against the
exact value in 50-digit mpmath arithmetic) for the M-step. Covariances are random SPD
matrices Q diag(lambda) Q^T with Q a random orthogonal matrix and log-uniform eigenvalues, condition numbers
up to 1e8; points and means mix zeros, subnormals and large values. Everything in float64."""
from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st
from scipy.stats import multivariate_normal, ortho_group

from lightning_modules.common.gaussian import (
    covariances_from_precision_cholesky, estimate_gaussians, gaussian_log_prob, precision_cholesky,
    sufficient_statistics,
)

EPS = np.finfo(np.float64).eps
SUBNORMAL = 5e-324


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# one coordinate of a point or a mean: mostly moderate, sometimes exactly zero, subnormal or large
coordinate = st.one_of(
    st.floats(-5, 5, allow_nan=False),
    st.sampled_from([0.0, -0.0, SUBNORMAL, -SUBNORMAL, 2.2250738585072014e-308, 1e-300, 1e3, -1e3, 37.5]),
)


def points(n: int, dim: int):
    return st.lists(st.lists(coordinate, min_size=dim, max_size=dim), min_size=n, max_size=n).map(
        lambda rows: np.array(rows, dtype=np.float64))


@st.composite
def spd_matrix(draw, dim: int):
    """Q diag(lambda) Q^T, Q Haar-orthogonal, log10 lambda uniform on [lo, lo + log10 cond], cond <= 1e8."""
    seed = draw(st.integers(0, 2**32 - 1))
    log_cond = draw(st.one_of(st.floats(0, 8), st.sampled_from([0.0, 8.0])))
    lo = draw(st.floats(-4, 2))
    rng = np.random.default_rng(seed)
    q = ortho_group.rvs(dim, random_state=rng) if dim > 1 else np.ones((1, 1))
    logs = lo + log_cond * rng.uniform(size=dim)
    if dim > 1:  # pin the extremes so the condition number is exactly 10**log_cond
        logs[0], logs[1] = lo, lo + log_cond
    sigma = (q * 10.0**logs) @ q.T
    return (sigma + sigma.T) / 2


def log_uniform_variances(shape, rng, log_cond):
    lo = rng.uniform(-4, 2)
    return 10.0 ** (lo + log_cond * rng.uniform(size=shape))


def maha_scale(x, means, prec_chol_full):
    """Size of the terms the expanded Mahalanobis forms subtract: ||x P||^2 + ||mu P||^2 (their rounding
    error is a few eps times this), per (n, k)."""
    xp = np.einsum("nd,kde->nke", x, prec_chol_full)
    mp = np.einsum("kd,kde->ke", means, prec_chol_full)
    return (xp**2).sum(-1) + (mp**2).sum(-1)[None]


def assert_log_prob_close(got, ref, scale, covs):
    """|got - ref| within a relative 1e-11 + 32 cond(Sigma) eps of the log-density (a condition number of
    1e8 loses up to 8 of the 16 digits of the quadratic form, in scipy's eigendecomposition as in the
    Cholesky factor: both are seen up to ~13 cond eps from the exact value) plus a few dozen eps of the
    terms an expanded form subtracts (x = mu = 1e3 under a tied covariance costs ~1e-11 absolute)."""
    cond = max(np.linalg.cond(c) for c in covs)
    tol = (1e-11 + 32 * cond * EPS) * (1 + np.abs(ref)) + 64 * EPS * scale
    assert np.all(np.isfinite(got))
    err = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), f"err {err[worst]:.3g} > tol {tol[worst]:.3g} (ref {ref[worst]:.6g}, cond {cond:.3g})"


def exact_log_prob(x, means, covs):
    """The same log-densities in 50-digit arithmetic (mpmath LU solve and determinant) on the float64 inputs."""
    out = np.empty((len(x), len(means)))
    with mpmath.workdps(50):
        for k, (m, c) in enumerate(zip(means, covs)):
            sigma = mpmath.matrix(c.tolist())
            log_det = mpmath.log(mpmath.det(sigma))
            for n, xn in enumerate(x):
                r = mpmath.matrix([mpmath.mpf(a) - mpmath.mpf(b) for a, b in zip(xn, m)])
                maha = (r.T * mpmath.lu_solve(sigma, r))[0]
                out[n, k] = float(-0.5 * (len(m) * mpmath.log(2 * mpmath.pi) + log_det + maha))
    return out


def scipy_log_prob(x, means, covs):
    return np.stack([multivariate_normal(mean=m, cov=c, allow_singular=False).logpdf(x).reshape(len(x))
                     for m, c in zip(means, covs)], 1)


# --- densities -------------------------------------------------------------------------------------
@given(st.data(), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4))
def test_full_log_prob_matches_scipy(data, dim, k, n):
    covs = np.stack([data.draw(spd_matrix(dim)) for _ in range(k)])
    means = data.draw(points(k, dim))
    x = data.draw(points(n, dim))
    pc = precision_cholesky(torch.from_numpy(covs), "full")
    got = gaussian_log_prob(torch.from_numpy(x), torch.from_numpy(means), pc, "full").numpy()
    scale = maha_scale(x, means, pc.numpy())
    assert_log_prob_close(got, scipy_log_prob(x, means, covs), scale, covs)
    assert_log_prob_close(got, exact_log_prob(x, means, covs), scale, covs)


@given(st.data(), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4))
def test_tied_log_prob_matches_scipy(data, dim, k, n):
    cov = data.draw(spd_matrix(dim))
    means = data.draw(points(k, dim))
    x = data.draw(points(n, dim))
    pc = precision_cholesky(torch.from_numpy(cov), "tied")
    assert pc.shape == (dim, dim)
    got = gaussian_log_prob(torch.from_numpy(x), torch.from_numpy(means), pc, "tied").numpy()
    scale = maha_scale(x, means, np.broadcast_to(pc.numpy(), (k, dim, dim)))
    assert_log_prob_close(got, scipy_log_prob(x, means, [cov] * k), scale, [cov])
    assert_log_prob_close(got, exact_log_prob(x, means, [cov] * k), scale, [cov])


@given(st.data(), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**32 - 1),
       st.floats(0, 8))
def test_diag_log_prob_matches_scipy(data, dim, k, n, seed, log_cond):
    var = log_uniform_variances((k, dim), np.random.default_rng(seed), log_cond)
    means = data.draw(points(k, dim))
    x = data.draw(points(n, dim))
    pc = precision_cholesky(torch.from_numpy(var), "diag")
    assert pc.shape == (k, dim)
    got = gaussian_log_prob(torch.from_numpy(x), torch.from_numpy(means), pc, "diag").numpy()
    covs = [np.diag(v) for v in var]
    ref = scipy_log_prob(x, means, covs)
    assert_log_prob_close(got, ref, maha_scale(x, means, np.stack([np.diag(p) for p in pc.numpy()])), covs)


@given(st.data(), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**32 - 1),
       st.floats(0, 8))
def test_spherical_log_prob_matches_scipy(data, dim, k, n, seed, log_cond):
    var = log_uniform_variances((k,), np.random.default_rng(seed), log_cond)
    means = data.draw(points(k, dim))
    x = data.draw(points(n, dim))
    pc = precision_cholesky(torch.from_numpy(var), "spherical")
    assert pc.shape == (k,)
    got = gaussian_log_prob(torch.from_numpy(x), torch.from_numpy(means), pc, "spherical").numpy()
    covs = [v * np.eye(dim) for v in var]
    ref = scipy_log_prob(x, means, covs)
    assert_log_prob_close(got, ref, maha_scale(x, means, np.stack([p * np.eye(dim) for p in pc.numpy()])), covs)


# --- the precision Cholesky factor ------------------------------------------------------------------
@given(st.data(), st.integers(1, 5))
def test_precision_cholesky_whitens_and_round_trips(data, dim):
    """P is upper triangular with a positive diagonal and P^T Sigma P = I (so P P^T = Sigma^-1), and
    `covariances_from_precision_cholesky` gives Sigma back."""
    sigma = data.draw(spd_matrix(dim))
    cond = np.linalg.cond(sigma)
    p = precision_cholesky(torch.from_numpy(sigma)[None], "full")[0].numpy()
    assert np.allclose(np.tril(p, -1), 0.0)
    assert np.all(np.diag(p) > 0)
    assert np.allclose(p.T @ sigma @ p, np.eye(dim), atol=1e-6 * max(1.0, cond * EPS * 1e6))
    # the log-determinant the density uses: sum log P_dd = -1/2 log det Sigma (numpy's slogdet)
    sign, logdet = np.linalg.slogdet(sigma)
    assert sign == 1
    assert np.isclose(np.log(np.diag(p)).sum(), -0.5 * logdet, rtol=1e-9, atol=1e-7)
    back = covariances_from_precision_cholesky(torch.from_numpy(p)[None], "full")[0].numpy()
    assert np.allclose(back, sigma, rtol=0, atol=1e-9 * np.abs(sigma).max() * max(1.0, cond * 1e-6))


@given(st.integers(1, 4))
def test_precision_cholesky_refuses_non_positive(dim):
    with pytest.raises(ValueError):
        precision_cholesky(torch.zeros(2, dim, dtype=torch.float64), "diag")
    with pytest.raises(ValueError):
        precision_cholesky(torch.tensor([1.0, -0.0], dtype=torch.float64), "spherical")
    singular = torch.zeros(dim, dim, dtype=torch.float64)
    singular[0, 0] = 1.0  # rank 1
    if dim > 1:
        with pytest.raises(ValueError):
            precision_cholesky(singular, "tied")


# --- the M-step --------------------------------------------------------------------------------------
@st.composite
def weighted_data(draw):
    n, dim, k = draw(st.integers(2, 8)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    x = draw(st.lists(st.lists(st.one_of(st.floats(-10, 10), st.sampled_from([0.0, SUBNORMAL, 1e-300])),
                               min_size=dim, max_size=dim), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    resp = rng.dirichlet(np.full(k, 0.5), size=n)
    if draw(st.booleans()):  # hard assignments: many exact zeros
        resp = np.eye(k)[resp.argmax(1)]
    assume((resp.sum(0) > 0.5).all())
    return np.array(x, dtype=np.float64), resp


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
@given(weighted_data(), st.sampled_from([0.0, 1e-6, 1e-3]))
def test_estimate_gaussians_matches_weighted_moments(covariance_type, xr, reg):
    """Means and covariances from summed sufficient statistics equal the directly computed (centred)
    weighted moments: sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T / N_k (+ reg I), pooled over k for `tied`."""
    x, resp = xr
    n, dim = x.shape
    stats = sufficient_statistics(torch.from_numpy(x), torch.from_numpy(resp), covariance_type)
    means, cov = estimate_gaussians(stats["nk"], stats["sx"], stats["sxx"], covariance_type, reg)
    nk = resp.sum(0)
    ref_means = resp.T @ x / nk[:, None]
    dev = x[None] - ref_means[:, None]  # (K, N, D)
    full = np.einsum("nk,knd,kne->kde", resp, dev, dev) / nk[:, None, None]
    ref = {
        "full": full + reg * np.eye(dim),
        "tied": np.einsum("k,kde->de", nk, full) / nk.sum() + reg * np.eye(dim),
        "diag": np.diagonal(full, axis1=1, axis2=2) + reg,
        "spherical": np.diagonal(full, axis1=1, axis2=2).mean(1) + reg,
    }[covariance_type]
    scale = 1.0 + (x**2).max()  # raw second moments minus squared means: rounding of order eps * max x^2
    assert np.allclose(means.numpy(), ref_means, rtol=1e-12, atol=1e-12 * scale)
    assert np.allclose(cov.numpy(), ref, rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_estimate_gaussians_empty_component_stays_finite(covariance_type):
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    resp = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    stats = sufficient_statistics(x, resp, covariance_type)
    means, cov = estimate_gaussians(stats["nk"], stats["sx"], stats["sxx"], covariance_type, 1e-6)
    assert torch.isfinite(means).all() and torch.isfinite(cov).all()
    assert torch.equal(means[1], torch.zeros(2, dtype=torch.float64))
