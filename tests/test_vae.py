"""The VAE family against independent references: IWAE vs ELBO (Burda et al. 2016), and for a linear-
Gaussian VAE the IWAE estimate converging to probabilistic PCA's closed-form log-likelihood computed by
scipy; shapes through the contract; a weights_only checkpoint round trip. The conditional VAE the same
way: its linear-Gaussian form is one PPCA per class with a class offset, so log p(x | y), the marginal
log p(x) and p(y | x) have scipy closed forms; its samples obey the label on 8gaussians. Semi-supervised
(M2, Kingma et al. 2014): the unlabelled bound against scipy's log p(x) - KL(q(y | x) || p(y | x)) and
against the labelled bound summed class by class; hidden labels add the classifier without touching the
generative model; one label per class on 8gaussians classifies far above chance."""
from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from lightning_modules.contract import UNLABELLED, ConfigError
from lightning_modules.vae import VAE
from pipeline.checkpoints import load_model
from pipeline.errors import GenzooError

DIGITS = {"shape": [1, 8, 8], "kind": "image", "levels": 17, "num_classes": 10}
TOY = {"shape": [2], "kind": "vector"}


def vae(info, **cfg):
    return VAE({**asdict(VAE.Config()), "hidden": 32, "channels": 8, **cfg}, info)


def digits_batch(n=64, seed=0):
    from sklearn.datasets import load_digits

    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None]
    return (levels + torch.rand(levels.shape, generator=g)) / 17


def digits_labels(n=64):
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().target[:n])


# --- IWAE vs ELBO -------------------------------------------------------------------------------------
@pytest.mark.parametrize("conditional", [False, True])
@torch.no_grad()
def test_iwae_is_at_least_the_elbo_and_k1_equals_it_in_expectation(conditional):
    """The conditional model's bounds on log p(x | y) under q(z | x, y) keep the unconditional ones' order."""
    torch.manual_seed(0)
    model = vae(DIGITS, arch="mlp", latent_dim=4, conditional=conditional).double().eval()
    model.encoder[-1][-1].bias[4:] -= 3  # q(z | x) far narrower than the untrained model's near-prior posterior
    x = digits_batch(32).double()
    y = digits_labels(32) if conditional else None
    reps = 200
    xr, yr = x.repeat(reps, 1, 1, 1), (y.repeat(reps) if conditional else None)
    elbo = model.elbo(xr, yr).view(reps, -1)  # analytic KL, one reparameterised sample per draw
    iwae1 = model.log_prob(xr, yr, k=1).view(reps, -1)  # Monte Carlo log p(x,z) - log q(z|x)
    diff = iwae1.mean(0) - elbo.mean(0)  # per example, averaged over the draws
    se = torch.sqrt((iwae1.var(0) + elbo.var(0)) / reps)
    assert (diff.abs() < 5 * se).all(), (diff / se).abs().max()
    assert abs(diff.mean()) < 4 * se.pow(2).mean().sqrt() / math.sqrt(len(x))

    torch.manual_seed(1)
    y8 = y.repeat(8) if conditional else None
    bounds = {k: model.log_prob(x.repeat(8, 1, 1, 1), y8, k=k).view(8, -1).mean(0) for k in (1, 8, 64, 512)}
    mean_elbo = elbo.mean(0)
    assert bounds[64].mean() > mean_elbo.mean() + 1.0  # so the ELBO leaves a wide gap
    assert (bounds[512] >= mean_elbo - 3 * elbo.std(0) / math.sqrt(reps)).all()
    means = [bounds[k].mean().item() for k in (1, 8, 64, 512)]
    assert means[0] < means[1] < means[2] < means[3] + 0.05, means  # E[IWAE_k] grows with k (to noise)


