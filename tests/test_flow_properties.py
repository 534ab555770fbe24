"""Property tests (Hypothesis) of every flow transform in `lightning_modules.flow.transforms`, in float64:
inverse(forward(x)) == x, and the returned log|det J| against log|det| of the Jacobian computed by
torch.autograd.functional.jacobian (and, for the logit, against the exact derivative in 50-digit mpmath).
Parameters are random (zero, moderate or large, with exact zeros), inputs mix zeros, subnormals and
values that saturate the bounded log-scales; logit inputs sit on and next to the edges of [0, 1]. The bases
are checked against scipy, and a whole 2-D flow's density is integrated on a grid."""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from scipy.stats import norm
from torch.autograd.functional import jacobian

from lightning_modules.flow.transforms import (
    MADE, ActNorm, AffineCoupling, ClassConditionalNormal, Flatten, InvertibleConv1x1, Logit,
    MaskedAffineAutoregressive, NormalizingFlow, Sequential, Split, Squeeze, StandardNormal, channel_mask,
    checkerboard_mask,
)
from lightning_modules.flow.transforms.nets import conv_net, mlp

EPS = float(np.finfo(np.float64).eps)
SUBNORMAL = 5e-324


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def own_rng():
    """The tests seed torch's global generator (layers draw their initial values from it): restore it after."""
    with torch.random.fork_rng():
        yield

seeds = st.integers(0, 2**31 - 1)
param_scales = st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0])
value = st.one_of(
    st.floats(-3, 3, allow_nan=False),
    st.sampled_from([0.0, -0.0, SUBNORMAL, -SUBNORMAL, 1e-300, 20.0, -20.0, 300.0, -300.0]),
)


def tensors(shape):
    """A float64 tensor of `shape` with entries from `value`."""
    n = math.prod(shape)
    return st.lists(value, min_size=n, max_size=n).map(lambda v: torch.tensor(v, dtype=torch.float64).view(shape))


def randomize(module, std: float, seed: int, zero_fraction: float = 0.2):
    """Every parameter ~ N(0, std^2) with a fraction of exact zeros; float64."""
    g = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            keep = torch.rand(p.shape, generator=g, dtype=torch.float64) >= zero_fraction
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std * keep)
    return module


def autograd_logdet(t, x):
    """log|det d t(x)/dx| per example, from the full Jacobian by autograd."""
    out = []
    for i in range(len(x)):
        xi = x[i : i + 1]
        jac = jacobian(lambda v: t(v.reshape(xi.shape))[0].reshape(-1), xi.reshape(-1), vectorize=True)
        assert jac.shape[0] == jac.shape[1]
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def check_transform(t, x, roundtrip_tol: float, logdet_rtol: float = 1e-9):
    """Round trip within `roundtrip_tol` (relative to 1 + |x| + |y|), log-det against autograd."""
    y, logdet = t(x)
    assert logdet.shape == (x.shape[0],) and logdet.dtype == torch.float64
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    back = t.inverse(y)
    assert back.shape == x.shape
    scale = 1 + x.abs().amax() + y.abs().amax()
    err = (back - x).abs().max().item()
    assert err <= roundtrip_tol * scale, (err, roundtrip_tol * scale.item())
    ref = autograd_logdet(t, x)
    assert torch.isfinite(ref).all()
    assert torch.allclose(logdet, ref, rtol=logdet_rtol, atol=logdet_rtol), (logdet, ref)
    return y, logdet


def max_log_scale(t) -> float:
    """The largest |log-scale| a TanhScale of `t` can produce (its weights bound it)."""
    return float(t.scale.weight.abs().max())


