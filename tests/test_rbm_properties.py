"""Property tests (Hypothesis) of the RBM's free energy and exact partition function against brute force
written here in numpy: enumeration over BOTH the visible and the hidden units of tiny RBMs (binary,
categorical and ordinal visibles), and for one Gaussian visible unit a scipy.integrate.quad integral over v
of the sum over h. Weights and biases are random, with exact zeros and large magnitudes. Also the
pseudo-likelihood, the label units' per-class log Z_y, and the module's exact `log_prob` (the path taken
when n_hidden <= exact_max_hidden)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.integrate import quad
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from lightning_modules.common.ais import effective_sample_size, log_z_standard_error
from lightning_modules.rbm.energy import RBMEnergy
from lightning_modules.rbm.labels import LabelUnits
from lightning_modules.rbm.model import RBM
from lightning_modules.rbm.units import BernoulliUnits, CategoricalUnits, GaussianUnits, OrdinalUnits, level_units

seeds = st.integers(0, 2**32 - 1)
# torch's softplus returns x itself above x = 20 (its `threshold`), short of log(1 + e^x) by up to log1p(e^-20) =
# 2.1e-9: each softplus term of a float64 free energy or log Z may carry that much (see the report), so the
# tolerances below allow it per term and are 1e-12 relative otherwise
SOFTPLUS_GAP = math.log1p(math.exp(-20.0))
magnitudes = st.sampled_from([0.0, 0.1, 1.0, 4.0, 25.0])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_array(rng, shape, scale, zero_fraction=0.25):
    """N(0, scale^2) entries, a fraction of them exactly zero."""
    return rng.normal(size=shape) * scale * (rng.uniform(size=shape) >= zero_fraction)


def binary_states(n):
    """All 2^n binary vectors, (2^n, n)."""
    return np.array(list(itertools.product([0.0, 1.0], repeat=n))).reshape(-1, n)


def level_states(d, levels):
    """All L^d level vectors, (L^d, d) ints."""
    return np.array(list(itertools.product(range(levels), repeat=d)), dtype=int).reshape(-1, d)


def one_hot(levels_vec, levels):
    """(N, d) ints -> (N, d L) flattened one-hot groups."""
    return np.eye(levels)[levels_vec].reshape(len(levels_vec), -1)


def energy_of(w, b, c, units, sigma=None):
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    d = len(b)
    return RBMEnergy(t(w), t(b), t(c), torch.zeros(d, dtype=torch.float64),
                     t(np.ones(d) if sigma is None else sigma), units)


def neg_joint_energy(v_feat, hs, w, b_dot_v, c):
    """-E(v, h) = b.v + c.h + v_feat' W h for every (v, h): (V, 2^H)."""
    return b_dot_v[:, None] + (hs @ c)[None, :] + v_feat @ w @ hs.T


@st.composite
def tiny_rbm(draw, max_visible=5, max_hidden=4):
    d, h = draw(st.integers(1, max_visible)), draw(st.integers(1, max_hidden))
    rng = np.random.default_rng(draw(seeds))
    w_scale, bias_scale = draw(magnitudes), draw(magnitudes)
    return d, h, random_array(rng, (d, h), w_scale), random_array(rng, d, bias_scale), random_array(rng, h, bias_scale)


# --- binary visibles ----------------------------------------------------------------------------------
@given(tiny_rbm())
def test_bernoulli_free_energy_and_log_z_match_joint_enumeration(rbm):
    d, h, w, b, c = rbm
    vs, hs = binary_states(d), binary_states(h)
    neg_e = neg_joint_energy(vs, hs, w, vs @ b, c)  # (2^D, 2^H)
    e = energy_of(w, b, c, BernoulliUnits)
    free = e.free_energy(torch.from_numpy(vs)).numpy()
    ref_free = -logsumexp(neg_e, axis=1)
    ref_log_z = logsumexp(neg_e)
    assert np.allclose(free, ref_free, rtol=1e-12, atol=1e-10 + h * SOFTPLUS_GAP)
    tol = 1e-10 + d * SOFTPLUS_GAP  # log Z: D softplus terms (the visible layer summed out) per hidden state
    assert e.log_z_enumerate() == pytest.approx(ref_log_z, rel=1e-12, abs=tol)
    assert e.log_z_enumerate(chunk=1) == pytest.approx(ref_log_z, rel=1e-12, abs=tol)  # chunked logsumexp
    # and the visible marginal it implies sums to one
    assert logsumexp(-free - e.log_z_enumerate()) == pytest.approx(0.0, abs=1e-10 + (d + h) * SOFTPLUS_GAP)


