"""RBM family: the energy math against brute-force enumeration and numerical integration, AIS against the exact
log Z, the data-space densities' normalisation, the Gibbs sampler against the exact distribution, training on
digits against an independent-pixel baseline, and the checkpoint round trip. Categorical (softmax) visibles on a
tiny model against the same brute-force enumerations over every one-hot configuration. The classification RBM
(label units) against brute-force enumeration over (v, h, y), its clamped sampler against the exact p(v | y), and
conditional sampling on 8 Gaussians. Semi-supervised training (hidden labels UNLABELLED): the unlabelled positive
phase and the whole objective's expected gradient against enumeration over (y, h, v', y'), and few labels on noisy
prototypes against the labelled-only fit."""
import itertools
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.rbm import RBM

DIGITS_INFO = dict(shape=[1, 8, 8], kind="image", levels=17, num_classes=10)
UNCONDITIONAL = dict(conditional=False)
BERNOULLI = dict(visible="bernoulli")  # the digits tests below are about binarised pixels
LEVELS = 3  # categorical visibles in the tiny models: L levels per pixel


# --- independent references ---------------------------------------------------------------------------
def joint_energy(v, h, e, visible):
    """E(v, h) written out directly (Hinton 2002; Gaussian-Bernoulli: Krizhevsky 2009 eq. 1.4.1; categorical v is
    one-hot per pixel, with the Bernoulli form: Salakhutdinov, Mnih & Hinton 2007 eq. 2)."""
    if visible in ("bernoulli", "categorical"):
        return -(v * e.b).sum(-1) - (h * e.c).sum(-1) - ((v @ e.W) * h).sum(-1)
    if visible == "ordinal":  # one-hot levels for the biases; the level l / (L - 1) meets the weights
        intensity = (v.unflatten(-1, (-1, LEVELS)) * torch.arange(LEVELS, dtype=v.dtype)).sum(-1) / (LEVELS - 1)
        return -(v * e.b).sum(-1) - (h * e.c).sum(-1) - ((intensity @ e.W) * h).sum(-1)
    s = e.sigma
    return ((v - e.b) ** 2 / (2 * s**2)).sum(-1) - (h * e.c).sum(-1) - (((v / s) @ e.W) * h).sum(-1)


def all_binary(n):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def all_levels(d, levels=LEVELS):
    """Every configuration of d pixels with `levels` levels, (L^d, d) integer levels, and its one-hot model
    vector (L^d, d L) built by hand."""
    lv = torch.tensor(list(itertools.product(range(levels), repeat=d)))
    one_hot = torch.zeros(len(lv), d, levels, dtype=torch.float64)
    for i in range(d):
        one_hot[torch.arange(len(lv)), i, lv[:, i]] = 1.0
    return lv, one_hot.flatten(1)


def all_visible(d, visible):
    """(model-space states, a data-space point inside each state's bin, another point in the same bin, log bin
    volume) for binary (half-cubes) or categorical and ordinal (level bins [l/L, (l+1)/L)) visibles."""
    if visible == "bernoulli":
        bits = all_binary(d)
        return bits, bits * 0.5 + 0.25, bits * 0.5 + 0.01, -d * math.log(2)
    lv, v = all_levels(d)
    return v, (lv + 0.5).double() / LEVELS, (lv + 0.97).double() / LEVELS, -d * math.log(LEVELS)


def grid(d, lo, hi, n):
    """Points and cell volume of a regular grid on [lo, hi]^d (midpoint rule)."""
    edges = torch.linspace(lo, hi, n + 1, dtype=torch.float64)
    mids = (edges[1:] + edges[:-1]) / 2
    pts = torch.cartesian_prod(*[mids] * d).reshape(-1, d)
    return pts, ((hi - lo) / n) ** d


def random_rbm(d, h, visible, seed=0, weight_scale=1.0, exact_max_hidden=20, classes=None):
    """A float64 module on (d,) vectors with random parameters (and, for Gaussian units, a random data
    standardisation so that the Jacobian term is exercised); with `classes`, a classification RBM with random
    label weights, label biases and per-class base models."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    cfg = dict(visible=visible, n_hidden=h, exact_max_hidden=exact_max_hidden, sample_steps=30)
    m = RBM(cfg, dict(shape=[d], kind="vector", num_classes=classes, levels=LEVELS)).double()
    dv = d * LEVELS if visible in ("categorical", "ordinal") else d  # visible units
    dw = d * LEVELS if visible == "categorical" else d  # rows of W
    if visible == "gaussian":
        with torch.no_grad():
            m.log_sigma.copy_(0.3 * randn(d))
        m.set_statistics((randn(d), 0.5 + torch.rand(d, generator=g, dtype=torch.float64), torch.zeros(d)))
    else:
        m.set_statistics((torch.zeros(d), torch.ones(d), randn(dv)))
    with torch.no_grad():
        m.W.copy_(weight_scale * randn(dw, h))
        m.b.copy_(randn(dv))
        m.c.copy_(randn(h))
        if classes:
            m.U.copy_(weight_scale * randn(classes, h))
            m.d.copy_(randn(classes))
            m.class_base.copy_(randn(classes, dv) if visible != "gaussian" else 0.3 * randn(classes, d))
    return m


def labelled_neg_energy(v, hs, m, visible):
    """-E(v, h, y) = -E(v, h) + d_y + h'U_y for every (v, h, y), shape (V, 2^H, K) (Larochelle & Bengio 2008 eq. 1)."""
    e = m.energy()
    return -joint_energy(v[:, None, :], hs[None], e, visible)[:, :, None] + m.d + (hs @ m.U.T)[None]


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