# --- linear-Gaussian VAE = probabilistic PCA ---------------------------------------------------------
def ppca_vae(d=6, latent=2, seed=0, classes=0, **cfg):
    """A linear-Gaussian VAE; with `classes` a conditional one, x = W z + V onehot(y) + b + noise: one PPCA
    per class, with means b + V[:, c] (overlapping classes) and a non-uniform class prior."""
    torch.manual_seed(seed)
    info = {"shape": [d], "kind": "vector", **({"num_classes": classes} if classes else {})}
    model = vae(info, arch="linear", likelihood="gaussian", obs_scale="shared", latent_dim=latent,
                conditional=bool(classes), **cfg).double().eval()
    lin_dec = model.decoder[0]
    with torch.no_grad():
        lin_dec.weight.copy_(torch.randn(d, latent + classes, dtype=torch.float64))
        lin_dec.bias.copy_(torch.randn(d, dtype=torch.float64))
        model.log_scale.fill_(math.log(0.5))
    if classes:
        model.set_class_prior(torch.arange(classes).repeat_interleave(torch.arange(1, classes + 1)))
    return model


def decoder_params(model):
    """W (D, L), the class means (K, D) (one row when unconditional), sigma."""
    L = model.config.latent_dim
    weight = model.decoder[0].weight.detach().numpy()
    b = model.decoder[0].bias.detach().numpy()
    sigma = float(model.log_scale.clamp(min=model.config.min_log_scale).exp())
    offsets = weight[:, L:].T if model.conditional else np.zeros((1, len(b)))
    return weight[:, :L], b + offsets, sigma


def ppca_truth(model, x):
    """scipy: log p(x | c) for every class (B, K), and log p(x) = logsumexp_c log p(x | c) + log p(c)."""
    W, means, sigma = decoder_params(model)
    cov = W @ W.T + sigma**2 * np.eye(W.shape[0])
    per_class = np.stack([multivariate_normal(m, cov).logpdf(x) for m in means], 1)
    log_prior = model.class_log_prior().numpy() if model.conditional else np.zeros(1)
    return per_class, logsumexp(per_class + log_prior, 1)


def sample_ppca(model, n, rng):
    W, means, sigma = decoder_params(model)
    prior = model.class_log_prior().exp().numpy() if model.conditional else np.ones(1)
    y = rng.choice(len(means), size=n, p=prior / prior.sum())
    x = means[y] + rng.normal(size=(n, W.shape[1])) @ W.T + sigma * rng.normal(size=(n, W.shape[0]))
    return x, y


def set_encoder_near_posterior(model, mean_shift=0.15, log_var_shift=0.4):
    """PPCA's posterior is N(M^-1 W^T (x - m_y), sigma^2 M^-1), M = W^T W + sigma^2 I, m_y the class mean.
    The encoder is diagonal, so it gets that mean (slightly off) and a perturbed diagonal variance: close,
    not exact. Its input is [x, onehot(y)], so the class mean's part goes into the one-hot weights."""
    W, means, sigma = decoder_params(model)
    d, L = W.shape
    M = W.T @ W + sigma**2 * np.eye(L)
    A = np.linalg.solve(M, W.T)
    var = sigma**2 * np.diag(np.linalg.inv(M))
    b = model.decoder[0].bias.detach().numpy()
    enc = model.encoder[1]
    with torch.no_grad():
        enc.weight.zero_()
        enc.bias.zero_()
        enc.weight[:L, :d] = torch.from_numpy(A * (1 + mean_shift))
        if model.conditional:
            enc.weight[:L, d:] = torch.from_numpy(-A @ (means - b).T * (1 + mean_shift))
        enc.bias[:L] = torch.from_numpy(-A @ b * (1 + mean_shift))
        enc.bias[L:] = torch.from_numpy(np.log(var) + log_var_shift)


@pytest.mark.parametrize("classes", [0, 3])
@torch.no_grad()
def test_linear_gaussian_iwae_converges_to_the_ppca_likelihood(classes):
    """Conditional: the marginal bound (log-sum-exp over classes of the per-class bounds, the full k spent
    on the plausible classes only) converges to scipy's log of the mixture of the classes' PPCAs."""
    model = ppca_vae(classes=classes)
    set_encoder_near_posterior(model)
    x, _ = sample_ppca(model, 200, np.random.default_rng(0))
    truth = ppca_truth(model, x)[1]  # the independent reference

    torch.manual_seed(0)
    xt = torch.from_numpy(x)
    gap = {k: float((truth - model.log_prob(xt, k=k).numpy()).mean()) for k in (1, 10, 1000)}
    assert gap[1] > 0.1, gap  # the encoder is visibly off the true posterior
    assert gap[1] > gap[10] > gap[1000] - 0.01, gap
    assert abs(gap[1000]) < 0.05, gap


