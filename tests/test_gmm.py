"""The Gaussian mixture family against independent references: scikit-learn's GaussianMixture (EM
iterates, BIC/AIC) and KMeans, scipy's multivariate normal, closed-form mixture moments, numerical
integration, the true density of a toy set, and a 1-process run for 2-process DDP. The conditional
model (one mixture per class) against per-class GaussianMixture fits, scipy, and scikit-learn's LDA."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy.special import logsumexp, softmax
from scipy.stats import multivariate_normal
from sklearn.cluster import KMeans
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.mixture import GaussianMixture

from lightning_modules.contract import DataInfo
from lightning_modules.common.em import fit_em
from lightning_modules.common.gaussian import covariances_from_precision_cholesky
from lightning_modules.common.kmeans import kmeans_plusplus, lloyd
from lightning_modules.gmm import GMM
from pipeline.config import DataConfig
from pipeline.data.datamodule import PreparedDataModule
from pipeline.data.images import digits
from pipeline.data.prepared import Prepared
from pipeline.data.store import write_prepared
from pipeline.data.toy2d import eight_gaussians, eight_gaussians_log_density
from label_checks import nearest_centre, share_nearest_requested_centre

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def make_trainer(tmp_path, **kw) -> pl.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, "accelerator": "cpu", "devices": 1, **kw}
    return pl.Trainer(default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **kw)


def vector_datamodule(tmp_path, x: np.ndarray, batch_size: int = 64, y=None) -> PreparedDataModule:
    """A prepared folder holding x (float32 vectors) as every split, as the pipeline passes EM families;
    with labels y, a labelled data set of y.max() + 1 classes."""
    x = x.astype(np.float32)
    info = DataInfo(shape=(x.shape[1],), kind="vector", num_classes=None if y is None else int(y.max()) + 1)
    y = np.zeros(len(x), dtype=np.int64) if y is None else y.astype(np.int64)
    p = Prepared({s: (x, y) for s in ("train", "val", "test")}, info, "test")
    write_prepared(p, tmp_path / "data", "test", 0)
    return PreparedDataModule(tmp_path / "data", batch_size=batch_size, fixed_train_noise=True, exact_sharding=True)


def fit(trainer: pl.Trainer, model: GMM, dm: PreparedDataModule) -> None:
    """As the train stage does: the class prior, the training set for the k-means initialisation, then fit."""
    x, y = dm.split("train")
    if model.conditional:
        model.set_class_prior(y)
    model.provide_init_data(x, y)
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


def sklearn_em(x64, weights, means, cov, covariance_type: str, reg: float, max_iter: int) -> GaussianMixture:
    """scikit-learn's float64 EM from these parameters: with all three *_init given, its first E-step uses exactly
    them, then it runs max_iter (E, M) pairs; tol=0 never stops early."""
    gm = GaussianMixture(len(weights), covariance_type=covariance_type, reg_covar=reg, max_iter=max_iter, tol=0.0,
                         weights_init=weights, means_init=means, precisions_init=precisions(cov, covariance_type))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 on purpose
        return gm.fit(x64)


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
        return sklearn_em(x64, weights, means, cov, covariance_type, reg, max_iter)

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


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float32_em_follows_sklearns_float64_em(covariance_type, offset):
    """`precision: float32`: E-steps in float32 (blocks of E_STEP_ROWS rows), statistics summed in float64 about
    the mean of the component means. Far from the origin (offset 1e3, spread ~1) raw float32 sums of squares
    would cancel to nothing; the log-likelihood still follows scikit-learn's float64 EM within 1e-6 relative."""
    from lightning_modules.gmm.model import E_STEP_ROWS

    n_iter, k, reg = 8, 3, 1e-3
    rng = np.random.default_rng(2)
    x64 = blobs(rng, n=int(2.5 * E_STEP_ROWS), dim=4) + offset
    x = torch.from_numpy(x64)
    weights, _, cov, _ = random_mixture(rng, k, x.shape[1], covariance_type)
    means = x64[rng.choice(len(x), k, replace=False)]
    histories = {}
    for precision in ("float64", "float32"):
        model = gmm_with(weights, means, cov, covariance_type, DataInfo(shape=(4,), kind="vector"), reg_covar=reg,
                         precision=precision)
        histories[precision] = fit_em(model, x, n_iter)

    def sklearn_fit(max_iter):
        return sklearn_em(x64, weights, means, cov, covariance_type, reg, max_iter)

    # fit_em's last entry is the log-likelihood its last E-step saw: sklearn's after n_iter - 1 (E, M) steps
    assert histories["float64"][-1] == pytest.approx(sklearn_fit(n_iter - 1).score(x64), rel=1e-9)
    np.testing.assert_allclose(histories["float32"], histories["float64"], rtol=1e-6)
    np.testing.assert_allclose(model.means.numpy(), sklearn_fit(n_iter).means_, rtol=1e-5, atol=1e-5)


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
    cfg = {"n_components": 4, "covariance_type": "full", "max_epochs": 3, "tol": 0.0, "init_subsample": 500,
           "conditional": False}
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