# --- affine coupling -----------------------------------------------------------------------------
@given(st.integers(1, 5), st.integers(0, 1), param_scales, seeds, st.data())
def test_affine_coupling_vector(dim, parity, std, seed, data):
    mask = checkerboard_mask((dim,), parity)
    t = randomize(AffineCoupling(mask, mlp(dim, 6)), std, seed)
    x = data.draw(tensors((3, dim)))
    y, _ = check_transform(t, x, roundtrip_tol=64 * EPS * math.exp(2 * max_log_scale(t)))
    fixed = mask.bool()
    assert torch.equal(y[:, fixed], x[:, fixed])  # the conditioning half passes through untouched


@given(st.sampled_from([(1, 2, 2), (2, 2, 3), (4, 2, 2), (2, 3, 3)]), st.sampled_from(["checkerboard", "channel"]),
       st.integers(0, 1), param_scales, seeds, st.data())
def test_affine_coupling_image(shape, kind, parity, std, seed, data):
    mask = (checkerboard_mask if kind == "checkerboard" else channel_mask)(shape, parity)
    t = randomize(AffineCoupling(mask, conv_net(shape[0], 4)), std, seed)
    x = data.draw(tensors((2, *shape)))
    y, _ = check_transform(t, x, roundtrip_tol=64 * EPS * math.exp(2 * max_log_scale(t)))
    fixed = mask.bool().expand_as(x)
    assert torch.equal(y[fixed], x[fixed])


# --- masked autoregressive -------------------------------------------------------------------------
@given(st.integers(1, 5), st.integers(1, 3), param_scales, seeds)
def test_made_is_autoregressive(dim, layers, std, seed):
    """Output i of every parameter block depends only on inputs < i: d out_i / d x_j == 0 for j >= i."""
    made = randomize(MADE(dim, 7, layers, outputs_per_feature=2), max(std, 0.5), seed, zero_fraction=0.0)
    x = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    jac = jacobian(lambda v: made(v[None])[0], x).view(2, dim, dim)  # (block, output i, input j)
    allowed = torch.tril(torch.ones(dim, dim, dtype=torch.bool), -1)
    assert torch.equal(jac[:, ~allowed], torch.zeros_like(jac[:, ~allowed]))


@given(st.integers(1, 5), param_scales, seeds, st.data())
def test_masked_affine_autoregressive(dim, std, seed, data):
    t = randomize(MaskedAffineAutoregressive(dim, 6, layers=2), std, seed)
    x = data.draw(tensors((3, dim)))
    # the inverse is D sequential passes: an error in x_<i reaches x_i through the MADE net
    check_transform(t, x, roundtrip_tol=1e-10 * math.exp(2 * dim * max_log_scale(t)))


# --- ActNorm ---------------------------------------------------------------------------------------
@given(st.sampled_from([(3,), (2, 2, 2), (1, 3, 2)]), param_scales, seeds, st.data())
def test_actnorm_random_parameters(shape, std, seed, data):
    t = randomize(ActNorm(shape[0]), std, seed).eval()  # eval: no data-dependent initialisation
    x = data.draw(tensors((3, *shape)))
    check_transform(t, x, roundtrip_tol=16 * EPS * math.exp(2 * float(t.log_scale.abs().max())))


@given(st.sampled_from([(3,), (2, 2, 2), (1, 3, 2)]), st.integers(2, 6), st.data())
def test_actnorm_initialisation_standardises(shape, n, data):
    """After the first training batch each channel has mean 0 and (population) std s / (s + eps), with s the
    channel's std from numpy: 1 unless the channel is (nearly) constant."""
    x = data.draw(tensors((n, *shape)))
    t = ActNorm(shape[0]).double().train()
    y, logdet = t(x)
    assert bool(t.initialized)
    per_channel = np.moveaxis(x.numpy(), 1, 0).reshape(shape[0], -1)
    mean, std = per_channel.mean(1), per_channel.std(1)
    out = np.moveaxis(y.detach().numpy(), 1, 0).reshape(shape[0], -1)
    spread = np.abs(per_channel).max(1)
    # the one-pass variance s2/n - mean^2 loses digits when the mean dominates: allow eps * max|x|^2 / std
    for c in range(shape[0]):
        if std[c] > 1e-6 * (1 + spread[c]):
            assert abs(out[c].mean()) < 1e-9 * (1 + spread[c] ** 2 / std[c] ** 2)
            assert abs(out[c].std() - std[c] / (std[c] + t.eps)) < 1e-9 * (1 + spread[c] ** 2 / std[c] ** 2)
    assert np.isfinite(out).all() and torch.isfinite(logdet).all()
    spatial = math.prod(shape[1:])
    assert np.allclose(logdet.detach().numpy(), -np.log(np.sqrt(np.maximum(
        (per_channel**2).mean(1) - mean**2, 0)) + t.eps).sum() * spatial, rtol=1e-12, atol=1e-9)