def exact_posterior_vae(classes, **cfg):
    """A linear-Gaussian VAE with orthogonal decoder columns, whose diagonal encoder is the exact posterior."""
    model = ppca_vae(d=5, latent=2, classes=classes, **cfg)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 2)))
    with torch.no_grad():
        model.decoder[0].weight[:, :2] = torch.from_numpy(q * np.array([2.0, 1.0]))
    set_encoder_near_posterior(model, mean_shift=0.0, log_var_shift=0.0)
    return model


@pytest.mark.parametrize("classes", [0, 3])
@torch.no_grad()
def test_linear_gaussian_with_the_exact_posterior_is_tight(classes):
    """With orthogonal decoder columns the true posterior is diagonal; the encoder can be exact and then
    log p(x,z) - log q(z|x) = log p(x) for every z, so even k=1 gives the exact likelihood. Conditional:
    log p(x | y) for every class, the marginal log p(x) and the Bayes classifier p(y | x) are scipy's."""
    model = exact_posterior_vae(classes)
    x, y = sample_ppca(model, 50, np.random.default_rng(2))
    per_class, marginal = ppca_truth(model, x)
    xt, yt = torch.from_numpy(x), (torch.from_numpy(y) if classes else None)
    truth = per_class[np.arange(len(x)), y]
    torch.manual_seed(0)
    np.testing.assert_allclose(model.log_prob(xt, yt, k=1).numpy(), truth, atol=1e-8)
    np.testing.assert_allclose(model.log_prob(xt, k=1).numpy(), marginal, atol=1e-8)
    if classes:
        np.testing.assert_allclose(model.class_log_likelihoods(xt, k=1).numpy(), per_class, atol=1e-8)
        np.testing.assert_allclose(model.log_prob(xt, k=16).numpy(), marginal, atol=1e-8)  # pilot + refined
        posterior = per_class + model.class_log_prior().numpy()
        posterior -= logsumexp(posterior, 1, keepdims=True)
        np.testing.assert_allclose(model.classify(xt).numpy(), posterior, atol=1e-8)
    # the ELBO (analytic KL, one sample) equals log p(x) only in expectation: KL(q || posterior) = 0
    reps = 400
    elbo = model.elbo(xt.repeat(reps, 1), yt.repeat(reps) if classes else None).view(reps, -1).numpy()
    se = elbo.std(0) / math.sqrt(reps)
    assert (np.abs(elbo.mean(0) - truth) < 5 * se + 1e-9).all()


def ppca_mle_log_likelihood(x: np.ndarray, latent: int) -> float:
    """Tipping & Bishop 1999: sigma^2 = mean of the discarded eigenvalues of the sample covariance,
    W W^T = U_L (Lambda_L - sigma^2) U_L^T; returns the mean log-likelihood at the MLE."""
    mean = x.mean(0)
    S = np.cov(x, rowvar=False, bias=True)
    lam, U = np.linalg.eigh(S)
    lam, U = lam[::-1], U[:, ::-1]
    s2 = lam[latent:].mean()
    cov = U[:, :latent] @ np.diag(lam[:latent] - s2) @ U[:, :latent].T + s2 * np.eye(len(mean))
    return float(multivariate_normal(mean, cov).logpdf(x).mean())