@given(tiny_rbm())
def test_bernoulli_pseudo_likelihood_matches_conditionals(rbm):
    """sum_i log p(v_i | v_-i) with each conditional from the brute-force joint p(v) over all 2^D states."""
    d, h, w, b, c = rbm
    vs, hs = binary_states(d), binary_states(h)
    log_pv = logsumexp(neg_joint_energy(vs, hs, w, vs @ b, c), axis=1)  # unnormalised log p(v)
    index = {tuple(v): i for i, v in enumerate(vs)}
    ref = np.zeros(len(vs))
    for n, v in enumerate(vs):
        for i in range(d):
            flipped = v.copy()
            flipped[i] = 1 - flipped[i]
            ref[n] += log_pv[n] - np.logaddexp(log_pv[n], log_pv[index[tuple(flipped)]])
    got = energy_of(w, b, c, BernoulliUnits).pseudo_log_likelihood(torch.from_numpy(vs)).numpy()
    assert np.allclose(got, ref, rtol=1e-10, atol=1e-9 + 2 * d * h * SOFTPLUS_GAP)


@given(tiny_rbm(max_visible=4, max_hidden=3), st.integers(1, 3), st.data())
def test_label_units_class_log_z_matches_enumeration(rbm, k, data):
    """log Z_y = log sum_{v,h} exp(-E(v, h) + d_y + h'U_y) for every class, and F(v, y) likewise over h."""
    d, h, w, b, c = rbm
    rng = np.random.default_rng(data.draw(seeds))
    scale = data.draw(magnitudes)
    u, dy = random_array(rng, (k, h), scale), random_array(rng, k, scale)
    vs, hs = binary_states(d), binary_states(h)
    neg_e = np.stack([neg_joint_energy(vs, hs, w, vs @ b, c + u[y]) + dy[y] for y in range(k)])  # (K, V, 2^H)
    e = energy_of(w, b, c, BernoulliUnits)
    labels = LabelUnits(torch.from_numpy(u), torch.from_numpy(dy), torch.zeros(k, d, dtype=torch.float64))
    got, log_weights = labels.class_log_z(e, exact=True)
    assert log_weights is None  # enumerated: no AIS weights
    got = got.numpy()
    assert np.allclose(got, logsumexp(neg_e, axis=(1, 2)), rtol=1e-12, atol=1e-10 + d * SOFTPLUS_GAP)
    free = labels.free_energies(e, torch.from_numpy(vs)).numpy()  # (V, K)
    assert np.allclose(free, -logsumexp(neg_e, axis=2).T, rtol=1e-12, atol=1e-10 + h * SOFTPLUS_GAP)


# --- categorical and ordinal visibles -------------------------------------------------------------------
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 4), magnitudes, magnitudes, seeds)
def test_categorical_free_energy_and_log_z_match_joint_enumeration(d, h, levels, w_scale, bias_scale, seed):
    rng = np.random.default_rng(seed)
    w, b, c = (random_array(rng, (d * levels, h), w_scale), random_array(rng, d * levels, bias_scale),
               random_array(rng, h, bias_scale))
    v = one_hot(level_states(d, levels), levels)  # (L^D, D L)
    hs = binary_states(h)
    neg_e = neg_joint_energy(v, hs, w, v @ b, c)
    e = energy_of(w, b, c, level_units(CategoricalUnits, levels))
    assert np.allclose(e.free_energy(torch.from_numpy(v)).numpy(), -logsumexp(neg_e, axis=1), rtol=1e-12,
                       atol=1e-10 + h * SOFTPLUS_GAP)
    assert e.log_z_enumerate() == pytest.approx(logsumexp(neg_e), rel=1e-12, abs=1e-10)  # logsumexp, no softplus


