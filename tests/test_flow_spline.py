"""The rational-quadratic spline transforms (Neural Spline Flows, Durkan et al. 2019) against independent
references, in float64: the spline's values against a scalar transcription of the paper's eq. 4 (Python loops,
knots found by a linear scan), its log-derivative against autograd, its inverse against bisection (scipy's
brentq) of that reference; monotonicity, the identity tails, the identity at initialisation; the layers' log|det|
against log|det| of autograd's Jacobian, their round trips and their autoregressive (triangular) structure. A
Hypothesis property test draws small random splines (zeros and saturating raw parameters among them) and
inputs on the knots, the ends, just outside them and far in the tails."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.optimize import brentq
from torch.autograd.functional import jacobian

from lightning_modules.flow import Flow
from lightning_modules.flow.transforms import (
    MaskedSplineAutoregressive, Reverse, SplineCoupling, rational_quadratic_spline,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MIN_BIN = MIN_DERIVATIVE = 1e-3  # the module's defaults


@pytest.fixture(autouse=True)
def own_rng():
    """The tests seed torch's global generator (layers draw their initial values from it): restore it after."""
    with torch.random.fork_rng():
        yield


# --- an independent scalar reference of the spline (Durkan et al. 2019, §3.1 and eq. 4) --------------------
def reference_knots(raw, bound):
    e = [math.exp(r - max(raw)) for r in raw]
    sizes = [MIN_BIN + (1 - MIN_BIN * len(raw)) * v / sum(e) for v in e]
    knots = [-bound]
    for size in sizes[:-1]:
        knots.append(knots[-1] + 2 * bound * size)
    return knots + [bound]


def reference_spline(x, raw_w, raw_h, raw_d, bound):
    """y for one input; raw parameters as Python lists (K, K, K - 1)."""
    if not -bound <= x <= bound:
        return x
    xs, ys = reference_knots(raw_w, bound), reference_knots(raw_h, bound)
    c = math.log(math.expm1(1 - MIN_DERIVATIVE))
    deriv = [1.0] + [MIN_DERIVATIVE + math.log1p(math.exp(r + c)) for r in raw_d] + [1.0]
    k = 0
    while k < len(raw_w) - 1 and xs[k + 1] <= x:
        k += 1
    w, h = xs[k + 1] - xs[k], ys[k + 1] - ys[k]
    s = h / w
    xi = min(max((x - xs[k]) / w, 0.0), 1.0)
    num = h * (s * xi**2 + deriv[k] * xi * (1 - xi))
    return ys[k] + num / (s + (deriv[k + 1] + deriv[k] - 2 * s) * xi * (1 - xi))


def spline(x, raw_w, raw_h, raw_d, bound, inverse=False):
    """The module's spline of a 1-D tensor x with one parameter set shared by every entry."""
    n = len(x)
    params = [torch.tensor(p, dtype=torch.float64).view(1, -1, 1).expand(n, -1, 1) for p in (raw_w, raw_h, raw_d)]
    y, logd = rational_quadratic_spline(x.view(n, 1), *params, bound=bound, inverse=inverse)
    return y.view(n), logd.view(n)


def autograd_log_derivative(x, raw_w, raw_h, raw_d, bound, inverse=False):
    x = x.clone().requires_grad_(True)
    y, _ = spline(x, raw_w, raw_h, raw_d, bound, inverse)
    (grad,) = torch.autograd.grad(y.sum(), x)
    return grad.log()


def random_params(k, seed, scale=2.0):
    g = np.random.default_rng(seed)
    return [list(scale * g.standard_normal(n)) for n in (k, k, k - 1)]


