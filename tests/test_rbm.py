"""RBM family: the energy math against brute-force enumeration and numerical integration, AIS against the exact
log Z, the data-space densities' normalisation, the Gibbs sampler against the exact distribution, training on
digits against an independent-pixel baseline, and the checkpoint round trip."""
import itertools
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.rbm import RBM

DIGITS_INFO = dict(shape=[1, 8, 8], kind="image", levels=17, num_classes=10)


# --- independent references ---------------------------------------------------------------------------
def joint_energy(v, h, e, visible):
    """E(v, h) written out directly (Hinton 2002; Gaussian-Bernoulli: Krizhevsky 2009 eq. 1.4.1)."""
    if visible == "bernoulli":
        return -(v * e.b).sum(-1) - (h * e.c).sum(-1) - ((v @ e.W) * h).sum(-1)
    s = e.sigma
    return ((v - e.b) ** 2 / (2 * s**2)).sum(-1) - (h * e.c).sum(-1) - (((v / s) @ e.W) * h).sum(-1)


def all_binary(n):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def grid(d, lo, hi, n):
    """Points and cell volume of a regular grid on [lo, hi]^d (midpoint rule)."""
    edges = torch.linspace(lo, hi, n + 1, dtype=torch.float64)
    mids = (edges[1:] + edges[:-1]) / 2
    pts = torch.cartesian_prod(*[mids] * d).reshape(-1, d)
    return pts, ((hi - lo) / n) ** d


def random_rbm(d, h, visible, seed=0, weight_scale=1.0, exact_max_hidden=20):
    """A float64 module on (d,) vectors with random parameters (and, for Gaussian units, a random data
    standardisation so that the Jacobian term is exercised)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    cfg = dict(visible=visible, n_hidden=h, exact_max_hidden=exact_max_hidden, sample_steps=30)
    m = RBM(cfg, dict(shape=[d], kind="vector")).double()
    if visible == "gaussian":
        with torch.no_grad():
            m.log_sigma.copy_(0.3 * randn(d))
        m.set_statistics((randn(d), 0.5 + torch.rand(d, generator=g, dtype=torch.float64), torch.zeros(d)))
    else:
        m.set_statistics((torch.zeros(d), torch.ones(d), randn(d)))
    with torch.no_grad():
        m.W.copy_(weight_scale * randn(d, h))
        m.b.copy_(randn(d))
        m.c.copy_(randn(h))
    return m


def data_space_integral(m, d, cells):
    """Midpoint-rule integral of exp(log_prob) over a box of +-12 standard deviations of the data."""
    lo, hi = float((m.shift - 12 * m.scale).min()), float((m.shift + 12 * m.scale).max())
    pts, vol = grid(d, lo, hi, cells)
    with torch.no_grad():
        return float(torch.exp(m.log_prob(pts)).sum() * vol)


def digits_splits():
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(d.images))
    x = torch.from_numpy((d.images[idx][:, None] + rng.random((len(idx), 1, 8, 8))) / 17).float()
    return x[:1257], x[1257:1437]


def fit(model, x, tmp_path, epochs):
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=epochs, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    model.provide_init_data(x)
    trainer.fit(model, DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=128, shuffle=True))
    return trainer


def independent_pixels_log_likelihood(train_bits, bits):
    """Log-likelihood of the factorised Bernoulli model with Laplace-smoothed marginals (closed form)."""
    p = (train_bits.sum(0) + 1) / (len(train_bits) + 2)
    return (bits * p.log() + (1 - bits) * (1 - p).log()).sum(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 12-hidden-unit CD-1 RBM trained briefly on binarised digits (exact log Z is computed at train end)."""
    train, val = digits_splits()
    model = RBM(dict(n_hidden=12), DIGITS_INFO)
    untrained = RBM(dict(n_hidden=12), DIGITS_INFO)
    trainer = fit(model, train, tmp_path_factory.mktemp("rbm"), epochs=15)
    untrained.set_statistics(untrained.units.statistics(train.flatten(1)))
    return dict(model=model, untrained=untrained, trainer=trainer, train=train, val=val)


# --- the energy math ----------------------------------------------------------------------------------
@pytest.mark.parametrize("visible", ["bernoulli", "gaussian"])
def test_free_energy_and_hidden_conditional_match_enumeration(visible):
    m = random_rbm(3, 4, visible)
    e = m.energy()
    v = all_binary(3) if visible == "bernoulli" else torch.randn(8, 3, dtype=torch.float64)
    hs = all_binary(4)
    neg_e = -joint_energy(v[:, None, :], hs[None], e, visible)  # (V, 16)
    torch.testing.assert_close(e.free_energy(v), -torch.logsumexp(neg_e, 1))
    posterior = torch.softmax(neg_e, 1)  # p(h | v) over the 16 hidden states
    torch.testing.assert_close(e.h_given_v(v), posterior @ hs)