def digits_labels():
    """The classes of `digits_splits`' examples, in the same order (train, then val)."""
    from sklearn.datasets import load_digits

    idx = np.random.default_rng(0).permutation(1797)
    return torch.from_numpy(load_digits().target[idx][:1437]).long()


def fit(model, x, tmp_path, epochs, y=None):
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=epochs, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    model.provide_init_data(x, y)
    labels = torch.zeros(len(x)) if y is None else y
    trainer.fit(model, DataLoader(TensorDataset(x, labels), batch_size=128, shuffle=True))
    return trainer


def independent_pixels_log_likelihood(train_bits, bits):
    """Log-likelihood of the factorised Bernoulli model with Laplace-smoothed marginals (closed form)."""
    p = (train_bits.sum(0) + 1) / (len(train_bits) + 2)
    return (bits * p.log() + (1 - bits) * (1 - p).log()).sum(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 12-hidden-unit CD-1 RBM trained briefly on binarised digits (exact log Z is computed at train end)."""
    train, val = digits_splits()
    model = RBM(dict(n_hidden=12, **UNCONDITIONAL, **BERNOULLI), DIGITS_INFO)
    untrained = RBM(dict(n_hidden=12, **UNCONDITIONAL, **BERNOULLI), DIGITS_INFO)
    trainer = fit(model, train, tmp_path_factory.mktemp("rbm"), epochs=15)
    untrained.set_statistics(untrained.units.statistics(train.flatten(1)))
    return dict(model=model, untrained=untrained, trainer=trainer, train=train, val=val)


# --- the energy math ----------------------------------------------------------------------------------
@pytest.mark.parametrize("visible", ["bernoulli", "categorical", "ordinal", "gaussian"])
def test_free_energy_and_hidden_conditional_match_enumeration(visible):
    m = random_rbm(3, 4, visible)
    e = m.energy()
    v = torch.randn(8, 3, dtype=torch.float64) if visible == "gaussian" else all_visible(3, visible)[0]
    hs = all_binary(4)
    neg_e = -joint_energy(v[:, None, :], hs[None], e, visible)  # (V, 16)
    torch.testing.assert_close(e.free_energy(v), -torch.logsumexp(neg_e, 1))
    posterior = torch.softmax(neg_e, 1)  # p(h | v) over the 16 hidden states
    torch.testing.assert_close(e.h_given_v(v), posterior @ hs)


@pytest.mark.parametrize("visible", ["bernoulli", "categorical", "ordinal"])
def test_discrete_visible_conditional_matches_enumeration(visible):
    """log p(v | h) and log sum_v exp(-E_vis(v) + v.(pre - b)) against normalising over every visible state."""
    m = random_rbm(3, 4, visible)
    e = m.energy()
    vs, hs = all_visible(3, visible)[0], all_binary(4)
    neg_e = -joint_energy(vs[None], hs[:, None, :], e, visible)  # (H-states, V-states)
    log_p_v_given_h = torch.log_softmax(neg_e, 1)
    ours = e.units.log_likelihood(vs[None], e.visible_input(hs)[:, None, :], e.sigma)
    torch.testing.assert_close(ours, log_p_v_given_h)
    pre = e.visible_input(hs)
    torch.testing.assert_close(e.units.log_partition(pre, e.b, e.sigma), torch.logsumexp(vs @ pre.T, 0))


def test_gaussian_visible_conditional_matches_numerical_normaliser():
    m = random_rbm(2, 3, "gaussian", weight_scale=0.5)
    e = m.energy()
    pts, vol = grid(2, -12, 12, 300)
    for h in all_binary(3):
        log_norm = torch.logsumexp(-joint_energy(pts, h, e, "gaussian"), 0) + math.log(vol)
        v = torch.randn(5, 2, dtype=torch.float64)
        expected = -joint_energy(v, h, e, "gaussian") - log_norm
        torch.testing.assert_close(e.units.log_likelihood(v, e.visible_input(h), e.sigma), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("visible, d", [("bernoulli", 10), ("categorical", 5), ("ordinal", 5)])
def test_log_z_by_hidden_enumeration_equals_joint_brute_force(visible, d):
    m = random_rbm(d, 6, visible, weight_scale=0.5)
    e = m.energy()
    v, h = all_visible(d, visible)[0], all_binary(6)
    brute = torch.logsumexp(-joint_energy(v[:, None, :], h[None], e, visible).flatten(), 0)
    assert e.log_z_enumerate(chunk=16) == pytest.approx(float(brute), abs=1e-9)
    assert float(e.detached().log_z_ais(200, 1000, torch.Generator().manual_seed(0)).log_z) == pytest.approx(
        float(brute), abs=0.05)


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
@pytest.mark.parametrize("visible, d", [("bernoulli", 6), ("categorical", 4), ("ordinal", 4)])
def test_discrete_data_density_is_normalised_and_constant_on_bins(visible, d):
    """Binary: half-cubes of [0, 1]^d; categorical and ordinal: the L^d level bins (the dequantisation convention)."""
    m = random_rbm(d, 5, visible)
    v, centre, corner, log_volume = all_visible(d, visible)
    with torch.no_grad():
        log_p = m.log_prob(centre)
        # the density integrates to 1 over [0, 1]^d: sum over bins of density * bin volume
        assert float(torch.logsumexp(log_p, 0)) + log_volume == pytest.approx(0.0, abs=1e-9)
        torch.testing.assert_close(m.log_prob(corner), log_p)
        # and P(state) is the brute-force Boltzmann distribution
        e, h = m.energy(), all_binary(5)
        neg_e = -joint_energy(v[:, None, :], h[None], e, visible)
        torch.testing.assert_close(log_p + log_volume, torch.logsumexp(neg_e, 1) - torch.logsumexp(neg_e.flatten(), 0))


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
def state_index(x, visible):
    """The row of each data-space sample's state in `all_visible` (mixed-radix, first pixel most significant)."""
    base = 2 if visible == "bernoulli" else LEVELS
    digits = (x * base).floor().long()
    return (digits * base ** torch.arange(x.shape[1] - 1, -1, -1)).sum(1)


@pytest.mark.parametrize("visible, d", [("bernoulli", 4), ("categorical", 2), ("ordinal", 2)])
def test_gibbs_samples_follow_the_exact_distribution(visible, d):
    m = random_rbm(d, 3, visible)
    torch.manual_seed(0)
    x = m.sample(20000)
    assert x.shape == (20000, d) and float(x.min()) >= 0 and float(x.max()) < 1
    v = all_visible(d, visible)[0]
    empirical = torch.bincount(state_index(x, visible), minlength=len(v)).double() / len(x)
    e, h = m.energy(), all_binary(3)
    exact = torch.softmax(torch.logsumexp(-joint_energy(v[:, None, :], h[None], e, visible), 1), 0)
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


def test_nll_kind_is_the_instance_s(trained):
    assert trained["model"].nll_kind() == "exact"  # log Z enumerated
    assert random_rbm(4, 3, "bernoulli", exact_max_hidden=2).nll_kind() == "estimate"  # AIS
    assert random_rbm(4, 3, "bernoulli", exact_max_hidden=3).nll_kind() == "exact"


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
    cfg = dict(n_hidden=12, persistent=True, lr=0.1, momentum=0.5, **UNCONDITIONAL, **BERNOULLI)
    model = RBM(cfg, DIGITS_INFO)
    fit(model, train, tmp_path, epochs=20)
    bits = (val.flatten(1) > 0.5).double()
    with torch.no_grad():
        log_p_bits = model.log_prob(val).double() - 64 * math.log(2)
    baseline = independent_pixels_log_likelihood((train.flatten(1) > 0.5).double(), bits)
    assert float(log_p_bits.mean()) > float(baseline.mean()) + 1.0  # PCD leaves the start slower than CD-1


@pytest.mark.parametrize("visible, units, weight_rows, margin", [
    ("auto", "ordinal", 64, 3.0),  # nats per image: 4.4 when written (17x fewer weights learn slower)
    ("categorical", "categorical", 64 * 17, 5.0),  # 8 when written
])
def test_level_rbm_beats_independent_levels_on_digits(tmp_path, visible, units, weight_rows, margin):
    """Softmax visibles over the 17 levels (ordinal: `visible: auto` on digits, or categorical): the exact
    discrete-data log-likelihood (log p(x) - D log L) of a briefly trained 12-hidden-unit RBM beats independent
    pixels with Laplace-smoothed level frequencies (closed form), and its samples lie in [0, 1)."""
    train, val = digits_splits()
    model = RBM(dict(n_hidden=12, visible=visible, **UNCONDITIONAL), DIGITS_INFO)
    assert model.units.name == units and model.W.shape == (weight_rows, 12) and model.b.shape == (64 * 17,)
    fit(model, train, tmp_path, epochs=15)
    level = lambda x: (x.flatten(1) * 17).floor().long()  # noqa: E731
    counts = torch.stack([torch.bincount(col, minlength=17) for col in level(train).T]).double()  # (64, 17)
    log_freq = ((counts + 1) / (len(train) + 17)).log()
    baseline = log_freq[torch.arange(64), level(val)].sum(1)
    with torch.no_grad():
        log_p_levels = model.log_prob(val).double() - 64 * math.log(17)
        s = model.sample(20)
    assert bool(model.log_z_exact)
    assert float(log_p_levels.mean()) > float(baseline.mean()) + margin
    assert s.shape == (20, 1, 8, 8) and float(s.min()) >= 0 and float(s.max()) < 1


def test_checkpoint_round_trip_weights_only(trained, tmp_path):
    model, val = trained["model"], trained["val"]
    path = tmp_path / "rbm.ckpt"
    trained["trainer"].save_checkpoint(path)
    loaded = RBM.load_from_checkpoint(path, weights_only=True)
    assert float(loaded.log_z) == float(model.log_z) and bool(loaded.log_z_exact)
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(val), model.log_prob(val))
        torch.testing.assert_close(loaded.encode(val), model.encode(val))


