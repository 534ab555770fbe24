"""Semi-supervised EM shared by the GMM and HMM families (`lightning_modules.common.semi_supervised`): one
label per class on a toy set that the labelled examples alone classify badly, the guessed labels of the
initialisation, and its subsample. The families' exact EM steps against scikit-learn and hmmlearn (every
label kept, none kept) are in tests/test_gmm.py and tests/test_hmm.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestCentroid

from lightning_modules.common.em import fit_em
from lightning_modules.common.semi_supervised import impute_labels
from lightning_modules.contract import UNLABELLED
from lightning_modules.gmm import GMM
from lightning_modules.hmm import HMM
from pipeline.data.labelled import hide_labels, select_labelled

TOY_INFO = {"shape": (2,), "kind": "vector", "num_classes": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def broad_and_tight(n: int = 1000, seed: int = 0):
    """Two well-separated classes of different spread: N((0, 0), 4^2 I) and N((10, 0), 0.3^2 I)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0.0, 4.0, (n, 2)), rng.normal(0.0, 0.3, (n, 2)) + [10.0, 0.0]])
    return x, np.repeat([0, 1], n)


@pytest.mark.parametrize("family, cfg", [(GMM, {}), (HMM, {"n_states": 2})])
def test_one_label_per_class_reaches_99_percent_where_the_labelled_examples_alone_cannot(family, cfg):
    """With one label per class, the labelled examples' nearest centroid (scikit-learn) puts the boundary
    halfway between two points and misclassifies the broad class's tail; semi-supervised EM learns both
    classes' spreads from the unlabelled examples and reaches the near-Bayes boundary (the HMM sees a
    vector as 2 steps of one coordinate: per-class independent Gaussians, enough here)."""
    x, y = broad_and_tight()
    labelled = select_labelled(y, 1, 2, seed=0)
    visible = torch.from_numpy(hide_labels(y, labelled))
    baseline = NearestCentroid().fit(x[labelled], y[labelled]).score(x, y)

    model = family({"conditional": True, **cfg}, TOY_INFO)
    model.set_class_prior(visible)
    fit_em(model, torch.from_numpy(x), max_iter=50, tol=1e-6, y=visible)
    accuracy = (model.classify(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert baseline < 0.99 and accuracy >= 0.99, (baseline, accuracy)
    np.testing.assert_allclose(model.class_log_prior().exp().numpy(), [0.5, 0.5], atol=0.01)  # re-estimated


def test_guessed_labels_keep_the_given_ones_and_read_no_hidden_one():
    x, y = broad_and_tight(200)
    visible = torch.from_numpy(hide_labels(y, select_labelled(y, 1, 2, seed=0)))
    features = torch.from_numpy(x)
    guessed = impute_labels(features, visible, 2, reg_covar=1e-2, seed=0)
    known = visible != UNLABELLED
    assert torch.equal(guessed[known], visible[known]) and (guessed >= 0).all()
    assert (guessed.numpy() == y).mean() >= 0.95
    assert torch.equal(impute_labels(features, torch.from_numpy(y), 2, 1e-2, seed=0), torch.from_numpy(y))


def test_initialisation_subsample_holds_every_labelled_example():
    """init_subsample smaller than the training set: with UNLABELLED labels the labelled examples come
    first, so each class's labelled examples start it; with all labels the seeded draw is unchanged."""
    x, y = broad_and_tight(500)
    visible = torch.from_numpy(hide_labels(y, select_labelled(y, 3, 2, seed=1)))
    model = GMM({"conditional": True, "init_subsample": 50}, TOY_INFO)
    model.provide_init_data(torch.from_numpy(x), visible)
    idx = model._init_subsample(len(x))
    assert len(idx) == 50 and set(np.flatnonzero(visible.numpy() >= 0)) <= set(idx.tolist())
    model.provide_init_data(torch.from_numpy(x), torch.from_numpy(y))
    assert torch.equal(model._init_subsample(len(x)), torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:50])