def test_bernoulli_visible_conditional_matches_enumeration():
    m = random_rbm(3, 4, "bernoulli")
    e = m.energy()
    vs, hs = all_binary(3), all_binary(4)
    neg_e = -joint_energy(vs[None], hs[:, None, :], e, "bernoulli")  # (H-states, V-states)
    log_p_v_given_h = torch.log_softmax(neg_e, 1)
    ours = e.units.log_likelihood(vs[None], e.visible_input(hs)[:, None, :], e.sigma)
    torch.testing.assert_close(ours, log_p_v_given_h)


def test_gaussian_visible_conditional_matches_numerical_normaliser():
    m = random_rbm(2, 3, "gaussian", weight_scale=0.5)
    e = m.energy()
    pts, vol = grid(2, -12, 12, 300)
    for h in all_binary(3):
        log_norm = torch.logsumexp(-joint_energy(pts, h, e, "gaussian"), 0) + math.log(vol)
        v = torch.randn(5, 2, dtype=torch.float64)
        expected = -joint_energy(v, h, e, "gaussian") - log_norm
        torch.testing.assert_close(e.units.log_likelihood(v, e.visible_input(h), e.sigma), expected, atol=1e-6, rtol=0)


def test_log_z_by_hidden_enumeration_equals_joint_brute_force():
    m = random_rbm(10, 6, "bernoulli", weight_scale=0.5)
    e = m.energy()
    v, h = all_binary(10), all_binary(6)
    brute = torch.logsumexp(-joint_energy(v[:, None, :], h[None], e, "bernoulli").flatten(), 0)
    assert e.log_z_enumerate(chunk=16) == pytest.approx(float(brute), abs=1e-9)


def test_pseudo_likelihood_matches_flipping_each_bit():
    m = random_rbm(5, 4, "bernoulli")
    e = m.energy()
    v = all_binary(5)
    f = e.free_energy(v)
    expected = torch.zeros(len(v), dtype=torch.float64)
    for i in range(5):  # log p(v_i | v_-i) by normalising over the two values of bit i
        flipped = v.clone()
        flipped[:, i] = 1 - flipped[:, i]
        expected += -f - torch.logaddexp(-f, -e.free_energy(flipped))
    torch.testing.assert_close(e.pseudo_log_likelihood(v), expected)


# --- data-space densities -----------------------------------------------------------------------------
def test_bernoulli_data_density_is_normalised_and_constant_on_half_cubes():
    m = random_rbm(6, 5, "bernoulli")
    bits = all_binary(6)
    centre, corner = bits * 0.5 + 0.25, bits * 0.5 + 0.01
    with torch.no_grad():
        log_p = m.log_prob(centre)
        # the density integrates to 1 over [0, 1]^6: sum over half-cubes of density * volume 2^-6
        assert float(torch.logsumexp(log_p, 0)) - 6 * math.log(2) == pytest.approx(0.0, abs=1e-9)
        torch.testing.assert_close(m.log_prob(corner), log_p)
        # and P(b) is the brute-force Boltzmann distribution
        e, h = m.energy(), all_binary(5)
        neg_e = -joint_energy(bits[:, None, :], h[None], e, "bernoulli")
        torch.testing.assert_close(log_p - 6 * math.log(2), torch.logsumexp(neg_e, 1) - torch.logsumexp(neg_e.flatten(), 0))


@pytest.mark.parametrize("d", [1, 2])
def test_gaussian_data_density_integrates_to_one(d):
    m = random_rbm(d, 5, "gaussian", weight_scale=0.7)
    assert data_space_integral(m, d, 4000 if d == 1 else 300) == pytest.approx(1.0, abs=1e-4)


def test_ais_gaussian_rbm_density_integrates_to_one():
    m = random_rbm(2, 5, "gaussian", weight_scale=0.7, exact_max_hidden=0)  # n_hidden > 0: AIS
    m.config.ais_steps = 2000
    assert data_space_integral(m, 2, 300) == pytest.approx(1.0, abs=0.05)
    assert not bool(m.log_z_exact)