def test_linear_vae_training_reaches_the_ppca_maximum_likelihood(tmp_path):
    """ELBO training of a linear VAE with a diagonal posterior reaches probabilistic PCA's maximum
    likelihood (Lucas et al. 2019): the decoder's own W, b, sigma give the closed-form MLE's likelihood,
    and the IWAE estimate agrees with the exact likelihood of the trained model."""
    d, L = 6, 2
    rng = np.random.default_rng(0)
    W0, b0 = rng.normal(size=(d, L)), rng.normal(size=d)
    x = rng.multivariate_normal(b0, W0 @ W0.T + 0.25 * np.eye(d), size=2000)
    xt = torch.tensor(x, dtype=torch.float32)
    torch.manual_seed(0)
    model = vae({"shape": [d], "kind": "vector"}, arch="linear", obs_scale="shared", latent_dim=L, lr=0.05)
    with torch.no_grad():
        before = model.log_prob(xt, k=100).mean().item()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, torch.zeros(len(x))), batch_size=200,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    pl.Trainer(max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path).fit(model, loader)
    model.eval()
    W, (b,), sigma = decoder_params(model)
    exact = multivariate_normal(b, W @ W.T + sigma**2 * np.eye(d)).logpdf(x).mean()
    mle = ppca_mle_log_likelihood(x, L)
    assert mle - 0.02 < exact <= mle + 1e-6, (exact, mle)
    with torch.no_grad():
        iwae = model.double().log_prob(torch.from_numpy(x), k=200).mean().item()
    assert iwae > before + 1.0
    assert exact - 0.05 < iwae < exact + 0.01, (iwae, exact)


# --- shapes through the contract ---------------------------------------------------------------------
@pytest.mark.parametrize("info, arch, likelihood", [
    (DIGITS, "auto", "gaussian"), (DIGITS, "auto", "bernoulli"), (DIGITS, "mlp", "gaussian"),
    (TOY, "auto", "gaussian"), (TOY, "linear", "gaussian"),
])
@torch.no_grad()
def test_sample_encode_log_prob_shapes(info, arch, likelihood):
    torch.manual_seed(0)
    model = vae(info, arch=arch, likelihood=likelihood, latent_dim=3, conditional=False).eval()
    shape = tuple(info["shape"])
    if arch == "auto":
        expected = "ConvEncoder" if info["kind"] == "image" else "Flatten"
        assert type(model.encoder[0]).__name__ == expected
    s = model.sample(7)
    assert s.shape == (7, *shape) and torch.isfinite(s).all()
    if likelihood == "bernoulli":
        assert ((s >= 0) & (s <= 1)).all()
    x = torch.rand(5, *shape)
    assert model.encode(x).shape == (5, 3)
    lp = model.log_prob(x, k=4)
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    torch.manual_seed(3)
    score = model(x)  # forward is the anomaly score: -log_prob with the configured k
    torch.manual_seed(3)
    assert torch.equal(score, -model.log_prob(x))
    assert VAE.has_log_prob() and VAE.has_encoder() and VAE.log_prob_kind == "lower_bound"


@pytest.mark.parametrize("arch", ["conv", "mlp", "linear"])
@torch.no_grad()
def test_conditional_contract(arch):
    """The conditional model through the contract: per-class bounds, a normalised p(y | x) that the pyfunc
    serves, requested classes sampled, a deterministic encoding [p(y | x), latent mean], labels refused by
    an unconditional model."""
    torch.manual_seed(0)
    model = vae(DIGITS, arch=arch, latent_dim=3, iwae_k=8).eval()
    assert model.conditional and model.can_classify()
    x, y = digits_batch(6), digits_labels(6)
    ll = model.class_log_likelihoods(x)
    assert ll.shape == (6, 10) and torch.isfinite(ll).all()
    assert model.log_prob(x, y).shape == (6,) and model.log_prob(x).shape == (6,)
    p = model(x)  # the pyfunc: p(y | x)
    assert p.shape == (6, 10) and torch.allclose(p.sum(1), torch.ones(6))
    assert model.sample(4, torch.tensor([0, 3, 3, 9])).shape == (4, 1, 8, 8) and model.sample(5).shape == (5, 1, 8, 8)
    e = model.encode(x)
    assert e.shape == (6, 13) and torch.equal(e, model.encode(x)) and torch.allclose(e[:, :10].sum(1), torch.ones(6))
    plain = vae(DIGITS, arch=arch, latent_dim=3, conditional=False)
    with pytest.raises(ValueError, match="without labels"):
        plain.log_prob(x, y)
    with pytest.raises(ValueError, match="without labels"):
        plain.sample(2, torch.tensor([1, 2]))


