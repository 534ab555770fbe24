"""Every flow layer against independent references: inverse(forward(x)) == x, and the log-determinant
equals log|det| of the Jacobian computed by autograd (float64, small inputs)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from lightning_modules.flow.transforms import (
    MADE, ActNorm, AffineCoupling, ClassConditionalNormal, Flatten, InvertibleConv1x1, Logit,
    MaskedAffineAutoregressive, NormalizingFlow, Sequential, Split, Squeeze, StandardNormal, channel_mask,
    checkerboard_mask,
)
from lightning_modules.flow.transforms.nets import conv_net, mlp

IMG = (4, 4, 4)


def randomize(module, std=0.3, seed=0):
    """Give every parameter a random value, so that zero-initialised layers are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def init_actnorm(module, x):
    """Run one training-mode forward so data-dependent ActNorm layers initialise, then switch to eval."""
    module.train()
    module(x)
    return module.eval()


def check_layer(t, x, atol=1e-8):
    x = x.double()
    t = t.double()
    y, logdet = t(x)
    assert logdet.shape == (x.shape[0],)
    assert (t.inverse(y) - x).abs().max() < 1e-5
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = jacobian(lambda v: t(v.reshape(xi.shape))[0].reshape(-1), xi.reshape(-1))
        expected = torch.linalg.slogdet(jac).logabsdet
        assert torch.isfinite(expected)
        assert torch.allclose(logdet[i], expected, atol=atol, rtol=1e-8), (logdet[i].item(), expected.item())


