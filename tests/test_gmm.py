"""The Gaussian mixture family against independent references: scikit-learn's GaussianMixture (EM
iterates, BIC/AIC) and KMeans, scipy's multivariate normal, closed-form mixture moments, numerical
integration, the true density of a toy set, and a 1-process run for 2-process DDP."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy.special import logsumexp, softmax
from scipy.stats import multivariate_normal
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from lightning_modules.contract import DataInfo
from lightning_modules.common.kmeans import kmeans_plusplus, lloyd
from lightning_modules.gmm import GMM
from pipeline.config import DataConfig
from pipeline.data.datamodule import PreparedDataModule
from pipeline.data.images import digits
from pipeline.data.prepared import Prepared
from pipeline.data.store import write_prepared
from pipeline.data.toy2d import eight_gaussians, eight_gaussians_log_density

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def make_trainer(tmp_path, **kw) -> pl.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, "accelerator": "cpu", "devices": 1, **kw}
    return pl.Trainer(default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **kw)


def vector_datamodule(tmp_path, x: np.ndarray, batch_size: int = 64) -> PreparedDataModule:
    """A prepared folder holding x (float32 vectors) as every split, as the pipeline passes EM families."""
    x = x.astype(np.float32)
    y = np.zeros(len(x), dtype=np.int64)
    p = Prepared({s: (x, y) for s in ("train", "val", "test")}, DataInfo(shape=(x.shape[1],), kind="vector"), "test")
    write_prepared(p, tmp_path / "data", "test", 0)
    return PreparedDataModule(tmp_path / "data", batch_size=batch_size, fixed_train_noise=True, exact_sharding=True)


def fit(trainer: pl.Trainer, model: GMM, dm: PreparedDataModule) -> None:
    """As the train stage does: the training set for the k-means initialisation, then fit."""
    model.provide_init_data(dm.split("train")[0])
    trainer.fit(model, dm)


def blobs(rng: np.random.Generator, n: int = 400, dim: int = 3, k: int = 3) -> np.ndarray:
    centres = 3 * rng.standard_normal((k, dim))
    return centres[rng.integers(0, k, n)] + rng.standard_normal((n, dim)) * rng.uniform(0.3, 1.0, (n, dim))


def random_mixture(rng: np.random.Generator, k: int, dim: int, covariance_type: str):
    """Random weights, means, covariances in scikit-learn's layout, and the full (K, D, D) covariances."""
    weights = rng.dirichlet(np.full(k, 3.0))
    means = rng.standard_normal((k, dim))
    if covariance_type in ("full", "tied"):
        a = rng.standard_normal((k, dim, dim))
        full = a @ a.transpose(0, 2, 1) / dim + 0.3 * np.eye(dim)
        cov = full if covariance_type == "full" else full[0]
        full = full if covariance_type == "full" else np.broadcast_to(full[0], (k, dim, dim))
    elif covariance_type == "diag":
        cov = rng.uniform(0.3, 1.5, (k, dim))
        full = np.stack([np.diag(c) for c in cov])
    else:
        cov = rng.uniform(0.3, 1.5, k)
        full = cov[:, None, None] * np.eye(dim)
    return weights, means, cov, full


def precisions(cov: np.ndarray, covariance_type: str) -> np.ndarray:
    return np.linalg.inv(cov) if covariance_type in ("full", "tied") else 1.0 / cov


def gmm_with(weights, means, cov, covariance_type: str, info: DataInfo, **cfg) -> GMM:
    model = GMM({"n_components": len(weights), "covariance_type": covariance_type, **cfg}, info.to_dict())
    model.set_parameters(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (weights, means, cov)))
    return model


def scipy_joint_log_prob(x, weights, means, full_covs) -> np.ndarray:
    return np.stack([np.log(w) + multivariate_normal(m, c).logpdf(x) for w, m, c in zip(weights, means, full_covs)], 1)