@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 4), magnitudes, magnitudes, seeds)
def test_ordinal_free_energy_and_log_z_match_joint_enumeration(d, h, levels, w_scale, bias_scale, seed):
    """E(v, h) = -b.v - c.h - sum_i (l_i / (L - 1)) W_i.h over one-hot levels, W of shape (D, H)."""
    rng = np.random.default_rng(seed)
    w, b, c = (random_array(rng, (d, h), w_scale), random_array(rng, d * levels, bias_scale),
               random_array(rng, h, bias_scale))
    lv = level_states(d, levels)
    v = one_hot(lv, levels)
    hs = binary_states(h)
    neg_e = neg_joint_energy(lv / (levels - 1), hs, w, v @ b, c)
    e = energy_of(w, b, c, level_units(OrdinalUnits, levels))
    assert np.allclose(e.free_energy(torch.from_numpy(v)).numpy(), -logsumexp(neg_e, axis=1), rtol=1e-12,
                       atol=1e-10 + h * SOFTPLUS_GAP)
    assert e.log_z_enumerate() == pytest.approx(logsumexp(neg_e), rel=1e-12, abs=1e-10)


# --- Gaussian visibles ------------------------------------------------------------------------------------
gauss_scales = st.sampled_from([0.0, 0.1, 1.0, 3.0])
sigmas = st.one_of(st.floats(0.05, 20.0), st.sampled_from([1.0, 1e-2, 50.0]))


@given(st.integers(1, 3), st.integers(1, 4), gauss_scales, gauss_scales, seeds, st.data())
def test_gaussian_free_energy_matches_hidden_enumeration(d, h, w_scale, bias_scale, seed, data):
    """F(v) = -log sum_h exp(-E(v, h)), E(v, h) = sum_i (v_i - b_i)^2 / 2 sigma_i^2 - c.h - (v / sigma)' W h."""
    rng = np.random.default_rng(seed)
    w, b, c = random_array(rng, (d, h), w_scale), random_array(rng, d, bias_scale), random_array(rng, h, bias_scale)
    sigma = np.array([data.draw(sigmas) for _ in range(d)])
    v = np.array(data.draw(st.lists(st.lists(st.one_of(st.floats(-30, 30), st.sampled_from([0.0, 5e-324])),
                                             min_size=d, max_size=d), min_size=3, max_size=3)))
    hs = binary_states(h)
    e_vis = (((v - b) / sigma) ** 2).sum(1) / 2
    ref = -logsumexp(neg_joint_energy(v / sigma, hs, w, -e_vis, c), axis=1)
    got = energy_of(w, b, c, GaussianUnits, sigma).free_energy(torch.from_numpy(v)).numpy()
    assert np.allclose(got, ref, rtol=1e-12, atol=1e-9 + h * SOFTPLUS_GAP)


@settings(max_examples=20)
@given(st.integers(1, 3), gauss_scales, gauss_scales, sigmas, seeds)
def test_gaussian_log_z_matches_quadrature(h, w_scale, bias_scale, sigma, seed):
    """One Gaussian visible unit: Z = sum_h int exp(-E(v, h)) dv by adaptive quadrature (scipy quad, split at
    the integrand's numerically located peak and rescaled by its value there)."""
    rng = np.random.default_rng(seed)
    w, b, c = random_array(rng, (1, h), w_scale), random_array(rng, 1, bias_scale), random_array(rng, h, bias_scale)
    terms = []
    for hv in binary_states(h):
        def log_f(v, hv=hv):
            return -((v - b[0]) ** 2) / (2 * sigma**2) + hv @ c + (v / sigma) * (w[0] @ hv)

        peak = minimize_scalar(lambda v: -log_f(v), bracket=(-1.0, 1.0), tol=1e-12).x
        top = log_f(peak)
        width = sigma
        pieces = [quad(lambda v: math.exp(log_f(v) - top), lo, hi, epsabs=0, epsrel=1e-12, limit=200)[0]
                  for lo, hi in ((-np.inf, peak - 10 * width), (peak - 10 * width, peak),
                                 (peak, peak + 10 * width), (peak + 10 * width, np.inf))]
        terms.append(top + math.log(sum(pieces)))
    ref = logsumexp(terms)
    got = energy_of(w, b, c, GaussianUnits, np.array([sigma])).log_z_enumerate()
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-8)