# --- the conditional model: one mixture per class -------------------------------------------------------
CLASSES, PER_CLASS, DIM = 3, 2, 3


def labelled_blobs(rng: np.random.Generator):
    """Three classes of different sizes, each its own blobs; x float32-representable, y (N,)."""
    sizes = (120, 150, 180)
    x = np.concatenate([blobs(rng, n, DIM, 2) + 4.0 * c for c, n in enumerate(sizes)])
    y = np.repeat(np.arange(CLASSES), sizes)
    return x.astype(np.float32).astype(np.float64), y


def class_mixtures(rng: np.random.Generator, covariance_type: str, x=None, y=None):
    """A random mixture per class (means drawn from the class's data when given), in scikit-learn's layout."""
    out = []
    for c in range(CLASSES):
        w, m, cov, full = random_mixture(rng, PER_CLASS, DIM, covariance_type)
        if x is not None:
            m = x[y == c][rng.choice((y == c).sum(), PER_CLASS, replace=False)]
        out.append((w, m, cov, full))
    return out


def conditional_gmm(mixtures, covariance_type: str, **cfg) -> GMM:
    """Our conditional GMM holding the class mixtures block by block (tied: class 0's covariance for all)."""
    info = DataInfo(shape=(DIM,), kind="vector", num_classes=CLASSES)
    weights, means = (np.concatenate([m[i] for m in mixtures]) for i in (0, 1))
    cov = mixtures[0][2] if covariance_type == "tied" else np.concatenate([m[2] for m in mixtures])
    return gmm_with(weights, means, cov, covariance_type, info, class_components=PER_CLASS, conditional=True, **cfg)


