"""HMM family: Baum-Welch, forward and Viterbi against hmmlearn and brute-force enumeration; recovery of a
known generating HMM; DDP equals one process; checkpoint round trip; data views; sampling. The conditional
HMM (one HMM per class) against per-class hmmlearn fits, Bayes' rule on them, and a toy set's labels."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hmmlearn import hmm as hmmlearn
from scipy.linalg import block_diag
from scipy.special import log_softmax, logsumexp
from scipy.stats import multivariate_normal

from lightning_modules.common.em import fit_em
from lightning_modules.common.gaussian import covariances_from_precision_cholesky
from lightning_modules.hmm import HMM
from lightning_modules.hmm.sequences import to_sequences
from label_checks import share_nearest_requested_centre

N_STATES, DIM, VOCAB = 3, 2, 5
LENGTHS = [7, 12, 3, 12, 9, 1, 10]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- references ---------------------------------------------------------------------------------------
def random_reference(kind: str, seed: int = 0):
    """An hmmlearn HMM with random parameters (init_params="" so fit starts from exactly these)."""
    rng = np.random.default_rng(seed)
    if kind == "categorical":
        ref = hmmlearn.CategoricalHMM(N_STATES, n_features=VOCAB, init_params="", n_iter=10, tol=-np.inf,
                                      emissionprob_prior=1.5)  # = our pseudocount 0.5
        ref.emissionprob_ = rng.dirichlet(np.ones(VOCAB), N_STATES)
    else:
        ref = hmmlearn.GaussianHMM(N_STATES, covariance_type=kind, init_params="", n_iter=10, tol=-np.inf,
                                   covars_prior=0.0)  # no prior: plain maximum likelihood, our reg_covar=0
        ref.n_features = DIM
        ref.means_ = rng.normal(scale=2.0, size=(N_STATES, DIM))
        a = rng.normal(size=(N_STATES, DIM, DIM))
        full = a @ a.transpose(0, 2, 1) + 0.3 * np.eye(DIM)
        ref.covars_ = full if kind == "full" else np.diagonal(full, axis1=1, axis2=2).copy()
    ref.startprob_ = rng.dirichlet(np.ones(N_STATES))
    ref.transmat_ = rng.dirichlet(np.ones(N_STATES), N_STATES)
    return ref


def padded(X: np.ndarray, lengths, fill):
    """hmmlearn's concatenated (sum T, ...) layout -> our padded (B, max T, ...) batch."""
    out = np.full((len(lengths), max(lengths), *X.shape[1:]), fill, dtype=X.dtype)
    for i, (s, n) in enumerate(zip(np.cumsum([0] + lengths[:-1]), lengths)):
        out[i, :n] = X[s : s + n]
    return torch.from_numpy(out)


def ours_from(ref, kind: str, **cfg) -> HMM:
    """Our HMM with the reference's parameters, on the matching data kind; a list of references gives the
    conditional HMM (labelled data, conditional: auto) holding reference c as class c's block of states."""
    refs = ref if isinstance(ref, list) else [ref]
    labels = {"num_classes": len(refs)} if isinstance(ref, list) else {}

    def stacked(name):
        return np.concatenate([getattr(r, name) for r in refs])

    if kind == "categorical":
        info = {"shape": (max(LENGTHS),), "kind": "sequence", "vocab_size": VOCAB, **labels}
        # maximum-likelihood transitions and float64, as the references (the MAP ones: tests/test_hmm_tokens.py)
        model = HMM({"n_states": N_STATES, "init": "random", "pseudocount": 0.5, "transition_pseudocount": 0.0,
                     "precision": "float64", **cfg}, info)
        model.emission.probs.copy_(torch.from_numpy(stacked("emissionprob_")))
    else:
        info = {"shape": (max(LENGTHS), DIM), "kind": "sequence", **labels}
        model = HMM({"n_states": N_STATES, "covariance_type": kind, "reg_covar": 0.0, **cfg}, info)
        covars = stacked("covars_") if kind == "full" else np.diagonal(stacked("covars_"), axis1=1, axis2=2)
        model.emission.set_parameters(torch.from_numpy(stacked("means_")), torch.from_numpy(covars.copy()))
    transmat = block_diag(*[r.transmat_ for r in refs])
    model.set_parameters(torch.from_numpy(stacked("startprob_")), torch.from_numpy(transmat))
    model.initialized.fill_(True)
    return model


def data_for(ref, kind: str, lengths=LENGTHS, seed: int = 1):
    X, _ = ref.sample(sum(lengths), random_state=seed)
    if kind == "categorical":
        X = X.astype(np.int64)
        return X, padded(X[:, 0], lengths, -1)
    return X, padded(X, lengths, np.nan)


KINDS = ["diag", "full", "categorical"]