# --- sampling ---------------------------------------------------------------------------------------------
def test_gibbs_samples_follow_the_exact_distribution():
    m = random_rbm(4, 3, "bernoulli")
    torch.manual_seed(0)
    x = m.sample(20000)
    assert x.shape == (20000, 4) and float(x.min()) >= 0 and float(x.max()) < 1
    bits = (x > 0.5).double()
    index = (bits * 2.0 ** torch.arange(3, -1, -1, dtype=torch.float64)).sum(1).long()  # row order of all_binary
    empirical = torch.bincount(index, minlength=16).double() / len(x)
    e, h = m.energy(), all_binary(3)
    exact = torch.softmax(torch.logsumexp(-joint_energy(all_binary(4)[:, None, :], h[None], e, "bernoulli"), 1), 0)
    assert 0.5 * float((empirical - exact).abs().sum()) < 0.02  # total variation


def test_gaussian_samples_have_the_model_moments():
    m = random_rbm(1, 3, "gaussian", weight_scale=0.7)
    torch.manual_seed(0)
    x = m.sample(20000)[:, 0]
    with torch.no_grad():
        pts, vol = grid(1, float(m.shift - 15 * m.scale), float(m.shift + 15 * m.scale), 6000)
        p = torch.exp(m.log_prob(pts)) * vol
    mean = float((p * pts[:, 0]).sum())
    std = float((p * (pts[:, 0] - mean) ** 2).sum().sqrt())
    assert float(x.mean()) == pytest.approx(mean, abs=0.03 * std)
    assert float(x.std()) == pytest.approx(std, rel=0.03)


# --- training on digits ---------------------------------------------------------------------------------
def test_ais_matches_exact_log_z_on_trained_rbm(trained):
    model = trained["model"]
    assert bool(model.log_z_exact)  # computed by enumeration when training ended
    energy = model.energy().detached()
    ais = energy.log_z_ais(n_chains=100, n_steps=3000, generator=torch.Generator().manual_seed(1))
    assert ais.log_z == pytest.approx(float(model.log_z), abs=0.1)


def test_cd_training_beats_untrained_and_independent_pixels(trained):
    model, untrained, train, val = trained["model"], trained["untrained"], trained["train"], trained["val"]
    bits = (val.flatten(1) > 0.5).double()
    with torch.no_grad():
        log_p_bits = model.log_prob(val).double() - 64 * math.log(2)
        baseline = independent_pixels_log_likelihood((train.flatten(1) > 0.5).double(), bits)
        assert float(log_p_bits.mean()) > float(baseline.mean()) + 2.0  # nats per image
        assert float(log_p_bits.mean()) > float(untrained.log_prob(val).mean() - 64 * math.log(2)) + 2.0
        pl_trained = model.energy().pseudo_log_likelihood(bits.float()).mean()
        pl_untrained = untrained.energy().pseudo_log_likelihood(bits.float()).mean()
    assert float(pl_trained) > float(pl_untrained) + 2.0
    assert model.encode(val).shape == (len(val), 12)


def test_persistent_cd_learns(tmp_path):
    train, val = digits_splits()
    model = RBM(dict(n_hidden=12, persistent=True, lr=0.1, momentum=0.5), DIGITS_INFO)
    fit(model, train, tmp_path, epochs=20)
    bits = (val.flatten(1) > 0.5).double()
    with torch.no_grad():
        log_p_bits = model.log_prob(val).double() - 64 * math.log(2)
    baseline = independent_pixels_log_likelihood((train.flatten(1) > 0.5).double(), bits)
    assert float(log_p_bits.mean()) > float(baseline.mean()) + 1.0  # PCD leaves the start slower than CD-1


def test_checkpoint_round_trip_weights_only(trained, tmp_path):
    model, val = trained["model"], trained["val"]
    path = tmp_path / "rbm.ckpt"
    trained["trainer"].save_checkpoint(path)
    loaded = RBM.load_from_checkpoint(path, weights_only=True)
    assert float(loaded.log_z) == float(model.log_z) and bool(loaded.log_z_exact)
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(val), model.log_prob(val))
        torch.testing.assert_close(loaded.encode(val), model.encode(val))


def test_trains_under_ddp_spawn(tmp_path):
    train, val = digits_splits()
    model = RBM(dict(n_hidden=12, persistent=True, n_chains=32), DIGITS_INFO)
    w0 = model.W.detach().clone()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn", default_root_dir=tmp_path,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model.provide_init_data(train)
    trainer.fit(model, DataLoader(TensorDataset(train, torch.zeros(len(train))), batch_size=128))
    assert bool(model.data_ready) and bool(model.log_z_exact) and torch.isfinite(model.log_z)
    assert not torch.equal(model.W.detach(), w0)
    with torch.no_grad():
        assert torch.isfinite(model.log_prob(val)).all()