def test_class_bounds_spend_the_full_k_on_the_plausible_classes():
    """A pilot bound of pilot_k samples for every class, then the full k (fresh draws) exactly for the
    classes whose pilot log p(x, c) is within the margin of the best; checked against a bound that
    records its calls and returns -(class offset) - 1/k."""
    from lightning_modules.vae.class_bounds import class_bounds

    offsets = torch.tensor([[0.0, 3.0, 30.0, 9.0], [50.0, 0.0, 1.0, 60.0]])  # per example, per class
    calls = []

    def bound(x, y, k, generator=None):
        calls.append((k, x[:, 0].long().tolist(), y.tolist()))
        return -offsets[x[:, 0].long(), y] - 1.0 / k

    x = torch.tensor([[0.0], [1.0]])
    log_prior = torch.log(torch.tensor([0.25, 0.25, 0.25, 0.25]))
    ll = class_bounds(bound, x, log_prior, k=100, pilot_k=4, margin=10.0, max_rows=10_000)
    expected = -offsets - 1 / 4
    for i, c in [(0, 0), (0, 1), (0, 3), (1, 1), (1, 2)]:  # within 10 nats (+- the pilot's 1/4) of the best
        expected[i, c] = -offsets[i, c] - 1 / 100
    assert torch.allclose(ll, expected)
    assert [k for k, *_ in calls] == [4, 100]
    assert sorted(zip(calls[1][1], calls[1][2])) == [(0, 0), (0, 1), (0, 3), (1, 1), (1, 2)]
    # chunks keep examples x samples within max_rows
    calls.clear()
    class_bounds(bound, x, log_prior, k=100, pilot_k=4, margin=10.0, max_rows=200)
    assert all(len(xs) * k <= 200 for k, xs, _ in calls)


def test_conditional_samples_obey_the_label(tmp_path):
    """8gaussians with the component as the label: >= 95% of the samples asked for class c lie nearest to
    centre c."""
    from pipeline.data.toy2d import EIGHT_GAUSSIANS_RADIUS, eight_gaussians

    x, y = eight_gaussians(4000, np.random.default_rng(0))
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    pl.seed_everything(0, verbose=False)
    model = vae({"shape": [2], "kind": "vector", "num_classes": 8}, latent_dim=2, hidden=64, lr=1e-2)
    model.set_class_prior(y)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100, shuffle=True)
    pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path).fit(model, loader)
    labels = torch.arange(8).repeat_interleave(200)
    torch.manual_seed(0)
    with torch.no_grad():
        s = model.eval().sample(len(labels), labels)
    angles = torch.arange(8) * (2 * math.pi / 8)
    centres = EIGHT_GAUSSIANS_RADIUS * torch.stack([angles.cos(), angles.sin()], 1)
    nearest = torch.cdist(s, centres).argmin(1)
    per_class = torch.stack([(nearest[labels == c] == c).float().mean() for c in range(8)])
    assert per_class.min() >= 0.95, per_class  # measured 0.96