# --- invertible 1x1 convolution --------------------------------------------------------------------
@given(st.sampled_from([(1,), (2,), (4,), (2, 2, 2), (3, 2, 1)]), st.sampled_from([0.0, 0.1, 0.5, 1.0]), seeds,
       st.data())
def test_invertible_conv1x1(shape, std, seed, data):
    torch.manual_seed(seed)  # the fixed permutation comes from the initial random rotation
    t = randomize(InvertibleConv1x1(shape[0]), std, seed)
    x = data.draw(tensors((3, *shape)))
    w = t.weight().detach().numpy()
    cond = np.linalg.cond(w)
    check_transform(t, x, roundtrip_tol=64 * EPS * cond)
    # log|det W| from the LU parameters against numpy's slogdet of the assembled W
    sign, logabsdet = np.linalg.slogdet(w)
    assert sign != 0
    assert np.isclose(float(t.log_s.sum()), logabsdet, rtol=1e-10, atol=1e-10)


# --- logit -----------------------------------------------------------------------------------------
alphas = st.sampled_from([0.0, 1e-12, 1e-6, 0.05, 0.3, 0.4999])
unit = st.one_of(
    st.floats(0, 1),
    st.sampled_from([0.0, 1.0, SUBNORMAL, 1e-300, 1e-16, 0.5, 1 - EPS / 2, 1 - EPS, 1 - 1e-12, 1e-6]),
)


def logit_logdet_exact(x: np.ndarray, alpha: float) -> float:
    """sum_i log|d/dx logit(alpha + (1 - 2 alpha) x_i)| = sum_i log(1 - 2a) - log p_i - log(1 - p_i), in 50 digits."""
    with mpmath.workdps(50):
        a = mpmath.mpf(alpha)
        total = mpmath.mpf(0)
        for xi in x.ravel():
            p = a + (1 - 2 * a) * mpmath.mpf(float(xi))
            total += mpmath.log(1 - 2 * a) - mpmath.log(p) - mpmath.log(1 - p)
        return float(total)


@given(alphas, st.sampled_from([(3,), (1, 2, 2)]), st.data())
def test_logit(alpha, shape, data):
    x = data.draw(st.lists(st.lists(unit, min_size=math.prod(shape), max_size=math.prod(shape)), min_size=2,
                           max_size=2).map(lambda v: torch.tensor(v, dtype=torch.float64).view(2, *shape)))
    edge = (x == 0) | (x == 1)
    assume(alpha > 0 or not bool(edge.any()))  # alpha = 0 maps the edges to -+inf (tested below)
    t = Logit(alpha)
    y, logdet = t(x)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    # inverse: sigmoid to a few eps, then the affine map divides by 1 - 2 alpha
    assert (t.inverse(y) - x).abs().max() <= 8 * EPS / (1 - 2 * alpha)
    # log-det against the exact derivative. p = alpha + (1 - 2 alpha) x is rounded to float64 (|dp| <= eps), which
    # moves log p and log(1 - p) by up to eps / p and eps / (1 - p): the float64 limit, not an error of the layer
    p = alpha + (1 - 2 * alpha) * x.numpy()
    rounding = (2 * EPS / np.minimum(p, 1 - p).clip(min=1e-300)).reshape(len(x), -1).sum(1)
    for i in range(len(x)):
        exact = logit_logdet_exact(x[i].numpy(), alpha)
        assert abs(logdet[i].item() - exact) <= 1e-12 * (1 + abs(exact)) + rounding[i], (logdet[i].item(), exact)
    # and against autograd where the Jacobian is representable (1 / (p (1 - p)) overflows at subnormal p)
    with np.errstate(over="ignore", divide="ignore"):
        diag = 1 / (p * (1 - p))
    if np.isfinite(diag).all():
        assert torch.allclose(logdet, autograd_logdet(t, x), rtol=1e-12, atol=1e-12)