# --- the module: exact log p(x) when n_hidden <= exact_max_hidden -----------------------------------------
@settings(max_examples=20)
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from(["bernoulli", "ordinal", "categorical"]), magnitudes,
       seeds)
def test_module_exact_log_prob_matches_enumeration(d, h, visible, scale, seed):
    """RBM.log_prob on [0, 1]^D: log P(state of x) from the brute-force joint, plus the log 1 / volume of the state's
    bin (2^D half-cubes for binary visibles, L^D level bins otherwise)."""
    levels = 3
    m = RBM(dict(visible=visible, n_hidden=h, exact_max_hidden=4, seed=0),
            dict(shape=[d], kind="vector", levels=levels)).double()
    dv = d * levels if visible != "bernoulli" else d
    dw = d * levels if visible == "categorical" else d
    rng = np.random.default_rng(seed)
    w, b, c = random_array(rng, (dw, h), scale), random_array(rng, dv, scale), random_array(rng, h, scale)
    m.set_statistics((torch.zeros(d), torch.ones(d), torch.zeros(dv)))
    with torch.no_grad():
        m.W.copy_(torch.from_numpy(w))
        m.b.copy_(torch.from_numpy(b))
        m.c.copy_(torch.from_numpy(c))
    m.refresh_log_z()
    assert bool(m.log_z_exact)
    hs = binary_states(h)
    if visible == "bernoulli":
        states = binary_states(d)
        v, feat, bins = states, states, 2
    else:
        states = level_states(d, levels)
        v = one_hot(states, levels)
        feat = v if visible == "categorical" else states / (levels - 1)
        bins = levels
    log_p_state = logsumexp(neg_joint_energy(feat, hs, w, v @ b, c), axis=1)
    log_p_state -= logsumexp(log_p_state)
    x = (states + np.random.default_rng(seed + 1).uniform(0.01, 0.99, size=states.shape)) / bins  # inside each bin
    with torch.no_grad():
        got = m.log_prob(torch.from_numpy(x)).numpy()
    log_z_terms = d if visible == "bernoulli" else 0
    assert np.allclose(got, log_p_state + d * math.log(bins), rtol=1e-12, atol=1e-9 + (h + log_z_terms) * SOFTPLUS_GAP)


# --- AIS diagnostics ------------------------------------------------------------------------------------
@given(st.lists(st.one_of(st.just(0.0), st.floats(-30, 30)), min_size=1, max_size=40),
       st.sampled_from([0.0, -1e4, 1e4, -700.0]))
def test_ais_diagnostics_equal_the_plain_formulas_at_any_offset(log_w, offset):
    """Kish's ESS (sum w)^2 / sum w^2 and the delta-method standard error sd(w) / (sqrt(n) mean(w)), computed by
    numpy on the plain weights, against the functions given log weights shifted by a constant (one that
    overflows or underflows exp in float64: neither quantity depends on it)."""
    w = np.exp(np.asarray(log_w, dtype=np.float64))
    shifted = torch.tensor(log_w, dtype=torch.float64) + offset
    assert float(effective_sample_size(shifted)) == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-9)
    se = float(log_z_standard_error(shifted))
    if len(w) < 2:
        assert math.isnan(se)
    else:
        assert se == pytest.approx(w.std(ddof=1) / (math.sqrt(len(w)) * w.mean()), rel=1e-9, abs=1e-15)