# --- (1) EM iterates equal scikit-learn's -------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_em_through_trainer_matches_sklearn(tmp_path, covariance_type):
    n_iter, k, reg = 5, 3, 1e-3
    rng = np.random.default_rng(1)
    x = blobs(rng).astype(np.float32)
    x64 = x.astype(np.float64)  # the values our float32 batches hold; sklearn then runs in float64 as we do
    weights, means, cov, _ = random_mixture(rng, k, x.shape[1], covariance_type)
    means = x64[rng.choice(len(x), k, replace=False)]

    model = gmm_with(weights, means, cov, covariance_type, DataInfo(shape=(3,), kind="vector"),
                     reg_covar=reg, max_epochs=n_iter, tol=0.0)
    trainer = make_trainer(tmp_path, max_epochs=n_iter)
    fit(trainer, model, vector_datamodule(tmp_path, x))
    assert trainer.current_epoch == n_iter

    def sklearn_fit(max_iter):
        # with all three *_init given, sklearn's first E-step uses exactly these parameters, then runs
        # max_iter (E, M) pairs; tol=0 never stops early
        gm = GaussianMixture(k, covariance_type=covariance_type, reg_covar=reg, max_iter=max_iter, tol=0.0,
                             weights_init=weights, means_init=means, precisions_init=precisions(cov, covariance_type))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 on purpose
            return gm.fit(x64)

    sk = sklearn_fit(n_iter)
    ours = model.log_prob(torch.from_numpy(x)).mean().item()
    assert abs(ours - sk.score(x64)) / abs(sk.score(x64)) < 1e-4
    np.testing.assert_allclose(model.weights.numpy(), sk.weights_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(model.means.numpy(), sk.means_, rtol=1e-6, atol=1e-9)

    # the last epoch's BIC/AIC are those of the parameters its E-step saw: sklearn after n_iter - 1 steps
    before = sklearn_fit(n_iter - 1)
    metrics = trainer.callback_metrics
    assert metrics["train/bic"].item() == pytest.approx(before.bic(x64), rel=1e-5)
    assert metrics["train/aic"].item() == pytest.approx(before.aic(x64), rel=1e-5)
    assert metrics["train/loglik"].item() == pytest.approx(before.score(x64), rel=1e-5)


# --- (2) two DDP processes = one process --------------------------------------------------------------
def fit_to_checkpoint(tmp_path, name: str, cfg: dict, **trainer_kw) -> str:
    """Fit on digits, then save as the pipeline's train stage does (after fit, from the main process)."""
    dm = PreparedDataModule(tmp_path / "digits", batch_size=100, fixed_train_noise=True, exact_sharding=True)
    trainer = make_trainer(tmp_path, max_epochs=cfg["max_epochs"], limit_val_batches=0,
                           use_distributed_sampler=False, **trainer_kw)  # as the pipeline runs EM families
    fit(trainer, GMM(cfg, dm.info.to_dict()), dm)
    trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
    return str(tmp_path / f"{name}.ckpt")


def test_ddp_two_processes_equal_one(tmp_path):
    write_prepared(digits(DataConfig(), np.random.default_rng(0)), tmp_path / "digits", "digits", 0)
    cfg = {"n_components": 4, "covariance_type": "full", "max_epochs": 3, "tol": 0.0, "init_subsample": 500}
    one = GMM.load_from_checkpoint(fit_to_checkpoint(tmp_path, "one", cfg), weights_only=True)
    two = GMM.load_from_checkpoint(fit_to_checkpoint(tmp_path, "two", cfg, devices=2, strategy="ddp_spawn"),
                                   weights_only=True)
    for name in ("weights", "means", "prec_chol"):
        assert (getattr(one, name) - getattr(two, name)).abs().max().item() < 1e-5, name
    # trained on images: the contract's shapes hold in data space
    x = torch.rand(5, 1, 8, 8)
    assert one.sample(7).shape == (7, 1, 8, 8)
    assert torch.allclose(one.encode(x[:5]).sum(1), torch.ones(5))


# --- (3) a density: integrates to 1 and reaches the true toy density ----------------------------------
def test_toy2d_density_integrates_to_one_and_matches_truth(tmp_path):
    x, _ = eight_gaussians(4000, np.random.default_rng(0))
    x_test, _ = eight_gaussians(4000, np.random.default_rng(1))
    model = GMM({"n_components": 8, "max_epochs": 50, "tol": 1e-6}, DataInfo(shape=(2,), kind="vector").to_dict())
    fit(make_trainer(tmp_path, max_epochs=50, limit_val_batches=0), model, vector_datamodule(tmp_path, x, batch_size=1000))

    grid = np.linspace(-5, 5, 801)
    xx, yy = np.meshgrid(grid, grid, indexing="ij")
    dens = model.log_prob(torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], 1))).exp().numpy().reshape(xx.shape)
    mass = np.trapezoid(np.trapezoid(dens, grid, axis=1), grid)
    assert abs(mass - 1) < 1e-2

    ours = -model.log_prob(torch.from_numpy(x_test)).mean().item()
    truth = -eight_gaussians_log_density(x_test).mean()
    assert ours - truth < 0.02  # nats; the GMM family contains the truth