def image_batch(shape=IMG, n=3, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def vector_batch(d=5, n=3, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- one test per layer ---------------------------------------------------------------------------
@pytest.mark.parametrize("x", [image_batch(), vector_batch()], ids=["image", "vector"])
def test_actnorm(x):
    t = init_actnorm(ActNorm(x.shape[1]).double(), 3 * x + 1)
    check_layer(t, x)


def test_actnorm_data_init_standardises_each_channel():
    x = 3 * image_batch(n=16) + torch.arange(4.0).view(1, 4, 1, 1)
    t = ActNorm(4).double().train()
    y, _ = t(x)
    assert bool(t.initialized)
    per_channel = y.transpose(0, 1).reshape(4, -1)
    assert per_channel.mean(1).abs().max() < 1e-6
    assert (per_channel.std(1, unbiased=False) - 1).abs().max() < 1e-4
    t(x + 10)  # a second batch does not re-initialise
    assert torch.allclose(t(x)[0], y)


def test_actnorm_is_identity_before_init_in_eval_mode():
    x = image_batch()
    y, logdet = ActNorm(4).double().eval()(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("x", [image_batch(), vector_batch()], ids=["image", "vector"])
def test_invertible_conv1x1(x):
    check_layer(InvertibleConv1x1(x.shape[1]), x)


def test_conv1x1_weight_is_the_lu_product_and_initially_orthogonal():
    t = InvertibleConv1x1(6).double()
    w = t.weight()
    assert torch.allclose(w @ w.T, torch.eye(6, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("make_mask", [checkerboard_mask, channel_mask])
@pytest.mark.parametrize("parity", [0, 1])
def test_affine_coupling_image(make_mask, parity):
    mask = make_mask(IMG, parity)
    assert 0 < mask.sum() < mask.numel()
    t = randomize(AffineCoupling(mask, conv_net(IMG[0], 8)))
    check_layer(t, image_batch())


def test_affine_coupling_leaves_masked_entries_unchanged():
    mask = checkerboard_mask(IMG, 0)
    t = randomize(AffineCoupling(mask, conv_net(IMG[0], 8))).double()
    x = image_batch()
    y, _ = t(x)
    assert torch.equal(y[:, mask.bool()], x[:, mask.bool()])
    assert not torch.allclose(y[:, ~mask.bool()], x[:, ~mask.bool()])


def test_masks():
    assert checkerboard_mask((1, 2, 2), 0)[0].tolist() == [[1, 0], [0, 1]]
    assert checkerboard_mask((3,), 1).tolist() == [0, 1, 0]
    assert channel_mask((4, 1, 1), 0).flatten().tolist() == [1, 1, 0, 0]
    assert channel_mask((4, 1, 1), 1).flatten().tolist() == [0, 0, 1, 1]


def test_affine_coupling_vector():
    t = randomize(AffineCoupling(checkerboard_mask((5,), 1), mlp(5, 8)))
    check_layer(t, vector_batch())


def test_squeeze():
    x = image_batch((2, 4, 4))
    check_layer(Squeeze(), x)
    y, _ = Squeeze()(x)
    assert y.shape == (3, 8, 2, 2)
    # channel c*4 + 2i + j at (h, w) holds x[c, 2h + i, 2w + j]
    assert y[1, 1 * 4 + 2 * 1 + 0, 1, 0] == x[1, 1, 3, 0]


def test_flatten():
    check_layer(Flatten(IMG), image_batch())


def test_logit():
    x = torch.rand(3, *IMG, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    check_layer(Logit(0.05), x)


@pytest.mark.parametrize("alpha", [0.0, 0.05])
def test_logit_density_integrates_to_the_mass_of_its_box(alpha):
    """logit(x) ~ N(0, 1) has density N(logit p) * dp/dx / (p (1 - p)) on [0, 1], whose integral is the
    standard-normal mass of [logit(alpha), logit(1 - alpha)] (1 for alpha = 0)."""
    flow = NormalizingFlow(Logit(alpha), StandardNormal(1)).double()
    n = 400_000
    x = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]  # midpoint rule on (0, 1)
    integral = flow.log_prob(x).exp().mean().item()
    edge = math.log((1 - alpha) / alpha) if alpha else math.inf
    assert integral == pytest.approx(math.erf(edge / math.sqrt(2)), abs=2e-4)


def test_made_is_autoregressive():
    made = randomize(MADE(5, 16, layers=2)).double()
    x = vector_batch()[0]
    jac = jacobian(made, x)  # (2*5, 5): output block k, feature i depends only on inputs < i
    strictly_lower = torch.tril(torch.ones(5, 5), -1).bool()
    for block in jac.split(5):
        assert block[~strictly_lower].abs().max() == 0
        assert block[strictly_lower].abs().min() > 0  # and the connectivity is really there


def test_masked_affine_autoregressive():
    check_layer(randomize(MaskedAffineAutoregressive(5, 16)), vector_batch())


def test_split():
    inner = Sequential([Squeeze(), randomize(AffineCoupling(channel_mask((8, 1, 1)), conv_net(8, 4))), Flatten((8, 1, 1))])
    x = image_batch((4, 2, 2))
    check_layer(Split((4, 2, 2), inner), x)
    z, _ = Split((4, 2, 2), inner).double()(x)
    assert torch.equal(z[:, :8], x[:, 2:].flatten(1))  # the factored-out half passes through untouched


def test_sequential_multiscale_stack():
    shape = (2, 4, 4)
    inner = Sequential([Squeeze(), randomize(InvertibleConv1x1(16)), Flatten((16, 1, 1))])
    t = Sequential([
        Logit(0.05), Squeeze(), ActNorm(8), randomize(InvertibleConv1x1(8)),
        randomize(AffineCoupling(checkerboard_mask((8, 2, 2)), conv_net(8, 4))), Split((8, 2, 2), inner),
    ]).double()
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    init_actnorm(t, x)
    check_layer(t, x)


def test_standard_normal():
    base = StandardNormal(3).double()
    z = vector_batch(3)
    ref = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    assert torch.allclose(base.log_prob(z), ref.log_prob(z))
    torch.manual_seed(0)
    s = base.sample(20_000, temperature=0.5)
    assert s.shape == (20_000, 3) and (s.std(0) - 0.5).abs().max() < 0.02


def test_class_conditional_normal():
    """Each class's density and samples against scipy's diagonal Gaussian of that class's mean and scale."""
    from scipy.stats import multivariate_normal

    base = randomize(ClassConditionalNormal(3, 4)).double().eval()
    z = vector_batch(3, n=6)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    mean, scale = base.mean.detach().numpy(), base.log_scale.detach().exp().numpy()
    ref = torch.tensor([[multivariate_normal(mean[c], np.diag(scale[c] ** 2)).logpdf(zi) for c in range(4)]
                        for zi in z.numpy()])
    assert torch.allclose(base.class_log_probs(z), ref, atol=1e-10)
    assert torch.allclose(base.log_prob(z, y), ref[torch.arange(6), y], atol=1e-10)
    torch.manual_seed(0)
    with torch.no_grad():
        s = base.sample(torch.full((20_000,), 2), temperature=0.5)
    assert s.shape == (20_000, 3)
    assert np.abs(s.mean(0).numpy() - mean[2]).max() < 0.02
    assert np.abs(s.std(0).numpy() / (0.5 * scale[2]) - 1).max() < 0.03


def test_class_conditional_normal_data_init():
    """The first training-mode call sets each class's mean and log-scale to its batch statistics (numpy); a
    class with fewer than two examples stays the standard normal, and later calls change nothing."""
    base = ClassConditionalNormal(3, 4).double().train()
    z = vector_batch(3, n=9) * 2 + 1
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 3, 0])
    base.log_prob(z, y)
    for c in (0, 1):
        zc = z[y == c].numpy()
        np.testing.assert_allclose(base.mean[c].detach().numpy(), zc.mean(0), atol=1e-12)
        np.testing.assert_allclose(base.log_scale[c].detach().numpy(), np.log(zc.std(0)), atol=1e-12)
    for c in (2, 3):
        assert not base.mean[c].any() and not base.log_scale[c].any()
    before = base.mean.detach().clone()
    base.log_prob(z + 5, y)
    assert torch.equal(base.mean.detach(), before)