@given(st.sampled_from([(3,), (1, 2, 2)]), st.data())
def test_logit_alpha_zero_edges(shape, data):
    """alpha = 0: x = 0 and x = 1 map to -inf and +inf with an infinite log-det, and the inverse still
    returns them; the interior stays finite."""
    x = data.draw(tensors((2, *shape)).map(lambda v: (v.abs() > 1).double()))  # only exact 0 and 1
    t = Logit(0.0)
    y, logdet = t(x)
    assert torch.equal(y, torch.where(x == 1, torch.inf, -torch.inf).double())
    assert torch.equal(logdet, torch.full((2,), torch.inf, dtype=torch.float64))
    assert torch.equal(t.inverse(y), x)


# --- volume-preserving reshapes and the multi-scale split ---------------------------------------------
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.data())
def test_squeeze(c, h, w, data):
    x = data.draw(tensors((2, c, 2 * h, 2 * w)))
    y, _ = check_transform(Squeeze(), x, roundtrip_tol=0.0, logdet_rtol=0.0)
    # brute force: channel 4c + 2i + j at (h, w) holds x[c, 2h + i, 2w + j]
    ref = np.zeros((2, 4 * c, h, w))
    xn = x.numpy()
    for ci in range(c):
        for i in range(2):
            for j in range(2):
                ref[:, 4 * ci + 2 * i + j] = xn[:, ci, i::2, j::2]
    assert np.array_equal(y.numpy(), ref)


@given(st.sampled_from([(3,), (2, 2, 2), (1, 3, 1)]), st.data())
def test_flatten(shape, data):
    x = data.draw(tensors((2, *shape)))
    y, _ = check_transform(Flatten(shape), x, roundtrip_tol=0.0, logdet_rtol=0.0)
    assert np.array_equal(y.numpy(), x.numpy().reshape(2, -1))