# --- Baum-Welch, forward, Viterbi, posteriors vs hmmlearn -----------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_baum_welch_trajectory_matches_hmmlearn(kind):
    ref = random_reference(kind)
    model = ours_from(ref, kind)
    X, x = data_for(ref, kind)
    ours = np.array(fit_em(model, x, max_iter=10)) * len(LENGTHS)  # mean per sequence -> total
    ref.fit(X, LENGTHS)
    theirs = np.array(ref.monitor_.history)
    assert len(theirs) == 10 and theirs[-1] > theirs[0] + 1.0  # EM really moved
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    np.testing.assert_allclose(model.transmat.numpy(), ref.transmat_, atol=1e-6)
    np.testing.assert_allclose(model.log_prob(x).sum().item(), ref.score(X, LENGTHS), rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_viterbi_matches_hmmlearn_decode(kind):
    ref = random_reference(kind, seed=2)
    X, x = data_for(ref, kind)
    model = ours_from(ref, kind)
    best_logprob, path = ref.decode(X, LENGTHS, algorithm="viterbi")
    ours = model.viterbi(x)
    seq, mask = to_sequences(x, model.info)
    assert (ours[~mask] == -1).all()
    np.testing.assert_array_equal(ours[mask].numpy(), path)
    # and the path's joint log-probability, recomputed from the parameters, is hmmlearn's maximum
    log_emit = model._log_emit(seq)
    states = ours.clamp_min(0)
    joint = (model.startprob.log()[states[:, 0]] + log_emit.gather(2, states[..., None])[..., 0][:, 0]
             + ((model.transmat.log()[states[:, :-1], states[:, 1:]] + log_emit.gather(2, states[..., None])[..., 0][:, 1:])
                * mask[:, 1:]).sum(1))
    np.testing.assert_allclose(joint.sum().item(), best_logprob, rtol=1e-10)


def test_encode_is_mean_posterior_of_hmmlearn():
    ref = random_reference("full", seed=3)
    X, x = data_for(ref, "full")
    gamma = ref.predict_proba(X, LENGTHS)
    expected = np.stack([gamma[s : s + n].mean(0) for s, n in zip(np.cumsum([0] + LENGTHS[:-1]), LENGTHS)])
    np.testing.assert_allclose(ours_from(ref, "full").encode(x).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_free_parameter_count_equals_hmmlearns(kind):
    ref = random_reference(kind)
    assert ours_from(ref, kind).n_parameters() == sum(ref._get_n_fit_scalars_per_param().values())
    # conditional, with ergodic class HMMs: the classes' counts, and K - 1 for the class prior
    refs = [random_reference(kind, seed=s) for s in (0, 1)]
    assert (ours_from(refs, kind, topology="ergodic").n_parameters()
            == sum(sum(r._get_n_fit_scalars_per_param().values()) for r in refs) + 1)


# --- log_prob vs brute force --------------------------------------------------------------------------
def test_log_prob_equals_enumeration_over_state_paths():
    """p(x) = sum over all N^T state paths of p(z) p(x | z), with scipy's Gaussian densities."""
    ref = random_reference("full", seed=4)
    lengths = [4, 2]
    X, _ = ref.sample(sum(lengths), random_state=5)
    x = padded(X, lengths, np.nan)
    model = ours_from(ref, "full")
    for seq, n in zip(x.numpy(), lengths):
        dens = np.array([multivariate_normal(ref.means_[k], ref.covars_[k]).logpdf(seq[:n]) for k in range(N_STATES)])
        paths = [np.log(ref.startprob_[z[0]]) + dens[z[0], 0]
                 + sum(np.log(ref.transmat_[z[t - 1], z[t]]) + dens[z[t], t] for t in range(1, n))
                 for z in itertools.product(range(N_STATES), repeat=n)]
        np.testing.assert_allclose(model.log_prob(torch.from_numpy(seq[None])).item(), logsumexp(paths), rtol=1e-12)


# --- sampling ------------------------------------------------------------------------------------------
def test_sample_marginals_match_closed_form():
    """x_t's marginal mean is (pi A^t) mu (Gaussian) and its distribution (pi A^t) B (categorical)."""
    torch.manual_seed(0)
    n = 20000
    for kind in ("full", "categorical"):
        ref = random_reference(kind, seed=6)
        model = ours_from(ref, kind)
        s = model.sample(n)
        state_marginals = np.stack([ref.startprob_ @ np.linalg.matrix_power(ref.transmat_, t) for t in range(3)])
        if kind == "categorical":
            assert s.shape == (n, max(LENGTHS)) and s.dtype == torch.int64
            freq = np.stack([np.bincount(s[:, t].numpy(), minlength=VOCAB) / n for t in range(3)])
            np.testing.assert_allclose(freq, state_marginals @ ref.emissionprob_, atol=0.015)
        else:
            assert s.shape == (n, max(LENGTHS), DIM)
            np.testing.assert_allclose(s[:, :3].mean(0).numpy(), state_marginals @ ref.means_, atol=0.06)


def test_image_view_is_rows_and_samples_are_images():
    info = {"shape": (3, 4, 5), "kind": "image", "levels": 256}
    model = HMM({"n_states": 2, "covariance_type": "diag"}, info)
    x = torch.rand(6, 3, 4, 5)
    seq, mask = to_sequences(x, model.info)
    assert seq.shape == (6, 4, 15) and mask.all()
    np.testing.assert_array_equal(seq[2, 1].numpy(), x[2, :, 1, :].reshape(-1).numpy())  # row 1, channels then columns
    model.emission.set_parameters(torch.tensor([[0.2] * 15, [0.8] * 15]), torch.full((2, 15), 0.01))
    s = model.sample(50)
    assert s.shape == (50, 3, 4, 5) and s.min() >= 0 and s.max() <= 1


def test_token_count_counts_unpadded_tokens():
    ref = random_reference("categorical")
    _, x = data_for(ref, "categorical")
    np.testing.assert_array_equal(ours_from(ref, "categorical").token_count(x).numpy(), LENGTHS)


# --- recovery of a known model -------------------------------------------------------------------------
def test_recovers_the_true_model_on_hmm_synthetic():
    from pipeline.config import DataConfig
    from pipeline.data.sources import load_source
    from pipeline.data.hmm_synthetic import N_STATES as TRUE_STATES, random_hmm

    dcfg = DataConfig(dataset="hmm_synthetic", seed=0)
    p = load_source(dcfg)
    # the recorded reference, checked independently with hmmlearn and the generating parameters
    truth = random_hmm(np.random.default_rng(dcfg.seed))
    true_hmm = hmmlearn.GaussianHMM(TRUE_STATES, covariance_type="full")
    true_hmm.startprob_, true_hmm.transmat_ = truth["startprob"], truth["transmat"]
    true_hmm.means_, true_hmm.covars_ = truth["means"], truth["covars"]
    xte = p.splits["test"][0].astype(np.float64)
    ref_ll = true_hmm.score(xte.reshape(-1, xte.shape[-1]), [xte.shape[1]] * len(xte)) / len(xte)
    np.testing.assert_allclose(p.extra["true_test_loglik"], ref_ll, rtol=1e-9)

    model = HMM({"n_states": TRUE_STATES, "covariance_type": "full"}, p.info.to_dict())
    fit_em(model, torch.from_numpy(p.splits["train"][0][:400]), max_iter=40, tol=1e-4)
    ours = model.log_prob(torch.from_numpy(p.splits["test"][0])).mean().item()
    assert abs(ours - ref_ll) < 0.01 * abs(ref_ll), (ours, ref_ll)


# --- Lightning: one process vs two, checkpoint ----------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    from pipeline.config import DataConfig
    from pipeline.data.sources import load_source
    from pipeline.data.store import write_prepared

    folder = tmp_path_factory.mktemp("hmm_synthetic") / "prepared"
    write_prepared(load_source(DataConfig(dataset="hmm_synthetic")), folder, "hmm_synthetic", 0)
    return folder


@pytest.fixture(scope="module")
def digits_rows_folder(tmp_path_factory):
    """digits_rows: labelled sequences (8 rows of 8 pixels, 10 classes)."""
    from pipeline.config import DataConfig
    from pipeline.data.sources import load_source
    from pipeline.data.store import write_prepared

    folder = tmp_path_factory.mktemp("digits_rows") / "prepared"
    write_prepared(load_source(DataConfig(dataset="digits_rows")), folder, "digits_rows", 0)
    return folder


def fit_lightning(folder, root, n_states: int = 4, **trainer_kwargs) -> HMM:
    """As the train stage does (class prior and init data, conditional: auto), then 3 epochs."""
    from pipeline.data.datamodule import PreparedDataModule

    dm = PreparedDataModule(folder, batch_size=200, exact_sharding=True, fixed_train_noise=True)
    model = HMM({"n_states": n_states, "max_epochs": 3, "tol": 0.0}, dm.info.to_dict())
    trainer = pl.Trainer(max_epochs=3, default_root_dir=root, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, use_distributed_sampler=False, **trainer_kwargs)
    x, y = dm.split("train")
    if model.conditional:
        model.set_class_prior(y)
    model.provide_init_data(x, y)
    trainer.fit(model, datamodule=dm)
    return model, trainer


@pytest.mark.parametrize("conditional", [False, True, "semi"])
def test_statistics_summed_over_shards_give_the_full_batch_em_step(conditional):
    """What DDP does in `EMModel.on_train_epoch_end`, without processes: E-steps on disjoint shards
    (rank r takes examples r, r+2, ...), statistics summed, one M-step == one EM step on everything
    (conditional: the per-class statistics of sequences of both classes; semi: most labels UNLABELLED,
    the class prior re-estimated too)."""
    if conditional:
        refs, x, y = class_data("full")
        if conditional == "semi":
            y = torch.where(torch.arange(len(y)) % 3 == 0, y, -1)
        args = (x, y)
    else:
        refs = random_reference("full", seed=7)
        args = (data_for(refs, "full")[1],)
    whole, sharded = ours_from(refs, "full"), ours_from(refs, "full")
    whole.m_step(whole.e_step(*args))
    shards = [sharded.e_step(*(a[r::2] for a in args)) for r in range(2)]
    sharded.m_step({k: shards[0][k] + shards[1][k] for k in shards[0]})
    for name, value in whole.state_dict().items():
        if value.is_floating_point() and value.numel():
            np.testing.assert_allclose(sharded.state_dict()[name].numpy(), value.numpy(), rtol=1e-12, err_msg=name)


def test_ddp_two_processes_equal_one(synthetic_folder, tmp_path):
    one, _ = fit_lightning(synthetic_folder, tmp_path, accelerator="cpu", devices=1)
    two, _ = fit_lightning(synthetic_folder, tmp_path, accelerator="cpu", devices=2, strategy="ddp_spawn")
    assert bool(one.initialized) and bool(two.initialized)
    for name, value in one.state_dict().items():
        if value.is_floating_point() and value.numel():
            np.testing.assert_allclose(two.state_dict()[name].numpy(), value.numpy(), atol=1e-5, err_msg=name)


def test_checkpoint_round_trip_weights_only(synthetic_folder, tmp_path):
    model, trainer = fit_lightning(synthetic_folder, tmp_path, accelerator="cpu", devices=1)
    path = tmp_path / "hmm.ckpt"
    trainer.save_checkpoint(path)
    loaded = HMM.load_from_checkpoint(path, weights_only=True)
    x = torch.from_numpy(np.load(synthetic_folder / "test_x.npy")[:20])
    assert loaded.config == model.config and loaded.emission.covariance_type == "full"
    np.testing.assert_array_equal(loaded.log_prob(x).numpy(), model.log_prob(x).numpy())
    np.testing.assert_array_equal(loaded.viterbi(x).numpy(), model.viterbi(x).numpy())


# --- the conditional HMM: one HMM per class ------------------------------------------------------------
CLASS_LENGTHS = [[7, 12, 3, 12], [9, 1, 10, 5, 8]]


def class_data(kind: str, shift: float = 0.0):
    """Two random hmmlearn references (class 1's means moved by `shift`), each class's sequences sampled
    from its own, and the padded batch (B, T, ...) of both with its labels."""
    refs = [random_reference(kind, seed=10 + c) for c in range(2)]
    if kind != "categorical":
        refs[1].means_ = refs[1].means_ + shift
    data = [data_for(r, kind, lengths, seed=c) for c, (r, lengths) in enumerate(zip(refs, CLASS_LENGTHS))]
    lengths = sum(CLASS_LENGTHS, [])
    x = padded(np.concatenate([d[0] for d in data]), lengths, -1 if kind == "categorical" else np.nan)
    if kind == "categorical":
        x = x[..., 0]
    y = torch.cat([torch.full((len(l),), c) for c, l in enumerate(CLASS_LENGTHS)])
    return refs, x, y


def sequence_scores(refs, kind: str, x: torch.Tensor) -> np.ndarray:
    """hmmlearn's log p(x | class c) per sequence of the padded batch x and class, (B, K)."""
    if kind == "categorical":
        frames = [row[row >= 0].numpy()[:, None] for row in x]
    else:
        frames = [row[~torch.isnan(row).any(-1)].numpy() for row in x]
    return np.array([[r.score(f) for r in refs] for f in frames])


@pytest.mark.parametrize("kind", KINDS)
def test_conditional_baum_welch_equals_hmmlearn_per_class_and_classifies_by_bayes(kind):
    """One Baum-Welch run on both classes' sequences = an hmmlearn fit on each class's sequences from the
    same start; classify, log p(x | y) and log p(x) = Bayes' rule and the mixture over those fits. Every
    label is known, so semi-supervised EM is this per-class fit: its variance floor (set far off here) and
    its re-estimated class prior stay out."""
    refs, x, y = class_data(kind)
    model = ours_from(refs, kind, semi_reg_covar=0.5)
    model.set_class_prior(y)
    ours = np.array(fit_em(model, x, max_iter=10, y=y)) * len(y)  # mean per sequence -> total
    np.testing.assert_allclose(model.class_log_prior().exp().numpy(), np.bincount(y.numpy()) / len(y), rtol=1e-12)
    for c, (ref, lengths) in enumerate(zip(refs, CLASS_LENGTHS)):
        ref.fit(data_for(ref, kind, lengths, seed=c)[0], lengths)
    np.testing.assert_allclose(ours, np.sum([r.monitor_.history for r in refs], 0), rtol=1e-6)

    n = N_STATES
    for c, ref in enumerate(refs):
        block = slice(c * n, (c + 1) * n)
        np.testing.assert_allclose(model.startprob[block].numpy(), ref.startprob_, atol=1e-8)
        np.testing.assert_allclose(model.transmat[block, block].numpy(), ref.transmat_, atol=1e-8)
        if kind == "categorical":
            np.testing.assert_allclose(model.emission.probs[block].numpy(), ref.emissionprob_, atol=1e-8)
        else:
            np.testing.assert_allclose(model.emission.means[block].numpy(), ref.means_, rtol=1e-6)
            covars = covariances_from_precision_cholesky(model.emission.prec_chol[block], kind).numpy()
            expected = ref.covars_ if kind == "full" else np.diagonal(ref.covars_, axis1=1, axis2=2)
            np.testing.assert_allclose(covars, expected, rtol=1e-6)
    off_block = torch.block_diag(*[torch.ones(n, n)] * 2) == 0
    assert (model.transmat[off_block] == 0).all()  # no path ever leaves its class

    scores = sequence_scores(refs, kind, x)
    log_joint = scores + np.log(np.bincount(y.numpy()) / len(y))
    np.testing.assert_allclose(model.class_log_likelihoods(x).numpy(), scores, rtol=1e-8)
    np.testing.assert_allclose(model.log_prob(x, y).numpy(), scores[np.arange(len(y)), y.numpy()], rtol=1e-8)
    np.testing.assert_allclose(model.classify(x).numpy(), log_softmax(log_joint, 1), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(model.log_prob(x).numpy(), logsumexp(log_joint, 1), rtol=1e-8)
    # marginal consistency through the contract: log p(x) = logsumexp_y log p(x | y) + log p(y)
    per_class = torch.stack([model.log_prob(x, torch.full((len(y),), c)) for c in range(2)], 1)
    np.testing.assert_allclose(model.log_prob(x).numpy(),
                               torch.logsumexp(per_class + model.class_log_prior(), 1).numpy(), rtol=1e-6)


def test_class_log_likelihoods_stay_exact_for_a_very_unlikely_class():
    """One forward pass gives every class's log p(x | c) exactly, also for a class thousands of nats less
    likely than another (each block is shifted by its own max; one shared shift would underflow to -inf)."""
    refs, x, _ = class_data("full", shift=100.0)
    scores = sequence_scores(refs, "full", x)
    assert np.abs(scores[:, 0] - scores[:, 1]).min() > 1000  # exp(-1000) underflows float64 (min ~ exp(-745))
    np.testing.assert_allclose(ours_from(refs, "full").class_log_likelihoods(x).numpy(), scores, rtol=1e-10)


def test_conditional_samples_obey_the_label_on_8gaussians():
    """With the component as the label, >= 95% of the samples asked for class c lie nearest centre c
    (a vector is a sequence of its coordinates: 2 steps of one feature)."""
    from pipeline.data.toy2d import eight_gaussians

    x, y = (torch.from_numpy(a) for a in eight_gaussians(4000, np.random.default_rng(0)))
    model = HMM({"n_states": 4, "conditional": True}, {"shape": (2,), "kind": "vector", "num_classes": 8})
    fit_em(model, x, max_iter=30, tol=1e-6, y=y)
    model.set_class_prior(y)
    assert share_nearest_requested_centre(model).min() >= 0.95


def test_conditional_checkpoint_round_trip_weights_only(digits_rows_folder, tmp_path):
    model, trainer = fit_lightning(digits_rows_folder, tmp_path, n_states=3, accelerator="cpu", devices=1)
    assert model.conditional and model.num_classes == 10  # conditional: auto on labelled data
    trainer.save_checkpoint(tmp_path / "hmm.ckpt")
    loaded = HMM.load_from_checkpoint(tmp_path / "hmm.ckpt", weights_only=True)
    assert loaded.config == model.config and loaded.conditional
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    x = torch.from_numpy(np.load(digits_rows_folder / "test_x.npy")[:20])
    assert torch.equal(loaded.classify(x), model.classify(x))
    assert loaded.sample(4, torch.tensor(7)).shape == (4, 8, 8)


def test_left_to_right_topology_starts_in_the_first_segment_and_never_moves_back():
    """4 states over 2-step sequences: states 0-1 are the first segment, 2-3 the second. The chain starts
    in the first, moves to the same or the next segment, and Baum-Welch keeps the other moves at zero."""
    model = HMM({"n_states": 4, "topology": "left_to_right"}, {"shape": (2,), "kind": "vector"})
    np.testing.assert_array_equal(model.startprob.numpy(), [0.5, 0.5, 0, 0])
    np.testing.assert_array_equal(model.transmat.numpy(), [[0.25] * 4, [0.25] * 4, [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(300, 2)) + [0.0, 3.0])
    fit_em(model, x, max_iter=5)
    assert (model.startprob[2:] == 0).all() and (model.transmat[2:, :2] == 0).all()
    # each segment's states start from the frames at its position: the first coordinate's, then the second's
    means = model.emission.means[:, 0]
    assert (means[:2] < 1.5).all() and (means[2:] > 1.5).all(), means
    # free parameters: 1 start, 3 + 3 + 1 + 1 transitions
    assert model.n_parameters() == 1 + 8 + model.emission.n_parameters()


def test_conditional_hmm_classifies_digits_rows():
    """One 8-state left-to-right HMM per class on `digits_rows` (8 steps of 8-pixel rows, seeded
    dequantisation), all trained in the same Baum-Welch steps: the Bayes classifier's test accuracy
    (0.978; 0.947 with ergodic class HMMs)."""
    from pipeline.config import DataConfig
    from pipeline.data.datamodule import dequantize
    from pipeline.data.sources import load_source

    p = load_source(DataConfig(dataset="digits_rows", seed=0))
    g = torch.Generator().manual_seed(0)
    (xtr, ytr), (xte, yte) = [(dequantize(torch.from_numpy(x), p.info.levels, g), torch.from_numpy(y))
                              for x, y in (p.splits["train"], p.splits["test"])]
    model = HMM({"n_states": 8, "covariance_type": "full", "reg_covar": 1e-2, "conditional": True}, p.info.to_dict())
    model.set_class_prior(ytr)
    fit_em(model, xtr, max_iter=30, tol=1e-3, y=ytr)
    acc = (model.classify(xte).argmax(1) == yte).double().mean().item()
    assert acc > 0.95, acc


def test_synthetic_sources_reference_loglik_matches_hmmlearn():
    """The `hmm_synthetic` source states the generating HMM's test log-likelihood, computed in numpy/scipy
    apart from the family; it must equal hmmlearn's forward algorithm on the same model."""
    from pipeline.data.hmm_synthetic import random_hmm, sample_hmm, true_loglik

    rng = np.random.default_rng(3)
    params = random_hmm(rng)
    x = sample_hmm(params, 6, 12, rng)
    ref = hmmlearn.GaussianHMM(len(params["startprob"]), covariance_type="full", init_params="")
    ref.startprob_, ref.transmat_ = params["startprob"], params["transmat"]
    ref.means_, ref.covars_ = params["means"], params["covars"]
    expected = [ref.score(seq) for seq in x]
    np.testing.assert_allclose(true_loglik(params, x), expected, rtol=1e-10)


# --- semi-supervised Baum-Welch: UNLABELLED training labels (Miller & Uyar 1997; Nigam et al. 2000) -----
def joint_reference(refs, prior: np.ndarray, kind: str):
    """The hmmlearn HMM of the classes' HMMs side by side: 2 N states, start p(c) p(z_1 | c), transitions
    block-diagonal (Baum-Welch keeps the zeros), the classes' emissions."""
    n = 2 * N_STATES
    if kind == "categorical":
        joint = hmmlearn.CategoricalHMM(n, n_features=VOCAB, init_params="", n_iter=10, tol=-np.inf,
                                        emissionprob_prior=1.5)
        joint.emissionprob_ = np.concatenate([r.emissionprob_ for r in refs])
    else:
        joint = hmmlearn.GaussianHMM(n, covariance_type=kind, init_params="", n_iter=10, tol=-np.inf, covars_prior=0.0)
        joint.n_features = DIM
        joint.means_ = np.concatenate([r.means_ for r in refs])
        covars = np.concatenate([r.covars_ for r in refs])
        joint.covars_ = covars if kind == "full" else np.diagonal(covars, axis1=1, axis2=2).copy()
    joint.startprob_ = np.concatenate([p * r.startprob_ for p, r in zip(prior, refs)])
    joint.transmat_ = block_diag(*[r.transmat_ for r in refs])
    return joint


@pytest.mark.parametrize("kind", KINDS)
def test_semi_supervised_with_no_label_is_baum_welch_on_the_joint_hmm(kind):
    """Every label UNLABELLED: semi-supervised EM of the class HMMs (class prior re-estimated) is
    hmmlearn's Baum-Welch on the one HMM of all classes' states from the same start, step by step."""
    refs, x, y = class_data(kind)
    prior = np.array([0.3, 0.7])
    model = ours_from(refs, kind, semi_reg_covar=None)  # the floor of the reference: reg_covar = 0
    model.label_log_prior.copy_(torch.from_numpy(np.log(prior)))
    ours = np.array(fit_em(model, x, max_iter=10, y=torch.full_like(y, -1))) * len(y)

    lengths = sum(CLASS_LENGTHS, [])
    frames = [row[row >= 0].numpy()[:, None] if kind == "categorical" else row[~torch.isnan(row).any(-1)].numpy()
              for row in x]
    joint = joint_reference(refs, prior, kind).fit(np.concatenate(frames), lengths)
    np.testing.assert_allclose(ours, joint.monitor_.history, rtol=1e-8)
    start = np.repeat(model.class_log_prior().exp().numpy(), N_STATES) * model.startprob.numpy()
    np.testing.assert_allclose(start, joint.startprob_, atol=1e-10)
    np.testing.assert_allclose(model.transmat.numpy(), joint.transmat_, atol=1e-10)
    if kind == "categorical":
        np.testing.assert_allclose(model.emission.probs.numpy(), joint.emissionprob_, atol=1e-10)
    else:
        np.testing.assert_allclose(model.emission.means.numpy(), joint.means_, rtol=1e-8)
        covars = covariances_from_precision_cholesky(model.emission.prec_chol, kind).numpy()
        expected = joint.covars_ if kind == "full" else np.diagonal(joint.covars_, axis1=1, axis2=2)
        np.testing.assert_allclose(covars, expected, rtol=1e-8)
    # p(y | x): the joint HMM's posterior mass on each class's states at any step (here the first)
    gamma = joint.predict_proba(np.concatenate(frames), lengths)
    first = np.cumsum([0] + lengths[:-1])
    np.testing.assert_allclose(model.classify(x).exp().numpy(), gamma[first].reshape(-1, 2, N_STATES).sum(2),
                               atol=1e-8)


def test_transition_counts_stay_exact_where_alpha_and_beta_peak_on_unjoined_states():
    """A left-to-right chain 0 -> 1 -> 2 and a sequence whose first frame fits only state 0 and whose
    second fits state 2 best (unreachable in one step) but state 1 only at -1500 nats: the max-shifted
    factors of xi would overflow (exp(1500)); the counts still equal the sum over all state paths of
    p(path | x) times its transitions (brute-force enumeration)."""
    from lightning_modules.hmm import forward_backward as fb

    trans = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    start = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    log_emit = torch.tensor([[[0.0, -2000.0, -2000.0], [-2000.0, -1500.0, 0.0], [-3.0, -1.0, -2.0]]],
                            dtype=torch.float64)
    mask = torch.tensor([[True, True, True]])
    post = fb.forward_backward(start, trans, log_emit, mask)
    paths = list(itertools.product(range(3), repeat=3))
    with np.errstate(divide="ignore"):
        scores = np.array([np.log(start[p[0]]) + sum(np.log(trans[a, b]) for a, b in zip(p, p[1:]))
                           + sum(log_emit[0, t, s].item() for t, s in enumerate(p)) for p in paths])
    weights = np.exp(scores - logsumexp(scores))
    expected = np.zeros((3, 3))
    for w, p in zip(weights, paths):
        for a, b in zip(p, p[1:]):
            expected[a, b] += w
    assert np.isfinite(post.trans_counts.numpy()).all()
    np.testing.assert_allclose(post.trans_counts.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(post.loglik.item(), logsumexp(scores), rtol=1e-12)


# --- numerics and starts --------------------------------------------------------------------------------
def test_forward_is_exact_where_the_best_source_cannot_reach_the_destination():
    """A chain 0 -> {0, 1}, 1 -> {1, 2}, 2 -> 2 whose first frame favours state 0 by 800 nats over state 1,
    and whose second fits only state 2, reachable from 1 alone: one max shift over the sources (state 0's)
    underflowed state 2's alpha to 0 (log p(x) -2001.9 against -801.9, a NaN-free but all-wrong gamma and
    infinite counts). With one chain, per-sequence chains and K chains side by side, log p(x), gamma, the
    transition counts and the Viterbi path equal the enumeration over all state paths."""
    from lightning_modules.hmm import forward_backward as fb

    start = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    trans = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    log_emit = torch.tensor([[[0.0, -800.0, -2000.0], [-2000.0, -2000.0, 0.0], [-1.0, -2.0, -0.5]]],
                            dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    paths = list(itertools.product(range(3), repeat=3))
    with np.errstate(divide="ignore"):
        scores = np.array([np.log(start[p[0]]) + sum(np.log(trans[a, b]) for a, b in zip(p, p[1:]))
                           + sum(log_emit[0, t, s].item() for t, s in enumerate(p)) for p in paths])
    ll = logsumexp(scores)
    weights = np.exp(scores - ll)
    gamma, counts = np.zeros((3, 3)), np.zeros((3, 3))
    for w, p in zip(weights, paths):
        gamma[range(3), p] += w
        for a, b in zip(p, p[1:]):
            counts[a, b] += w
    assert abs(ll - (-801.886)) < 1e-3
    for post in (fb.forward_backward(start, trans, log_emit, mask),
                 fb.forward_backward(start[None], trans[None], log_emit, mask)):
        np.testing.assert_allclose(post.loglik.item(), ll, rtol=1e-12)
        np.testing.assert_allclose(post.gamma[0].numpy(), gamma, atol=1e-12)
        np.testing.assert_allclose(post.trans_counts.reshape(3, 3).numpy(), counts, atol=1e-12)
    # K = 2 chains side by side: this one, and one that explains the frames far better
    easy = torch.full((3,), -1.0, dtype=torch.float64).expand(1, 3, 3)
    both = fb.loglik(torch.stack([start, torch.full((3,), 1 / 3, dtype=torch.float64)]),
                     torch.stack([trans, torch.full((3, 3), 1 / 3, dtype=torch.float64)]),
                     torch.stack([log_emit, easy], 2), mask)
    np.testing.assert_allclose(both[0, 0].item(), ll, rtol=1e-12)
    path, score = fb.viterbi(start, trans, log_emit, mask)
    np.testing.assert_array_equal(path[0].numpy(), paths[int(np.argmax(scores))])
    np.testing.assert_allclose(score.item(), scores.max(), rtol=1e-12)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_an_uninitialised_gaussian_hmm_is_a_normalised_density(covariance_type):
    """Before any data, each state's emission is N(0, I) (the precision Cholesky factor the identity, not a
    matrix of ones, which is singular: no density), so the HMM of identical states is the i.i.d. N(0, I)."""
    model = HMM({"n_states": 3, "covariance_type": covariance_type}, {"shape": (4, DIM), "kind": "sequence"})
    x = torch.from_numpy(np.random.default_rng(0).normal(scale=2.0, size=(5, 4, DIM)))
    reference = multivariate_normal(np.zeros(DIM), np.eye(DIM)).logpdf(x.numpy())  # (5, 4)
    np.testing.assert_allclose(model.emission.log_prob(x.reshape(-1, DIM)).numpy(),
                               np.repeat(reference.reshape(-1, 1), 3, 1), rtol=1e-12)
    np.testing.assert_allclose(model.log_prob(x).numpy(), reference.sum(1), rtol=1e-12)


def test_categorical_start_is_seeded_random_and_keeps_the_topology():
    """Categorical emissions and transitions start from seeded random rows (the same for the same seed);
    the transitions only where the topology allows them, within each class's block."""
    info = {"shape": (6,), "kind": "sequence", "vocab_size": VOCAB, "num_classes": 2}
    x = torch.from_numpy(np.random.default_rng(0).integers(0, VOCAB, size=(20, 6)))
    y = torch.arange(20) % 2

    def started(seed):
        model = HMM({"n_states": 4, "seed": seed, "conditional": True, "topology": "left_to_right"}, info)
        allowed = model.transmat > 0
        model.set_class_prior(y)
        model.initialize(x, y)
        return model, allowed

    (a, allowed), (b, _), (c, _) = started(0), started(0), started(1)
    assert torch.equal(a.transmat, b.transmat) and torch.equal(a.emission.probs, b.emission.probs)
    assert not torch.equal(a.transmat, c.transmat) and not torch.equal(a.emission.probs, c.emission.probs)
    assert torch.equal(a.transmat > 0, allowed)  # block-diagonal, left to right
    np.testing.assert_allclose(a.transmat.sum(1).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(a.emission.probs.sum(1).numpy(), 1.0, rtol=1e-12)
    assert a.transmat[allowed].std() > 0.05 and a.emission.probs.std(0).min() > 1e-3  # the states differ


def test_categorical_hmm_leaves_the_unigram_plateau_on_text():
    """16 states from the random start on 1500 `text` sequences: 10 Baum-Welch steps reach a test perplexity
    far below the smoothed unigram's (27.4; 15.4 here), so the states learnt something temporal. From uniform
    transitions and copies of the unigram jittered by U(0.5, 1.5) they stayed at the unigram's (27.4). (The
    token default, the bigram start, is in tests/test_hmm_tokens.py.)"""
    from pipeline.config import DataConfig
    from pipeline.data.sources import load_source

    p = load_source(DataConfig(dataset="text", seed=0))
    xtr, xte = (torch.from_numpy(p.splits[s][0]) for s in ("train", "test"))
    xtr = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[:1500]]
    counts = torch.bincount(xtr[xtr >= 0], minlength=p.info.vocab_size).double() + 1e-2
    tokens = int((xte >= 0).sum())
    unigram = math.exp(-(counts / counts.sum()).log()[xte[xte >= 0]].sum().item() / tokens)
    model = HMM({"n_states": 16, "init": "random"}, p.info.to_dict())
    fit_em(model, xtr, max_iter=10)
    perplexity = math.exp(-model.log_prob(xte).sum().item() / tokens)
    assert perplexity < 20 and perplexity < 0.75 * unigram, (perplexity, unigram)