# --- semi-supervised: M2 (Kingma et al. 2014) --------------------------------------------------------
def semi_ppca():
    """The exact-posterior conditional PPCA VAE (3 classes) with M2's linear classifier q(y | x) at random
    weights: every E[L(x, c)] is log p(x | c) + log p(c) exactly, which scipy computes."""
    model = exact_posterior_vae(3, semi_supervised=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def linear_log_q(model, x):
    """log q(y | x) from the linear classifier's weights, by numpy."""
    lin = model.classifier[1]
    logits = x @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()
    return logits - logsumexp(logits, 1, keepdims=True)


@pytest.mark.parametrize("m", [None, 2])
@torch.no_grad()
def test_unlabelled_bound_is_the_sum_over_classes_and_bounds_log_px(m):
    """U(x) = sum_y q(y | x) L(x, y) + H(q) (eq. 7) against scipy: with exact per-class bounds its mean is
    sum_y q (log p(x | y) + log p(y) - log q) = log p(x) - KL(q || p(y | x)) <= log p(x), and against the
    labelled bound summed class by class. m=2: q renormalised over its 2 most likely classes, still a
    bound. With q the true posterior (linear for PPCA classes sharing a covariance) it is tight."""
    model = semi_ppca()
    x, _ = sample_ppca(model, 30, np.random.default_rng(3))
    per_class, marginal = ppca_truth(model, x)
    log_joint = per_class + model.class_log_prior().numpy()
    log_q = linear_log_q(model, x)
    if m is not None:  # keep the m most likely classes, renormalised
        drop = np.argsort(-log_q, 1)[:, m:]
        np.put_along_axis(log_q, drop, -np.inf, 1)
        log_q -= logsumexp(log_q, 1, keepdims=True)
    q, log_q = np.exp(log_q), np.where(np.isfinite(log_q), log_q, 0.0)  # 0 log 0 = 0
    truth = (q * (log_joint - log_q)).sum(1)
    kl = (q * (log_q - (log_joint - marginal[:, None]))).sum(1)
    np.testing.assert_allclose(truth, marginal - kl, atol=1e-9)
    assert (kl > 0.01).mean() > 0.5  # random weights: a visibly loose bound

    reps, xt = 300, torch.from_numpy(x)
    torch.manual_seed(0)
    u = model.unlabelled_bound(xt.repeat(reps, 1), m).view(reps, -1)
    se = u.std(0) / math.sqrt(reps)
    assert (abs(u.mean(0).numpy() - truth) < 5 * se.numpy() + 1e-9).all()
    assert (u.mean(0).numpy() <= marginal + 5 * se.numpy()).all()
    # brute force: the labelled ELBO of every class, weighted by q, plus the entropy
    brute = np.zeros(len(x))
    for c in range(3):
        elbo = model.elbo(xt.repeat(reps, 1), torch.full((reps * len(x),), c)).view(reps, -1).mean(0).numpy()
        brute += q[:, c] * (elbo + log_joint[:, c] - per_class[:, c] - log_q[:, c])
    assert (abs(u.mean(0).numpy() - brute) < 5 * se.numpy() * math.sqrt(2) + 1e-9).all()

    if m is None:  # q = p(y | x): logits log p(c) + mu_c' C^-1 x - mu_c' C^-1 mu_c / 2
        W, means, sigma = decoder_params(model)
        prec = np.linalg.inv(W @ W.T + sigma**2 * np.eye(len(W)))
        lin = model.classifier[1]
        lin.weight.copy_(torch.from_numpy(means @ prec))
        lin.bias.copy_(torch.from_numpy(model.class_log_prior().numpy() - 0.5 * np.einsum("cd,de,ce->c", means, prec, means)))
        torch.manual_seed(1)
        u = model.unlabelled_bound(xt.repeat(reps, 1)).view(reps, -1)
        assert (abs(u.mean(0).numpy() - marginal) < 5 * u.std(0).numpy() / math.sqrt(reps) + 1e-9).all()


def test_hidden_labels_add_the_classifier_and_leave_the_generative_model_alone():
    """Fully labelled: no classifier, `semi_supervised` stays auto. Hidden labels: the classifier appears
    (after every other module, from its own generator: the generative weights and the global random
    stream are those of the fully labelled model) and the saved config says semi_supervised=true."""
    y = digits_labels(40)
    hidden = y.clone()
    hidden[10:] = UNLABELLED
    torch.manual_seed(0)
    full = vae(DIGITS, latent_dim=3)
    full.set_class_prior(y)
    full.provide_init_data(digits_batch(40), y)
    after_full = torch.rand(3)
    torch.manual_seed(0)
    semi = vae(DIGITS, latent_dim=3)
    semi.set_class_prior(hidden)
    assert torch.equal(torch.rand(3), after_full)
    assert full.classifier is None and full.config.semi_supervised == "auto"
    assert semi.classifier is not None and semi.hparams["cfg"]["semi_supervised"] is True
    weights = dict(semi.named_parameters())
    assert all(torch.equal(v, weights[k]) for k, v in full.named_parameters())
    assert sorted(set(weights) - set(dict(full.named_parameters()))) == sorted(
        f"classifier.{k}" for k in semi.classifier.state_dict())
    with pytest.raises(ConfigError, match="semi_supervised"):
        vae(DIGITS, latent_dim=3, semi_supervised=False).set_class_prior(hidden)
    with pytest.raises(ConfigError, match="semi_supervised"):
        vae(DIGITS, latent_dim=3, conditional=False, semi_supervised=True)
    with pytest.raises(ValueError, match="UNLABELLED"):
        full.training_step((digits_batch(40), hidden), 0)


def test_semi_supervised_training_with_one_label_per_class(tmp_path):
    """8gaussians with one visible label per class (8 of 1000): the M2 model classifies held-out points
    far above chance (1/8), and a weights-only checkpoint rebuilds it with its classifier."""
    from pipeline.data.toy2d import eight_gaussians

    x, y = eight_gaussians(1300, np.random.default_rng(0))
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    (x, x_test), (y, y_test) = x.split([1000, 300]), y.split([1000, 300])
    hidden = torch.full_like(y, UNLABELLED)
    first = [int((y == c).nonzero()[0]) for c in range(8)]
    hidden[first] = y[first]
    pl.seed_everything(0, verbose=False)
    model = vae({"shape": [2], "kind": "vector", "num_classes": 8}, latent_dim=2, hidden=64, lr=1e-2, iwae_k=16)
    model.set_class_prior(hidden)
    model.provide_init_data(x, hidden)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, hidden), batch_size=100, shuffle=True)
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, loader)
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        acc = (model.classify(x_test).argmax(1) == y_test).float().mean()
        acc_q = (model.classifier_log_probs(x_test).argmax(1) == y_test).float().mean()
    assert acc > 0.9 and acc_q > 0.9, (acc, acc_q)
    path = tmp_path / "semi.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_model(path)
    assert loaded.classifier is not None and loaded.config == model.config
    torch.manual_seed(1)
    a = loaded.classify(x_test[:20])
    torch.manual_seed(1)
    assert torch.equal(a, model.classify(x_test[:20]))