@given(st.sampled_from([(2, 2, 2), (3, 2, 1), (4, 1, 2)]), st.sampled_from([0.0, 0.1, 0.5]), seeds, st.data())
def test_split(shape, std, seed, data):
    c, h, w = shape
    keep = c - c // 2
    torch.manual_seed(seed)
    inner = randomize(Sequential([InvertibleConv1x1(keep), Flatten((keep, h, w))]), std, seed)
    t = Split(shape, inner)
    x = data.draw(tensors((2, *shape)))
    y, _ = check_transform(t, x, roundtrip_tol=64 * EPS * np.linalg.cond(inner.transforms[0].weight().detach().numpy()))
    assert torch.equal(y[:, : (c // 2) * h * w], x[:, keep:].flatten(1))  # the factored-out half, untouched


@given(st.integers(2, 4), st.sampled_from([0.0, 0.1, 0.5]), seeds, st.data())
def test_sequential_chain_rule(dim, std, seed, data):
    """A stack of every vector layer: log-dets add up to the log|det| of the composite Jacobian."""
    torch.manual_seed(seed)
    t = randomize(Sequential([
        Logit(0.05), ActNorm(dim), InvertibleConv1x1(dim), AffineCoupling(checkerboard_mask((dim,), 0), mlp(dim, 5)),
        MaskedAffineAutoregressive(dim, 5), AffineCoupling(checkerboard_mask((dim,), 1), mlp(dim, 5)),
    ]), std, seed).eval()
    x = data.draw(st.lists(unit, min_size=2 * dim, max_size=2 * dim).map(
        lambda v: torch.tensor(v, dtype=torch.float64).view(2, dim)))
    y, logdet = t(x)
    parts = x.new_zeros(2)
    z = x
    for layer in t.transforms:
        z, ld = layer(z)
        parts = parts + ld
    assert torch.equal(z, y) and torch.allclose(parts, logdet, rtol=1e-14, atol=0)
    assert torch.allclose(logdet, autograd_logdet(t, x), rtol=1e-9, atol=1e-9)
    assert (t.inverse(y) - x).abs().max() < 1e-8


# --- bases and the flow as a density --------------------------------------------------------------------
@given(st.integers(1, 5), st.data())
def test_standard_normal_matches_scipy(dim, data):
    z = data.draw(tensors((3, dim)))
    got = StandardNormal(dim).double().log_prob(z).numpy()
    assert np.allclose(got, norm.logpdf(z.numpy()).sum(1), rtol=1e-13, atol=1e-13)


@given(st.integers(1, 4), st.integers(1, 3), seeds, st.data())
def test_class_conditional_normal_matches_scipy(dim, k, seed, data):
    base = ClassConditionalNormal(dim, k).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base.mean.copy_(torch.randn(k, dim, generator=g, dtype=torch.float64) * 3)
        base.log_scale.copy_(torch.rand(k, dim, generator=g, dtype=torch.float64) * 8 - 4)  # std in [e^-4, e^4]
    z = data.draw(tensors((3, dim)))
    mean, std = base.mean.detach().numpy(), base.log_scale.exp().detach().numpy()
    ref = norm.logpdf(z.numpy()[:, None, :], mean[None], std[None]).sum(-1)  # (B, K)
    got = base.class_log_probs(z).detach().numpy()
    assert np.allclose(got, ref, rtol=1e-12, atol=1e-10)
    y = torch.arange(3) % k
    assert np.allclose(base.log_prob(z, y).detach().numpy(), ref[np.arange(3), y.numpy()], rtol=1e-12, atol=1e-10)


@settings(max_examples=10)
@given(st.sampled_from([0.0, 0.3, 0.6]), seeds)
def test_flow_density_integrates_to_one(std, seed):
    """A 2-D flow (ActNorm, two couplings, a 1x1 mixing and a MAF layer) over a standard normal: exp(log p)
    summed on a fine grid covering its samples integrates to 1 (change of variables with the right sign)."""
    torch.manual_seed(seed)
    t = randomize(Sequential([
        ActNorm(2), AffineCoupling(checkerboard_mask((2,), 0), mlp(2, 8)), InvertibleConv1x1(2),
        AffineCoupling(checkerboard_mask((2,), 1), mlp(2, 8)), MaskedAffineAutoregressive(2, 8),
    ]), std, seed).eval()
    flow = NormalizingFlow(t, StandardNormal(2).double()).eval()
    with torch.no_grad():
        s = flow.sample(4000)
        lo, hi = s.amin(0), s.amax(0)
        pad = (hi - lo) * 0.75 + 1.0
        lo, hi = lo - pad, hi + pad
        n = 400
        gx = torch.linspace(float(lo[0]), float(hi[0]), n, dtype=torch.float64)
        gy = torch.linspace(float(lo[1]), float(hi[1]), n, dtype=torch.float64)
        grid = torch.cartesian_prod(gx, gy)
        dens = flow.log_prob(grid).exp().view(n, n).numpy()
    total = np.trapezoid(np.trapezoid(dens, gy.numpy(), axis=1), gx.numpy())
    assert abs(total - 1) < 5e-3, total
