"""The VAE family against independent references: IWAE vs ELBO (Burda et al. 2016), and for a linear-
Gaussian VAE the IWAE estimate converging to probabilistic PCA's closed-form log-likelihood computed by
scipy; shapes through the contract; a weights_only checkpoint round trip."""
from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy.stats import multivariate_normal

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


# --- IWAE vs ELBO -------------------------------------------------------------------------------------
@torch.no_grad()
def test_iwae_is_at_least_the_elbo_and_k1_equals_it_in_expectation():
    torch.manual_seed(0)
    model = vae(DIGITS, arch="mlp", latent_dim=4).double().eval()
    x = digits_batch(32).double()
    reps = 200
    xr = x.repeat(reps, 1, 1, 1)
    elbo = model.elbo(xr).view(reps, -1)  # analytic KL, one reparameterised sample per draw
    iwae1 = model.log_prob(xr, k=1).view(reps, -1)  # Monte Carlo log p(x,z) - log q(z|x)
    diff = iwae1.mean(0) - elbo.mean(0)  # per example, averaged over the draws
    se = torch.sqrt((iwae1.var(0) + elbo.var(0)) / reps)
    assert (diff.abs() < 5 * se).all(), (diff / se).abs().max()
    assert abs(diff.mean()) < 4 * se.pow(2).mean().sqrt() / math.sqrt(len(x))

    torch.manual_seed(1)
    bounds = {k: model.log_prob(x.repeat(8, 1, 1, 1), k=k).view(8, -1).mean(0) for k in (1, 8, 64, 512)}
    mean_elbo = elbo.mean(0)
    assert bounds[64].mean() > mean_elbo.mean() + 1.0  # an untrained encoder leaves a wide gap
    assert (bounds[512] >= mean_elbo - 3 * elbo.std(0) / math.sqrt(reps)).all()
    means = [bounds[k].mean().item() for k in (1, 8, 64, 512)]
    assert means[0] < means[1] < means[2] < means[3] + 0.05, means  # E[IWAE_k] grows with k (to noise)


# --- linear-Gaussian VAE = probabilistic PCA ---------------------------------------------------------
def ppca_vae(d=6, latent=2, seed=0):
    torch.manual_seed(seed)
    model = vae({"shape": [d], "kind": "vector"}, arch="linear", likelihood="gaussian", obs_scale="shared",
                latent_dim=latent).double().eval()
    lin_dec = model.decoder[0]
    with torch.no_grad():
        lin_dec.weight.copy_(torch.randn(d, latent, dtype=torch.float64))
        lin_dec.bias.copy_(torch.randn(d, dtype=torch.float64))
        model.log_scale.fill_(math.log(0.5))
    return model


def decoder_params(model):
    W = model.decoder[0].weight.detach().numpy()  # (D, L)
    b = model.decoder[0].bias.detach().numpy()
    sigma = float(model.log_scale.clamp(min=model.config.min_log_scale).exp())
    return W, b, sigma


def set_encoder_near_posterior(model, mean_shift=0.15, log_var_shift=0.4):
    """PPCA's posterior is N(M^-1 W^T (x - b), sigma^2 M^-1), M = W^T W + sigma^2 I. The encoder is
    diagonal, so it gets that mean (slightly off) and a perturbed diagonal variance: close, not exact."""
    W, b, sigma = decoder_params(model)
    L = W.shape[1]
    M = W.T @ W + sigma**2 * np.eye(L)
    A = np.linalg.solve(M, W.T)
    var = sigma**2 * np.diag(np.linalg.inv(M))
    enc = model.encoder[1]
    with torch.no_grad():
        enc.weight.zero_()
        enc.bias.zero_()
        enc.weight[:L] = torch.from_numpy(A * (1 + mean_shift))
        enc.bias[:L] = torch.from_numpy(-A @ b * (1 + mean_shift))
        enc.bias[L:] = torch.from_numpy(np.log(var) + log_var_shift)


@torch.no_grad()
def test_linear_gaussian_iwae_converges_to_the_ppca_likelihood():
    model = ppca_vae()
    set_encoder_near_posterior(model)
    W, b, sigma = decoder_params(model)
    cov = W @ W.T + sigma**2 * np.eye(len(b))
    rng = np.random.default_rng(0)
    x = rng.multivariate_normal(b, cov, size=200)
    truth = multivariate_normal(b, cov).logpdf(x)  # the independent reference

    torch.manual_seed(0)
    xt = torch.from_numpy(x)
    gap = {k: float((truth - model.log_prob(xt, k=k).numpy()).mean()) for k in (1, 10, 1000)}
    assert gap[1] > 0.1, gap  # the encoder is visibly off the true posterior
    assert gap[1] > gap[10] > gap[1000] - 0.01, gap
    assert abs(gap[1000]) < 0.05, gap


@torch.no_grad()
def test_linear_gaussian_with_the_exact_posterior_is_tight():
    """With orthogonal decoder columns the true posterior is diagonal; the encoder can be exact and then
    log p(x,z) - log q(z|x) = log p(x) for every z, so even k=1 gives the exact likelihood."""
    model = ppca_vae(d=5, latent=2)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 2)))
    with torch.no_grad():
        model.decoder[0].weight.copy_(torch.from_numpy(q * np.array([2.0, 1.0])))
    set_encoder_near_posterior(model, mean_shift=0.0, log_var_shift=0.0)
    W, b, sigma = decoder_params(model)
    x = np.random.default_rng(2).normal(size=(50, 5)) + b
    truth = multivariate_normal(b, W @ W.T + sigma**2 * np.eye(5)).logpdf(x)
    torch.manual_seed(0)
    est = model.log_prob(torch.from_numpy(x), k=1).numpy()
    np.testing.assert_allclose(est, truth, atol=1e-8)
    # the ELBO (analytic KL, one sample) equals log p(x) only in expectation: KL(q || posterior) = 0
    reps = 400
    elbo = model.elbo(torch.from_numpy(x).repeat(reps, 1)).view(reps, -1).numpy()
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
    W, b, sigma = decoder_params(model)
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
    model = vae(info, arch=arch, likelihood=likelihood, latent_dim=3).eval()
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


# --- checkpoints ---------------------------------------------------------------------------------------
def test_checkpoint_round_trip_weights_only(tmp_path, digits_folder):
    from pipeline.data.datamodule import PreparedDataModule

    dm = PreparedDataModule(digits_folder, batch_size=64)
    torch.manual_seed(0)
    model = vae(dm.info.to_dict(), latent_dim=4, iwae_k=16)
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

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(GenzooError, match="bad.ckpt"):
        load_model(bad)
    with pytest.raises(GenzooError, match="not found"):
        load_model(tmp_path / "missing.ckpt")