@pytest.mark.parametrize("covariance_type", ("full", "diag", "spherical"))
def test_conditional_em_equals_sklearn_per_class_and_classifies_by_bayes(tmp_path, covariance_type):
    """One EM run on all labelled data = a GaussianMixture fit on each class's data from the same start;
    classify = Bayes' rule on those fits with the class frequencies as prior."""
    n_iter, reg = 5, 1e-3
    rng = np.random.default_rng(5)
    x, y = labelled_blobs(rng)
    mixtures = class_mixtures(rng, covariance_type, x, y)
    model = conditional_gmm(mixtures, covariance_type, reg_covar=reg, max_epochs=n_iter, tol=0.0)
    trainer = make_trainer(tmp_path, max_epochs=n_iter, limit_val_batches=0)
    fit(trainer, model, vector_datamodule(tmp_path, x, y=y))
    assert trainer.current_epoch == n_iter

    covariances = covariances_from_precision_cholesky(model.prec_chol, covariance_type).numpy()
    fits = []
    for c, (w, m, cov, _) in enumerate(mixtures):
        gm = GaussianMixture(PER_CLASS, covariance_type=covariance_type, reg_covar=reg, max_iter=n_iter, tol=0.0,
                             weights_init=w, means_init=m, precisions_init=precisions(cov, covariance_type))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 on purpose
            fits.append(gm.fit(x[y == c]))
        block = slice(c * PER_CLASS, (c + 1) * PER_CLASS)
        np.testing.assert_allclose(model.weights[block].numpy(), gm.weights_, rtol=1e-6)
        np.testing.assert_allclose(model.means[block].numpy(), gm.means_, rtol=1e-6)
        np.testing.assert_allclose(covariances[block], gm.covariances_, rtol=1e-6)
    assert model.n_parameters() == sum(gm._n_parameters() for gm in fits) + CLASSES - 1

    x_test = 3 * rng.standard_normal((40, DIM)) + 4.0
    log_joint = np.stack([gm.score_samples(x_test) for gm in fits], 1) + np.log(np.bincount(y) / len(y))
    np.testing.assert_allclose(model.classify(torch.from_numpy(x_test)).numpy(),
                               log_joint - logsumexp(log_joint, 1, keepdims=True), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_conditional_log_prob_against_scipy_and_marginal_consistency(covariance_type):
    """log p(x | y) is class y's mixture density (scipy), and log p(x) = logsumexp_y log p(x | y) + log p(y)."""
    rng = np.random.default_rng(6)
    mixtures = class_mixtures(rng, covariance_type)
    model = conditional_gmm(mixtures, covariance_type)
    y_train = torch.from_numpy(rng.integers(0, CLASSES, 50))
    model.set_class_prior(y_train)
    x = torch.from_numpy(2 * rng.standard_normal((30, DIM)))
    y = torch.from_numpy(rng.integers(0, CLASSES, 30))

    full = [mixtures[0][3]] * CLASSES if covariance_type == "tied" else [m[3] for m in mixtures]
    scipy_ll = np.stack([logsumexp(scipy_joint_log_prob(x.numpy(), m[0], m[1], f), 1)
                         for m, f in zip(mixtures, full)], 1)
    log_prior = np.log(np.bincount(y_train.numpy(), minlength=CLASSES) / len(y_train))
    np.testing.assert_allclose(model.class_log_likelihoods(x).numpy(), scipy_ll, rtol=1e-10)
    np.testing.assert_allclose(model.log_prob(x, y).numpy(), scipy_ll[np.arange(30), y.numpy()], rtol=1e-10)
    np.testing.assert_allclose(model.log_prob(x).numpy(), logsumexp(scipy_ll + log_prior, 1), rtol=1e-10)
    per_class = torch.stack([model.log_prob(x, torch.full((30,), c)) for c in range(CLASSES)], 1)
    np.testing.assert_allclose(model.log_prob(x).numpy(), logsumexp(per_class.numpy() + log_prior, 1), rtol=1e-6)


def test_tied_conditional_with_one_component_per_class_is_lda():
    """One Gaussian per class with one covariance shared by all classes is linear discriminant analysis:
    the same means, pooled covariance and posterior p(y | x) as scikit-learn's LDA."""
    rng = np.random.default_rng(7)
    x, y = labelled_blobs(rng)
    info = DataInfo(shape=(DIM,), kind="vector", num_classes=CLASSES).to_dict()
    model = GMM({"covariance_type": "tied", "reg_covar": 0.0, "class_components": 1, "conditional": True}, info)
    fit_em(model, torch.from_numpy(x), max_iter=2, y=torch.from_numpy(y))
    model.set_class_prior(torch.from_numpy(y))
    lda = LinearDiscriminantAnalysis(solver="lsqr").fit(x, y)
    np.testing.assert_allclose(model.means.numpy(), lda.means_, rtol=1e-10)
    np.testing.assert_allclose(covariances_from_precision_cholesky(model.prec_chol, "tied").numpy(), lda.covariance_,
                               rtol=1e-8)
    x_test = 3 * rng.standard_normal((40, DIM)) + 4.0
    np.testing.assert_allclose(model.classify(torch.from_numpy(x_test)).exp().numpy(), lda.predict_proba(x_test),
                               atol=1e-8)


def test_conditional_samples_obey_the_label_on_8gaussians():
    """With the component as the label, >= 95% of the samples asked for class c lie nearest centre c."""
    x, y = eight_gaussians(4000, np.random.default_rng(0))
    model = GMM({"conditional": True}, DataInfo(shape=(2,), kind="vector", num_classes=8).to_dict())
    fit_em(model, torch.from_numpy(x), max_iter=20, tol=1e-6, y=torch.from_numpy(y))
    model.set_class_prior(torch.from_numpy(y))
    assert share_nearest_requested_centre(model).min() >= 0.95
    # and unlabelled samples draw the classes by their frequencies (the toy set's are near uniform)
    unlabelled = nearest_centre(model.sample(4000).numpy())
    np.testing.assert_allclose(np.bincount(unlabelled, minlength=8) / 4000, np.bincount(y) / len(y), atol=0.025)


def test_conditional_statistics_summed_over_shards_give_the_full_batch_em_step():
    """Per-class statistics of disjoint shards (what DDP sums), then one M-step == one EM step on all."""
    rng = np.random.default_rng(8)
    x, y = (torch.from_numpy(a) for a in labelled_blobs(rng))
    mixtures = class_mixtures(rng, "full", x.numpy(), y.numpy())
    whole, sharded = conditional_gmm(mixtures, "full"), conditional_gmm(mixtures, "full")
    whole.m_step(whole.e_step(x, y))
    shards = [sharded.e_step(x[r::2], y[r::2]) for r in range(2)]
    sharded.m_step({k: shards[0][k] + shards[1][k] for k in shards[0]})
    for name in ("weights", "means", "prec_chol"):
        np.testing.assert_allclose(getattr(sharded, name).numpy(), getattr(whole, name).numpy(), rtol=1e-10,
                                   err_msg=name)


def test_conditional_checkpoint_round_trip_weights_only(tmp_path):
    x, y = labelled_blobs(np.random.default_rng(9))
    info = DataInfo(shape=(DIM,), kind="vector", num_classes=CLASSES)
    model = GMM({"class_components": 2, "max_epochs": 2}, info.to_dict())
    assert model.conditional  # conditional: auto on labelled data
    trainer = make_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    fit(trainer, model, vector_datamodule(tmp_path, x, y=y))
    trainer.save_checkpoint(tmp_path / "gmm.ckpt")

    loaded = GMM.load_from_checkpoint(tmp_path / "gmm.ckpt", weights_only=True)
    assert loaded.config == model.config and loaded.conditional and loaded.num_classes == CLASSES
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    np.testing.assert_allclose(loaded.class_log_prior().exp().numpy(), np.bincount(y) / len(y), rtol=1e-12)
    xt = torch.from_numpy(x[::20])
    assert torch.equal(loaded.classify(xt), model.classify(xt))
    assert loaded.sample(5, torch.tensor(1)).shape == (5, DIM)


# --- semi-supervised EM: UNLABELLED training labels (Miller & Uyar 1997; Nigam et al. 2000) ------------
def test_semi_supervised_with_every_label_kept_is_the_per_class_fit(tmp_path):
    """The semi-supervised data path with every training label kept (`use_labelled` of all examples) =
    a GaussianMixture fit on each class's data from the same start; the class prior stays the label
    frequencies and the semi-supervised variance floor is not used (it would change every covariance)."""
    n_iter, reg = 4, 1e-3
    rng = np.random.default_rng(11)
    x, y = labelled_blobs(rng)
    mixtures = class_mixtures(rng, "full", x, y)
    model = conditional_gmm(mixtures, "full", reg_covar=reg, semi_reg_covar=0.5, max_epochs=n_iter, tol=0.0)
    dm = vector_datamodule(tmp_path, x, y=y)
    dm.use_labelled(np.arange(len(x)))
    fit(make_trainer(tmp_path, max_epochs=n_iter, limit_val_batches=0), model, dm)

    covariances = covariances_from_precision_cholesky(model.prec_chol, "full").numpy()
    for c, (w, m, cov, _) in enumerate(mixtures):
        gm = GaussianMixture(PER_CLASS, covariance_type="full", reg_covar=reg, max_iter=n_iter, tol=0.0,
                             weights_init=w, means_init=m, precisions_init=precisions(cov, "full"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 on purpose
            gm.fit(x[y == c])
        block = slice(c * PER_CLASS, (c + 1) * PER_CLASS)
        np.testing.assert_allclose(model.means[block].numpy(), gm.means_, rtol=1e-6)
        np.testing.assert_allclose(covariances[block], gm.covariances_, rtol=1e-6)
    np.testing.assert_allclose(model.class_log_prior().exp().numpy(), np.bincount(y) / len(y), rtol=1e-12)


def test_semi_supervised_with_no_label_is_the_unsupervised_mixture(tmp_path):
    """Every training label UNLABELLED: the K classes' mixtures of M Gaussians are one mixture of K * M
    with weights p(c) p(m | c), and semi-supervised EM (through the Trainer, with its class prior
    re-estimated) is scikit-learn's EM on it from the same start; p(y | x) sums its responsibilities."""
    n_iter, reg = 5, 1e-3
    rng = np.random.default_rng(12)
    x, _ = labelled_blobs(rng)
    mixtures = class_mixtures(rng, "full", x, np.repeat(np.arange(CLASSES), [120, 150, 180]))
    prior = np.array([0.2, 0.3, 0.5])
    # the semi-supervised floor is the one in force (reg_covar would be far off)
    model = conditional_gmm(mixtures, "full", reg_covar=0.5, semi_reg_covar=reg, max_epochs=n_iter, tol=0.0)
    model.label_log_prior.copy_(torch.from_numpy(np.log(prior)))
    dm = vector_datamodule(tmp_path, x, y=np.arange(len(x)) % CLASSES)  # labels of 3 classes, all hidden below
    dm.use_labelled(np.array([], dtype=np.int64))
    assert (dm.labels("train") == -1).all()
    model.provide_init_data(*dm.split("train"))
    trainer = make_trainer(tmp_path, max_epochs=n_iter, limit_val_batches=0)
    trainer.fit(model, dm)

    weights = np.concatenate([p * m[0] for p, m in zip(prior, mixtures)])
    means = np.concatenate([m[1] for m in mixtures])
    gm = GaussianMixture(CLASSES * PER_CLASS, covariance_type="full", reg_covar=reg, max_iter=n_iter, tol=0.0,
                         weights_init=weights, means_init=means,
                         precisions_init=np.concatenate([precisions(m[2], "full") for m in mixtures]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 on purpose
        gm.fit(x)
    joint_weights = np.repeat(model.class_log_prior().exp().numpy(), PER_CLASS) * model.weights.numpy()
    np.testing.assert_allclose(joint_weights, gm.weights_, rtol=1e-6)
    np.testing.assert_allclose(model.means.numpy(), gm.means_, rtol=1e-6)
    np.testing.assert_allclose(covariances_from_precision_cholesky(model.prec_chol, "full").numpy(), gm.covariances_,
                               rtol=1e-6)
    # the last epoch's log-likelihood is that of sklearn's last E-step
    assert trainer.callback_metrics["train/loglik"].item() == pytest.approx(gm.lower_bound_, rel=1e-6)
    x_test = torch.from_numpy(3 * rng.standard_normal((30, DIM)) + 4.0)
    class_posterior = gm.predict_proba(x_test.numpy()).reshape(30, CLASSES, PER_CLASS).sum(2)
    np.testing.assert_allclose(model.classify(x_test).exp().numpy(), class_posterior, atol=1e-8)


def test_semi_supervised_statistics_summed_over_shards_give_the_full_batch_em_step():
    """Labelled and UNLABELLED examples mixed: disjoint shards' statistics (what DDP sums), then one
    M-step == one EM step on all, class prior included."""
    rng = np.random.default_rng(13)
    x, y = (torch.from_numpy(a) for a in labelled_blobs(rng))
    y = torch.where(torch.from_numpy(rng.random(len(y)) < 0.8), -1, y)
    mixtures = class_mixtures(rng, "full", x.numpy(), y.clamp_min(0).numpy())
    whole, sharded = conditional_gmm(mixtures, "full"), conditional_gmm(mixtures, "full")
    whole.m_step(whole.e_step(x, y))
    shards = [sharded.e_step(x[r::2], y[r::2]) for r in range(2)]
    sharded.m_step({k: shards[0][k] + shards[1][k] for k in shards[0]})
    for name in ("weights", "means", "prec_chol", "label_log_prior"):
        np.testing.assert_allclose(getattr(sharded, name).numpy(), getattr(whole, name).numpy(), rtol=1e-10,
                                   err_msg=name)
    assert not torch.allclose(whole.label_log_prior, torch.full((CLASSES,), -np.log(CLASSES), dtype=torch.float64))