@pytest.mark.parametrize("conditional", [False, True])
def test_trains_under_ddp_spawn(tmp_path, conditional):
    train, val = digits_splits()
    labels = digits_labels()[:len(train)]
    model = RBM(dict(n_hidden=12, persistent=True, n_chains=32, conditional=conditional, **BERNOULLI), DIGITS_INFO)
    w0 = model.W.detach().clone()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn", default_root_dir=tmp_path,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model.provide_init_data(train, labels)
    trainer.fit(model, DataLoader(TensorDataset(train, labels), batch_size=128))
    assert bool(model.data_ready) and bool(model.log_z_exact) and torch.isfinite(model.log_z)
    assert not torch.equal(model.W.detach(), w0)
    with torch.no_grad():
        assert torch.isfinite(model.log_prob(val)).all()
    if conditional:  # the per-class base models come from rank 0's data statistics
        assert torch.isfinite(model.class_log_z).all() and not torch.equal(model.class_base[0], model.class_base[1])


# --- the classification RBM (label units joined to the hidden layer) ---------------------------------------
@pytest.mark.parametrize("visible", ["bernoulli", "categorical", "ordinal"])
def test_label_units_match_joint_enumeration(visible):
    """log Z, log Z_y, p(y), p(y | x) and p(x | y) against brute force over every (v, h, y)."""
    m = random_rbm(4, 3, visible, classes=3)
    m.refresh_log_z()
    assert bool(m.log_z_exact)
    v, x, _, log_volume = all_visible(4, visible)  # x: a point inside each state's bin of [0, 1]^4
    n = len(v)
    with torch.no_grad():
        neg_e = labelled_neg_energy(v, all_binary(3), m, visible)  # (V, 8, 3)
        log_z_y = torch.logsumexp(neg_e.flatten(0, 1), 0)
        log_z = torch.logsumexp(neg_e.flatten(), 0)
        assert float(m.log_z) == pytest.approx(float(log_z), abs=1e-9)
        torch.testing.assert_close(m.class_log_z, log_z_y, atol=1e-9, rtol=0)
        torch.testing.assert_close(m.class_log_prior(), log_z_y - log_z, atol=1e-9, rtol=0)
        log_joint_v = torch.logsumexp(neg_e, 1)  # (16, 3): log of the unnormalised p(v, y)
        torch.testing.assert_close(m.classify(x), torch.log_softmax(log_joint_v, 1), atol=1e-9, rtol=0)
        offset = -log_volume  # P(state) -> density on its bin
        for c in range(3):
            y = torch.full((n,), c)
            torch.testing.assert_close(m.log_prob(x, y) - offset, log_joint_v[:, c] - log_z_y[c], atol=1e-9, rtol=0)
        torch.testing.assert_close(m.log_prob(x) - offset, torch.logsumexp(log_joint_v, 1) - log_z, atol=1e-9, rtol=0)