# --- checkpoints ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("conditional", [False, True])
def test_checkpoint_round_trip_weights_only(tmp_path, digits_folder, conditional):
    from pipeline.data.datamodule import PreparedDataModule

    dm = PreparedDataModule(digits_folder, batch_size=64)
    torch.manual_seed(0)
    model = vae(dm.info.to_dict(), latent_dim=4, iwae_k=16, conditional=conditional)
    if conditional:
        model.set_class_prior(dm.split("train")[1])
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and containers only
    assert raw["genzoo_family"] == "vae"
    for loaded in (load_model(path), load_model(path, VAE)):
        assert type(loaded) is VAE and not loaded.training
        assert loaded.config == model.config and loaded.info == model.info
        sd, ref = loaded.state_dict(), model.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
        x = dm.split("test")[0][:16]
        model.eval()
        with torch.no_grad():
            assert torch.equal(loaded.encode(x), model.encode(x))
            torch.manual_seed(5)
            a = loaded.log_prob(x)
            torch.manual_seed(5)
            assert torch.equal(a, model.log_prob(x))
            if conditional:
                assert torch.equal(loaded.class_log_prior(), model.class_log_prior())
                for fn in ("classify", "sample"):
                    args = (x,) if fn == "classify" else (10, torch.arange(10))
                    torch.manual_seed(6)
                    a = getattr(loaded, fn)(*args)
                    torch.manual_seed(6)
                    assert torch.equal(a, getattr(model, fn)(*args))

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(GenzooError, match="bad.ckpt"):
        load_model(bad)
    with pytest.raises(GenzooError, match="not found"):
        load_model(tmp_path / "missing.ckpt")
