"""P(X, Y) in the contract and the pipeline's label metrics.

A small exact family written here, Gaussian naive Bayes (class-conditional independent Gaussians), runs the
contract's defaults (class prior from counts, Bayes rule, marginal, label sampling); scikit-learn's GaussianNB
is the independent reference. The label metrics (gen_class_acc, cond_acc, CAS) are checked on digits with
models whose answer is known: one that returns real images of the requested class, and one that ignores it.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB

from lightning_modules.contract import Conditional, DataInfo, GenerativeModel
from pipeline.evaluation.conditional import (classification_accuracy_score, conditional_metrics,
                                             real_data_baselines)
from pipeline.evaluation.scoring import held_out_log_likelihoods
from pipeline.stages.train import resolve_conditional

DIGITS_INFO = DataInfo(shape=(1, 8, 8), kind="image", levels=17, num_classes=10)


class NaiveBayes(GenerativeModel):
    """p(x | y) = prod_d N(x_d; mu_yd, var_yd), fitted in closed form; `log_prob` and `sample` use the contract's
    defaults for everything else."""

    family = "naive_bayes"
    log_prob_kind = "exact"

    @dataclass
    class Config:
        seed: int = 0
        max_epochs: int = 1
        conditional: Conditional = "auto"
        var_smoothing: float = 1e-9  # as scikit-learn: epsilon times the largest variance is added

    def fit(self, x, y):
        x = x.flatten(1).double()
        self.mu = torch.stack([x[y == c].mean(0) for c in range(self.num_classes)])
        var = torch.stack([x[y == c].var(0, unbiased=False) for c in range(self.num_classes)])
        self.var = var + self.config.var_smoothing * x.var(0, unbiased=False).max()
        self.set_class_prior(y)
        return self

    def class_log_likelihoods(self, x):
        x = x.flatten(1).double()[:, None]
        return (-0.5 * ((x - self.mu) ** 2 / self.var + torch.log(2 * torch.pi * self.var))).sum(-1)

    def log_prob(self, x, y=None):
        self.no_labels_unless_conditional(y)
        if y is None:
            return self.marginal_log_prob(x)
        return self.class_log_likelihoods(x).gather(1, y[:, None]).squeeze(1)

    def sample(self, n, y=None):
        y = self.sample_labels(n, y)
        x = self.mu[y] + self.var[y].sqrt() * torch.randn(n, self.mu.shape[1], dtype=torch.float64)
        return self.to_data_space(x.float().reshape(n, *self.info.shape))


class RealImages(NaiveBayes):
    """Samples are real training images of the requested class (a perfect generator of that set); with
    `obeys=False` the requested class is ignored. No likelihood."""

    log_prob_kind = None

    def __init__(self, cfg, info, x, y, obeys=True):
        super().__init__(cfg, info)
        self.x, self.y, self.obeys = x, y, obeys

    def sample(self, n, y=None):
        y = self.sample_labels(n, y)
        if not self.obeys:
            y = torch.randint(0, self.num_classes, (n,))
        return torch.stack([self.x[self.y == c][i % int((self.y == c).sum())] for i, c in enumerate(y.tolist())])


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target)
    rng = np.random.default_rng(0)
    order = torch.as_tensor(rng.permutation(len(x)))
    tr, te = order[:1200], order[1200:]
    return (x[tr], y[tr]), (x[te], y[te])


def _sklearn_nb(x, y):
    return GaussianNB(var_smoothing=1e-9).fit(x.flatten(1).double().numpy(), y.numpy())


def test_bayes_rule_prior_and_marginal_equal_sklearn_gaussian_nb(digits):
    (xtr, ytr), (xte, _) = digits
    model = NaiveBayes({}, DIGITS_INFO.to_dict()).fit(xtr, ytr)
    ref = _sklearn_nb(xtr, ytr)
    xt = xte.flatten(1).double().numpy()
    np.testing.assert_allclose(model.class_log_prior().numpy(), np.log(ref.class_prior_), rtol=1e-12)
    np.testing.assert_allclose(model.classify(xte).numpy(), ref.predict_log_proba(xt), atol=1e-6)
    joint = ref.predict_joint_log_proba(xt)
    np.testing.assert_allclose(model.class_log_joint(xte).numpy(), joint, rtol=1e-9)
    np.testing.assert_allclose(model.log_prob(xte).numpy(), logsumexp(joint, axis=1), rtol=1e-9)


def test_marginal_is_the_prior_weighted_sum_of_the_conditionals(digits):
    (xtr, ytr), (xte, _) = digits
    model = NaiveBayes({}, DIGITS_INFO.to_dict()).fit(xtr, ytr)
    per_class = [model.log_prob(xte, torch.full((len(xte),), c)) + model.class_log_prior()[c] for c in range(10)]
    np.testing.assert_allclose(model.log_prob(xte).numpy(), torch.logsumexp(torch.stack(per_class, 1), 1).numpy(),
                               rtol=1e-12)


def test_pyfunc_forward_is_the_class_posterior(digits):
    (xtr, ytr), (xte, _) = digits
    model = NaiveBayes({}, DIGITS_INFO.to_dict()).fit(xtr, ytr)
    probs = model(xte[:5])
    assert probs.shape == (5, 10)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, rtol=1e-9)


def test_sample_labels_follow_the_request_and_the_prior():
    model = NaiveBayes({}, DIGITS_INFO.to_dict())
    y = torch.tensor([0] * 700 + [3] * 300)
    model.set_class_prior(y)
    assert model.class_log_prior()[1].item() == -np.inf  # a class with no training example is never drawn
    assert model.sample_labels(4, 7).tolist() == [7] * 4
    assert model.sample_labels(2, torch.tensor([1, 2])).tolist() == [1, 2]
    torch.manual_seed(0)
    drawn = model.sample_labels(20000)
    assert set(drawn.unique().tolist()) == {0, 3}
    assert abs((drawn == 3).float().mean().item() - 0.3) < 0.015  # 5 binomial standard deviations
    for bad in (10, -1, torch.tensor([0, 1, 2])):
        with pytest.raises(ValueError, match="0..9"):
            model.sample_labels(2, bad)


def test_an_unconditional_model_refuses_labels():
    model = NaiveBayes({"conditional": False}, DIGITS_INFO.to_dict())
    assert not model.conditional and not model.can_classify() and model.num_classes is None
    with pytest.raises(ValueError, match="without labels"):
        model.sample_labels(3, 1)
    with pytest.raises(NotImplementedError, match="cannot classify"):
        model.classify(torch.zeros(2, 1, 8, 8))


def test_conditional_true_on_unlabelled_data_names_the_key():
    from lightning_modules.contract import ConfigError

    with pytest.raises(ConfigError, match="no labels") as e:
        NaiveBayes({"conditional": True}, DataInfo(shape=(2,), kind="vector").to_dict())
    assert e.value.key == "conditional"


@pytest.mark.parametrize("value, labels, expected", [
    ("auto", [0, 1, 2], True),
    ("auto", [0, 2, 2], False),  # class 1 held out of training: no model of it can be fitted
    (False, [0, 1, 2], False),
    (True, [0, 2, 2], True),
])
def test_auto_is_conditional_when_every_class_has_training_examples(value, labels, expected):
    info = DataInfo(shape=(2,), kind="vector", num_classes=3)
    assert resolve_conditional({"conditional": value}, info, torch.tensor(labels))["conditional"] is expected
    unlabelled = DataInfo(shape=(2,), kind="vector")
    assert resolve_conditional({"conditional": "auto"}, unlabelled, torch.tensor(labels))["conditional"] is False


FCFG = SimpleNamespace(max_epochs=15, batch_size=128, lr=2e-3, feature_dim=64)
ECFG = SimpleNamespace(seed=0, batch_size=256)


def _logistic_judge(xtr, ytr):
    """An independent classifier of real digits (scikit-learn) that judges whether samples obey their label."""
    clf = LogisticRegression(max_iter=3000).fit(xtr.flatten(1).numpy(), ytr.numpy())
    return lambda x: torch.as_tensor(clf.predict_log_proba(x.flatten(1).numpy()))


def test_label_metrics_of_a_perfect_and_a_label_blind_generator(digits):
    (xtr, ytr), test = digits
    judge = _logistic_judge(xtr, ytr)
    real = real_data_baselines((xtr, ytr), test, "image", 10, FCFG, ECFG)
    assert real["logreg_acc"] > 0.9 and real["cas"] > 0.9
    perfect = RealImages({}, DIGITS_INFO.to_dict(), xtr, ytr)
    perfect.set_class_prior(ytr)
    m, samples, labels = conditional_metrics(perfect, "image", ytr, test, judge, FCFG, ECFG)
    assert len(samples) == len(labels) == len(ytr)
    assert torch.equal(torch.bincount(labels), torch.bincount(ytr))  # N and the label counts of the training set
    assert m["cond_acc"] > 0.95
    assert abs(m["cas"] - real["cas"]) < 0.03  # the same images in another order: the real-data CAS
    blind = RealImages({}, DIGITS_INFO.to_dict(), xtr, ytr, obeys=False)
    blind.set_class_prior(ytr)
    m, _, _ = conditional_metrics(blind, "image", ytr, test, judge, FCFG, ECFG)
    assert m["cond_acc"] < 0.2 and m["cas"] < 0.3  # chance is 0.1


def test_held_out_likelihoods_and_gen_class_acc_equal_sklearns_bayes_classifier(digits):
    (xtr, ytr), (xte, yte) = digits
    model = NaiveBayes({}, DIGITS_INFO.to_dict()).fit(xtr, ytr)
    log_p, m = held_out_log_likelihoods(model, xte, yte, 100)
    ref = _sklearn_nb(xtr, ytr)
    xt = xte.flatten(1).double().numpy()
    expected = (ref.predict(xt) == yte.numpy()).mean()
    assert m == {"gen_class_acc": pytest.approx(expected, abs=1e-12)}
    np.testing.assert_allclose(log_p.numpy(), logsumexp(ref.predict_joint_log_proba(xt), axis=1), rtol=1e-9)


def test_cas_is_deterministic(digits):
    (xtr, ytr), test = digits
    small = SimpleNamespace(**{**vars(FCFG), "max_epochs": 2})
    a = classification_accuracy_score(xtr, ytr, test, 10, small, 0, 256)
    b = classification_accuracy_score(xtr, ytr, test, 10, small, 0, 256)
    assert a == b


@pytest.mark.parametrize("prior, n", [([0.5, 0.5], 7), ([0.1, 0.0, 0.6, 0.3], 1000), ([1.0], 5),
                                      ([0.07, 0.13, 0.11, 0.09, 0.1, 0.1, 0.12, 0.08, 0.1, 0.1], 1258), ([1 / 3] * 3, 100)])
def test_proportional_labels_have_the_priors_counts_in_a_random_order(prior, n):
    from pipeline.evaluation.conditional import proportional_labels

    prior = torch.tensor(prior, dtype=torch.float64)
    labels = proportional_labels(prior, n, torch.Generator().manual_seed(0))
    counts = np.bincount(labels.numpy(), minlength=len(prior))
    assert counts.sum() == n and len(labels) == n
    assert np.all(np.abs(counts - n * prior.numpy()) < 1)  # each count is n p(y) rounded up or down
    assert np.all(counts[prior.numpy() == 0] == 0)
    if len(prior) > 1 and n > 10:
        assert not torch.equal(labels, labels.sort().values)  # shuffled, so every batch mixes the classes