def test_label_units_match_enumeration_and_integration_gaussian():
    """Gaussian visibles: p(y | x) by enumerating (h, y), log Z_y by a grid integral over v of the sum over h."""
    m = random_rbm(2, 3, "gaussian", weight_scale=0.5, classes=3)
    m.refresh_log_z()
    hs = all_binary(3)
    with torch.no_grad():
        x = m.shift + m.scale * torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        v = (x - m.shift) / m.scale
        log_joint_v = torch.logsumexp(labelled_neg_energy(v, hs, m, "gaussian"), 1)  # (6, 3)
        torch.testing.assert_close(m.classify(x), torch.log_softmax(log_joint_v, 1), atol=1e-9, rtol=0)
        pts, vol = grid(2, -25, 25, 500)
        log_z_y = torch.logsumexp(labelled_neg_energy(pts, hs, m, "gaussian").flatten(0, 1), 0) + math.log(vol)
        torch.testing.assert_close(m.class_log_z, log_z_y, atol=1e-7, rtol=0)
        jacobian = -m.scale.log().sum()
        for c in range(3):
            expected = log_joint_v[:, c] - log_z_y[c] + jacobian
            torch.testing.assert_close(m.log_prob(x, torch.full((6,), c)), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("visible", ["bernoulli", "categorical", "gaussian"])
def test_marginal_is_the_sum_over_classes(visible):
    """log p(x) == logsumexp_y(log p(x | y) + log p(y)), and the one-pass class likelihoods equal log_prob(x, y)."""
    m = random_rbm(3, 4, visible, classes=4)
    x = torch.rand(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        per_class = torch.stack([m.log_prob(x, torch.full((10,), c)) for c in range(4)], 1)
        torch.testing.assert_close(m.class_log_likelihoods(x), per_class, atol=1e-9, rtol=0)
        torch.testing.assert_close(m.log_prob(x), torch.logsumexp(per_class + m.class_log_prior(), 1),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(m.classify(x), torch.log_softmax(per_class + m.class_log_prior(), 1),
                                   atol=1e-9, rtol=0)
        assert float(torch.logsumexp(m.class_log_prior(), 0)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("visible, d", [("bernoulli", 10), ("categorical", 5), ("ordinal", 5)])
def test_class_ais_matches_brute_force(visible, d):
    """AIS of every class's log Z_y in one batch of chains against enumeration over (v, h) per class."""
    m = random_rbm(d, 6, visible, weight_scale=0.5, classes=3, exact_max_hidden=0)
    # 100 chains per class, 3000 steps: over 10 seeds the error's spread is 0.007 to 0.02 per class (no bias),
    # the largest error 0.042, against the tolerance of 0.05
    m.config.ais_steps, m.config.ais_chains = 3000, 300
    m.refresh_log_z()
    assert not bool(m.log_z_exact)
    with torch.no_grad():
        neg_e = labelled_neg_energy(all_visible(d, visible)[0], all_binary(6), m, visible)
        log_z_y = torch.logsumexp(neg_e.flatten(0, 1), 0)
    torch.testing.assert_close(m.class_log_z, log_z_y, atol=0.05, rtol=0)
    assert float(m.log_z) == pytest.approx(float(torch.logsumexp(log_z_y, 0)), abs=0.05)
    diagnostics = m.likelihood_diagnostics()  # the worst class's ESS of its 100 chains; log Z's standard error
    assert set(diagnostics) == {"ais_ess", "ais_log_z_se"}
    assert 1.0 <= diagnostics["ais_ess"] <= 100.0 and 0.0 < diagnostics["ais_log_z_se"] < 0.05


def test_ais_diagnostics_only_for_an_estimated_log_z():
    """An enumerated log Z has no AIS diagnostics; an AIS one has its chains' ESS (at most `ais_chains`) and a
    standard error that covers the estimate's actual error against enumeration (within 4 standard errors)."""
    assert random_rbm(4, 3, "bernoulli", exact_max_hidden=3).likelihood_diagnostics() == {}
    m = random_rbm(8, 6, "bernoulli", weight_scale=0.5, exact_max_hidden=0)
    m.config.ais_steps, m.config.ais_chains = 500, 200
    diagnostics = m.likelihood_diagnostics()
    exact = m.energy().detached(torch.float64).log_z_enumerate()
    assert 1.0 <= diagnostics["ais_ess"] <= 200.0
    assert 0.0 < diagnostics["ais_log_z_se"] and abs(float(m.log_z) - exact) <= 4 * diagnostics["ais_log_z_se"] + 1e-3


@pytest.mark.parametrize("visible, d", [("bernoulli", 4), ("categorical", 2), ("ordinal", 2)])
def test_clamped_gibbs_samples_follow_the_exact_class_conditional(visible, d):
    """sample(n, y = c) against the enumerated p(v | y = c), and sample(n) against p(v) = sum_y p(v, y)."""
    m = random_rbm(d, 3, visible, classes=2)
    v = all_visible(d, visible)[0]
    neg_e = labelled_neg_energy(v, all_binary(3), m, visible).detach()  # (V, 8, 2)
    torch.manual_seed(0)
    for y, exact in [(1, torch.softmax(torch.logsumexp(neg_e[:, :, 1], 1), 0)),
                     (None, torch.softmax(torch.logsumexp(neg_e.flatten(1), 1), 0))]:
        x = m.sample(20000, y)
        empirical = torch.bincount(state_index(x, visible), minlength=len(v)).double() / len(x)
        assert 0.5 * float((empirical - exact).abs().sum()) < 0.02  # total variation


@pytest.fixture(scope="module")
def trained_conditional(tmp_path_factory):
    """A 16-hidden-unit classification RBM trained briefly on binarised digits with their labels."""
    train, val = digits_splits()
    labels = digits_labels()
    model = RBM(dict(n_hidden=16, **BERNOULLI), DIGITS_INFO)
    model.set_class_prior(labels[:len(train)])  # as the train stage does
    trainer = fit(model, train, tmp_path_factory.mktemp("rbm_cond"), epochs=30, y=labels[:len(train)])
    return dict(model=model, trainer=trainer, train=train, val=val, val_y=labels[len(train):])


def test_conditional_digits_classify_and_generate_their_class(trained_conditional):
    """p(y | x) classifies about as well as naive Bayes on the same binarised pixels (scikit-learn), and clamped
    samples sit nearest their own class's pixel mean."""
    from sklearn.naive_bayes import BernoulliNB

    model, train, val, val_y = (trained_conditional[k] for k in ("model", "train", "val", "val_y"))
    train_y = digits_labels()[:len(train)]
    bits = lambda x: (x.flatten(1) > 0.5).numpy()  # noqa: E731
    naive_bayes = BernoulliNB().fit(bits(train), train_y).score(bits(val), val_y)
    with torch.no_grad():
        assert float((model.classify(val).argmax(1) == val_y).float().mean()) > naive_bayes - 0.03
        torch.manual_seed(0)
        asked = torch.arange(10).repeat_interleave(30)
        s = model.sample(len(asked), asked).flatten(1)
    means = torch.stack([(train[train_y == c].flatten(1) > 0.5).float().mean(0) for c in range(10)])
    nearest = torch.cdist((s > 0.5).float(), means).argmin(1)
    assert float((nearest == asked).float().mean()) > 0.8


def test_label_bias_is_fitted_to_the_training_frequencies(trained_conditional):
    """At train end the label bias takes its maximum-likelihood value: the model's own p(y) = Z_y / Z equals the
    training labels' frequencies, and the shifted log Z_y equals a fresh enumeration."""
    model, n_train = trained_conditional["model"], len(trained_conditional["train"])
    counts = torch.bincount(digits_labels()[:n_train], minlength=10).double()
    # to 1e-6: the bias is stored in float32
    torch.testing.assert_close(model.class_log_prior(), (counts / n_train).log(), atol=1e-6, rtol=0)
    stored = model.class_log_z.clone()
    model.refresh_log_z()
    torch.testing.assert_close(model.class_log_z, stored, atol=1e-9, rtol=0)


def test_conditional_checkpoint_round_trip_weights_only(trained_conditional, tmp_path):
    model, val, val_y = trained_conditional["model"], trained_conditional["val"], trained_conditional["val_y"]
    path = tmp_path / "rbm_cond.ckpt"
    trained_conditional["trainer"].save_checkpoint(path)
    loaded = RBM.load_from_checkpoint(path, weights_only=True)
    assert loaded.conditional and loaded.num_classes == 10
    torch.testing.assert_close(loaded.class_log_z, model.class_log_z, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(val), model.log_prob(val))
        torch.testing.assert_close(loaded.log_prob(val, val_y), model.log_prob(val, val_y))
        torch.testing.assert_close(loaded.classify(val), model.classify(val))
        torch.testing.assert_close(loaded.forward(val), model.classify(val).exp())


def eight_gaussians_fit(tmp_path, n, epochs, **cfg):
    from pipeline.data.toy2d import eight_gaussians

    x, c = eight_gaussians(n, np.random.default_rng(0))
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(c)
    model = RBM(dict(ais_steps=100, **cfg), dict(shape=[2], kind="vector", num_classes=8))
    model.set_class_prior(y)
    fit(model, x, tmp_path, epochs, y=y)
    return model


def nearest_centre_rate(model, per_class=200):
    """The fraction of the samples asked for component c that lie nearest centre c, per component."""
    from pipeline.data.toy2d import EIGHT_GAUSSIANS_RADIUS

    angles = torch.arange(8) * (2 * math.pi / 8)
    centres = EIGHT_GAUSSIANS_RADIUS * torch.stack([angles.cos(), angles.sin()], 1)
    asked = torch.arange(8).repeat_interleave(per_class)
    torch.manual_seed(0)
    s = model.sample(len(asked), asked)
    return (torch.cdist(s, centres).argmin(1) == asked).float().view(8, per_class).mean(1)


@pytest.mark.slow
def test_eight_gaussians_class_samples_fall_nearest_their_centre(tmp_path):
    """Gaussian visibles with the component as the label: >= 95% of the samples asked for component c lie nearest
    centre c, for every c (issue 10's conditional-sampling check)."""
    model = eight_gaussians_fit(tmp_path, n=8000, epochs=100)
    assert float(nearest_centre_rate(model).min()) >= 0.95


# --- semi-supervised training (hidden labels UNLABELLED) ----------------------------------------------------
def brute_free_energies(m, v):
    """F(v, y) = -log sum_h exp(-E(v, h, y)) for every class, (V, K), by enumeration over h."""
    return -torch.logsumexp(labelled_neg_energy(v, all_binary(m.config.n_hidden), m, "bernoulli"), 1)


def brute_cd1_gradient(m, x_bits, y=None):
    """The expected CD-1 gradient of one example by enumeration (Hinton 2002; Larochelle & Bengio 2008 sec. 4 for
    an unlabelled example): sum_y q(y) [dF(x, y) - sum_{h, v', y'} p(h | x, y) p(v' | h) p(y' | h) dF(v', y')],
    with q the point mass on a known label, else the posterior p(y | x) (the label as a latent variable)."""
    hs, vs = all_binary(m.config.n_hidden), all_binary(len(x_bits))
    free = brute_free_energies(m, x_bits[None])[0]  # (K,)
    with torch.no_grad():
        q = torch.softmax(-free, 0) if y is None else torch.nn.functional.one_hot(torch.tensor(y), len(free)).double()
        neg_e = labelled_neg_energy(x_bits[None], hs, m, "bernoulli")[0]  # (2^H, K)
        p_h = torch.softmax(neg_e, 0)  # p(h | x, y), one column per y
        e = m.energy()
        p_v = torch.softmax(-joint_energy(vs[None], hs[:, None, :], e, "bernoulli"), 1)  # p(v' | h), (2^H, V)
        p_y = torch.softmax(m.d + hs @ m.U.T, 1)  # p(y' | h), (2^H, K)
        weight = torch.einsum("y,hy,hv,hk->vk", q, p_h, p_v, p_y)  # the chain's end (v', y')
    surrogate = (q * free).sum() - (weight * brute_free_energies(m, vs)).sum()
    return torch.autograd.grad(surrogate, [m.W, m.b, m.c, m.U, m.d])


def test_unlabelled_positive_phase_is_the_posterior_weighted_labelled_one():
    """An unlabelled example's positive free energy is F(x) = -log sum_{h, y} e^{-E}, and its gradient (the positive
    statistics) equals sum_y p(y | x) times the labelled example's gradient for y, p(y | x) by enumeration."""
    m = random_rbm(4, 3, "bernoulli", classes=3)
    v = all_binary(4)[[3, 10]]
    params = [m.W, m.b, m.c, m.U, m.d]
    with torch.no_grad():
        brute = brute_free_energies(m, v)
        posterior = torch.softmax(-brute, 1)
    free = m.labels().free_energies(m.energy(), v)
    unlabelled = torch.full((2,), -1)
    positive = m.positive_free_energy(free, unlabelled, unlabelled != -1)
    torch.testing.assert_close(positive, -torch.logsumexp(-brute, 1), atol=1e-9, rtol=0)
    for i in range(2):
        ours = torch.autograd.grad(positive[i], params, retain_graph=True)
        expected = [sum(posterior[i, c] * g for c, g in enumerate(grads)) for grads in zip(*[
            torch.autograd.grad(brute_free_energies(m, v[i:i + 1])[0, c], params) for c in range(3)])]
        for a, b in zip(ours, expected):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_hidden_labels_are_drawn_from_the_posterior():
    """The unlabelled rows' chains start from y ~ p(y | x): empirical frequencies against enumeration; the known
    labels pass through unchanged."""
    m = random_rbm(4, 3, "bernoulli", classes=3)
    v = all_binary(4)[[5]].expand(30000, -1)
    y = torch.full((30000,), -1)
    y[:10] = 2
    with torch.no_grad():
        free = m.labels().free_energies(m.energy(), v)
        torch.manual_seed(0)
        drawn = m.complete_labels(free, y, y != -1)
        posterior = torch.softmax(-brute_free_energies(m, v[:1]), 1)[0]
    assert bool((drawn[:10] == 2).all()) and bool(((drawn >= 0) & (drawn < 3)).all())
    torch.testing.assert_close(torch.bincount(drawn[10:], minlength=3).double() / (30000 - 10), posterior,
                               atol=0.01, rtol=0)


def test_semi_supervised_cd_gradient_matches_enumeration():
    """The whole semi-supervised objective's gradient, averaged over a large batch of copies of a labelled and an
    unlabelled example, equals its expectation by enumeration over (y, h, v', y'): the labelled rows' CD-1 term,
    `unlabelled_weight` times the unlabelled rows' CD-1 term with y a latent, and `discriminative_weight` times
    -log p(y | x) over the labelled rows alone."""
    m = random_rbm(3, 3, "bernoulli", classes=2, weight_scale=0.7)
    m.config.unlabelled_weight, m.config.discriminative_weight = 0.5, 2.0
    bits = all_binary(3)[[2, 5]]
    n = 20000
    x = (bits * 0.5 + 0.25).repeat_interleave(n, 0)  # n copies of each, in data space
    y = torch.tensor([1, -1]).repeat_interleave(n)
    params = [m.W, m.b, m.c, m.U, m.d]
    torch.manual_seed(0)
    ours = torch.autograd.grad(m.cd_step(x, y)[0], params)
    labelled, unlabelled = brute_cd1_gradient(m, bits[0], 1), brute_cd1_gradient(m, bits[1])
    discriminative = torch.autograd.grad(-torch.log_softmax(-brute_free_energies(m, bits[:1]), 1)[0, 1], params)
    for a, g_l, g_u, g_d in zip(ours, labelled, unlabelled, discriminative):
        # the labelled term's 1 and the unlabelled term's 0.5 over the two halves of the batch
        expected = (g_l + 0.5 * g_u) / 2 + 2.0 * g_d
        # Monte Carlo error <= 0.0023 over 3 seeds; clamping the hidden label to either class instead is off by 0.02
        torch.testing.assert_close(a, expected, atol=0.006, rtol=0)


def test_fully_labelled_batches_keep_the_supervised_objective():
    """With no hidden label the objective is the supervised hybrid one, bit for bit (and draws the same noise)."""
    m = random_rbm(4, 3, "bernoulli", classes=3)
    x = torch.rand(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(3, (64,), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    ours = m.cd_step(x, y)[0]
    torch.manual_seed(0)
    v, energy, labels = m.to_model(x), m.energy(), m.labels()
    negative, negative_y = m.joint_negative_phase(energy, v, y)
    discriminative = torch.nn.functional.cross_entropy(-labels.free_energies(energy, v), y)
    expected = (labels.free_energy(energy, v, y).mean() - labels.free_energy(energy, negative, negative_y).mean()
                + m.config.discriminative_weight * discriminative)
    assert float(ours) == float(expected)


def test_discriminative_term_is_the_labelled_mean_with_a_capped_boost():
    """-log p(y | x) is averaged over a batch's labelled rows; with fewer than B / max_label_boost of them, the sum
    is divided by B / max_label_boost instead (each labelled row then weighs max_label_boost times a full batch's)."""
    m = random_rbm(4, 3, "bernoulli", classes=3)
    free = m.labels().free_energies(m.energy(), torch.rand(64, 4, dtype=torch.float64))
    y = torch.full((64,), -1)
    nll = lambda rows: -torch.log_softmax(-free[rows], 1)[torch.arange(len(rows)), y[rows]]  # noqa: E731
    y[:10] = torch.arange(10) % 3
    torch.testing.assert_close(m.labelled_cross_entropy(free, y, y != -1), nll(torch.arange(10)).mean())
    y[2:] = -1  # 2 labelled rows < 64 / 16
    torch.testing.assert_close(m.labelled_cross_entropy(free, y, y != -1), nll(torch.arange(2)).sum() / 4)


def separated_prototypes(n, seed, k=4, d=20, flip=0.25):
    """k random binary prototypes (the same for every seed), each bit flipped with probability `flip`; points in
    the middle of their half-cubes, classes in turn."""
    prototypes = (torch.rand(k, d, generator=torch.Generator().manual_seed(0)) < 0.5).double()
    y = torch.arange(n) % k
    flips = (torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < flip).double()
    return ((prototypes[y] + flips) % 2) * 0.5 + 0.25, y


def test_semi_supervised_training_beats_the_labelled_only_fit(tmp_path):
    """Four noisy binary prototypes, 2 labels per class among 800 examples: the semi-supervised classification RBM
    (the other 792 labels hidden) classifies held-out data far better than the same RBM fitted to the 8 labelled
    examples alone (0.89 against 0.53 when written; 0.86 to 0.89 against 0.53 to 0.70 over three data seeds), which
    never sees the clusters."""
    x, y = separated_prototypes(800, seed=1)
    x_test, y_test = separated_prototypes(400, seed=2)
    keep = torch.cat([torch.nonzero(y == c)[:2, 0] for c in range(4)])
    visible = torch.full_like(y, -1)
    visible[keep] = y[keep]
    info, cfg = dict(shape=[20], kind="vector", num_classes=4), dict(visible="bernoulli", n_hidden=16)
    semi, labelled_only = RBM(cfg, info), RBM(cfg, info)
    semi.set_class_prior(visible)
    fit(semi, x.float(), tmp_path, 30, y=visible)
    labelled_only.set_class_prior(y[keep])
    fit(labelled_only, x[keep].float(), tmp_path, 30 * 7, y=y[keep])  # 210 steps, as many as the semi fit's
    accuracy = lambda m: float((m.classify(x_test.float()).argmax(1) == y_test).float().mean())  # noqa: E731
    with torch.no_grad():
        semi_acc, labelled_acc = accuracy(semi), accuracy(labelled_only)
    assert semi_acc > 0.8 and semi_acc > labelled_acc + 0.1  # chance: 0.25
    assert torch.isfinite(semi.class_log_z).all() and semi.class_log_prior().exp().sum() == pytest.approx(1.0)