# --- (4) log_prob, encode, sample against scipy and closed forms ------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_prob_encode_sample_against_scipy(covariance_type):
    rng = np.random.default_rng(2)
    k, dim = 4, 3
    weights, means, cov, full = random_mixture(rng, k, dim, covariance_type)
    model = gmm_with(weights, means, cov, covariance_type, DataInfo(shape=(dim,), kind="vector"))
    x = 2 * rng.standard_normal((50, dim))

    joint = scipy_joint_log_prob(x, weights, means, full)
    np.testing.assert_allclose(model.log_prob(torch.from_numpy(x)).numpy(), logsumexp(joint, 1), rtol=1e-10)
    np.testing.assert_allclose(model.encode(torch.from_numpy(x)).numpy(), softmax(joint, 1), atol=1e-6)

    # mixture moments: E x = sum w mu, Cov x = sum w (Sigma + mu mu^T) - E x E x^T
    torch.manual_seed(0)
    s = model.sample(40_000).double().numpy()
    mean = weights @ means
    second = np.einsum("k,kde->de", weights, full + np.einsum("kd,ke->kde", means, means))
    np.testing.assert_allclose(s.mean(0), mean, atol=0.03)
    np.testing.assert_allclose(np.cov(s.T), second - np.outer(mean, mean), atol=0.06)


# --- (5) checkpoint round trip -------------------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_checkpoint_round_trip_weights_only(tmp_path, covariance_type):
    x = blobs(np.random.default_rng(3))
    model = GMM({"n_components": 3, "covariance_type": covariance_type, "max_epochs": 2},
                DataInfo(shape=(3,), kind="vector").to_dict())
    trainer = make_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    fit(trainer, model, vector_datamodule(tmp_path, x))
    trainer.save_checkpoint(tmp_path / "gmm.ckpt")

    loaded = GMM.load_from_checkpoint(tmp_path / "gmm.ckpt", weights_only=True)
    assert loaded.config == model.config and loaded.info == model.info and bool(loaded.initialized)
    for name in ("weights", "means", "prec_chol"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    xt = torch.from_numpy(x[:20])
    assert torch.equal(loaded.log_prob(xt), model.log_prob(xt))


# --- initialisation and configuration --------------------------------------------------------------------
def test_kmeans_plusplus_then_lloyd_finds_sklearn_kmeans_centres():
    rng = np.random.default_rng(4)
    centres = 10 * rng.standard_normal((5, 4))
    x = torch.from_numpy(centres[rng.integers(0, 5, 600)] + rng.standard_normal((600, 4)))
    labels = lloyd(x, kmeans_plusplus(x, 5, torch.Generator().manual_seed(0)), iters=10)
    ours = np.stack([x[labels == j].mean(0).numpy() for j in range(5)])
    ref = KMeans(5, n_init=10, random_state=0).fit(x.numpy()).cluster_centers_
    np.testing.assert_allclose(ours[np.lexsort(ours.T)], ref[np.lexsort(ref.T)], atol=1e-8)


def test_config_rejects_bad_values():
    info = DataInfo(shape=(2,), kind="vector").to_dict()
    with pytest.raises(ValueError, match="covariance_type"):
        GMM({"covariance_type": "banded"}, info)
    with pytest.raises(ValueError, match="n_component"):  # unknown keys are named
        GMM({"n_component": 3}, info)