# --- the spline --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,bound,seed", [(2, 1.0, 0), (5, 3.0, 1), (8, 5.0, 2)])
def test_spline_against_the_reference_autograd_and_bisection(k, bound, seed):
    params = random_params(k, seed)
    x = torch.linspace(-1.5 * bound, 1.5 * bound, 301, dtype=torch.float64)
    y, logd = spline(x, *params, bound)
    ref = torch.tensor([reference_spline(v, *params, bound) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(logd, autograd_log_derivative(x, *params, bound), rtol=1e-10, atol=1e-10)
    # the inverse: the root of reference(x) = y by bisection, and its log-derivative by autograd
    x_back, logd_inv = spline(y, *params, bound, inverse=True)
    roots = [brentq(lambda v: reference_spline(v, *params, bound) - t, -bound, bound, xtol=1e-14, rtol=1e-15)
             if -bound <= t <= bound else t for t in y.tolist()]
    assert torch.allclose(x_back, torch.tensor(roots, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(x_back, x, atol=1e-10)
    assert torch.allclose(logd_inv, -logd, atol=1e-9)
    assert torch.allclose(logd_inv, autograd_log_derivative(y, *params, bound, inverse=True), atol=1e-9)


def test_spline_is_monotonic_and_the_identity_outside_the_interval():
    params, bound = random_params(6, 3, scale=3.0), 2.0
    x = torch.cat([torch.tensor([-1e6, -50.0, -2.0000001, 2.0000001, 7.0, 1e6], dtype=torch.float64),
                   torch.linspace(-bound, bound, 2001, dtype=torch.float64)])
    y, logd = spline(x, *params, bound)
    tails = x.abs() > bound
    assert torch.equal(y[tails], x[tails]) and torch.equal(logd[tails], torch.zeros_like(logd[tails]))
    inner = y[~tails]
    assert (inner[1:] > inner[:-1]).all()  # strictly increasing
    assert inner[0].item() == pytest.approx(-bound, abs=1e-12) and inner[-1].item() == pytest.approx(bound, abs=1e-12)
    # the derivative is 1 at both ends (boundary derivatives), so it joins the tails continuously
    ends = torch.tensor([-bound, bound], dtype=torch.float64)
    assert torch.allclose(autograd_log_derivative(ends, *params, bound), torch.zeros(2, dtype=torch.float64), atol=1e-9)


def test_zero_raw_parameters_give_the_identity_with_unit_derivatives():
    """Uniform bins and every knot derivative exactly 1 (the softplus offset): y = x, log-derivative 0."""
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    y, logd = spline(x, [0.0] * 8, [0.0] * 8, [0.0] * 7, 3.0)
    assert torch.allclose(y, x, atol=1e-12) and logd.abs().max() < 1e-12
    assert autograd_log_derivative(x, [0.0] * 8, [0.0] * 8, [0.0] * 7, 3.0).abs().max() < 1e-12


edge_inputs = st.one_of(st.floats(-6, 6, allow_nan=False),
                        st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e6, -1e6, 1e300, -1e300]))
raw = st.one_of(st.floats(-8, 8, allow_nan=False), st.sampled_from([0.0, 30.0, -30.0]))


@given(st.integers(2, 6), st.sampled_from([0.5, 1.0, 3.0, 5.0]), st.data())
def test_spline_properties(k, bound, data):
    params = [data.draw(st.lists(raw, min_size=n, max_size=n)) for n in (k, k, k - 1)]
    knots = reference_knots(params[0], bound)
    special = [bound, -bound, *knots, math.nextafter(bound, math.inf), math.nextafter(-bound, -math.inf)]
    x_list = data.draw(st.lists(st.one_of(edge_inputs, st.sampled_from(special)), min_size=1, max_size=8))
    x = torch.tensor(x_list, dtype=torch.float64)
    y, logd = spline(x, *params, bound)
    assert torch.isfinite(y).all() and torch.isfinite(logd).all()
    ref = torch.tensor([reference_spline(v, *params, bound) for v in x_list], dtype=torch.float64)
    assert torch.allclose(y, ref, rtol=1e-10, atol=1e-10 * bound)
    tails = x.abs() > bound
    assert torch.equal(y[tails], x[tails]) and (logd[tails] == 0).all()
    assert (y[~tails].abs() <= bound * (1 + 1e-12)).all()
    assert torch.allclose(logd, autograd_log_derivative(x, *params, bound), rtol=1e-8, atol=1e-8)
    back, logd_inv = spline(y, *params, bound, inverse=True)
    # the inverse's error grows as the derivative shrinks (a slope of 1e-3 amplifies rounding a thousandfold)
    assert torch.allclose(back, x, rtol=1e-9, atol=1e-9 * bound / math.exp(min(0.0, logd.min().item())))
    assert torch.allclose(logd_inv, -logd, atol=1e-6)


# --- the layers --------------------------------------------------------------------------------------------
def randomize(module, std, seed):
    g = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return module


@torch.no_grad()
def check_round_trip(t, x):
    z, _ = t(x)
    back = t.inverse(z)
    assert (t(back)[0] - z).abs().max() < 1e-10  # the inverse solves forward(x) = z to rounding
    # and finds x itself: slopes down to 1e-3 amplify that rounding, feature after feature
    assert (back - x).abs().max() < 1e-6


def check_layer(t, x):
    z, logdet = t(x)
    assert logdet.shape == (len(x),) and torch.isfinite(z).all()
    check_round_trip(t, x)
    for i in range(len(x)):
        jac = jacobian(lambda v: t(v[None])[0][0], x[i], vectorize=True)
        assert logdet[i].item() == pytest.approx(torch.linalg.slogdet(jac).logabsdet.item(), abs=1e-9)
    return z


def layers(d, bins, bound):
    mask = (torch.arange(d) % 2).float()
    return [MaskedSplineAutoregressive(d, 12, 2, bins, bound), SplineCoupling(mask, 12, 2, bins, bound)]


@pytest.mark.parametrize("index", [0, 1])
def test_layers_log_det_is_the_autograd_jacobian_and_they_invert(index):
    torch.manual_seed(0)
    t = randomize(layers(4, 5, 2.0)[index], 0.4, seed=index)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.5
    x[0, 0], x[1, 2] = 10.0, -2.0  # a tail and the interval's end
    check_layer(t, x)


@settings(max_examples=15)
@given(st.integers(1, 4), st.integers(2, 5), st.sampled_from([0.0, 0.3, 1.0]), st.integers(0, 2**31 - 1), st.data())
def test_layers_properties(d, bins, std, seed, data):
    torch.manual_seed(seed)
    for t in layers(d, bins, 2.0):
        t = randomize(t, std, seed)
        values = data.draw(st.lists(edge_inputs.filter(lambda v: abs(v) < 1e6), min_size=2 * d, max_size=2 * d))
        x = torch.tensor(values, dtype=torch.float64).view(2, d)
        check_layer(t, x)


def test_autoregressive_jacobian_is_triangular():
    """z_i depends on x_j only for j <= i (MADE's order), so the Jacobian is lower triangular."""
    t = randomize(MaskedSplineAutoregressive(5, 16, 2, 4, 3.0), 0.5, seed=3)
    jac = jacobian(lambda v: t(v[None])[0][0], torch.randn(5, dtype=torch.float64))
    assert torch.equal(jac.triu(1), torch.zeros_like(jac)) and (jac.diagonal() > 0).all()


def test_new_layers_start_as_the_identity():
    x = torch.randn(6, 5) * 3
    for t in layers(5, 8, 3.0):
        z, logdet = t(x)
        assert torch.allclose(z, x, atol=1e-6) and logdet.abs().max() < 1e-5


# --- in the flow family ------------------------------------------------------------------------------------
def check_flow_density(model, shape, y=None):
    """log p(x) (log p(x | y)) = log N(f(x); base) + log|det df/dx| (autograd); f inverts; images sampled in
    [0, 1]."""
    x = torch.rand(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lp = model.log_prob(x, y)
    for i in range(3):
        jac = jacobian(lambda v: model.encode(v.view(1, *shape))[0], x[i].reshape(-1))
        z = model.encode(x[i : i + 1])[0]
        if y is None:
            base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
        else:
            mean, scale = model.flow.base.mean[y[i]], model.flow.base.log_scale[y[i]].exp()
            base = torch.distributions.Normal(mean, scale).log_prob(z).sum()
        assert lp[i].item() == pytest.approx((base + torch.linalg.slogdet(jac).logabsdet).item(), abs=1e-8)
    assert torch.allclose(model.flow.transform.inverse(model.encode(x)), x, atol=1e-8)
    s = model.sample(4, None if y is None else y[:1].expand(4))
    assert s.shape == (4, *shape) and torch.isfinite(s).all()
    if model.info.kind == "image":
        assert s.min() >= 0 and s.max() <= 1


@pytest.mark.parametrize("arch, shape", [("spline", (1, 2, 3)), ("glow", (1, 4, 4))])
@pytest.mark.parametrize("conditional", [False, True])
def test_image_archs_density(arch, shape, conditional):
    """Both image architectures (the 8x8 tests of test_flow_family take the spline one under `auto`)."""
    info = {"shape": list(shape), "kind": "image", "levels": 17, "num_classes": 3}
    model = Flow({"arch": arch, "spline_steps": 2, "spline_hidden": 8, "steps_per_scale": 2, "hidden_channels": 8,
                  "conditional": conditional}, info)
    assert model.arch == arch
    model = randomize(model, 0.2, seed=0).eval()
    check_flow_density(model, shape, torch.tensor([2, 0, 1]) if conditional else None)


@pytest.mark.parametrize("layer", ["spline", "spline_coupling"])
def test_vector_stack_with_spline_layers(layer):
    model = Flow({"vector_layer": layer, "vector_steps": 2, "hidden_features": 8, "vector_mixing": "reverse"},
                 {"shape": [5], "kind": "vector"})
    check_flow_density(randomize(model, 0.3, seed=1).eval(), (5,))


DIGITS = {"shape": [1, 8, 8], "kind": "image", "levels": 17, "num_classes": 10}


def test_auto_arch_flattens_small_images_unless_semi_supervised(tmp_path):
    small = Flow({"conditional": False}, DIGITS)
    large = Flow({"conditional": False, "steps_per_scale": 1, "hidden_channels": 4},
                 {"shape": [1, 28, 28], "kind": "image", "levels": 256})
    assert small.arch == "spline" and large.arch == "glow" and Flow({"arch": "glow"}, DIGITS).arch == "glow"
    assert (small.lr, small.weight_decay, large.lr, large.weight_decay) == (1.5e-2, 1e-2, 2e-3, 0.0)
    assert Flow({"lr": 1e-3, "weight_decay": 0}, DIGITS).lr == 1e-3
    # hidden labels: FlowGMM on the Glow, built as `arch: glow` builds it, and checkpointed as one
    semi, glow = Flow({}, DIGITS), Flow({"arch": "glow"}, DIGITS)
    semi.set_class_prior(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1, -1]))
    assert semi.arch == "glow" and semi.config.arch == "glow" and semi.hparams["cfg"]["arch"] == "glow"
    assert semi.state_dict().keys() == glow.state_dict().keys()
    assert all(torch.equal(v, glow.state_dict()[k]) for k, v in semi.state_dict().items() if "label" not in k)
    fully = Flow({}, DIGITS)
    fully.set_class_prior(torch.arange(10))
    assert fully.arch == "spline"


def test_reverse_permutes_and_inverts():
    x = torch.randn(3, 5)
    y, logdet = Reverse()(x)
    assert torch.equal(y, x[:, [4, 3, 2, 1, 0]]) and torch.equal(logdet, torch.zeros(3))
    assert torch.equal(Reverse().inverse(y), x)
